"""The local-file scan: files in, one stored verdict per file out (``synthsentry scan``).

One of the two pipelines over the scoring core (``workers/scoring.py``); the fleet is the
other. A stream, in which every stage works at once and bounded queues join them: read,
hash, decode and preprocess in threads (no database); register images and sources and find
results that can be reused (a store thread, one transaction per group of files that
arrived together); the detectors that are still missing (model detectors in batches
through the engine's pipeline, model-free ones on threads); then detections, verdicts and
review cases (the store thread again, one transaction per group). Bad files become
``rejected`` results; they never stop the run.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import Detection, SourceKind
from db.session import transaction
from workers import scoring
from workers.budget import DEFAULT_MEMORY_BUDGET, MemoryBudget, Reservation, image_cost
from workers.detectors.base import Detector
from workers.engine import (
    PIPELINE_DEPTH,
    BatchObserver,
    DetectorResult,
    IgnoreBatches,
    Prepared,
    detector_batcher,
    draft_size,
    is_staged,
    prepare,
    run_detector,
)
from workers.ensemble import EnsembleConfig
from workers.intake import IntakeLimits, Rejected, RejectReason, read_local
from workers.names import identity, printable, raw_base64
from workers.results import (
    DetectorReport,
    ScanOutcome,
    image_summary,
    rejected_outcome,
    review_of,
    reviews_of,
    scored_outcome,
)

log = logging.getLogger(__name__)

# How long a model batch may wait for company once the pipeline has room for it. A scan
# closes a batch as soon as nothing else is ready, so this only caps a steady trickle.
BATCH_WINDOW_S = 0.5
# The store thread's groups: it writes when this many model batches' worth of files wait,
# or after STORE_GATHER_S, whichever comes first (and at once when no file is on its way).
# Each group costs a transaction and a dozen statements whatever its size, on the thread
# and interpreter lock the intake threads need. With a GPU-like model on two cores, gathering
# one batch for at most 0.05 s gave 96 img/s and 0.2 s 108 (intake ceiling 130); two
# batches for at most 0.4 s raised the engine from 0.81-0.85 to 0.88-0.91 of the intake
# ceiling (medians of four runs, twice, 235 files); four batches for at most 0.8 s, with
# the allocator keeping freed images mapped (workers/allocator.py), took commfor-vit384's
# stand-in from 0.855 to 0.88 (medians of eight runs in turn, 84 files).
STORE_GROUP_BATCHES = 4
STORE_GATHER_S = 0.8


def iter_image_paths(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named directly, and every file below named folders, in a stable order: a
    folder's files (sorted by name), then its subfolders one after the other, each in the
    same way. Hidden entries (a leading dot) are skipped.

    The walk keeps its own stack, so a tree of any depth is listed without recursion.
    Symbolic links to files are scanned (their target is read); symbolic links to folders
    are not followed, so a link loop cannot make the walk endless. A path that does not
    exist, and a folder that cannot be listed, are yielded as they are, so that they are
    reported (``missing``, ``unreadable``) rather than silently dropped.
    """
    for path in paths:
        if not path.is_dir():
            yield path
            continue
        stack = [path]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(
                        (e for e in listing if not e.name.startswith(".")), key=lambda e: e.name
                    )
            except OSError as exc:
                log.warning(
                    "folder cannot be listed",
                    extra={"path": printable(folder), "error": printable(str(exc))},
                )
                yield folder
                continue
            subfolders = []
            for entry in entries:
                if _is_folder(entry):
                    subfolders.append(Path(entry.path))
                else:
                    yield Path(entry.path)
            stack.extend(reversed(subfolders))


def _is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


@dataclass
class _Item:
    index: int
    path: Path
    intake: scoring.Intake
    prepared: Prepared | None = None
    source_id: int | None = None
    image_id: int | None = None
    summary: dict[str, Any] | None = None  # the decoded image's facts, kept once freed
    reused: dict[str, Detection] = field(default_factory=dict)
    fresh: dict[str, DetectorResult] = field(default_factory=dict)
    reservation: Reservation = field(default_factory=Reservation)
    waiting: int = 0  # detectors still working on it
    waiting_for_pixels: int = 0  # of those, the ones that read the decoded image


