"""Data access: the only module that builds queries.

Every write that an event, a retry or a re-run can repeat is an idempotent insert keyed by
a unique constraint (``INSERT ... ON CONFLICT DO NOTHING`` on Postgres and SQLite), so
doing it twice leaves one row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Insert, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    AuditEvent,
    Base,
    DeadLetter,
    Detection,
    DetectionAttempt,
    Image,
    ReviewCase,
    ReviewState,
    Source,
    SourceKind,
    SourceStatus,
    Verdict,
    VerdictLabel,
    utcnow,
)


def _insert(session: Session, model: type[Base]) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise NotImplementedError(f"unsupported database dialect {dialect!r}")


def _insert_ignore(session: Session, model: type[Base], values: Mapping[str, Any]) -> bool:
    """Insert a row unless a unique constraint already holds one; True if inserted."""
    statement: Insert = _insert(session, model).values(**values).on_conflict_do_nothing()
    result = session.execute(statement)
    return bool(cast(CursorResult[Any], result).rowcount)


# --- images -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFacts:
    sha256: str
    size_bytes: int
    format: str | None = None
    mime: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    mode: str | None = None


def get_or_create_image(session: Session, facts: ImageFacts) -> Image:
    _insert_ignore(
        session,
        Image,
        {
            "sha256": facts.sha256,
            "size_bytes": facts.size_bytes,
            "format": facts.format,
            "mime": facts.mime,
            "width": facts.width,
            "height": facts.height,
            "frames": facts.frames,
            "mode": facts.mode,
            "first_seen_at": utcnow(),
        },
    )
    return session.execute(select(Image).where(Image.sha256 == facts.sha256)).scalar_one()


def image_by_sha256(session: Session, sha256: str) -> Image | None:
    return session.execute(select(Image).where(Image.sha256 == sha256)).scalar_one_or_none()


# --- sources ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRef:
    """Where an image came from. ``ref_key`` identifies it for de-duplication."""

    kind: SourceKind
    ref_key: str
    local_path: str | None = None
    bucket: str | None = None
    object_key: str | None = None
    version_id: str | None = None
    etag: str | None = None
    submitted_by: str | None = None


def record_source(session: Session, ref: SourceRef, image_id: int | None) -> tuple[Source, bool]:
    """The source row for ``ref``, created if new (then True) or marked seen again."""
    now = utcnow()
    created = _insert_ignore(
        session,
        Source,
        {
            "kind": ref.kind,
            "ref_key": ref.ref_key,
            "local_path": ref.local_path,
            "bucket": ref.bucket,
            "object_key": ref.object_key,
            "version_id": ref.version_id,
            "etag": ref.etag,
            "submitted_by": ref.submitted_by,
            "image_id": image_id,
            "status": SourceStatus.PENDING,
            "created_at": now,
            "last_seen_at": now,
            "seen_count": 1,
        },
    )
    source = session.execute(
        select(Source).where(Source.kind == ref.kind, Source.ref_key == ref.ref_key)
    ).scalar_one()
    if not created:
        session.execute(
            update(Source)
            .where(Source.id == source.id)
            .values(last_seen_at=now, seen_count=Source.seen_count + 1)
        )
        session.refresh(source)
    return source, created


def mark_source_rejected(session: Session, source: Source, reason: str, message: str) -> None:
    source.status = SourceStatus.REJECTED
    source.reject_reason = reason
    source.reject_message = message
    session.flush()


def mark_source_scored(session: Session, source: Source) -> None:
    source.status = SourceStatus.SCORED
    source.reject_reason = None
    source.reject_message = None
    session.flush()


def sources_for_image(session: Session, image_id: int) -> Sequence[Source]:
    return (
        session.execute(select(Source).where(Source.image_id == image_id).order_by(Source.id))
        .scalars()
        .all()
    )


def count_rows(session: Session, model: type[Base]) -> int:
    return int(session.execute(select(func.count()).select_from(model)).scalar_one())


# --- detections -------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionRecord:
    detector_name: str
    detector_version: str
    weights_sha256: str | None
    score: float | None
    evidence: dict[str, Any]
    latency_ms: float | None
    error: str | None = None


def reusable_detections(
    session: Session, image_id: int, versions: Mapping[str, str]
) -> dict[str, Detection]:
    """Stored detections of this image by exactly these detector versions, by name.

    A stored failure is not reusable: the caller runs that detector again.
    """
    if not versions:
        return {}
    rows = session.execute(
        select(Detection).where(
            Detection.image_id == image_id,
            Detection.detector_name.in_(list(versions)),
            Detection.error.is_(None),
        )
    ).scalars()
    return {
        row.detector_name: row
        for row in rows
        if versions[row.detector_name] == row.detector_version
    }


def save_detection(session: Session, image_id: int, record: DetectionRecord) -> Detection:
    """Store one detector's result once. A stored failure is replaced by a later answer;
    a stored answer is never overwritten (the first result for a version is the record)."""
    values = {
        "image_id": image_id,
        "detector_name": record.detector_name,
        "detector_version": record.detector_version,
        "weights_sha256": record.weights_sha256,
        "score": record.score,
        "evidence": record.evidence,
        "latency_ms": record.latency_ms,
        "error": record.error,
        "created_at": utcnow(),
    }
    inserted = _insert_ignore(session, Detection, values)
    row = session.execute(
        select(Detection).where(
            Detection.image_id == image_id,
            Detection.detector_name == record.detector_name,
            Detection.detector_version == record.detector_version,
        )
    ).scalar_one()
    if not inserted and row.error is not None and record.error is None:
        for key in ("weights_sha256", "score", "evidence", "latency_ms", "error", "created_at"):
            setattr(row, key, values[key])
        session.flush()
    return row


# --- verdicts and review ----------------------------------------------------------------


@dataclass(frozen=True)
class VerdictRecord:
    ensemble_version: str
    detector_set_digest: str
    detector_set: dict[str, Any]
    ai_score: float | None
    label: VerdictLabel
    flagged: bool
    reason: str


def save_verdict(
    session: Session, image_id: int, record: VerdictRecord, *, actor: str
) -> tuple[Verdict, bool]:
    """Store a verdict once per (image, ensemble version, detector set); open a review case
    and write the audit entries the first time a flagged verdict is stored."""
    created = _insert_ignore(
        session,
        Verdict,
        {
            "image_id": image_id,
            "ensemble_version": record.ensemble_version,
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
    if record.flagged:
        open_review_case(session, verdict, actor=actor)
    return verdict, created


def open_review_case(session: Session, verdict: Verdict, *, actor: str) -> ReviewCase:
    """The image's review case, opened by this verdict unless one exists already."""
    created = _insert_ignore(
        session,
        ReviewCase,
        {
            "verdict_id": verdict.id,
            "image_id": verdict.image_id,
            "state": ReviewState.OPEN,
            "opened_at": utcnow(),
        },
    )
    case = session.execute(
        select(ReviewCase).where(ReviewCase.image_id == verdict.image_id)
    ).scalar_one()
    if created:
        append_audit(
            session,
            actor=actor,
            action="review_case.opened",
            subject_type="review_case",
            subject_id=case.id,
            details={"verdict_id": verdict.id, "reason": verdict.reason},
        )
    return case


