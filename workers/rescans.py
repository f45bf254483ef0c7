"""Batch re-scans: an operator's request to score again every object under a prefix, a list
of keys, or stored images, without holding up the uploads.

    create_rescan     the request, checked (selection, bucket policy) and recorded; audited
    advance_rescans   one page step for every active re-scan (the reconciler's tick in the
                      fleet, a sweeper of the embedded worker): list one page, record its
                      items and the cursor in one transaction, then dispatch the items'
                      work to the low-priority (bulk) queues
    rescan_status     the counts, throughput and ETA, read by the API and the CLI alike
                      from the re-scan's row alone (see "Counts" below)
    cancel_rescan     no more listing; items not yet taken in are never scanned; audited

Memory is bounded by one page: the listing goes on from ``rescans.cursor`` (the last key
listed, the position in a list of keys, the last image id), committed with the page's
items, so a lister killed mid-run goes on where the last commit left it, and a page listed
again after a crash records nothing twice (items are unique per re-scan and object). A
re-scan never has more than ``max_in_flight`` items recorded but unfinished: its listing
waits while it has, so its queues stay bounded whatever its size.

Work already scored is not done again: an object's bytes whose every detector answered at
its current version are concluded at intake without a detector running (``fleet.take_in``),
and a stored image whose answers are current is concluded here, under its row lock,
without sending anything; such items count as ``reused``.

Counts are kept on the re-scan's row, brought up to date by each step of
``advance_rescans`` (under the row lock the step holds anyway), by a cancel and when the
re-scan finishes; a reader never counts items. Each count looks only at the items pending
at the last one and those listed since (``repository.count_finished_items``), so neither
a read nor a step costs more as a re-scan grows into millions of items, and no intake or
detection worker ever writes the re-scan's row (nor waits for a lister that holds it
during its listing call). While a re-scan is active, the counts are those of the fleet's
last step for it (``counted_at``): every ``synthsentry reconcile --rescan-every`` seconds
(2 by default; at once while pages are being listed), every sweep of the embedded worker
(5 s). Once it is done or cancelled they are final.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import Rescan, RescanState, as_utc, utcnow
from db.session import transaction
from workers import fleet, metrics
from workers.dispatch import Dispatcher
from workers.events import BUCKET_NAME_PATTERN, BucketPolicy
from workers.fleet import FleetContext
from workers.names import is_clean

log = logging.getLogger(__name__)

ACTOR = "fleet"  # who moves a re-scan along once it was asked for (the audit's actor)
MAX_KEYS = 1000  # keys one request may name
MAX_KEY_BYTES = 1024  # S3's limit on a key
_DETECTOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Listing errors no retry fixes: the listing ends with what it has.
_PERMANENT_LISTING_ERRORS = frozenset(
    {"NoSuchBucket", "AccessDenied", "InvalidBucketName", "AllAccessDisabled", "403", "404"}
)


class RescanError(ValueError):
    """A request about re-scans that cannot be met; ``kind`` names the problem."""

    kind = "invalid-selection"


class InvalidSelection(RescanError):
    kind = "invalid-selection"


class BucketRefused(RescanError):
    kind = "bucket-not-allowed"


class RescanNotFound(RescanError):
    kind = "not-found"


class RescanFinished(RescanError):
    kind = "rescan-finished"


# --- what a re-scan selects ---------------------------------------------------------------


@dataclass(frozen=True)
class ObjectPrefix:
    """Every object under ``prefix`` in ``bucket`` ("" for the whole bucket)."""

    bucket: str
    prefix: str


@dataclass(frozen=True)
class ObjectKeys:
    """These keys of ``bucket``, in this order, each once."""

    bucket: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class StoredImages:
    """Images already stored: ``all``; ``stale`` (not scored under the active ensemble, or
    missing an answer from a detector's current version); or those ``detector`` scored."""

    which: Literal["all", "stale", "detector"]
    detector: str | None = None


Selection = ObjectPrefix | ObjectKeys | StoredImages


def check_bucket(bucket: str) -> str:
    if not BUCKET_NAME_PATTERN.fullmatch(bucket):
        raise InvalidSelection(f"{bucket!r} is not a bucket name")
    return bucket


def check_key(key: str, *, what: str = "key") -> str:
    """An object key (or, with ``what="prefix"``, a prefix, which may be empty) that names
    one place: UTF-8 text of at most 1024 bytes, without NUL and without a ``..`` segment
    (which a local object store or a later copy to a file system would read as the
    parent folder)."""
    if not key and what == "key":
        raise InvalidSelection("a key is empty")
    if "\x00" in key:
        raise InvalidSelection(f"a {what} holds a NUL character")
    if not is_clean(key):
        raise InvalidSelection(f"a {what} is not valid UTF-8 text")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidSelection(f"a {what} is longer than {MAX_KEY_BYTES} bytes")
    if ".." in key.split("/"):
        raise InvalidSelection(f"a {what} holds a '..' segment: {key[:200]!r}")
    return key


def parse_selection(
    *,
    bucket: str | None = None,
    prefix: str | None = None,
    keys: Sequence[str] | None = None,
    images: str | None = None,
    detector: str | None = None,
) -> Selection:
    """Exactly one selection: ``bucket`` with ``prefix`` or with ``keys`` (1 to 1000), or
    ``images`` ("all", "stale"), or ``detector`` (the images it scored)."""
    chosen = [
        name
        for name, value in (
            ("prefix", prefix),
            ("keys", keys),
            ("images", images),
            ("detector", detector),
        )
        if value is not None
    ]
    if not chosen:
        if bucket is not None:
            raise InvalidSelection("a bucket needs a prefix or a list of keys")
        raise InvalidSelection(
            "nothing selected: give a bucket with a prefix or keys, or a selection of images"
        )
    if len(chosen) > 1:
        raise InvalidSelection(f"give one selection, not {' and '.join(chosen)}")
    if prefix is not None or keys is not None:
        if bucket is None:
            raise InvalidSelection(f"{chosen[0]} needs a bucket")
        check_bucket(bucket)
        if prefix is not None:
            return ObjectPrefix(bucket, check_key(prefix, what="prefix"))
        assert keys is not None
        unique = tuple(dict.fromkeys(check_key(key) for key in keys))
        if not unique:
            raise InvalidSelection("the list of keys is empty")
        if len(unique) > MAX_KEYS:
            raise InvalidSelection(f"at most {MAX_KEYS} keys per re-scan, not {len(unique)}")
        return ObjectKeys(bucket, unique)
    if bucket is not None:
        raise InvalidSelection("a selection of stored images names no bucket")
    if detector is not None:
        if not _DETECTOR_NAME.fullmatch(detector):
            raise InvalidSelection(f"{detector[:200]!r} is not a detector name")
        return StoredImages("detector", detector)
    if images not in ("all", "stale"):
        raise InvalidSelection(f"images must be 'all' or 'stale', not {images!r}")
    return StoredImages("all" if images == "all" else "stale")


def selection_document(selection: Selection) -> dict[str, Any]:
    """The selection as stored and shown: the shape the API takes."""
    if isinstance(selection, ObjectPrefix):
        return {"bucket": selection.bucket, "prefix": selection.prefix}
    if isinstance(selection, ObjectKeys):
        return {"bucket": selection.bucket, "keys": list(selection.keys)}
    if selection.which == "detector":
        return {"images": {"detector": selection.detector}}
    return {"images": selection.which}


def selection_of(document: Mapping[str, Any]) -> Selection:
    images = document.get("images")
    if isinstance(images, Mapping):
        return StoredImages("detector", str(images["detector"]))
    if images is not None:
        return StoredImages("all" if images == "all" else "stale")
    if "keys" in document:
        return ObjectKeys(str(document["bucket"]), tuple(document["keys"]))
    return ObjectPrefix(str(document["bucket"]), str(document["prefix"]))


def _check_policy(selection: Selection, policy: BucketPolicy | None) -> None:
    if isinstance(selection, StoredImages):
        return
    if policy is None:
        raise BucketRefused("this deployment scans no bucket (SYNTHSENTRY_ALLOWED_BUCKETS)")
    if isinstance(selection, ObjectPrefix):
        if not policy.permits(selection.bucket, selection.prefix):
            raise BucketRefused(
                f"s3://{selection.bucket}/{selection.prefix} is not wholly in the buckets and "
                f"prefixes this deployment scans ({policy})"
            )
        return
    refused = [key for key in selection.keys if not policy.permits(selection.bucket, key)]
    if refused:
        shown = ", ".join(repr(key[:100]) for key in refused[:3])
        raise BucketRefused(
            f"{len(refused)} of the keys are outside the buckets and prefixes this deployment "
            f"scans ({policy}): {shown}"
        )


# --- what a reader is shown ---------------------------------------------------------------


@dataclass(frozen=True)
class RescanView:
    """A re-scan as the API and the CLI show it."""

    id: str
    state: RescanState
    selection: dict[str, Any]
    created_by: str
    created_at: datetime
    listed_at: datetime | None
    finished_at: datetime | None
    listed: int  # items recorded by the listing
    queued: int  # items whose work was sent to the bulk queues
    counts: repository.ItemCounts  # as of ``counted_at``; they add up to ``listed``
    counted_at: datetime | None  # None: not counted yet (nothing finished)
    total: int | None  # items the re-scan will have, once known
    throughput: float  # items finished per second, from its creation to ``counted_at``
    eta_seconds: float | None  # at that rate, until every item is finished; None: unknown

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state.value,
            "selection": self.selection,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "listed_at": self.listed_at.isoformat() if self.listed_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "counts": {"listed": self.listed, "queued": self.queued, **asdict(self.counts)},
            "counted_at": self.counted_at.isoformat() if self.counted_at else None,
            "total": self.total,
            "throughput": self.throughput,
            "eta_seconds": self.eta_seconds,
        }


