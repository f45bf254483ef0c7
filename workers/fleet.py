"""The fleet's steps as plain functions; the Celery tasks in ``tasks/`` only call these.

One of the two pipelines over the scoring core (``workers/scoring.py``); the local-file
scan is the other.

    upload recorded (source row, pending)  -> take_in: fetch once, hash, validate, find
    the detectors still missing            -> detect (one per detector queue): count the
    attempt, score, store the detection    -> conclude: under a row lock on the image, the
    writer of the last expected detection stores the verdict (once); the image's review case
    follows it (opened, withdrawn or reopened: db/repository/review.py).

Every step is idempotent: a redelivered message or a duplicated event finds its work done
and changes nothing. Nothing here sends messages or names queues; the caller sends the
returned work after the transaction that recorded it has committed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeAlias

from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import SourceKind, SourceStatus, Verdict, utcnow
from db.session import transaction
from workers import callbacks, scoring
from workers.budget import DEFAULT_MEMORY_BUDGET, MemoryBudget, reserving
from workers.detectors.base import Detector
from workers.engine import (
    BatchObserver,
    DetectorResult,
    MicroBatcher,
    Prepared,
    detector_batcher,
    draft_size,
    prepare,
    run_detector,
)
from workers.ensemble import EnsembleConfig
from workers.grouping import GroupedCalls
from workers.intake import Admit, IntakeLimits, Rejected, RejectReason, decode
from workers.scoring import TransientError
from workers.uploads import Upload, record_object

log = logging.getLogger(__name__)

ACTOR = "fleet"


class S3Reader(Protocol):
    def get_object(self, **kwargs: Any) -> Mapping[str, Any]: ...


@dataclass
class FleetContext:
    session_factory: sessionmaker[Session]
    s3: Callable[[], S3Reader]
    limits: IntakeLimits
    ensemble: EnsembleConfig  # the active configuration: its verdicts move review cases
    detectors: Sequence[str]  # the ensemble: every image waits for all of these
    max_attempts: int = 3
    # Decoded images this process holds at once, across its task threads.
    memory: MemoryBudget = field(default_factory=lambda: MemoryBudget(DEFAULT_MEMORY_BUDGET))
    _ensemble_id: int | None = field(default=None, init=False, repr=False)
    _registering: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def ensemble_id(self) -> int:
        """The stored id of ``ensemble``, registered on first use (in a transaction of its
        own: call it before opening one that locks an image)."""
        with self._registering:
            if self._ensemble_id is None:
                self._ensemble_id = scoring.register_ensemble(self.session_factory, self.ensemble)
            return self._ensemble_id


# --- recording uploads ------------------------------------------------------------------


def record_upload(
    ctx: FleetContext, upload: Upload, *, kind: SourceKind = SourceKind.UPLOAD_EVENT
) -> int | None:
    """Record an upload (``workers.uploads.record_object``); returns the source id to take
    in when this call recorded it, or None when this exact object was recorded before. A
    dispatch lost after this commit is not lost work: the reconciler (resend_stalled) finds
    the upload still pending and sends its intake again."""
    return record_object(ctx.session_factory, upload, kind=kind)


# --- intake -----------------------------------------------------------------------------


def fetch_object(s3: S3Reader, stored: repository.StoredObject, limits: IntakeLimits) -> bytes:
    """The object's bytes, read at most once past the size limit: one GET, whose length is
    checked before its body is read (an object over the limit is refused unread)."""
    from botocore.exceptions import BotoCoreError, ClientError

    params: dict[str, Any] = {"Bucket": stored.bucket, "Key": stored.key}
    if stored.version_id:
        params["VersionId"] = stored.version_id
    try:
        response = s3.get_object(**params)
        body = response["Body"]
        try:
            size = int(response.get("ContentLength") or 0)
            if size > limits.max_bytes:
                raise Rejected(
                    RejectReason.TOO_LARGE,
                    f"the object is {size} bytes; the limit is {limits.max_bytes}",
                )
            data: bytes = body.read(limits.max_bytes + 1)
        finally:
            body.close()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        # The HTTP status decides where the code is one this list does not name (a store's
        # own codes, an object encrypted with a customer key): a 4xx answer other than
        # throttling does not change on retry.
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in {"NoSuchKey", "NoSuchVersion", "NotFound", "NoSuchBucket"} or status == 404:
            raise Rejected(
                RejectReason.MISSING,
                f"s3://{stored.bucket}/{stored.key} no longer exists",
            ) from exc
        if code == "AccessDenied" or status == 403:
            raise Rejected(
                RejectReason.UNREADABLE, f"access to the object was denied ({code})"
            ) from exc
        if code in {"InvalidArgument", "InvalidBucketName", "KeyTooLongError"} or status == 400:
            # A name this store cannot hold an object under, or a request it refuses as
            # malformed (a version id S3 does not accept): no retry changes that.
            raise Rejected(
                RejectReason.UNREADABLE, f"the store cannot read this object ({code})"
            ) from exc
        raise TransientError(f"S3 error {code}") from exc
    except BotoCoreError as exc:
        raise TransientError(f"S3 unreachable: {exc}") from exc
    if len(data) > limits.max_bytes:
        raise Rejected(RejectReason.TOO_LARGE, f"the object is over {limits.max_bytes} bytes")
    if not data:
        raise Rejected(RejectReason.EMPTY, "the object is empty")
    return data


def take_in(ctx: FleetContext, source_id: int) -> list[tuple[int, str]]:
    """Fetch, hash and validate one upload. Returns ``(image_id, detector)`` pairs still to
    run; an empty list when the upload was rejected or every result could be reused."""
    with ctx.session_factory() as session:
        source = repository.get_source(session, source_id)
        if source is None:
            raise LookupError(f"no source {source_id}")
        if source.status != SourceStatus.PENDING:
            return []
        stored = repository.stored_object(session, source_id)
    if stored is None:
        raise LookupError(f"source {source_id} names no object to fetch")
    # Intake decodes to check the upload: its pixels are reserved from the process's budget
    # like a detector's, and given back once what they say is stored.
    with reserving(ctx.memory) as admit:
        return _record(ctx, source_id, stored, admit)


def _record(
    ctx: FleetContext, source_id: int, stored: repository.StoredObject, admit: Admit
) -> list[tuple[int, str]]:
    intake = scoring.take_in(
        lambda: fetch_object(ctx.s3(), stored, ctx.limits), ctx.limits, admit=admit
    )
    ctx.ensemble_id()  # registered before a transaction that may lock the image
    with transaction(ctx.session_factory) as session:
        image_id = scoring.record_intake(session, source_id, intake)
        if intake.rejection is not None:
            log.info(
                "upload rejected",
                extra={"source_id": source_id, "reason": intake.rejection.reason.value},
            )
            if image_id is not None:  # bytes were read: their "not scored" verdict
                repository.lock_image(session, image_id)
                scoring.conclude_unscored(
                    session,
                    image_id,
                    intake.rejection,
                    ctx.ensemble,
                    ensemble_id=ctx.ensemble_id(),
                    actor=ACTOR,
                )
            # The refusal is the upload's final outcome: a scan of it is complete.
            callbacks.enqueue_scan_completed(
                session, [source_id], active_ensemble=ctx.ensemble.version
            )
            return []
        assert image_id is not None  # bytes were read and accepted
        versions = repository.current_versions(session, ctx.detectors)
        reusable = repository.reusable_detections(session, image_id, versions)
        missing = [name for name in ctx.detectors if name not in reusable]
        if not missing:
            conclude(session, ctx, image_id)
        return [(image_id, name) for name in missing]


# --- detection --------------------------------------------------------------------------


@dataclass
class Batching:
    """How a worker that holds many messages at once runs its detector: every message's
    thread has its delivery counted with those of the messages that arrived with it
    (:func:`delivery_desk`), fetches and decodes its own image, then waits on ``batcher``
    for the forward pass and on the store writer (:func:`store_writer`) for its detection
    to be stored with the answers that finished with it. ``suspects`` serialises
    redelivered messages (see ``detect``)."""

    batcher: MicroBatcher[Prepared, DetectorResult]
    suspects: threading.Lock = field(default_factory=threading.Lock)
    # Decoding and preprocessing are CPU work: only as many at once as there are cores for
    # it, however many messages are waiting (more only thrash the cores the model needs).
    # Entered by every message's thread around its decoding; a semaphore unless a caller
    # has another way to pace them.
    decoding: AbstractContextManager[Any] = field(
        default_factory=lambda: threading.BoundedSemaphore(2)
    )
    _desks: tuple[Deliveries, Answers] | None = field(default=None, init=False, repr=False)
    _starting: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def for_detector(
        cls,
        detector: Detector,
        *,
        max_batch: int,
        max_wait_s: float,
        decode_threads: int = 2,
        watchdog_s: float | None = None,
        on_stuck: Callable[[float], None] | None = None,
        observer: BatchObserver | None = None,
    ) -> Batching:
        return cls(
            # The engine's model stage, as the scan uses it; every message's thread
            # announces itself (see detect), so a batch waits only for those on their way.
            detector_batcher(
                detector,
                max_batch=max_batch,
                max_wait_s=max_wait_s,
                watchdog_s=watchdog_s,
                on_stuck=on_stuck,
                announced=True,
                observer=observer,
            ),
            decoding=threading.BoundedSemaphore(decode_threads),
        )

    def desks(self, ctx: FleetContext, detector: Detector) -> tuple[Deliveries, Answers]:
        """The threads that count this detector's deliveries and store its answers, in
        groups; started on first use."""
        with self._starting:
            if self._desks is None:
                self._desks = (delivery_desk(ctx, detector), store_writer(ctx, detector))
            return self._desks

    def close(self) -> None:
        """Run and store what was submitted, then stop the batcher's and the desks' threads:
        once every ``detect`` call that uses this has returned."""
        self.batcher.close()
        with self._starting:
            if self._desks is not None:
                for desk in self._desks:
                    desk.close()


# A message's delivery counted (None: a suspect, see ``detect``), and an answer stored.
Deliveries: TypeAlias = GroupedCalls[tuple[int, str], "_Delivery | None"]
Answers: TypeAlias = GroupedCalls[tuple[int, DetectorResult], "Verdict | None"]


def delivery_desk(ctx: FleetContext, detector: Detector) -> Deliveries:
    """Counts the deliveries of one detector's messages for the threads of a batching
    worker: those that arrived together, in one transaction (:func:`_count_deliveries`)."""
    return GroupedCalls(
        lambda messages: _count_deliveries(ctx, detector, messages),
        name=f"deliveries-{detector.spec.name}",
    )


def store_writer(ctx: FleetContext, detector: Detector) -> Answers:
    """Stores one detector's answers (image id, result) for the threads of a batching
    worker, off the threads that run the model: those that finished together, in one
    transaction (:func:`_store_group`); each call returns the image's verdict if its answer
    was the last one missing."""

    def store(answers: Sequence[tuple[int, DetectorResult]]) -> list[Verdict | None]:
        verdicts = _store_group(ctx, detector, answers)
        return [verdicts[image_id] for image_id, _ in answers]

    return GroupedCalls(store, name=f"store-{detector.spec.name}")


@dataclass(frozen=True)
class _Delivery:
    """What the database says of a message when it arrives."""

    attempts: int  # deliveries of this message, this one included
    done: bool  # a reusable detection by this detector version is stored already
    sha256: str  # the image's bytes, and the objects that delivered them (oldest first)
    objects: list[repository.StoredObject]


def _count_delivery(
    session: Session, detector: Detector, image_id: int, message_id: str
) -> _Delivery:
    name = detector.spec.name
    attempts = repository.count_attempt(session, image_id, name, message_id)
    done = bool(repository.reusable_detections(session, image_id, {name: detector.version}))
    image = repository.get_image(session, image_id)
    if image is None:
        raise LookupError(f"no image {image_id}")
    return _Delivery(attempts, done, image.sha256, repository.objects_of_image(session, image_id))


def _count_deliveries(
    ctx: FleetContext, detector: Detector, messages: Sequence[tuple[int, str]]
) -> list[_Delivery | None]:
    """:func:`_count_delivery` for the messages (image id, message id) that arrived
    together, in one transaction of a few statements for them all. A message whose work
    was delivered before is a suspect: it is not counted here (None; ``detect`` counts it
    alone, in its turn), nor is a second message for an image in the same group."""
    name = detector.spec.name
    with transaction(ctx.session_factory) as session:
        so_far = repository.attempts_so_far_of(session, [i for i, _ in messages], name)
        counting: dict[int, int] = {}  # image id -> the position of the message counted
        for position, (image_id, _) in enumerate(messages):
            if not so_far[image_id] and image_id not in counting:
                counting[image_id] = position
        hashes = repository.sha256_of_images(session, counting)
        if missing := sorted(set(counting) - set(hashes)):
            raise LookupError(f"no image {missing[0]}")
        attempts = repository.count_attempts(
            session, name, [messages[position] for position in counting.values()]
        )
        done = repository.reusable_detections_of(session, counting, {name: detector.version})
        objects = repository.objects_of_images(session, counting)
    return [
        _Delivery(
            attempts[image_id, message_id],
            bool(done[image_id]),
            hashes[image_id],
            objects[image_id],
        )
        if counting.get(image_id) == position
        else None
        for position, (image_id, message_id) in enumerate(messages)
    ]


def detect(
    ctx: FleetContext,
    detector: Detector,
    image_id: int,
    *,
    message_id: str,
    batching: Batching | None = None,
) -> Verdict | None:
    """Run one detector on one image and store its answer; returns the verdict if this was
    the last detection the image was waiting for. ``message_id`` names the message being
    handled: its deliveries are counted, and after ``max_attempts`` of them without a
    result the detection is stored as failed. Another message for the same work (sent
    again by the reconciler) has its own count, and finds the work done if it was.

    With ``batching``, the forward pass joins other messages' images in one batch, and the
    answer is stored with theirs. Work delivered before (a worker may have died while
    holding it) is a suspect: it waits for the other suspects, counts its attempt only
    then, and runs in a batch of its own. So an image that kills its worker every time
    reaches ``max_attempts`` and is recorded as an error, while the innocent messages that
    died beside it count at most one extra attempt.
    """
    ctx.ensemble_id()  # registered before a transaction that may lock the image
    if batching is None:
        with transaction(ctx.session_factory) as session:
            delivery = _count_delivery(session, detector, image_id, message_id)
        return _attempt(
            ctx,
            detector,
            image_id,
            delivery,
            score=lambda p: run_detector(detector, [p], max_batch=1)[0],
            store=lambda image, result: _store_group(ctx, detector, [(image, result)])[image],
        )
    deliveries, answers = batching.desks(ctx, detector)
    found = deliveries((image_id, message_id))
    suspect = found is None
    # A suspect announces itself only once its turn has come: one waiting for the lock
    # must not hold a batch open.
    with (
        batching.suspects if suspect else nullcontext(),
        batching.batcher.expecting() as submit,
    ):
        if found is None:
            with transaction(ctx.session_factory) as session:
                found = _count_delivery(session, detector, image_id, message_id)
        return _attempt(
            ctx,
            detector,
            image_id,
            found,
            score=lambda p: submit(p, alone=suspect).result(),
            store=lambda image, result: answers((image, result)),
            decoding=batching.decoding,
        )


def _attempt(
    ctx: FleetContext,
    detector: Detector,
    image_id: int,
    delivery: _Delivery,
    *,
    score: Callable[[Prepared], DetectorResult],
    store: Callable[[int, DetectorResult], Verdict | None],
    decoding: AbstractContextManager[Any] | None = None,
) -> Verdict | None:
    if delivery.done:
        with transaction(ctx.session_factory) as session:
            return conclude(session, ctx, image_id)
    if delivery.attempts > ctx.max_attempts:
        gave_up = (
            f"gave up after {ctx.max_attempts} attempts: every delivery of the message ended "
            "without a result (the worker was killed or the task timed out)"
        )
        return store(image_id, DetectorResult.failed(gave_up))
    # The decoded image is held until its detection is stored: reserved from the process's
    # budget once the header says how large it is (a batch closes on its own deadline, so
    # a message waiting for memory never holds up the ones that hold it).
    with reserving(ctx.memory) as admit:
        try:
            data = _bytes_of(ctx, delivery)
            with decoding or nullcontext():
                decoded = decode(data, ctx.limits, admit=admit, draft=draft_size([detector]))
                prepared = prepare(decoded.image, data, [detector])
        except Rejected as exc:
            failed = DetectorResult.failed(f"{exc.reason.value}: {exc.message}")
            return store(image_id, failed)
        return store(image_id, score(prepared))


def _bytes_of(ctx: FleetContext, delivery: _Delivery) -> bytes:
    """The image's bytes, from any of its sources whose object still has them."""
    last: Rejected | None = None
    for stored in delivery.objects:
        try:
            data = fetch_object(ctx.s3(), stored, ctx.limits)
        except Rejected as exc:
            last = exc
            continue
        if scoring.sha256_of(data) == delivery.sha256:
            return data
        last = Rejected(RejectReason.MISSING, "the object was replaced by other content")
    raise last or Rejected(RejectReason.MISSING, "no stored object holds these bytes")