def latest_verdict(session: Session, image_id: int) -> Verdict | None:
    return session.execute(
        select(Verdict)
        .where(Verdict.image_id == image_id)
        .order_by(Verdict.created_at.desc(), Verdict.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def detections_for_image(session: Session, image_id: int) -> Sequence[Detection]:
    return (
        session.execute(
            select(Detection)
            .where(Detection.image_id == image_id)
            .order_by(Detection.detector_name)
        )
        .scalars()
        .all()
    )


# --- audit ------------------------------------------------------------------------------


def append_audit(
    session: Session,
    *,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: int,
    details: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    event = AuditEvent(
        at=at or utcnow(),
        actor=actor,
        action=action,
        subject_type=subject_type,
        subject_id=subject_id,
        details=details or {},
    )
    session.add(event)
    session.flush()
    return event


def audit_trail(
    session: Session, subject_type: str, subject_ids: Iterable[int]
) -> Sequence[AuditEvent]:
    return (
        session.execute(
            select(AuditEvent)
            .where(
                AuditEvent.subject_type == subject_type,
                AuditEvent.subject_id.in_(list(subject_ids)),
            )
            .order_by(AuditEvent.id)
        )
        .scalars()
        .all()
    )


# --- fleet bookkeeping ------------------------------------------------------------------


def count_attempt(session: Session, image_id: int, detector_name: str) -> int:
    """Add one to the deliveries of this detector task and return the new count."""
    _insert_ignore(
        session,
        DetectionAttempt,
        {
            "image_id": image_id,
            "detector_name": detector_name,
            "attempts": 0,
            "updated_at": utcnow(),
        },
    )
    session.execute(
        update(DetectionAttempt)
        .where(
            DetectionAttempt.image_id == image_id, DetectionAttempt.detector_name == detector_name
        )
        .values(attempts=DetectionAttempt.attempts + 1, updated_at=utcnow())
    )
    return int(
        session.execute(
            select(DetectionAttempt.attempts).where(
                DetectionAttempt.image_id == image_id,
                DetectionAttempt.detector_name == detector_name,
            )
        ).scalar_one()
    )


def attempts_so_far(session: Session, image_id: int, detector_name: str) -> int:
    """Deliveries of this detector task counted so far (0 for a first delivery)."""
    found = session.execute(
        select(DetectionAttempt.attempts).where(
            DetectionAttempt.image_id == image_id,
            DetectionAttempt.detector_name == detector_name,
        )
    ).scalar_one_or_none()
    return int(found or 0)


def record_dead_letter(session: Session, channel: str, reason: str, body: str) -> None:
    session.add(
        DeadLetter(channel=channel, reason=reason, body=body[:100_000], received_at=utcnow())
    )
    session.flush()


def lock_image(session: Session, image_id: int) -> Image:
    """The image row, locked until the transaction ends: whoever holds it is the only one
    deciding this image's verdict. Take it before writing rows that reference the image.

    ``FOR NO KEY UPDATE`` rather than ``FOR UPDATE``: inserting a detection or a source that
    points at the image takes a KEY SHARE lock on it (the foreign key check), which
    ``FOR UPDATE`` would wait on, so two workers that each stored a detection could deadlock
    waiting for each other. SQLite serialises writers anyway; the clause is a no-op there.
    """
    statement = select(Image).where(Image.id == image_id).with_for_update(key_share=True)
    return session.execute(statement).scalar_one()


def latest_detections(
    session: Session, image_id: int, names: Iterable[str]
) -> dict[str, Detection]:
    """The newest detection of this image by each named detector."""
    rows = session.execute(
        select(Detection)
        .where(Detection.image_id == image_id, Detection.detector_name.in_(list(names)))
        .order_by(Detection.created_at, Detection.id)
    ).scalars()
    return {row.detector_name: row for row in rows}


def current_versions(session: Session, names: Iterable[str]) -> dict[str, str]:
    """The version each detector wrote most recently, anywhere: what a worker serves now."""
    newest = (
        select(Detection.detector_name, func.max(Detection.id).label("id"))
        .where(Detection.detector_name.in_(list(names)), Detection.error.is_(None))
        .group_by(Detection.detector_name)
        .subquery()
    )
    rows = session.execute(
        select(Detection.detector_name, Detection.detector_version).join(
            newest, Detection.id == newest.c.id
        )
    )
    return {name: version for name, version in rows}


def pending_sources(session: Session, image_id: int) -> Sequence[Source]:
    return (
        session.execute(
            select(Source).where(Source.image_id == image_id, Source.status == SourceStatus.PENDING)
        )
        .scalars()
        .all()
    )


def stalled_sources(
    session: Session, *, created_before: datetime, now: datetime, limit: int
) -> Sequence[Source]:
    """Pending sources due for a check for lost messages, oldest first, locked so that two
    checkers never take the same row (SKIP LOCKED on Postgres)."""
    due = or_(
        and_(Source.recheck_at.is_(None), Source.created_at < created_before),
        Source.recheck_at < now,
    )
    return (
        session.execute(
            select(Source)
            .where(Source.status == SourceStatus.PENDING, due)
            .order_by(Source.created_at, Source.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )


def source_by_ref(session: Session, kind: SourceKind, ref_key: str) -> Source | None:
    return session.execute(
        select(Source).where(Source.kind == kind, Source.ref_key == ref_key)
    ).scalar_one_or_none()


def sources_by_object(session: Session, bucket: str, object_key: str) -> Sequence[Source]:
    return (
        session.execute(
            select(Source)
            .where(Source.bucket == bucket, Source.object_key == object_key)
            .order_by(Source.id)
        )
        .scalars()
        .all()
    )
