"""Batch re-scans: the operator's request, where its listing stands, the items it recorded
(``sources`` rows with its ``rescan_id``) and what became of them.

An item of a re-scan is a source row of kind ``rescan`` whose ``ref_key`` names the
re-scan and the object or image (``rescan:<public id>:<bucket>/<key>``,
``rescan:<public id>:image:<id>``), so the same object listed twice by one re-scan is one
item, and two re-scans of it are two.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Select, and_, case, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    Detection,
    Image,
    Rescan,
    RescanState,
    Source,
    SourceKind,
    SourceStatus,
    Verdict,
    utcnow,
)
from db.repository.audit import append_audit

# Why an item is rejected without being taken in: its re-scan was cancelled first.
CANCELLED_REASON = "cancelled"
# Rejections that say the object could not be read (gone, or access denied): the item
# failed; other rejections are about the bytes themselves.
FAILED_REASONS = ("missing", "unreadable")

ACTIVE_STATES = (RescanState.LISTING, RescanState.RUNNING)


@dataclass(frozen=True)
class RescanRecord:
    public_id: str
    selection: dict[str, Any]
    created_by: str
    token_id: int | None = None


@dataclass(frozen=True)
class RescanItem:
    """One object or stored image a re-scan lists."""

    ref_key: str
    bucket: str | None = None
    object_key: str | None = None
    etag: str | None = None
    image_id: int | None = None


@dataclass(frozen=True)
class ItemCounts:
    """What became of a re-scan's items as of its last count (``count_finished_items``)."""

    pending: int = 0
    done: int = 0  # scored
    reused: int = 0  # scored without any detector running for this item
    rejected: int = 0  # the bytes were refused (not an image, too large, ...)
    failed: int = 0  # the object could not be read (gone, access denied)
    cancelled: int = 0  # never taken in: the re-scan was cancelled first


def add_rescan(session: Session, record: RescanRecord) -> Rescan:
    """Store a new re-scan (listing from the start); audited."""
    now = utcnow()
    rescan = Rescan(
        public_id=record.public_id,
        token_id=record.token_id,
        created_by=record.created_by,
        selection=record.selection,
        state=RescanState.LISTING,
        cursor=None,
        listed=0,
        queued=0,
        reused=0,
        created_at=now,
        updated_at=now,
    )
    session.add(rescan)
    session.flush()
    append_audit(
        session,
        actor=record.created_by,
        action="rescan.created",
        subject_type="rescan",
        subject_id=rescan.id,
        details={"public_id": record.public_id, "selection": record.selection},
    )
    return rescan


def rescan_by_public_id(session: Session, public_id: str, *, lock: bool = False) -> Rescan | None:
    """The re-scan, locked until the transaction ends with ``lock`` (waiting for a lister
    that holds it)."""
    query = select(Rescan).where(Rescan.public_id == public_id)
    if lock:
        query = query.with_for_update()
    return session.execute(query).scalar_one_or_none()


def list_rescans(session: Session, *, limit: int) -> Sequence[Rescan]:
    """The newest re-scans first."""
    return session.execute(select(Rescan).order_by(Rescan.id.desc()).limit(limit)).scalars().all()


