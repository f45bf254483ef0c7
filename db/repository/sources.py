"""Sources: every place an image came from, and what happened when it was taken in."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import Scan, ScanPriority, Source, SourceKind, SourceStatus, utcnow
from db.repository._sql import dialect_insert, insert_ignore


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


@dataclass(frozen=True)
class StoredObject:
    """An object in a bucket that a source names: what a fetch needs, as plain values."""

    source_id: int
    bucket: str
    key: str
    version_id: str | None
    status: SourceStatus


def record_source(session: Session, ref: SourceRef, image_id: int | None) -> tuple[Source, bool]:
    """The source row for ``ref``, created if new (then True) or marked seen again."""
    now = utcnow()
    created = insert_ignore(session, Source, _source_values(ref, image_id, now))
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


@dataclass(frozen=True)
class SourceIntake:
    """A source as taken in: where the bytes came from, the image they are (None when
    nothing was read) and, for a refused upload, why."""

    ref: SourceRef
    image_id: int | None
    reject_reason: str | None = None
    reject_message: str | None = None


def record_sources(session: Session, entries: Sequence[SourceIntake]) -> list[int]:
    """Store several sources as taken in, in one statement: each row is created, or seen
    again (``last_seen_at``, ``seen_count``); either way it points at the image read and, when
    refused, says why (a source taken in without a refusal keeps its status until it is
    scored). Returns the source ids in the order of ``entries``; a source named twice is one
    row seen twice."""
    if not entries:
        return []
    now = utcnow()
    rows: dict[tuple[SourceKind, str], dict[str, Any]] = {}
    for entry in entries:
        key = (entry.ref.kind, entry.ref.ref_key)
        row = rows.get(key)
        if row is not None:  # the later entry is what was found last
            row["seen_count"] += 1
            row["image_id"] = entry.image_id if entry.image_id is not None else row["image_id"]
        else:
            row = rows[key] = _source_values(entry.ref, entry.image_id, now)
        if entry.reject_reason is not None:
            row["status"] = SourceStatus.REJECTED
            row["reject_reason"] = entry.reject_reason
            row["reject_message"] = entry.reject_message
    table = cast(Table, Source.__table__)
    columns = table.c
    insert = dialect_insert(session)(table)
    refused = insert.excluded.status == SourceStatus.REJECTED
    statement = insert.on_conflict_do_update(
        index_elements=[columns.kind, columns.ref_key],
        set_={
            "last_seen_at": insert.excluded.last_seen_at,
            "seen_count": columns.seen_count + insert.excluded.seen_count,
            "image_id": func.coalesce(insert.excluded.image_id, columns.image_id),
            "status": case((refused, insert.excluded.status), else_=columns.status),
            "reject_reason": case(
                (refused, insert.excluded.reject_reason), else_=columns.reject_reason
            ),
            "reject_message": case(
                (refused, insert.excluded.reject_message), else_=columns.reject_message
            ),
        },
    ).returning(columns.id, columns.kind, columns.ref_key)
    stored = session.execute(statement, [rows[key] for key in sorted(rows)])
    ids = {(kind, ref_key): source_id for source_id, kind, ref_key in stored}
    return [ids[(entry.ref.kind, entry.ref.ref_key)] for entry in entries]


def _source_values(ref: SourceRef, image_id: int | None, now: datetime) -> dict[str, Any]:
    return {
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
        "reject_reason": None,
        "reject_message": None,
        "created_at": now,
        "last_seen_at": now,
        "seen_count": 1,
    }


def attach_image(session: Session, source_id: int, image_id: int) -> None:
    """The bytes this source delivered are ``image_id``."""
    session.execute(update(Source).where(Source.id == source_id).values(image_id=image_id))


def mark_source_rejected(session: Session, source_id: int, reason: str, message: str) -> None:
    session.execute(
        update(Source)
        .where(Source.id == source_id)
        .values(status=SourceStatus.REJECTED, reject_reason=reason, reject_message=message)
    )


def mark_sources_scored(session: Session, source_ids: Sequence[int]) -> None:
    """These sources are scored (a refusal they had is cleared), in one statement."""
    if source_ids:
        session.execute(
            update(Source)
            .where(Source.id.in_(sorted(set(source_ids))))
            .values(status=SourceStatus.SCORED, reject_reason=None, reject_message=None)
            .execution_options(synchronize_session=False)
        )


def mark_pending_sources_scored_of(session: Session, image_ids: Sequence[int]) -> list[int]:
    """Every source of these images still waiting for its verdict is scored, in one
    statement; returns their ids (the scans among them are complete)."""
    if not image_ids:
        return []
    marked = session.execute(
        update(Source)
        .where(Source.image_id.in_(sorted(set(image_ids))), Source.status == SourceStatus.PENDING)
        .values(status=SourceStatus.SCORED, reject_reason=None, reject_message=None)
        .returning(Source.id)
    )
    return sorted(marked.scalars())


def mark_resent(session: Session, source_id: int, *, recheck_at: datetime) -> None:
    """The work of this pending source was sent again; check it next at ``recheck_at``."""
    session.execute(
        update(Source)
        .where(Source.id == source_id)
        .values(resend_count=Source.resend_count + 1, recheck_at=recheck_at)
    )


def get_source(session: Session, source_id: int) -> Source | None:
    return session.get(Source, source_id)


def stored_object(session: Session, source_id: int) -> StoredObject | None:
    """The bucket object a source names, or None for a source without one (a local file)
    or no source at all."""
    source = session.get(Source, source_id)
    if source is None or source.bucket is None or source.object_key is None:
        return None
    return _as_object(source)


def objects_of_image(session: Session, image_id: int) -> list[StoredObject]:
    """Every bucket object that delivered these bytes, oldest first."""
    return objects_of_images(session, [image_id])[image_id]


def objects_of_images(session: Session, image_ids: Iterable[int]) -> dict[int, list[StoredObject]]:
    """The stored objects that delivered each of these images (sources with a bucket),
    oldest first, in one query, by image id."""
    found: dict[int, list[StoredObject]] = {image_id: [] for image_id in image_ids}
    if found:
        rows = session.execute(
            select(Source)
            .where(Source.image_id.in_(sorted(found)), Source.bucket.is_not(None))
            .order_by(Source.id)
        ).scalars()
        for source in rows:
            if source.bucket and source.image_id is not None:
                found[source.image_id].append(_as_object(source))
    return found


def _as_object(source: Source) -> StoredObject:
    assert source.bucket is not None and source.object_key is not None
    return StoredObject(
        source_id=source.id,
        bucket=source.bucket,
        key=source.object_key,
        version_id=source.version_id,
        status=source.status,
    )


def sources_for_image(session: Session, image_id: int) -> Sequence[Source]:
    return (
        session.execute(select(Source).where(Source.image_id == image_id).order_by(Source.id))
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


def low_priority_sources(session: Session, source_ids: Sequence[int]) -> set[int]:
    """Those of ``source_ids`` that are scans asked for at low priority, in one query: their
    work belongs on the bulk queues, like a re-scan's."""
    if not source_ids:
        return set()
    rows = session.execute(
        select(Scan.source_id).where(
            Scan.source_id.in_(list(source_ids)), Scan.priority == ScanPriority.LOW
        )
    )
    return {int(source_id) for source_id in rows.scalars()}


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
