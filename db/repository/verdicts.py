"""Ensemble configurations and the verdicts stored under them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Ensemble, ReviewCase, Verdict, VerdictLabel, utcnow
from db.repository._sql import insert_ignore, insert_ignore_rows
from db.repository.audit import append_audits
from db.repository.review import cases_for_images, follow_verdicts


@dataclass(frozen=True)
class EnsembleRecord:
    """An ensemble configuration as stored: its version, digest and canonical definition."""

    version: str
    digest: str
    definition: dict[str, Any]


@dataclass(frozen=True)
class VerdictRecord:
    ensemble_id: int  # a registered configuration (register_ensemble)
    ensemble_version: str
    detector_set_digest: str
    detector_set: dict[str, Any]
    ai_score: float | None
    label: VerdictLabel
    flagged: bool
    reason: str


class EnsembleVersionClash(RuntimeError):
    """Two different configurations share a version (a digest prefix): refuse to mix them."""


def register_ensemble(session: Session, record: EnsembleRecord) -> Ensemble:
    """The stored row of this configuration, written the first time it is seen. Run it in
    a transaction of its own, before any that stores verdicts under the configuration: a
    verdict transaction holds an image's row lock, and must not also wait on another
    transaction's new configuration row."""
    insert_ignore(
        session,
        Ensemble,
        {
            "version": record.version,
            "digest": record.digest,
            "definition": record.definition,
            "created_at": utcnow(),
        },
    )
    row = session.execute(
        select(Ensemble).where(Ensemble.digest == record.digest)
    ).scalar_one_or_none()
    if row is None or row.version != record.version:
        raise EnsembleVersionClash(
            f"ensemble version {record.version} is already stored for another configuration"
        )
    return row


def save_verdict(
    session: Session, image_id: int, record: VerdictRecord, *, actor: str, active: bool = True
) -> tuple[Verdict, bool]:
    """Store a verdict once per (image, ensemble configuration, detector set) and bring the
    image's review case in line with it (see ``review.follow_verdict``; ``active``: the
    configuration is the active one, whose verdicts may also withdraw a case). True: this
    call stored it."""
    (saved,) = save_verdicts(session, [(image_id, record)], actor=actor, active=active)
    return saved


def save_verdicts(
    session: Session,
    entries: Sequence[tuple[int, VerdictRecord]],
    *,
    actor: str,
    active: bool = True,
) -> list[tuple[Verdict, bool]]:
    """``save_verdict`` for several (image id, verdict) pairs in a few statements for the
    group: the verdicts, their audit events, then the review cases (``follow_verdicts``).
    Returns (verdict, stored by this call) in the order of ``entries``."""
    if not entries:
        return []
    now = utcnow()
    values = [_verdict_values(image_id, record, now) for image_id, record in entries]
    created_keys = {
        tuple(row)
        for row in insert_ignore_rows(
            session,
            Verdict,
            sorted(values, key=_key),
            returning=(Verdict.image_id, Verdict.ensemble_version, Verdict.detector_set_digest),
        )
    }
    rows = session.execute(
        select(Verdict).where(
            Verdict.image_id.in_(sorted({image_id for image_id, _ in entries})),
            Verdict.ensemble_version.in_(sorted({r.ensemble_version for _, r in entries})),
        )
    ).scalars()
    stored = {(v.image_id, v.ensemble_version, v.detector_set_digest): v for v in rows}
    saved: list[tuple[Verdict, bool]] = []
    audits = []
    for value in values:
        key = _key(value)
        verdict, created = stored[key], key in created_keys
        created_keys.discard(key)  # the same verdict twice in the group: stored once
        if created:
            audits.append(_verdict_audit(verdict, actor))
        saved.append((verdict, created))
    append_audits(session, audits)
    follow_verdicts(session, [verdict for verdict, _ in saved], actor=actor, active=active)
    return saved