def _aware(moment: datetime | None) -> datetime | None:
    return as_utc(moment) if moment is not None else None


def _view(rescan: Rescan, *, now: datetime | None = None) -> RescanView:
    """The re-scan as its row says, without a query: the counts are those of its last count
    (``counted_at``), and the throughput is measured up to that moment."""
    counts = repository.counts_of(rescan)
    finished = counts.done + counts.rejected + counts.failed
    created_at = _aware(rescan.created_at)
    assert created_at is not None
    counted_at = _aware(rescan.counted_at)
    end = _aware(rescan.finished_at) or counted_at or now or utcnow()
    elapsed = max((end - created_at).total_seconds(), 1e-3)
    throughput = finished / elapsed
    total: int | None = None
    if rescan.state != RescanState.LISTING:
        total = rescan.listed
    elif "keys" in rescan.selection:
        total = len(rescan.selection["keys"])
    eta: float | None = None
    if rescan.state in (RescanState.DONE, RescanState.CANCELLED):
        eta = 0.0
    elif total is not None and throughput > 0:
        eta = max(0, total - finished - counts.cancelled) / throughput
    return RescanView(
        id=rescan.public_id,
        state=rescan.state,
        selection=dict(rescan.selection),
        created_by=rescan.created_by,
        created_at=created_at,
        listed_at=_aware(rescan.listed_at),
        finished_at=_aware(rescan.finished_at),
        listed=rescan.listed,
        queued=rescan.queued,
        counts=counts,
        counted_at=counted_at,
        total=total,
        throughput=round(throughput, 3),
        eta_seconds=None if eta is None else round(eta, 1),
    )