def claim_active_rescan(session: Session, *, after_id: int) -> Rescan | None:
    """The next re-scan still listing or running after ``after_id``, locked until the
    transaction ends; one another driver holds is skipped (SKIP LOCKED on Postgres), so two
    drivers never list the same page."""
    return session.execute(
        select(Rescan)
        .where(Rescan.state.in_(ACTIVE_STATES), Rescan.id > after_id)
        .order_by(Rescan.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    ).scalar_one_or_none()


def set_rescan_state(
    session: Session, rescan: Rescan, state: RescanState, *, actor: str, details: dict[str, Any]
) -> None:
    """Move the re-scan to ``state`` (stamping when its listing ended or it finished);
    audited as ``rescan.<state>``."""
    now = utcnow()
    rescan.state = state
    rescan.updated_at = now
    if state == RescanState.RUNNING:
        rescan.listed_at = now
    elif state in (RescanState.DONE, RescanState.CANCELLED):
        rescan.finished_at = now
        if rescan.listed_at is None:
            rescan.listed_at = now
    session.flush()
    append_audit(
        session,
        actor=actor,
        action=f"rescan.{state.value}",
        subject_type="rescan",
        subject_id=rescan.id,
        details={"public_id": rescan.public_id, **details},
    )


def record_rescan_items(
    session: Session, rescan_id: int, items: Sequence[RescanItem], *, submitted_by: str
) -> list[tuple[int, int | None]]:
    """Record a page of items as pending sources of the re-scan, in one statement; returns
    ``(source id, image id)`` of those this call created (an item recorded before, by an
    earlier try at the same page, is left as it is)."""
    if not items:
        return []
    now = utcnow()
    rows = [
        {
            "kind": SourceKind.RESCAN,
            "ref_key": item.ref_key,
            "bucket": item.bucket,
            "object_key": item.object_key,
            "etag": item.etag,
            "image_id": item.image_id,
            "status": SourceStatus.PENDING,
            "submitted_by": submitted_by,
            "rescan_id": rescan_id,
            "created_at": now,
            "last_seen_at": now,
            "seen_count": 1,
            "resend_count": 0,
        }
        for item in items
    ]
    dialect = session.get_bind().dialect.name
    statement: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        statement = postgresql.insert(Source).values(rows).on_conflict_do_nothing()
    elif dialect == "sqlite":
        statement = sqlite.insert(Source).values(rows).on_conflict_do_nothing()
    else:
        raise NotImplementedError(f"unsupported database dialect {dialect!r}")
    created = session.execute(statement.returning(Source.id, Source.image_id))
    return sorted((int(source_id), image_id) for source_id, image_id in created)


def add_to_progress(session: Session, rescan: Rescan, *, listed: int, queued: int) -> None:
    rescan.listed += listed
    rescan.queued += queued
    rescan.updated_at = utcnow()
    session.flush()


def counts_of(rescan: Rescan) -> ItemCounts:
    """The re-scan's counts as of its last count (``rescan.counted_at``), read from its row
    alone. An item counts as pending until a count sees it finished, so the numbers always
    add up to ``listed``."""
    finished = rescan.done + rescan.rejected + rescan.failed + rescan.cancelled
    return ItemCounts(
        pending=max(0, rescan.listed - finished),
        done=rescan.done,
        reused=rescan.reused,
        rejected=rescan.rejected,
        failed=rescan.failed,
        cancelled=rescan.cancelled,
    )


def count_finished_items(session: Session, rescan: Rescan, *, batch: int = 1000) -> ItemCounts:
    """Bring the re-scan's counts up to date: look again at the items still pending at the
    last count (``rescan.unfinished``) and, for the first time, at those recorded since
    (ids above ``rescan.counted_through``), ``batch`` at a time. Each finished item is
    counted once, when a count first sees it finished, so the work is bounded by the items
    unfinished at the last count (at most the in-flight cap) plus those listed since,
    however many the re-scan holds.

    Call it with the re-scan locked (the listing step and a cancel hold it): two counts at
    once would count the same items twice. An item counts as reused when it was scored and
    no detection of its image was stored after it was recorded (every detector's answer was
    current already)."""
    tally = {
        "done": rescan.done,
        "reused": rescan.reused,
        "rejected": rescan.rejected,
        "failed": rescan.failed,
        "cancelled": rescan.cancelled,
    }
    unfinished: list[int] = []

    def count(rows: Sequence[Row[int, SourceStatus, str | None, bool]]) -> None:
        for source_id, status, reason, reused in rows:
            if status == SourceStatus.PENDING:
                unfinished.append(int(source_id))
            elif status == SourceStatus.SCORED:
                tally["done"] += 1
                tally["reused"] += bool(reused)
            elif reason == CANCELLED_REASON:
                tally["cancelled"] += 1
            elif reason in FAILED_REASONS:
                tally["failed"] += 1
            else:
                tally["rejected"] += 1

    earlier = list(rescan.unfinished or ())
    for start in range(0, len(earlier), batch):
        chunk = earlier[start : start + batch]
        count(session.execute(_outcomes().where(Source.id.in_(chunk))).all())
    through = rescan.counted_through
    while True:
        rows = session.execute(
            _outcomes()
            .where(Source.rescan_id == rescan.id, Source.id > through)
            .order_by(Source.id)
            .limit(batch)
        ).all()
        count(rows)
        if rows:
            through = int(rows[-1][0])
        if len(rows) < batch:
            break
    rescan.done = tally["done"]
    rescan.reused = tally["reused"]
    rescan.rejected = tally["rejected"]
    rescan.failed = tally["failed"]
    rescan.cancelled = tally["cancelled"]
    rescan.unfinished = sorted(unfinished)
    rescan.counted_through = through
    rescan.counted_at = utcnow()
    session.flush()
    return counts_of(rescan)


def pending_rescan_items(session: Session) -> int:
    """Items of every re-scan recorded and not finished yet (the pending sources' index
    range: at most the in-flight cap of each active re-scan)."""
    count = session.scalar(
        select(func.count())
        .select_from(Source)
        .where(Source.status == SourceStatus.PENDING, Source.rescan_id.is_not(None))
    )
    return int(count or 0)


def _outcomes() -> Select[int, SourceStatus, str | None, bool]:
    """Each item's id, status, rejection reason and whether it was scored without a fresh
    detection (the subquery runs only for scored items)."""
    fresh_detection = exists().where(
        Detection.image_id == Source.image_id, Detection.created_at >= Source.created_at
    )
    reused = case((and_(Source.status == SourceStatus.SCORED, ~fresh_detection), True), else_=False)
    return select(Source.id, Source.status, Source.reject_reason, reused)


def cancel_pending_items(session: Session, rescan_id: int, *, message: str) -> int:
    """Mark every item of the re-scan still pending as rejected ("cancelled"): an intake
    that reaches one finds it finished and does nothing, and the reconciler sends nothing
    more for it. Returns how many."""
    result = session.execute(
        update(Source)
        .where(Source.rescan_id == rescan_id, Source.status == SourceStatus.PENDING)
        .values(
            status=SourceStatus.REJECTED, reject_reason=CANCELLED_REASON, reject_message=message
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


def postpone_checks(session: Session, source_ids: Iterable[int], *, recheck_at: datetime) -> None:
    """Look at these pending items again for lost messages only at ``recheck_at``: their
    low-priority queue is still being worked through (nothing is counted as sent again)."""
    ids = list(source_ids)
    if ids:
        session.execute(update(Source).where(Source.id.in_(ids)).values(recheck_at=recheck_at))


# --- stored images ------------------------------------------------------------------------


def image_page(
    session: Session,
    *,
    after_id: int,
    limit: int,
    which: str,
    detector: str | None = None,
    detectors: Sequence[str] = (),
    versions: Mapping[str, str] | None = None,
    ensemble_version: str | None = None,
) -> list[int]:
    """The next ``limit`` ids above ``after_id`` of stored images that were decoded once
    (bytes refused at intake have nothing a detector can score), selected by ``which``:

    - ``all``: every such image;
    - ``detector``: those ``detector`` (any version) has scored;
    - ``stale``: those whose current result is not the active one: no verdict under
      ``ensemble_version``, or a detector of ``detectors`` without an answer from its
      current version (``versions``: what each wrote most recently).
    """
    query = select(Image.id).where(Image.id > after_id, Image.width.is_not(None))
    if which == "detector":
        query = query.where(
            exists().where(Detection.image_id == Image.id, Detection.detector_name == detector)
        )
    elif which == "stale":
        assert ensemble_version is not None
        current = versions or {}
        stale = [
            ~exists().where(
                Verdict.image_id == Image.id, Verdict.ensemble_version == ensemble_version
            )
        ]
        for name in detectors:
            answered = [
                Detection.image_id == Image.id,
                Detection.detector_name == name,
                Detection.error.is_(None),
            ]
            if name in current:
                answered.append(Detection.detector_version == current[name])
            stale.append(~exists().where(*answered))
        query = query.where(or_(*stale))
    elif which != "all":
        raise ValueError(f"unknown image selection {which!r}")
    return [int(i) for i in session.execute(query.order_by(Image.id).limit(limit)).scalars()]


def current_answers(
    session: Session, image_ids: Sequence[int], versions: Mapping[str, str]
) -> dict[int, set[str]]:
    """For each image, the detectors whose current version (``versions``) has answered it
    (a stored failure is no answer), in one query."""
    if not image_ids or not versions:
        return {image_id: set() for image_id in image_ids}
    matches = or_(
        *(
            and_(Detection.detector_name == name, Detection.detector_version == version)
            for name, version in versions.items()
        )
    )
    rows = session.execute(
        select(Detection.image_id, Detection.detector_name).where(
            Detection.image_id.in_(list(image_ids)), Detection.error.is_(None), matches
        )
    )
    found: dict[int, set[str]] = {image_id: set() for image_id in image_ids}
    for image_id, name in rows:
        found[image_id].add(name)
    return found
