"""Results as their readers see them: one outcome per input, in the shape ``scan --json``
and ``status --json`` print (and the API will answer).

Statuses and labels are the enums the models define: an outcome's ``status`` is the
source's (``scored``, ``rejected``, ``pending``) and its ``verdict`` the ensemble's label;
a rejected or pending outcome has no verdict, and prints its status in that field.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from db import repository
from db.models import (
    Detection,
    ReviewDecision,
    ReviewState,
    Source,
    SourceStatus,
    Verdict,
    VerdictLabel,
)


@dataclass(frozen=True)
class DetectorReport:
    name: str
    version: str
    weights_sha256: str | None
    score: float | None
    evidence: dict[str, Any]
    latency_ms: float | None
    error: str | None
    reused: bool

    @classmethod
    def from_row(cls, row: Detection, *, reused: bool) -> DetectorReport:
        return cls(
            name=row.detector_name,
            version=row.detector_version,
            weights_sha256=row.weights_sha256,
            score=row.score,
            evidence=row.evidence,
            latency_ms=row.latency_ms,
            error=row.error,
            reused=reused,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "weights_sha256": self.weights_sha256,
            "score": self.score,
            "evidence": self.evidence,
            "latency_ms": self.latency_ms,
            "error": self.error,
            "reused": self.reused,
        }


@dataclass(frozen=True)
class VerdictSummary:
    id: int
    label: VerdictLabel
    ai_score: float | None
    flagged: bool
    ensemble_version: str

    @classmethod
    def of(cls, verdict: Verdict) -> VerdictSummary:
        return cls(
            id=verdict.id,
            label=verdict.label,
            ai_score=verdict.ai_score,
            flagged=verdict.flagged,
            ensemble_version=verdict.ensemble_version,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label.value,
            "ai_score": self.ai_score,
            "flagged": self.flagged,
            "ensemble_version": self.ensemble_version,
        }


@dataclass(frozen=True)
class ReviewSummary:
    """The image's review case: its state, the moderator's decision once there is one, the
    verdict that opened it and the image's current verdict (they differ after a re-score
    under another ensemble configuration)."""

    state: ReviewState
    decision: ReviewDecision | None
    opened_by: VerdictSummary
    current: VerdictSummary | None

    @classmethod
    def of(cls, found: repository.CaseVerdicts) -> ReviewSummary:
        return cls(
            state=found.case.state,
            decision=found.case.decision,
            opened_by=VerdictSummary.of(found.opened_by),
            current=VerdictSummary.of(found.current) if found.current is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "decision": self.decision.value if self.decision is not None else None,
            "opened_by": self.opened_by.to_json(),
            "current": self.current.to_json() if self.current is not None else None,
        }


@dataclass(frozen=True)
class ScanOutcome:
    """One input's result."""

    path: str  # printable (see workers.names); path_bytes: the exact bytes when it differs
    sha256: str | None
    status: SourceStatus
    reason: str | None = None
    message: str | None = None
    ai_score: float | None = None
    flagged: bool = False
    verdict: VerdictLabel | None = None
    verdict_reason: str | None = None
    ensemble_version: str | None = None
    detectors: list[DetectorReport] = field(default_factory=list)
    image: dict[str, Any] | None = None
    review: ReviewSummary | None = None
    path_bytes: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "path_bytes": self.path_bytes,
            "sha256": self.sha256,
            "status": self.status.value,
            "reason": self.reason,
            "message": self.message,
            "ai_score": self.ai_score,
            "flagged": self.flagged,
            "verdict": (self.verdict or self.status).value,
            "verdict_reason": self.verdict_reason,
            "ensemble_version": self.ensemble_version,
            "image": self.image,
            "detectors": [d.to_json() for d in self.detectors],
            "review": self.review.to_json() if self.review is not None else None,
        }


def rejected_outcome(
    path: str,
    sha256: str | None,
    reason: str,
    message: str,
    *,
    verdict: Verdict | None = None,
    review: ReviewSummary | None = None,
) -> ScanOutcome:
    """The outcome of an upload refused before any detector saw it: its verdict is "not
    scored", with the reason; ``verdict`` is the stored one when bytes were read (it says
    whether the refusal was sent to review), and ``review`` the image's case if any."""
    return ScanOutcome(
        path=path,
        sha256=sha256,
        status=SourceStatus.REJECTED,
        reason=reason,
        message=message,
        verdict=VerdictLabel.NOT_SCORED,
        flagged=verdict.flagged if verdict is not None else False,
        verdict_reason=verdict.reason
        if verdict is not None
        else f"not scored ({reason}): {message}",
        ensemble_version=verdict.ensemble_version if verdict is not None else None,
        review=review,
    )