# --- the services the API and the CLI call ------------------------------------------------


def create_rescan(
    session: Session,
    selection: Selection,
    *,
    policy: BucketPolicy | None,
    actor: str,
    token_id: int | None = None,
) -> RescanView:
    """Record a re-scan (in the caller's transaction); its listing starts at the next step
    of ``advance_rescans``. Buckets must pass ``policy`` (None refuses every bucket)."""
    _check_policy(selection, policy)
    rescan = repository.add_rescan(
        session,
        repository.RescanRecord(
            public_id=f"rs_{secrets.token_hex(8)}",
            selection=selection_document(selection),
            created_by=actor,
            token_id=token_id,
        ),
    )
    return _view(rescan)


def rescan_status(session: Session, public_id: str) -> RescanView:
    """The re-scan with its counts as of the fleet's last step for it (one row read, no
    lock: a lister holding the row does not hold up a reader)."""
    rescan = repository.rescan_by_public_id(session, public_id)
    if rescan is None:
        raise RescanNotFound(f"no re-scan {public_id[:64]!r}")
    return _view(rescan)


def list_rescans(session: Session, *, limit: int = 20) -> list[RescanView]:
    """The newest re-scans first, each as ``rescan_status`` shows it (one query in all)."""
    return [_view(rescan) for rescan in repository.list_rescans(session, limit=limit)]