def _store_group(
    ctx: FleetContext, detector: Detector, answers: Sequence[tuple[int, DetectorResult]]
) -> dict[int, Verdict | None]:
    """Store ``detector``'s answers (image id, result) in one transaction, and the verdict
    of every image they complete; each image's verdict, None where one is still missing."""
    image_ids = sorted({image_id for image_id, _ in answers})
    with transaction(ctx.session_factory) as session:
        repository.lock_images(session, image_ids)  # first: the fan-in below needs them
        repository.save_detections(
            session,
            [
                (image_id, scoring.detection_record(detector, result))
                for image_id, result in answers
            ],
        )
        return _conclude_locked(session, ctx, image_ids)


# --- fan-in -----------------------------------------------------------------------------


def conclude(session: Session, ctx: FleetContext, image_id: int) -> Verdict | None:
    """If every detector of the ensemble has answered for this image, store the verdict
    (once: the image row is locked, and the verdict is unique per configuration and
    detector set) and mark the image's pending sources scored."""
    repository.lock_image(session, image_id)
    return _conclude_locked(session, ctx, [image_id])[image_id]


def _conclude_locked(
    session: Session, ctx: FleetContext, image_ids: Sequence[int]
) -> dict[int, Verdict | None]:
    """:func:`conclude` for several images whose row locks ``session`` holds, in a few
    statements for them all; each image's verdict, None where a detection is missing."""
    verdicts: dict[int, Verdict | None] = dict.fromkeys(image_ids)
    latest = repository.latest_detections_of(session, image_ids, ctx.detectors)
    complete = [(i, rows) for i, rows in latest.items() if set(rows) == set(ctx.detectors)]
    if not complete:
        return verdicts
    concluded = scoring.conclude_many(
        session, complete, ctx.ensemble, ensemble_id=ctx.ensemble_id(), actor=ACTOR
    )
    for (image_id, _), done in zip(complete, concluded, strict=True):
        verdicts[image_id] = done.verdict
    scored = repository.mark_pending_sources_scored_of(session, [i for i, _ in complete])
    callbacks.enqueue_scan_completed(session, scored, active_ensemble=ctx.ensemble.version)
    return verdicts