def review_of(session: Session, image_id: int, *, active_ensemble: str) -> ReviewSummary | None:
    """The image's review case beside its current verdict under ``active_ensemble``."""
    found = repository.with_verdicts(session, image_id, ensemble_version=active_ensemble)
    return ReviewSummary.of(found) if found is not None else None


def pending_outcome(path: str, sha256: str | None) -> ScanOutcome:
    return ScanOutcome(
        path=path,
        sha256=sha256,
        status=SourceStatus.PENDING,
        message="the scan has not finished",
    )


def image_summary(
    format: str | None,
    width: int | None,
    height: int | None,
    anomalies: Sequence[str] | None = None,
) -> dict[str, Any]:
    """What the outcome says of the image: its format and size, and what the decoder
    stepped over to read it (``anomalies``: damaged ancillary chunks skipped, ...)."""
    return {"format": format, "width": width, "height": height, "anomalies": list(anomalies or [])}


def reviews_of(
    session: Session, image_ids: Iterable[int], *, active_ensemble: str
) -> dict[int, ReviewSummary]:
    """``review_of`` several images at once, by image id (images without a case left out)."""
    found = repository.with_verdicts_of(session, image_ids, ensemble_version=active_ensemble)
    return {image_id: ReviewSummary.of(one) for image_id, one in found.items()}


def scored_outcome(
    path: str,
    sha256: str,
    verdict: Verdict,
    reports: list[DetectorReport],
    *,
    image: dict[str, Any],
    review: ReviewSummary | None,
) -> ScanOutcome:
    """The outcome of a scored input: ``verdict`` with the detector reports behind it, and
    the image's review case as it stands now (``review_of``: beside its current verdict
    under the active ensemble configuration)."""
    return ScanOutcome(
        path=path,
        sha256=sha256,
        status=SourceStatus.SCORED,
        ai_score=verdict.ai_score,
        flagged=verdict.flagged,
        verdict=verdict.label,
        verdict_reason=verdict.reason,
        ensemble_version=verdict.ensemble_version,
        detectors=reports,
        image=image,
        review=review,
    )


def status_of(
    session: Session, bucket: str, key: str, *, active_ensemble: str
) -> list[ScanOutcome]:
    """Every recorded upload of ``s3://bucket/key``. A scored one shows the image's current
    verdict (the newest under ``active_ensemble``, a version), or, when the image was never
    scored under that configuration, the newest verdict it has, whose version says so."""
    path = f"s3://{bucket}/{key}"
    return [
        source_outcome(session, source, path, active_ensemble=active_ensemble)
        for source in repository.sources_by_object(session, bucket, key)
    ]


def source_outcome(
    session: Session, source: Source, path: str, *, active_ensemble: str
) -> ScanOutcome:
    """What became of one recorded upload (see ``status_of``)."""
    image = repository.get_image(session, source.image_id) if source.image_id else None
    sha256 = image.sha256 if image is not None else None
    verdict = None
    if image is not None and source.status != SourceStatus.PENDING:
        verdict = repository.current_verdict(
            session, image.id, ensemble_version=active_ensemble
        ) or repository.latest_verdict(session, image.id)
    if source.status == SourceStatus.REJECTED:
        # The "not scored" verdict of these bytes; a score another upload of the same
        # bytes earned is that upload's, not this one's.
        unscored = verdict if verdict and verdict.label == VerdictLabel.NOT_SCORED else None
        return rejected_outcome(
            path,
            sha256,
            source.reject_reason or "",
            source.reject_message or "",
            verdict=unscored,
            review=review_of(session, image.id, active_ensemble=active_ensemble)
            if image is not None
            else None,
        )
    if image is None or verdict is None:
        return pending_outcome(path, sha256)
    versions = {d["name"]: d["version"] for d in verdict.detector_set.get("detectors", [])}
    rows = repository.detections_by_version(session, image.id, versions)
    reports = [DetectorReport.from_row(rows[name], reused=False) for name in sorted(rows)]
    return scored_outcome(
        path,
        image.sha256,
        verdict,
        reports,
        image=image_summary(image.format, image.width, image.height, image.anomalies),
        review=review_of(session, image.id, active_ensemble=active_ensemble),
    )