def _take_in(
    index: int,
    path: Path,
    limits: IntakeLimits,
    detectors: Sequence[Detector],
    budget: MemoryBudget,
    *,
    draft: tuple[int, int] | None = None,
) -> _Item:
    """Read, hash, decode and preprocess one file (runs in an intake thread). The pixels
    are reserved from ``budget`` once the header has said how many, and held until no
    detector needs them (see ``_Stream``)."""
    reservation: Reservation | None = None

    def admit(width: int, height: int, file_bytes: int) -> None:
        nonlocal reservation
        reservation = budget.reserve(image_cost(width, height, file_bytes))

    try:
        read = partial(read_local, path, limits)
        intake = scoring.take_in(read, limits, admit=admit, draft=draft)
    except scoring.TransientError as exc:  # one file must not end the run: scan it again
        log.warning(
            "intake failed for now", extra={"path": printable(path), "error": printable(str(exc))}
        )
        why = Rejected(RejectReason.DECODE_ERROR, f"{exc}; scan the file again")
        intake = scoring.Intake.refused(why)
    item = _Item(index=index, path=path, intake=intake, reservation=reservation or Reservation())
    if intake.decoded is None:  # a refusal keeps no pixels
        budget.release(item.reservation)
        return item
    try:
        item.prepared = prepare(intake.decoded.image, intake.data, detectors)
    except Exception as exc:  # a bug in preprocessing must not end the run
        log.exception("preprocessing failed unexpectedly", extra={"path": printable(path)})
        why = Rejected(RejectReason.DECODE_ERROR, f"unexpected preprocessing error: {exc}")
        item.intake = scoring.Intake.refused(why, intake.data)
        budget.release(item.reservation)
    return item


def _run_alone(detector: Detector, prepared: Prepared) -> DetectorResult:
    """One model-free detector on one image (a thread of the scan's detector pool)."""
    (result,) = run_detector(detector, [prepared], max_batch=1)
    return result


