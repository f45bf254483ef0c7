"""The case page's evidence in plain words: what each detector said, what the provenance
signals found (the details a moderator weighs, picked out of each finding's stored JSON),
where the bytes were seen, and the case's history.

Everything here reads stored JSON that came, in part, from the file itself: values are
turned into bounded text, and the templates escape them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from db.models import AuditEvent, ReviewDecision, Source
from workers.review import CaseView, DetectorEvidence

_MAX_TEXT = 2000
_MAX_ITEMS = 12

# The details shown under a finding, in this order, when the finding has them.
DETAIL_LABELS: tuple[tuple[str, str], ...] = (
    ("signer", "Signed by"),
    ("validity", "Signature validity"),
    ("claim_generator", "Claim generator"),
    ("actions", "Actions"),
    ("source_type", "IPTC digital source type"),
    ("creator_tool", "Creator tool"),
    ("ai_system_used", "AI system named"),
    ("generator", "Generator"),
    ("model", "Model"),
    ("settings", "Settings"),
    ("prompt", "Prompt"),
    ("watermark", "Watermark"),
    ("p_value", "p-value against chance"),
)

ACTION_NAMES: Mapping[str, str] = {
    "review_case.opened": "opened",
    "review_case.reopened": "reopened",
    "review_case.withdrawn": "withdrawn",
    "review_case.claimed": "claimed",
    "review_case.released": "released",
    "review_case.lease_expired": "lease ran out",
    "review_case.decided": "decided",
    "review_case.escalated": "escalated to admins",
    "review_case.second_review": "sent to a blind second review",
}


@dataclass(frozen=True)
class Detail:
    label: str
    value: str


@dataclass(frozen=True)
class FindingView:
    kind: str
    ai: bool
    summary: str
    details: list[Detail]


@dataclass(frozen=True)
class DetectorView:
    name: str
    version: str
    weights_sha256: str | None
    score: float | None
    error: str | None
    summary: str | None
    findings: list[FindingView]
    problems: list[str]


@dataclass(frozen=True)
class SourceView:
    kind: str
    place: str
    first_seen: datetime
    last_seen: datetime
    times_seen: int


@dataclass(frozen=True)
class HistoryRow:
    at: datetime
    actor: str
    action: str
    from_state: str | None
    to_state: str | None
    decision: ReviewDecision | None


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def _last_segment(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def _signer(value: Mapping[str, Any]) -> str:
    issuer, common_name = value.get("issuer"), value.get("common_name")
    name = issuer or common_name or "an unnamed signer"
    if issuer and common_name and issuer != common_name:
        name = f"{issuer} ({common_name})"
    when = value.get("time")
    return f"{name}, signed {when}" if when else str(name)


def _action(value: Mapping[str, Any]) -> str:
    text = str(value.get("action") or "an action")
    if value.get("software_agent"):
        text += f" by {value['software_agent']}"
    if value.get("digital_source_type"):
        text += f" ({_last_segment(str(value['digital_source_type']))})"
    return text


def detail_text(key: str, value: Any) -> str | None:
    """One detail of a finding as a line of text; None when there is nothing to show."""
    if value is None or value in ("", [], {}):
        return None
    if key == "signer" and isinstance(value, Mapping):
        return _clip(_signer(value))
    if key == "actions" and isinstance(value, list):
        shown = [_action(a) for a in value[:_MAX_ITEMS] if isinstance(a, Mapping)]
        more = len(value) - len(shown)
        return _clip("; ".join(shown) + (f"; and {more} more" if more > 0 else ""))
    if key == "p_value" and isinstance(value, int | float) and math.isfinite(value):
        return f"{value:.3g}"
    if isinstance(value, Mapping):
        pairs = list(value.items())[:_MAX_ITEMS]
        return _clip("; ".join(f"{k}: {v}" for k, v in pairs))
    if isinstance(value, list):
        return _clip(", ".join(str(v) for v in value[:_MAX_ITEMS]))
    return _clip(str(value))


def finding_view(finding: Mapping[str, Any]) -> FindingView:
    details = finding.get("details")
    shown: list[Detail] = []
    if isinstance(details, Mapping):
        for key, label in DETAIL_LABELS:
            text = detail_text(key, details.get(key))
            if text is not None:
                shown.append(Detail(label, text))
    return FindingView(
        kind=str(finding.get("kind") or "finding"),
        ai=bool(finding.get("ai")),
        summary=_clip(str(finding.get("summary") or "")),
        details=shown,
    )


def detector_view(evidence: DetectorEvidence) -> DetectorView:
    return DetectorView(
        name=evidence.name,
        version=evidence.version,
        weights_sha256=evidence.weights_sha256,
        score=evidence.score,
        error=evidence.error,
        summary=evidence.summary,
        findings=[finding_view(f) for f in evidence.findings],
        problems=evidence.problems,
    )


def place_of(source: Source) -> str:
    """Where the bytes were seen, as an operator names it: never a link into a bucket."""
    if source.bucket and source.object_key:
        return f"s3://{source.bucket}/{source.object_key}"
    return source.local_path or source.ref_key


def source_view(source: Source) -> SourceView:
    return SourceView(
        kind=source.kind.value,
        place=place_of(source),
        first_seen=source.created_at,
        last_seen=source.last_seen_at,
        times_seen=source.seen_count,
    )


def history_row(event: AuditEvent) -> HistoryRow:
    details = event.details if isinstance(event.details, Mapping) else {}
    decision = details.get("decision")
    try:
        chosen = ReviewDecision(decision) if decision else None
    except ValueError:
        chosen = None
    from_state, to_state = details.get("from_state"), details.get("to_state")
    return HistoryRow(
        at=event.at,
        actor=event.actor,
        action=ACTION_NAMES.get(event.action, event.action),
        from_state=str(from_state) if from_state else None,
        to_state=str(to_state) if to_state else None,
        decision=chosen,
    )


@dataclass(frozen=True)
class CasePresentation:
    detectors: list[DetectorView]
    sources: list[SourceView]
    history: list[HistoryRow]
    reasons: list[tuple[str, str]]  # (which verdict, its reasoning)


def present(view: CaseView) -> CasePresentation:
    reasons: list[tuple[str, str]] = []
    if view.current is not None:
        reasons.append(("Current verdict", view.current.reason))
    if view.current is None or view.opened_by.reason != view.current.reason:
        reasons.append(("Verdict that opened the case", view.opened_by.reason))
    return CasePresentation(
        detectors=[detector_view(d) for d in view.detectors],
        sources=[source_view(s) for s in view.sources],
        history=[history_row(e) for e in view.history],
        reasons=reasons,
    )


def signal_groups(signals: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """A queue row's signals as (label, value) tags: detectors that fired, provenance kinds
    found, kinds of source."""
    names = {"detector": "fired", "provenance": "provenance", "source": "source"}
    return [(names.get(kind, kind), value) for kind, value in signals]