# --- lost messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class Resend:
    """Work to send again for uploads that stayed pending too long. The work of a batch
    re-scan's items and of scans asked for at low priority is also listed in
    ``bulk_intake`` / ``bulk_detect``: it goes back to the low-priority queues it came from."""

    intake: list[int]  # source ids whose intake never finished
    detect: list[tuple[int, str]]  # (image id, detector) with no detection stored
    bulk_intake: list[int] = field(default_factory=list)  # of ``intake``: bulk work
    bulk_detect: list[tuple[int, str]] = field(default_factory=list)  # of ``detect``


class Backlog(Protocol):
    """Whether stalled work of each kind is better left where it is (asked of the broker):
    true while its queue holds messages that a live worker will reach within the delay, and
    while nobody consumes the queue at all (sending more into it cannot help);
    ``tasks.submit.BrokerBacklog`` says how it tells them apart and warns of the latter."""

    def intake_waiting(self, *, bulk: bool = False) -> bool: ...

    def detection_waiting(self, detector: str, *, bulk: bool = False) -> bool: ...


class NoBacklog:
    """Nothing is waiting anywhere: every stalled upload's work is sent again."""

    def intake_waiting(self, *, bulk: bool = False) -> bool:
        return False

    def detection_waiting(self, detector: str, *, bulk: bool = False) -> bool:
        return False