def cancel_rescan(session: Session, public_id: str, *, actor: str) -> RescanView:
    """Stop a re-scan: nothing more is listed, and every item not yet finished is marked
    rejected ("cancelled"), so an intake that reaches one does nothing and the reconciler
    sends nothing more for it. Work already being done finishes (a detector's answer is
    kept, as for any upload). Cancelling a cancelled re-scan changes nothing; a finished
    one cannot be cancelled (``RescanFinished``). Waits for a lister holding the re-scan
    to commit its page."""
    rescan = repository.rescan_by_public_id(session, public_id, lock=True)
    if rescan is None:
        raise RescanNotFound(f"no re-scan {public_id[:64]!r}")
    if rescan.state == RescanState.DONE:
        raise RescanFinished(f"re-scan {public_id} has finished; there is nothing to cancel")
    if rescan.state != RescanState.CANCELLED:
        cancelled = repository.cancel_pending_items(
            session, rescan.id, message="the re-scan was cancelled before this item was scanned"
        )
        repository.set_rescan_state(
            session,
            rescan,
            RescanState.CANCELLED,
            actor=actor,
            details={"items_cancelled": cancelled, "listed": rescan.listed},
        )
        # Its items no longer change (but for an intake under way that refuses its bytes):
        # these counts are final.
        _, finished = _count_items(session, rescan)
        for outcome, count in finished.items():
            if count:
                metrics.RESCAN_ITEMS.labels(outcome).inc(count)
    return _view(rescan)


def _count_items(session: Session, rescan: Rescan) -> tuple[int, dict[str, int]]:
    """Bring the re-scan's counts up to date (``repository.count_finished_items``); returns
    its items still pending, and those this count found finished: done (scored, or rejected
    with their verdict) and failed."""
    done, failed = rescan.done + rescan.rejected, rescan.failed
    pending = repository.count_finished_items(session, rescan).pending
    return pending, {
        "done": rescan.done + rescan.rejected - done,
        "failed": rescan.failed - failed,
    }


def pending_items(session_factory: sessionmaker[Session]) -> int:
    """Items of every re-scan recorded and not finished yet (the reconciler's gauge)."""
    with session_factory() as session:
        return repository.pending_rescan_items(session)


# --- the listing --------------------------------------------------------------------------


class ObjectLister(Protocol):
    """What a listing asks of the object store (boto3's client, ``LocalObjectStore``)."""

    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]: ...


class ListingUnavailable(Exception):
    """The object store did not answer a listing; the page is tried again next step."""


@dataclass
class _Page:
    items: list[repository.RescanItem]
    cursor: str | None
    last: bool
    stopped: str | None = None  # why the listing ended early (the bucket is gone, ...)
    # Stored images: the detectors whose current version answered each already.
    answered: dict[int, set[str]] = field(default_factory=dict)


@dataclass
class _Step:
    """What one step decided, to be done after its transaction committed."""

    public_id: str
    listed_page: bool = False
    intake: list[int] = field(default_factory=list)  # source ids
    detect: list[tuple[int, str]] = field(default_factory=list)
    conclude: list[int] = field(default_factory=list)  # image ids whose answers are current
    recorded: int = 0  # items this step listed and recorded
    finished: dict[str, int] = field(default_factory=dict)  # items first counted finished

    def count(self) -> None:
        """Move the metrics once the step's transaction committed."""
        metrics.upload_received("rescan", self.recorded)
        for outcome, count in self.finished.items():
            if count:
                metrics.RESCAN_ITEMS.labels(outcome).inc(count)