def _verdict_values(image_id: int, record: VerdictRecord, now: datetime) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "ensemble_version": record.ensemble_version,
        "ensemble_id": record.ensemble_id,
        "detector_set_digest": record.detector_set_digest,
        "detector_set": record.detector_set,
        "ai_score": record.ai_score,
        "label": record.label,
        "flagged": record.flagged,
        "reason": record.reason,
        "created_at": now,
    }


def _key(values: Mapping[str, Any]) -> tuple[int, str, str]:
    return values["image_id"], values["ensemble_version"], values["detector_set_digest"]


def _verdict_audit(verdict: Verdict, actor: str) -> dict[str, Any]:
    return {
        "actor": actor,
        "action": "verdict.created",
        "subject_type": "verdict",
        "subject_id": verdict.id,
        "details": {
            "image_id": verdict.image_id,
            "label": verdict.label.value,
            "ai_score": verdict.ai_score,
            "flagged": verdict.flagged,
            "ensemble_version": verdict.ensemble_version,
        },
    }


def latest_verdict(session: Session, image_id: int) -> Verdict | None:
    """The newest verdict stored for the image, under any ensemble configuration (ids grow
    in commit order per image: verdicts of one image are written under its row lock)."""
    return session.execute(
        select(Verdict).where(Verdict.image_id == image_id).order_by(Verdict.id.desc()).limit(1)
    ).scalar_one_or_none()


def current_verdict(session: Session, image_id: int, *, ensemble_version: str) -> Verdict | None:
    """The image's current verdict: the newest one under the active ensemble configuration
    (``ensemble_version``), or None when it has not been scored under it."""
    return session.execute(
        select(Verdict)
        .where(Verdict.image_id == image_id, Verdict.ensemble_version == ensemble_version)
        .order_by(Verdict.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def has_scored_verdict(session: Session, image_id: int, *, ensemble_version: str) -> bool:
    """Whether detectors have scored this image under the configuration (a verdict other
    than "not scored")."""
    found = session.execute(
        select(Verdict.id)
        .where(
            Verdict.image_id == image_id,
            Verdict.ensemble_version == ensemble_version,
            Verdict.label != VerdictLabel.NOT_SCORED,
        )
        .limit(1)
    ).scalar_one_or_none()
    return found is not None


@dataclass(frozen=True)
class CaseVerdicts:
    """A review case with the verdict that opened it and the image's current verdict (the
    latest under the active ensemble configuration; None while there is none)."""

    case: ReviewCase
    opened_by: Verdict
    current: Verdict | None


def with_verdicts_of(
    session: Session, image_ids: Iterable[int], *, ensemble_version: str
) -> dict[int, CaseVerdicts]:
    """``with_verdicts`` of several images in three queries, by image id (images without a
    case are left out)."""
    cases = cases_for_images(session, image_ids)
    if not cases:
        return {}
    opening = {case.verdict_id for case in cases.values()}
    opening_rows = session.execute(select(Verdict).where(Verdict.id.in_(sorted(opening))))
    opened_by = {verdict.id: verdict for verdict in opening_rows.scalars()}
    current: dict[int, Verdict] = {}
    for verdict in session.execute(
        select(Verdict)
        .where(Verdict.image_id.in_(sorted(cases)), Verdict.ensemble_version == ensemble_version)
        .order_by(Verdict.id)
    ).scalars():
        current[verdict.image_id] = verdict  # the newest last
    return {
        image_id: CaseVerdicts(
            case=case, opened_by=opened_by[case.verdict_id], current=current.get(image_id)
        )
        for image_id, case in cases.items()
    }


def with_verdicts(session: Session, image_id: int, *, ensemble_version: str) -> CaseVerdicts | None:
    """The image's review case, the verdict that opened it and its current verdict under
    ``ensemble_version`` (the active configuration)."""
    return with_verdicts_of(session, [image_id], ensemble_version=ensemble_version).get(image_id)
