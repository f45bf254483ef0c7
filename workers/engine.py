"""Batched inference: keep the model busy with full batches while other threads decode and
preprocess the next images.

A detector that can split its work (``preprocess`` one image -> tensor, ``forward`` a
stacked batch) is run in two stages: preprocessing happens in the intake threads, next to
decoding, and only ``forward`` runs on the scanning thread, on batches of up to
``max_batch`` tensors. Pillow and torch both release the GIL in their heavy loops, so
threads suffice (see docs/performance.md for the threads-versus-processes measurement).
Other detectors (provenance) get ``detect_batch`` on the decoded images.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeGuard, TypeVar

from PIL import Image

from workers.detectors.base import Detector, DetectorOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectorResult:
    """One detector's result for one image: its output, or why there is none."""

    output: DetectorOutput | None
    latency_ms: float | None = None  # per image (a batch's time divided by its size)
    error: str | None = None

    @classmethod
    def failed(cls, error: str) -> DetectorResult:
        return cls(output=None, latency_ms=None, error=error)


class StagedDetector(Detector, Protocol):
    """A detector whose work splits into per-image preprocessing and a batched forward."""

    def preprocess(self, image: Image.Image) -> Any: ...

    def forward(self, batch: Any) -> list[DetectorOutput]: ...


def is_staged(detector: Detector) -> TypeGuard[StagedDetector]:
    return callable(getattr(detector, "preprocess", None)) and callable(
        getattr(detector, "forward", None)
    )


@dataclass
class Prepared:
    """What intake hands to the detectors for one image."""

    image: Image.Image
    raw: bytes
    tensors: dict[str, Any]  # detector name -> preprocessed input (staged detectors)
    errors: dict[str, str]  # detector name -> preprocessing failure


def prepare(image: Image.Image, raw: bytes, detectors: Sequence[Detector]) -> Prepared:
    """Preprocess one decoded image for every staged detector (runs in intake threads)."""
    prepared = Prepared(image=image, raw=raw, tensors={}, errors={})
    for detector in detectors:
        if is_staged(detector):
            try:
                prepared.tensors[detector.spec.name] = detector.preprocess(image)
            except Exception as exc:
                prepared.errors[detector.spec.name] = f"{type(exc).__name__}: {exc}"
    return prepared


def run_detector(
    detector: Detector, items: Sequence[Prepared], *, max_batch: int
) -> list[DetectorResult]:
    """Score ``items`` with one detector in batches of at most ``max_batch``.

    If a batch fails, its images are retried one at a time, so one bad image is recorded as
    that image's failure and the others still get a score.
    """
    results: list[DetectorResult] = []
    for start in range(0, len(items), max(1, max_batch)):
        batch = list(items[start : start + max_batch])
        results.extend(_run_batch(detector, batch))
    return results


def _run_batch(detector: Detector, batch: list[Prepared]) -> list[DetectorResult]:
    name = detector.spec.name
    failed = {i: p.errors[name] for i, p in enumerate(batch) if name in p.errors}
    runnable = [i for i in range(len(batch)) if i not in failed]
    results = {i: DetectorResult.failed(err) for i, err in failed.items()}
    if runnable:
        started = time.perf_counter()
        try:
            outputs = _call(detector, [batch[i] for i in runnable])
        except Exception:
            if len(runnable) > 1:
                log.warning("batch failed; retrying one image at a time", extra={"detector": name})
            for i in runnable:
                results[i] = _run_one(detector, batch[i])
        else:
            per_image_ms = (time.perf_counter() - started) * 1000 / len(runnable)
            for i, output in zip(runnable, outputs, strict=True):
                results[i] = DetectorResult(output, per_image_ms)
    return [results[i] for i in range(len(batch))]


def _run_one(detector: Detector, item: Prepared) -> DetectorResult:
    started = time.perf_counter()
    try:
        (output,) = _call(detector, [item])
    except Exception as exc:
        log.exception("detector failed on an image", extra={"detector": detector.spec.name})
        return DetectorResult.failed(f"{type(exc).__name__}: {exc}")
    return DetectorResult(output, (time.perf_counter() - started) * 1000)


def _call(detector: Detector, items: list[Prepared]) -> list[DetectorOutput]:
    outputs: list[DetectorOutput]
    if is_staged(detector) and all(detector.spec.name in p.tensors for p in items):
        import torch

        outputs = detector.forward(torch.stack([p.tensors[detector.spec.name] for p in items]))
    else:
        outputs = detector.detect_batch([p.image for p in items], [p.raw for p in items])
    if len(outputs) != len(items):
        raise RuntimeError(f"{detector.spec.name} returned {len(outputs)} results for {len(items)}")
    return outputs


T = TypeVar("T")


def collect_batches(
    source: queue.Queue[T | None],
    *,
    max_batch: int,
    max_wait_s: float,
    clock: Callable[[], float] = time.monotonic,
    more_coming: Callable[[], bool] | None = None,
    poll_s: float = 0.002,
) -> Iterator[list[T]]:
    """Group items from ``source`` into batches of at most ``max_batch``; a batch is handed
    out when full, or ``max_wait_s`` after its first item arrived, whichever comes first.
    A ``None`` in the queue ends the stream (after the pending batch is handed out).

    This is what lets a busy worker see full batches while a lone upload waits at most
    ``max_wait_s`` for company. With ``more_coming`` (is any item on its way?), a batch is
    also handed out as soon as nothing is queued and nothing is on its way: a lone upload
    then waits for no one.
    """
    while True:
        first = source.get()
        if first is None:
            return
        batch = [first]
        deadline = clock() + max_wait_s
        ended = False
        while len(batch) < max_batch:
            remaining = deadline - clock()
            if remaining <= 0:
                break
            # In this order: an item is queued before its sender stops being "on its way".
            if more_coming is not None and not more_coming() and source.empty():
                break
            try:
                item = source.get(timeout=remaining if more_coming is None else poll_s)
            except queue.Empty:
                continue
            if item is None:
                ended = True
                break
            batch.append(item)
        yield batch
        if ended:
            return