def resend_stalled(
    ctx: FleetContext,
    *,
    after_s: float,
    backlog: Backlog | None = None,
    now: datetime | None = None,
    limit: int = 500,
) -> Resend:
    """The messages to send again for uploads still pending ``after_s`` seconds after they
    were recorded (then after 2x, 4x ... that delay for each further try).

    Work that ``backlog`` says to leave is left, unmarked, for a later check: in a backlog
    that a worker drains, an old pending upload is most likely waiting its turn, and sending
    its work again would only lengthen the queue; into a queue that nobody consumes, a copy
    would wait as long as the original. Lost work is sent once its queue drains, or once
    the queue's oldest message has waited longer than ``after_s`` (a queue that never
    drains).

    The broker is not the record of what is owed, Postgres is: Redis pops a message before
    it marks it unacknowledged, so a worker killed between the two loses it, and a broker
    that lost its disk loses everything queued. Sending again is safe because every step is
    idempotent; an image whose detections are all stored but whose verdict is missing gets
    one detect message, which finds its work done and concludes.
    """
    waiting = backlog or NoBacklog()
    now = now or utcnow()
    intake: list[int] = []
    detect: dict[tuple[int, str], None] = {}
    bulk_intake: list[int] = []
    bulk_detect: dict[tuple[int, str], None] = {}
    urgent: dict[tuple[int, str], None] = {}  # needed by an upload too: not low priority
    # Bulk work whose low-priority queue is still being worked through: looked at again
    # after another delay, so that it does not hold the head of the check's order.
    postponed: list[int] = []
    with transaction(ctx.session_factory) as session:
        stalled = repository.stalled_sources(
            session, created_before=now - timedelta(seconds=after_s), now=now, limit=limit
        )
        low_priority = repository.low_priority_sources(session, [s.id for s in stalled])
        for source in stalled:
            # A batch re-scan's item, or a scan asked for at low priority: its work goes back
            # to the low-priority queues it was first sent to.
            bulk = source.rescan_id is not None or source.id in low_priority
            options = {"bulk": True} if bulk else {}
            if source.image_id is None:
                if waiting.intake_waiting(**options):
                    if bulk:
                        postponed.append(source.id)
                    continue
                intake.append(source.id)
                if bulk:
                    bulk_intake.append(source.id)
            else:
                stored = repository.latest_detections(session, source.image_id, ctx.detectors)
                missing = [n for n in ctx.detectors if n not in stored] or [ctx.detectors[0]]
                if any(waiting.detection_waiting(name, **options) for name in missing):
                    if bulk:
                        postponed.append(source.id)
                    continue
                work = {(source.image_id, name): None for name in missing}
                detect.update(work)
                (bulk_detect if bulk else urgent).update(work)
            delay = after_s * 2 ** min(source.resend_count + 1, 8)
            repository.mark_resent(session, source.id, recheck_at=now + timedelta(seconds=delay))
        repository.postpone_checks(session, postponed, recheck_at=now + timedelta(seconds=after_s))
    if intake or detect:
        log.warning(
            "sending again the work of stalled uploads",
            extra={"intake": len(intake), "detect": len(detect)},
        )
    return Resend(
        intake=intake,
        detect=list(detect),
        bulk_intake=bulk_intake,
        bulk_detect=[work for work in detect if work in bulk_detect and work not in urgent],
    )