def advance_rescans(
    ctx: FleetContext,
    store: ObjectLister,
    dispatcher: Dispatcher,
    *,
    page_size: int,
    max_in_flight: int,
    actor: str = ACTOR,
) -> int:
    """Take one step for every re-scan still listing or running: list its next page (unless
    it has ``max_in_flight`` items unfinished already), or mark it done once its listing
    ended and every item finished. Each re-scan is claimed with ``FOR UPDATE SKIP LOCKED``,
    so several drivers may run at once. Returns how many pages were listed (a caller may
    step again at once while it is not 0).

    An object store that does not answer leaves that re-scan for the next step; a database
    or broker error propagates (the page's items are then recorded but their work unsent,
    and the reconciler sends it once they count as stalled)."""
    after_id = 0
    pages = 0
    while True:
        try:
            with transaction(ctx.session_factory) as session:
                rescan = repository.claim_active_rescan(session, after_id=after_id)
                if rescan is None:
                    return pages
                after_id = rescan.id
                step = _step(
                    session,
                    ctx,
                    store,
                    rescan,
                    page_size=page_size,
                    max_in_flight=max_in_flight,
                    actor=actor,
                )
        except ListingUnavailable as exc:
            metrics.error("rescan")
            log.warning("re-scan listing failed; tried again next step", extra={"error": str(exc)})
            continue
        step.count()
        pages += step.listed_page
        _dispatch(ctx, dispatcher, step)


def _step(
    session: Session,
    ctx: FleetContext,
    store: ObjectLister,
    rescan: Rescan,
    *,
    page_size: int,
    max_in_flight: int,
    actor: str,
) -> _Step:
    step = _Step(rescan.public_id)
    # Every item recorded so far is looked at by this count: its pending ones are exactly
    # those unfinished now.
    in_flight, step.finished = _count_items(session, rescan)
    if rescan.state == RescanState.RUNNING:
        if in_flight == 0:
            _finish(session, rescan, actor=actor)
        return step
    room = max_in_flight - in_flight
    if room <= 0:
        return step  # paused: its queues hold enough of its work already
    selection = selection_of(rescan.selection)
    limit = max(1, min(page_size, room))
    if isinstance(selection, StoredImages):
        page = _image_page(session, ctx, rescan, selection, limit)
    else:
        page = _object_page(store, rescan.public_id, selection, rescan.cursor, limit)
    made = repository.record_rescan_items(
        session, rescan.id, page.items, submitted_by=f"rescan:{rescan.public_id}"
    )
    if isinstance(selection, StoredImages):
        _plan_images(ctx, page, made, step)
    else:
        step.intake = [source_id for source_id, _ in made]
    rescan.cursor = page.cursor
    step.listed_page = True
    step.recorded = len(made)
    sent = len(step.intake) + len({image_id for image_id, _ in step.detect})
    repository.add_to_progress(session, rescan, listed=len(made), queued=sent)
    log.info(
        "re-scan page listed",
        extra={"rescan": rescan.public_id, "items": len(made), "listed": rescan.listed},
    )
    if page.last:
        details: dict[str, Any] = {"listed": rescan.listed}
        if page.stopped is not None:
            log.warning(
                "re-scan listing stopped",
                extra={"rescan": rescan.public_id, "reason": page.stopped},
            )
            details["stopped"] = page.stopped
        repository.set_rescan_state(
            session, rescan, RescanState.RUNNING, actor=actor, details=details
        )
        if in_flight == 0 and not made:
            _finish(session, rescan, actor=actor)
    return step


def _finish(session: Session, rescan: Rescan, *, actor: str) -> None:
    counts = repository.counts_of(rescan)  # counted by this step: every item finished
    repository.set_rescan_state(
        session, rescan, RescanState.DONE, actor=actor, details=asdict(counts)
    )
    log.info("re-scan done", extra={"rescan": rescan.public_id, **asdict(counts)})