R = TypeVar("R")

# A long-lived worker runs millions of batches: keep counts and the latest sizes only.
RECENT_BATCHES = 256


@dataclass
class BatchStats:
    """A bounded summary of the batches a batcher ran."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=RECENT_BATCHES))

    def add(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)
        self.recent.append(size)

    @property
    def mean(self) -> float:
        return self.items / self.batches if self.batches else 0.0


class BatchObserver(Protocol):
    """Where a batcher reports each batch it ran (the logs; metrics later)."""

    def batch_ran(self, batcher: str, size: int, seconds: float) -> None: ...


class LogBatches:
    """Reports every batch as one structured log line (``batch ran``, with its size)."""

    def batch_ran(self, batcher: str, size: int, seconds: float) -> None:
        log.info(
            "batch ran",
            extra={"batcher": batcher, "batch_size": size, "ms": round(seconds * 1000, 1)},
        )


@dataclass
class _Waiting(Generic[T, R]):
    item: T
    alone: bool
    future: Future[R]


class MicroBatcher(Generic[T, R]):
    """Run ``run`` on batches of items submitted from many threads at once.

    Each caller submits one item and waits for its own result. A batch is run when it is
    full (``max_batch``) or ``max_wait_s`` after its first item arrived, so a busy worker
    feeds the model full batches while a lone item waits at most ``max_wait_s``. With
    ``announced=True`` callers announce themselves before they prepare their item
    (``expecting``), and a batch closes as soon as no announced caller is still preparing
    one: a lone item then waits for no one. Items submitted with ``alone=True`` are run in
    a batch of their own, after the others that were collected with them: a suspect (say,
    an image whose earlier delivery died with its worker) cannot take innocent neighbours
    down with it.

    ``run`` must return one result per item, in order; if it raises, every item of that
    batch gets the exception. If one run takes longer than ``watchdog_s``, ``on_stuck`` is
    called with the seconds elapsed (a worker uses it to exit, so that its messages are
    delivered again instead of waiting on a hung device forever).
    """

    def __init__(
        self,
        run: Callable[[list[T]], list[R]],
        *,
        max_batch: int,
        max_wait_s: float,
        watchdog_s: float | None = None,
        on_stuck: Callable[[float], None] | None = None,
        name: str = "batcher",
        announced: bool = False,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._watchdog_s = watchdog_s
        self._on_stuck = on_stuck
        self._queue: queue.Queue[_Waiting[T, R] | None] = queue.Queue()
        self._announced = announced
        self._expected = 0  # callers announced through expecting() that have not submitted
        self._expected_lock = threading.Lock()
        self.stats = BatchStats()
        self._observer: BatchObserver = observer or LogBatches()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @contextmanager
    def expecting(self) -> Iterator[Callable[..., Future[R]]]:
        """For a caller that will probably submit one item soon: until it submits (through
        the function this yields) or leaves, a collecting batch waits for it, within the
        window. Only for a batcher made with ``announced=True``, whose batches wait for no
        one else; otherwise a batch waits out its window for whoever may come."""
        announced = True
        self._add_expected(1)

        def submit(item: T, *, alone: bool = False) -> Future[R]:
            nonlocal announced
            future = self.submit(item, alone=alone)  # queued first, then no longer expected
            if announced:
                announced = False
                self._add_expected(-1)
            return future

        try:
            yield submit
        finally:
            if announced:
                announced = False
                self._add_expected(-1)

    def _add_expected(self, change: int) -> None:
        with self._expected_lock:
            self._expected += change

    def submit(self, item: T, *, alone: bool = False) -> Future[R]:
        future: Future[R] = Future()
        self._queue.put(_Waiting(item, alone, future))
        return future

    def __call__(self, item: T, *, alone: bool = False) -> R:
        return self.submit(item, alone=alone).result()

    def close(self) -> None:
        """Run what was submitted, then stop the batching thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        for collected in collect_batches(
            self._queue,
            max_batch=self.max_batch,
            max_wait_s=self.max_wait_s,
            more_coming=(lambda: self._expected > 0) if self._announced else None,
        ):
            together = [w for w in collected if not w.alone]
            groups = ([together] if together else []) + [[w] for w in collected if w.alone]
            for group in groups:
                self._run_group(group)

    def _run_group(self, group: list[_Waiting[T, R]]) -> None:
        live = [w for w in group if w.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.stats.add(len(live))
        started = time.monotonic()
        watchdog = None
        if self._watchdog_s is not None and self._on_stuck is not None:
            on_stuck = self._on_stuck
            watchdog = threading.Timer(
                self._watchdog_s, lambda: on_stuck(time.monotonic() - started)
            )
            watchdog.daemon = True
            watchdog.start()
        try:
            results = self._run([w.item for w in live])
            if len(results) != len(live):
                raise RuntimeError(f"{len(results)} results for a batch of {len(live)}")
        except Exception as exc:
            for waiting in live:
                waiting.future.set_exception(exc)
        else:
            for waiting, result in zip(live, results, strict=True):
                waiting.future.set_result(result)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self._observer.batch_ran(self._thread.name, len(live), time.monotonic() - started)