class Scanner:
    def __init__(
        self,
        detectors: Sequence[Detector],
        session_factory: sessionmaker[Session],
        limits: IntakeLimits,
        ensemble: EnsembleConfig,
        *,
        batch_size: int = 16,
        decode_threads: int = 2,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        actor: str = "cli",
        active: bool = True,
        window: int | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        """``batch_size``: the largest batch a model sees. ``decode_threads``: intake threads
        (read, hash, decode, preprocess; model-free detectors run on as many threads beside
        them). ``memory_budget``: bytes of decoded images held at once (see
        ``workers.budget``). ``window``: files between intake and the reader at once
        (default: enough to keep every stage busy; it bounds the memory a scan holds
        whatever the number of files). ``active``: the ensemble is the active
        configuration, whose verdicts may withdraw review cases; an ad-hoc one (a scan with
        its own threshold or detectors) may only open them. ``observer`` hears of every
        model batch (by default no one)."""
        self.detectors = list(detectors)
        self.session_factory = session_factory
        self.limits = limits
        self.ensemble = ensemble
        self.batch_size = max(1, batch_size)
        self.decode_threads = max(1, decode_threads)
        self.memory_budget = memory_budget
        self.store_group = STORE_GROUP_BATCHES * self.batch_size
        # Room for the batches in the model's pipeline, a store group, and the files the
        # intake threads are working on or have just finished.
        self.window = max(
            1,
            window or PIPELINE_DEPTH * self.batch_size + self.store_group + 2 * self.decode_threads,
        )
        self.observer = observer
        self.peak_reserved = 0  # the most bytes of images held at once in the last scan
        self.actor = actor
        self.active = active
        self.versions = {d.spec.name: d.version for d in self.detectors}
        self._ensemble_id: int | None = None

    def scan(self, paths: Iterable[Path]) -> Iterator[ScanOutcome]:
        """Results in input order, as a stream: intake threads read, hash, decode and
        preprocess up to ``window`` files ahead of the reader; one thread stores (the
        images and sources as they arrive, then the detections and verdicts as the
        detectors answer, each in one transaction per group); each model detector runs its
        batches through the engine's pipeline (``workers.engine.detector_batcher``) as
        soon as images are ready. Results that finish early wait for the ones before
        them. Closing the iterator (an error, Ctrl-C, a reader that stops) stops the
        stream; whatever was stored stays stored."""
        self._ensemble_id = scoring.register_ensemble(self.session_factory, self.ensemble)
        budget = MemoryBudget(self.memory_budget)
        stream = _Stream(self, budget)
        try:
            yield from stream.outcomes(paths)
        finally:
            stream.stop()
            self.peak_reserved = budget.peak

    def _register(self, session: Session, items: Sequence[_Item]) -> None:
        """Store the sources and images of files that finished intake, and find the results
        stored for those images that can be reused: a few statements for the group."""
        taken = []
        for item in items:
            absolute = item.path.absolute()
            ref = repository.SourceRef(
                kind=SourceKind.CLI,
                ref_key=f"{identity(absolute)}@{item.intake.sha256 or 'unread'}",
                local_path=printable(absolute),
                submitted_by=self.actor,
            )
            taken.append((ref, item.intake))
        for item, (source_id, image_id) in zip(
            items, scoring.record_intakes(session, taken), strict=True
        ):
            item.source_id, item.image_id = source_id, image_id
            decoded = item.intake.decoded
            if decoded is not None:
                item.summary = image_summary(
                    decoded.format, decoded.width, decoded.height, decoded.anomalies
                )
        accepted = [i for i in items if i.image_id is not None and i.intake.rejection is None]
        reusable = repository.reusable_detections_of(
            session, (i.image_id for i in accepted if i.image_id is not None), self.versions
        )
        for item in accepted:
            assert item.image_id is not None
            item.reused = reusable[item.image_id]

    def _conclude(self, session: Session, items: Sequence[_Item]) -> list[ScanOutcome]:
        """Store the detections, verdicts and review cases of files every detector answered
        (their images locked by the caller), the scored ones together and first: a refused
        copy of bytes that detectors scored in the same group then finds their verdict, as
        ``conclude_unscored`` wants, whatever the files' order. Outcomes in the order of
        ``items``."""
        outcomes: dict[int, ScanOutcome] = {}
        scored = [item for item in items if item.intake.rejection is None]
        fresh = [
            (item.image_id, scoring.detection_record(d, item.fresh[d.spec.name]))
            for item in scored
            for d in self.detectors
            if d.spec.name not in item.reused and item.image_id is not None
        ]
        saved = iter(repository.save_detections(session, fresh))
        found: list[tuple[int, dict[str, Detection]]] = []
        reports: list[list[DetectorReport]] = []
        for item in scored:
            assert item.image_id is not None
            rows = {}
            for detector in self.detectors:  # the order ``fresh`` was made in
                name = detector.spec.name
                rows[name] = item.reused[name] if name in item.reused else next(saved)
            found.append((item.image_id, rows))
            reports.append(
                [
                    DetectorReport.from_row(row, reused=name in item.reused)
                    for name, row in rows.items()
                ]
            )
        assert self._ensemble_id is not None  # registered when the scan started
        concluded = scoring.conclude_many(
            session,
            found,
            self.ensemble,
            ensemble_id=self._ensemble_id,
            actor=self.actor,
            active=self.active,
        )
        repository.mark_sources_scored(session, [i.source_id for i in scored if i.source_id])
        reviews = reviews_of(
            session, (image_id for image_id, _ in found), active_ensemble=self.ensemble.version
        )
        for item, verdict, item_reports in zip(
            scored, (c.verdict for c in concluded), reports, strict=True
        ):
            assert item.summary is not None and item.intake.sha256 is not None
            outcomes[item.index] = scored_outcome(
                printable(item.path),
                item.intake.sha256,
                verdict,
                item_reports,
                image=item.summary,
                review=reviews.get(verdict.image_id),
            )
        for item in items:
            if item.intake.rejection is not None:
                outcomes[item.index] = self._not_scored(session, item, item.intake.rejection)
        return [replace(outcomes[i.index], path_bytes=raw_base64(i.path)) for i in items]

    def _not_scored(self, session: Session, item: _Item, rejection: Rejected) -> ScanOutcome:
        """A refused file's outcome; bytes that were read also get their "not scored"
        verdict, which opens a review case for the reasons the ensemble sends to review."""
        verdict = review = None
        if item.image_id is not None:
            assert self._ensemble_id is not None  # registered when the scan started
            concluded = scoring.conclude_unscored(
                session,
                item.image_id,
                rejection,
                self.ensemble,
                ensemble_id=self._ensemble_id,
                actor=self.actor,
                active=self.active,
            )
            verdict = concluded.verdict if concluded is not None else None
            review = review_of(session, item.image_id, active_ensemble=self.ensemble.version)
        return rejected_outcome(
            printable(item.path),
            item.intake.sha256,
            rejection.reason.value,
            rejection.message,
            verdict=verdict,
            review=review,
        )


class _Stream:
    """One scan's moving parts (see ``Scanner.scan``). Threads: the intake pool, a pool for
    model-free detectors, one pipeline per model detector, and the store thread; the reader's
    thread tops up intake and hands results out in order. Every queue between them is
    bounded by the window: at most ``window`` files are anywhere between intake and reader.
    """

    def __init__(self, scanner: Scanner, budget: MemoryBudget) -> None:
        self.scanner = scanner
        self.budget = budget
        # One lock, two conditions: the reader waits for stored files, the store thread for
        # a group. Each side is woken only when what it waits for may have come true (waking
        # both for every file cost the intake threads' cores a few context switches a file).
        self.lock = threading.Lock()
        self.for_reader = threading.Condition(self.lock)
        self.for_store = threading.Condition(self.lock)
        self.taken_in: list[_Item] = []  # to register
        self.answered: list[_Item] = []  # every detector answered: to store
        self.finished: dict[int, ScanOutcome] = {}  # stored, waiting for the reader
        # Files on their way to the store thread (in intake, or with the detectors): while
        # there are none, a group has nothing to wait for.
        self.upstream = 0
        self.failure: BaseException | None = None
        self.stopping = False
        threads = scanner.decode_threads
        self.intake = ThreadPoolExecutor(threads, thread_name_prefix="intake")
        self.model_free = [d for d in scanner.detectors if not is_staged(d)]
        # Detectors that opted into fast decoding may get JPEGs decoded at a reduced scale,
        # when every detector of the scan did (the pixels are shared).
        self.draft = draft_size(scanner.detectors)
        self.cpu = (
            ThreadPoolExecutor(threads, thread_name_prefix="detect") if self.model_free else None
        )
        self.batchers = {
            d.spec.name: detector_batcher(
                d,
                max_batch=scanner.batch_size,
                max_wait_s=BATCH_WINDOW_S,
                observer=scanner.observer or IgnoreBatches(),
            )
            for d in scanner.detectors
            if is_staged(d)
        }
        self.store = threading.Thread(target=self._store_loop, name="scan-store", daemon=True)
        self.store.start()

    # --- the reader's side ------------------------------------------------------------

    def outcomes(self, paths: Iterable[Path]) -> Iterator[ScanOutcome]:
        todo = iter(paths)
        submitted = handed_out = 0
        window = self.scanner.window

        def top_up() -> None:
            nonlocal submitted
            while submitted - handed_out < window:
                path = next(todo, None)
                if path is None:
                    return
                with self.lock:
                    self.upstream += 1
                future = self.intake.submit(
                    _take_in,
                    submitted,
                    path,
                    self.scanner.limits,
                    self.scanner.detectors,
                    self.budget,
                    draft=self.draft,
                )
                future.add_done_callback(self._taken_in)
                submitted += 1

        top_up()
        while handed_out < submitted:
            with self.lock:
                self.for_reader.wait_for(partial(self._ready, handed_out))
                if self.failure is not None:
                    raise self.failure
                outcome = self.finished.pop(handed_out)
            handed_out += 1
            top_up()  # first, so that the stream keeps moving while the reader reads
            yield outcome

    def _ready(self, index: int) -> bool:
        return index in self.finished or self.failure is not None

    def stop(self) -> None:
        """End every thread: files not yet stored are dropped (a later scan takes them
        again); a transaction under way completes."""
        with self.lock:
            self.stopping = True
            self.for_reader.notify_all()
            self.for_store.notify_all()
        # Threads waiting for memory that decoded files still hold must not wait forever.
        self.budget.close()
        self.intake.shutdown(wait=True, cancel_futures=True)
        for batcher in self.batchers.values():
            batcher.close(cancel=True)
        if self.cpu is not None:
            self.cpu.shutdown(wait=True, cancel_futures=True)
        self.store.join()

    def _group_full(self) -> bool:
        waiting = len(self.taken_in) + len(self.answered)
        return self.stopping or waiting >= self.scanner.store_group or self.upstream == 0

    def _wake_store(self) -> None:
        """After a file joined the store's lists (lock held): wake the store thread if it
        was waiting for a first file, or if its group is now complete."""
        if len(self.taken_in) + len(self.answered) == 1 or self._group_full():
            self.for_store.notify()

    def _fail(self, error: BaseException) -> None:
        with self.lock:
            if self.failure is None:
                self.failure = error
            self.for_reader.notify_all()
            self.for_store.notify_all()

    # --- intake and detectors (their threads) -----------------------------------------

    def _taken_in(self, future: Future[_Item]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            if not self.stopping:  # once stopping, a closed budget is expected
                self._fail(error)
            return
        with self.lock:
            self.taken_in.append(future.result())
            self.upstream -= 1
            self._wake_store()

    def _dispatch(self, item: _Item) -> None:
        """Send a registered file to the detectors whose results it lacks."""
        with self.lock:
            self.upstream += 1  # until answered
        prepared = item.prepared
        missing = [d for d in self.scanner.detectors if d.spec.name not in item.reused]
        if prepared is None or item.intake.rejection is not None or not missing:
            self._free_pixels(item)
            self._answer(item)
            return
        model_free = [d for d in missing if not is_staged(d)]
        item.waiting = len(missing)
        item.waiting_for_pixels = len(model_free)
        if not model_free:
            self._free_pixels(item)
        # The model detectors get the preprocessed inputs only: the decoded image and the
        # file's bytes, whose memory the budget may give back, must not wait in a batch.
        inputs = prepared.without_pixels()
        for detector in missing:
            name = detector.spec.name
            answer: Future[DetectorResult]
            if name in self.batchers:
                answer = self.batchers[name].submit(inputs)
            else:
                assert self.cpu is not None
                answer = self.cpu.submit(_run_alone, detector, prepared)
            answer.add_done_callback(partial(self._answered, item, detector))

    def _answered(self, item: _Item, detector: Detector, answer: Future[DetectorResult]) -> None:
        if answer.cancelled():
            return
        error = answer.exception()
        if error is not None:
            result = DetectorResult.failed(f"{type(error).__name__}: {error}")
        else:
            result = answer.result()
        with self.lock:
            item.fresh[detector.spec.name] = result
            item.waiting -= 1
            if not is_staged(detector):
                item.waiting_for_pixels -= 1
            free = not is_staged(detector) and item.waiting_for_pixels == 0
            done = item.waiting == 0
        if free:
            self._free_pixels(item)
        if done:
            self._answer(item)

    def _answer(self, item: _Item) -> None:
        with self.lock:
            self.answered.append(item)
            self.upstream -= 1
            self._wake_store()

    def _free_pixels(self, item: _Item) -> None:
        """No detector reads the decoded image any more: free it, and its share of the
        memory budget (the preprocessed tensors stay until the models have run)."""
        if item.prepared is not None:
            item.prepared = item.prepared.without_pixels()
        item.intake = item.intake.released()
        self.budget.release(item.reservation)

    # --- the store thread -------------------------------------------------------------

    def _store_loop(self) -> None:
        scanner = self.scanner
        while True:
            with self.lock:
                self.for_store.wait_for(lambda: self.taken_in or self.answered or self.stopping)
                # A transaction costs about as much as the rows in it: while files are on
                # their way, give the group a moment to fill (a commit per file cost a sixth
                # of the throughput).
                self.for_store.wait_for(self._group_full, timeout=STORE_GATHER_S)
                if self.stopping:
                    return
                taken_in, self.taken_in = self.taken_in, []
                answered, self.answered = self.answered, []
            try:
                if taken_in:
                    with transaction(scanner.session_factory) as session:
                        scanner._register(session, taken_in)
                    for item in taken_in:
                        self._dispatch(item)
                if answered:
                    with transaction(scanner.session_factory) as session:
                        # The images' rows, in id order: a fleet worker or another scan
                        # deciding one of these images waits, and two scans cannot deadlock.
                        repository.lock_images(
                            session, (i.image_id for i in answered if i.image_id)
                        )
                        outcomes = scanner._conclude(session, answered)
                    with self.lock:
                        for item, outcome in zip(answered, outcomes, strict=True):
                            item.prepared = None  # the tensors too: this file is done
                            self.finished[item.index] = outcome
                        self.for_reader.notify_all()
            except BaseException as exc:
                self._fail(exc)
                return
