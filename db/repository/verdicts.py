"""Ensemble configurations and the verdicts stored under them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Ensemble, ReviewCase, Verdict, VerdictLabel, utcnow
from db.repository._sql import insert_ignore
from db.repository.audit import append_audit
from db.repository.review import case_for_image, follow_verdict


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
    configuration is the active one, whose verdicts may also withdraw a case)."""
    created = insert_ignore(
        session,
        Verdict,
        {
            "image_id": image_id,
            "ensemble_version": record.ensemble_version,
            "ensemble_id": record.ensemble_id,
            "detector_set_digest": record.detector_set_digest,
            "detector_set": record.detector_set,
            "ai_score": record.ai_score,
            "label": record.label,
            "flagged": record.flagged,
            "reason": record.reason,
            "created_at": utcnow(),
        },
    )
    verdict = session.execute(
        select(Verdict).where(
            Verdict.image_id == image_id,
            Verdict.ensemble_version == record.ensemble_version,
            Verdict.detector_set_digest == record.detector_set_digest,
        )
    ).scalar_one()
    if created:
        append_audit(
            session,
            actor=actor,
            action="verdict.created",
            subject_type="verdict",
            subject_id=verdict.id,
            details={
                "image_id": image_id,
                "label": record.label.value,
                "ai_score": record.ai_score,
                "flagged": record.flagged,
                "ensemble_version": record.ensemble_version,
            },
        )
    follow_verdict(session, verdict, actor=actor, active=active)
    return verdict, created


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


def with_verdicts(session: Session, image_id: int, *, ensemble_version: str) -> CaseVerdicts | None:
    """The image's review case, the verdict that opened it and its current verdict under
    ``ensemble_version`` (the active configuration)."""
    case = case_for_image(session, image_id)
    if case is None:
        return None
    opened_by = session.get(Verdict, case.verdict_id)
    assert opened_by is not None  # a foreign key
    current = current_verdict(session, image_id, ensemble_version=ensemble_version)
    return CaseVerdicts(case=case, opened_by=opened_by, current=current)
