"""The local-file scan: files in, one stored verdict per file out (``synthsentry scan``).

One of the two pipelines over the scoring core (``workers/scoring.py``); the fleet is the
other. Per chunk of files: read, hash, decode and preprocess in threads (no database),
register images and sources and find results that can be reused (one transaction), run
the detectors that are still missing (no transaction held), then store detections,
verdicts and review cases (one transaction). Bad files become ``rejected`` results; they
never stop the run.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import Detection, SourceKind
from db.session import transaction
from workers import scoring
from workers.budget import DEFAULT_MEMORY_BUDGET, MemoryBudget, Reservation, image_cost
from workers.detectors.base import Detector
from workers.engine import DetectorResult, Prepared, prepare, run_detector
from workers.ensemble import EnsembleConfig
from workers.intake import IntakeLimits, Rejected, RejectReason, read_local
from workers.names import identity, printable, raw_base64
from workers.results import (
    DetectorReport,
    ScanOutcome,
    image_summary,
    rejected_outcome,
    review_of,
    scored_outcome,
)

log = logging.getLogger(__name__)


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


def _ready_or_starved(future: Future[_Item], budget: MemoryBudget, ticket: int) -> bool:
    """The file is taken in, or it waits for memory (see ``Scanner.scan``)."""
    return future.done() or budget.starved(ticket)


def _is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


@dataclass
class _Item:
    path: Path
    intake: scoring.Intake
    prepared: Prepared | None = None
    source_id: int | None = None
    image_id: int | None = None
    reused: dict[str, Detection] = field(default_factory=dict)
    fresh: dict[str, DetectorResult] = field(default_factory=dict)
    reservation: Reservation = field(default_factory=Reservation)


def _take_in(
    path: Path,
    limits: IntakeLimits,
    detectors: Sequence[Detector],
    budget: MemoryBudget,
    ticket: int,
) -> _Item:
    """Read, hash, decode and preprocess one file (runs in an intake thread). The pixels
    are reserved from ``budget`` in ticket order, once the header has said how many."""
    reservation: Reservation | None = None

    def admit(width: int, height: int, file_bytes: int) -> None:
        nonlocal reservation
        reservation = budget.reserve(image_cost(width, height, file_bytes), ticket=ticket)

    try:
        intake = scoring.take_in(lambda: read_local(path, limits), limits, admit=admit)
    except scoring.TransientError as exc:  # one file must not end the run: scan it again
        log.warning(
            "intake failed for now", extra={"path": printable(path), "error": printable(str(exc))}
        )
        why = Rejected(RejectReason.DECODE_ERROR, f"{exc}; scan the file again")
        intake = scoring.Intake.refused(why)
    finally:
        if reservation is None:  # refused before its pixels: let the next file go
            budget.pass_ticket(ticket)
    item = _Item(path=path, intake=intake, reservation=reservation or Reservation())
    if intake.decoded is None:  # a refusal keeps no pixels
        budget.release(item.reservation)
    if item.intake.decoded is not None:
        try:
            item.prepared = prepare(item.intake.decoded.image, item.intake.data, detectors)
        except Exception as exc:  # a bug in preprocessing must not end the run
            log.exception("preprocessing failed unexpectedly", extra={"path": printable(path)})
            why = Rejected(RejectReason.DECODE_ERROR, f"unexpected preprocessing error: {exc}")
            item.intake = scoring.Intake.refused(why, item.intake.data)
    return item


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
    ) -> None:
        """``batch_size``: files taken in per step, and the largest batch a model sees.
        ``decode_threads``: intake threads (read, decode, preprocess). ``memory_budget``:
        bytes of decoded images held at once (see ``workers.budget``). ``active``: the
        ensemble is the active configuration, whose verdicts may withdraw review cases; an
        ad-hoc one (a scan with its own threshold or detectors) may only open them."""
        self.detectors = list(detectors)
        self.session_factory = session_factory
        self.limits = limits
        self.ensemble = ensemble
        self.batch_size = max(1, batch_size)
        self.decode_threads = max(1, decode_threads)
        self.memory_budget = memory_budget
        self.peak_reserved = 0  # the most bytes of images held at once in the last scan
        self.actor = actor
        self.active = active
        self.versions = {d.spec.name: d.version for d in self.detectors}
        self._ensemble_id: int | None = None

    def scan(self, paths: Iterable[Path]) -> Iterator[ScanOutcome]:
        """Results in input order. While the detectors work on one chunk, the intake threads
        already read, decode and preprocess the files after it, as far as the memory budget
        allows: a chunk is ``batch_size`` files, or fewer when the next file's pixels do not
        fit beside the ones already held (the chunk is scored and freed first)."""
        self._ensemble_id = scoring.register_ensemble(self.session_factory, self.ensemble)
        budget = MemoryBudget(self.memory_budget)
        todo = iter(paths)
        tickets = itertools.count()
        pending: deque[tuple[int, Future[_Item]]] = deque()

        def wake(_: Future[_Item]) -> None:
            budget.notify()  # a file is ready: the chunk being formed may take it

        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="intake") as pool:

            def top_up() -> None:
                while len(pending) < 2 * self.batch_size:
                    path = next(todo, None)
                    if path is None:
                        return
                    ticket = next(tickets)
                    future = pool.submit(
                        _take_in, path, self.limits, self.detectors, budget, ticket
                    )
                    future.add_done_callback(wake)
                    pending.append((ticket, future))

            try:
                top_up()
                while pending:
                    chunk: list[_Item] = []
                    while pending and len(chunk) < self.batch_size:
                        ticket, future = pending[0]
                        if chunk:
                            budget.wait_until(partial(_ready_or_starved, future, budget, ticket))
                            if not future.done():
                                break  # it waits for memory this chunk holds: score these
                        pending.popleft()
                        chunk.append(future.result())
                        top_up()
                    yield from self._finish(chunk, budget)
            finally:
                # Stopped early (an error, Ctrl-C, a reader that stopped reading): threads
                # waiting for memory that decoded files still hold must not wait forever.
                budget.close()
                pool.shutdown(wait=False, cancel_futures=True)
        self.peak_reserved = budget.peak

    def _finish(self, items: list[_Item], budget: MemoryBudget) -> list[ScanOutcome]:
        with transaction(self.session_factory) as session:
            for item in items:
                self._register(session, item)
        self._detect(items)
        with transaction(self.session_factory) as session:
            # The chunk's image rows, in id order: a fleet worker or another scan deciding
            # one of these images waits, and two scans cannot deadlock.
            repository.lock_images(session, (i.image_id for i in items if i.image_id))
            outcomes = [self._conclude(session, item) for item in items]
        for item in items:  # free bytes, pixels and tensors before the next chunk
            item.intake = item.intake.released()
            item.prepared = None
            budget.release(item.reservation)
        return outcomes

    def _register(self, session: Session, item: _Item) -> None:
        absolute = item.path.absolute()
        source, _ = repository.record_source(
            session,
            repository.SourceRef(
                kind=SourceKind.CLI,
                ref_key=f"{identity(absolute)}@{item.intake.sha256 or 'unread'}",
                local_path=printable(absolute),
                submitted_by=self.actor,
            ),
            None,
        )
        item.source_id = source.id
        item.image_id = scoring.record_intake(session, source.id, item.intake)
        if item.image_id is not None and item.intake.rejection is None:
            item.reused = repository.reusable_detections(session, item.image_id, self.versions)

    def _detect(self, items: list[_Item]) -> None:
        for detector in self.detectors:
            name = detector.spec.name
            todo = [i for i in items if i.prepared is not None and name not in i.reused]
            if todo:
                prepared = [i.prepared for i in todo if i.prepared is not None]
                results = run_detector(detector, prepared, max_batch=self.batch_size)
                for item, result in zip(todo, results, strict=True):
                    item.fresh[name] = result

    def _conclude(self, session: Session, item: _Item) -> ScanOutcome:
        rejection = item.intake.rejection
        if rejection is not None:
            return replace(
                self._not_scored(session, item, rejection), path_bytes=raw_base64(item.path)
            )
        assert item.image_id is not None and item.source_id is not None
        rows: dict[str, Detection] = {}
        reports: list[DetectorReport] = []
        for detector in self.detectors:
            name = detector.spec.name
            reused = name in item.reused
            if reused:
                rows[name] = item.reused[name]
            else:
                record = scoring.detection_record(detector, item.fresh[name])
                rows[name] = repository.save_detection(session, item.image_id, record)
            reports.append(DetectorReport.from_row(rows[name], reused=reused))
        assert self._ensemble_id is not None  # registered when the scan started
        concluded = scoring.conclude(
            session,
            item.image_id,
            rows,
            self.ensemble,
            ensemble_id=self._ensemble_id,
            actor=self.actor,
            active=self.active,
        )
        repository.mark_source_scored(session, item.source_id)
        decoded = item.intake.decoded
        assert decoded is not None and item.intake.sha256 is not None
        outcome = scored_outcome(
            session,
            printable(item.path),
            item.intake.sha256,
            concluded.verdict,
            reports,
            image=image_summary(decoded.format, decoded.width, decoded.height, decoded.anomalies),
            active_ensemble=self.ensemble.version,
        )
        return replace(outcome, path_bytes=raw_base64(item.path))

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