def _image_page(
    session: Session, ctx: FleetContext, rescan: Rescan, selection: StoredImages, limit: int
) -> _Page:
    """The next page of stored images, each with the detectors whose current version has
    answered it already (``_Page.answered``)."""
    versions = repository.current_versions(session, ctx.detectors)
    image_ids = repository.image_page(
        session,
        after_id=int(rescan.cursor or 0),
        limit=limit,
        which=selection.which,
        detector=selection.detector,
        detectors=ctx.detectors,
        versions=versions,
        ensemble_version=ctx.ensemble.version,
    )
    items = [
        repository.RescanItem(
            ref_key=f"rescan:{rescan.public_id}:image:{image_id}", image_id=image_id
        )
        for image_id in image_ids
    ]
    return _Page(
        items,
        str(image_ids[-1]) if image_ids else rescan.cursor,
        last=len(image_ids) < limit,
        answered=repository.current_answers(session, image_ids, versions),
    )


def _plan_images(
    ctx: FleetContext, page: _Page, made: Sequence[tuple[int, int | None]], step: _Step
) -> None:
    """Each stored image recorded needs either the detectors whose current version has not
    answered it (sent, bulk: they read the stored bytes; nothing is taken in again) or,
    when every answer is current, only a verdict under the active ensemble (concluded after
    the commit; nothing sent)."""
    for _, image_id in made:
        assert image_id is not None
        missing = [name for name in ctx.detectors if name not in page.answered[image_id]]
        if missing:
            step.detect.extend((image_id, name) for name in missing)
        else:
            step.conclude.append(image_id)


def _object_page(
    store: ObjectLister,
    public_id: str,
    selection: ObjectPrefix | ObjectKeys,
    cursor: str | None,
    limit: int,
) -> _Page:
    bucket = selection.bucket

    def item(key: str, etag: str | None = None) -> repository.RescanItem:
        return repository.RescanItem(
            ref_key=f"rescan:{public_id}:{bucket}/{key}", bucket=bucket, object_key=key, etag=etag
        )

    if isinstance(selection, ObjectKeys):
        start = int(cursor or 0)
        chunk = selection.keys[start : start + limit]
        end = start + len(chunk)
        return _Page([item(key) for key in chunk], str(end), end >= len(selection.keys))
    params: dict[str, Any] = {"Bucket": bucket, "Prefix": selection.prefix, "MaxKeys": limit}
    if cursor:
        # The last key listed rather than S3's continuation token: it never expires, so a
        # re-scan paused for days (or a lister down that long) goes on where it was.
        params["StartAfter"] = cursor
    try:
        answer = store.list_objects_v2(**params)
    except Exception as exc:
        code = _error_code(exc)
        if code in _PERMANENT_LISTING_ERRORS:
            return _Page([], cursor, last=True, stopped=f"{code}: the listing was refused")
        raise ListingUnavailable(f"listing s3://{bucket}/{selection.prefix}: {exc}") from exc
    contents = answer.get("Contents") or []
    items = []
    for entry in contents:
        key = str(entry["Key"])
        if "\x00" in key or not is_clean(key):
            # No database stores it, and no fetch could name it again.
            log.warning("re-scan skipped a key that cannot be stored", extra={"bucket": bucket})
            continue
        etag = str(entry.get("ETag") or "").strip('"') or None
        items.append(item(key, etag))
    last_key = str(contents[-1]["Key"]) if contents else cursor
    return _Page(items, last_key, last=not contents or not answer.get("IsTruncated"))


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error")
        if isinstance(error, Mapping):
            return str(error.get("Code", ""))
    return None


def _dispatch(ctx: FleetContext, dispatcher: Dispatcher, step: _Step) -> None:
    """Send a committed page's work: intakes and detects to the bulk queues; the images
    whose answers are all current are concluded here, each under its row lock."""
    for source_id in step.intake:
        dispatcher.intake(source_id, bulk=True)
    for image_id, name in step.detect:
        dispatcher.detect(image_id, name, bulk=True)
    if step.conclude:
        ctx.ensemble_id()  # registered before a transaction that locks an image
        for image_id in step.conclude:
            with transaction(ctx.session_factory) as session:
                fleet.conclude(session, ctx, image_id)
