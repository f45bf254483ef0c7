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

    image: Image.Image | None  # None once no detector needs the pixels any more
    raw: bytes
    tensors: dict[str, Any]  # detector name -> preprocessed input (staged detectors)
    errors: dict[str, str]  # detector name -> preprocessing failure

    def without_pixels(self) -> Prepared:
        """The preprocessed inputs only: the decoded image and the file's bytes are freed."""
        return Prepared(image=None, raw=b"", tensors=self.tensors, errors=self.errors)


def prepare(image: Image.Image, raw: bytes, detectors: Sequence[Detector]) -> Prepared:
    """Preprocess one decoded image for every staged detector (runs in intake threads). A
    detector that decodes on its device (``preprocess_encoded``) is given the file's
    bytes as well."""
    prepared = Prepared(image=image, raw=raw, tensors={}, errors={})
    for detector in detectors:
        if is_staged(detector):
            try:
                encoded = getattr(detector, "preprocess_encoded", None)
                prepared.tensors[detector.spec.name] = (
                    encoded(image, raw) if callable(encoded) else detector.preprocess(image)
                )
            except Exception as exc:
                prepared.errors[detector.spec.name] = f"{type(exc).__name__}: {exc}"
    return prepared


def draft_size(detectors: Sequence[Detector]) -> tuple[int, int] | None:
    """How small the images for these detectors may be decoded (a JPEG's DCT scaling): the
    largest size any of them asks for, or None (full size) as soon as one needs every
    pixel: a detector on the exact path, or one that reads the decoded image itself."""
    sizes = []
    for detector in detectors:
        size = getattr(detector, "decode_size", None) if is_staged(detector) else None
        if size is None:
            return None
        sizes.append(size)
    if not sizes:
        return None
    return max(w for w, _ in sizes), max(h for _, h in sizes)


def run_detector(
    detector: Detector, items: Sequence[Prepared], *, max_batch: int
) -> list[DetectorResult]:
    """Score ``items`` with one detector in batches of at most ``max_batch``, one batch after
    the other (the streaming engine overlaps these steps: see :class:`MicroBatcher`).

    If a batch fails, its images are retried one at a time, so one bad image is recorded as
    that image's failure and the others still get a score.
    """
    steps = DetectorSteps(detector)
    results: list[DetectorResult] = []
    max_batch = batch_limit(detector, max(1, max_batch))
    for start in range(0, len(items), max_batch):
        batch = list(items[start : start + max_batch])
        try:
            results.extend(steps.read(steps.launch(steps.stage(batch))))
        except Exception as exc:
            results.extend(steps.failed(batch, exc))
    return results


class PipelinedDetector(StagedDetector, Protocol):
    """A staged detector whose forward pass splits further (see ``TorchDetector``):
    ``collate`` on the host, ``to_device`` starts the copy, ``launch`` queues the model,
    ``read`` waits for its answers."""

    def collate(self, inputs: Sequence[Any]) -> Any: ...

    def to_device(self, batch: Any) -> Any: ...

    def launch(self, staged: Any) -> Any: ...

    def read(self, launched: Any) -> list[DetectorOutput]: ...


def is_pipelined(detector: Detector) -> TypeGuard[PipelinedDetector]:
    return is_staged(detector) and all(
        callable(getattr(detector, step, None))
        for step in ("collate", "to_device", "launch", "read")
    )


@dataclass
class _DetectorBatch:
    """A batch on its way through :class:`DetectorSteps`: which images run, and what the
    last step made of them (the staged tensors, the launched model, or the outputs)."""

    items: list[Prepared]
    runnable: list[int]
    failed: dict[int, str]
    staged: Any = None
    launched: Any = None
    outputs: list[DetectorOutput] | None = None
    started: float = 0.0


class DetectorSteps:
    """One detector's batches in the steps a streaming engine overlaps (``BatchSteps``):
    ``stage`` collates the preprocessed tensors and starts their copy to the device,
    ``launch`` queues the model, ``read`` waits for its answers. A detector that splits
    only into ``preprocess``/``forward`` runs its whole forward in ``launch``; one that
    does not split (provenance) runs ``detect_batch`` there."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.name = detector.spec.name

    @property
    def device(self) -> str:
        return str(getattr(self.detector, "device", "cpu"))

    def stage(self, items: list[Prepared]) -> _DetectorBatch:
        name = self.name
        failed = {i: p.errors[name] for i, p in enumerate(items) if name in p.errors}
        runnable = [i for i in range(len(items)) if i not in failed]
        batch = _DetectorBatch(items, runnable, failed)
        detector = self.detector
        if runnable and is_staged(detector) and all(name in items[i].tensors for i in runnable):
            inputs = [items[i].tensors[name] for i in runnable]
            if is_pipelined(detector):
                batch.staged = detector.to_device(detector.collate(inputs))
            else:
                import torch

                batch.staged = torch.stack(inputs)
        return batch

    def launch(self, batch: _DetectorBatch) -> _DetectorBatch:
        batch.started = time.perf_counter()
        if not batch.runnable:
            return batch
        detector = self.detector
        if batch.staged is None:  # no tensors: the detector takes decoded images
            chosen = [batch.items[i] for i in batch.runnable]
            images = [p.image for p in chosen if p.image is not None]
            if len(images) != len(chosen):
                raise RuntimeError(f"{self.name} needs pixels that were already freed")
            batch.outputs = detector.detect_batch(images, [p.raw for p in chosen])
        elif is_pipelined(detector):
            batch.launched = detector.launch(batch.staged)
        else:
            assert is_staged(detector)
            batch.outputs = detector.forward(batch.staged)
        batch.staged = None  # the device may reuse the input's memory once the model ran
        return batch

    def read(self, batch: _DetectorBatch) -> list[DetectorResult]:
        results = {i: DetectorResult.failed(error) for i, error in batch.failed.items()}
        if batch.runnable:
            outputs = batch.outputs
            if outputs is None:
                assert is_pipelined(self.detector)
                outputs = self.detector.read(batch.launched)
            if len(outputs) != len(batch.runnable):
                raise RuntimeError(
                    f"{self.name} returned {len(outputs)} results for {len(batch.runnable)}"
                )
            per_image_ms = (time.perf_counter() - batch.started) * 1000 / len(batch.runnable)
            for i, output in zip(batch.runnable, outputs, strict=True):
                results[i] = DetectorResult(output, per_image_ms)
        return [results[i] for i in range(len(batch.items))]

    def failed(self, items: list[Prepared], error: BaseException) -> list[DetectorResult]:
        """A batch failed in any step: each image is tried again on its own, so only the
        image that causes the failure is recorded as failed."""
        if len(items) > 1:
            log.warning(
                "batch failed; retrying one image at a time",
                extra={"detector": self.name, "error": f"{type(error).__name__}: {error}"},
            )
        return [self._one(item) for item in items]

    def _one(self, item: Prepared) -> DetectorResult:
        try:
            (result,) = self.read(self.launch(self.stage([item])))
        except Exception as exc:
            log.exception("detector failed on an image", extra={"detector": self.name})
            return DetectorResult.failed(f"{type(exc).__name__}: {exc}")
        return result


T = TypeVar("T")


def collect_batches(
    source: queue.Queue[T | None],
    *,
    max_batch: int,
    max_wait_s: float,
    clock: Callable[[], float] = time.monotonic,
    more_coming: Callable[[], bool] | None = None,
    poll_s: float = 0.002,
    room: threading.Semaphore | None = None,
) -> Iterator[list[T]]:
    """Group items from ``source`` into batches of at most ``max_batch``; a batch is handed
    out when full, or ``max_wait_s`` after its first item arrived, whichever comes first.
    A ``None`` in the queue ends the stream (after the pending batch is handed out).

    This is what lets a busy worker see full batches while a lone upload waits at most
    ``max_wait_s`` for company. With ``more_coming`` (is any item on its way?), a batch is
    also handed out as soon as nothing is queued and nothing is on its way: a lone upload
    then waits for no one.

    With ``room``, a batch is only formed once the consumer has room for it (one unit is
    taken per batch; the consumer gives it back): while the model is busy, items pile up
    in ``source`` and the next batch is as full as they allow, instead of closing early
    and waiting its turn half empty. The window starts once there is room.
    """
    while True:
        first = source.get()
        if first is None:
            return
        if room is not None:
            room.acquire()
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
        del batch, first  # the consumer owns the batch now: keep nothing of it alive here
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
    """Where a batcher reports each batch it ran (the logs, the metrics): its size, and the
    seconds from launching the model to its answers being read."""

    def batch_ran(
        self, batcher: str, size: int, seconds: float, *, detector: str = "", device: str = "cpu"
    ) -> None: ...


class LogBatches:
    """Reports every batch as one structured log line (``batch ran``, with its size)."""

    def batch_ran(
        self, batcher: str, size: int, seconds: float, *, detector: str = "", device: str = "cpu"
    ) -> None:
        log.info(
            "batch ran",
            extra={
                "batcher": batcher,
                "batch_size": size,
                "ms": round(seconds * 1000, 1),
                "detector": detector,
                "device": device,
            },
        )


class IgnoreBatches:
    """Reports nothing (a scan on a terminal: its progress bar says enough)."""

    def batch_ran(
        self, batcher: str, size: int, seconds: float, *, detector: str = "", device: str = "cpu"
    ) -> None:
        return None


class BatchSteps(Protocol[T, R]):
    """How a batch runs in three overlapping steps: ``stage`` (host work and the copy to the
    device), ``launch`` (queue the model), ``read`` (wait for the answers, one per item in
    order). ``failed`` answers for a batch whose step raised (say, by trying each item on
    its own)."""

    def stage(self, items: list[T]) -> Any: ...

    def launch(self, staged: Any) -> Any: ...

    def read(self, launched: Any) -> list[R]: ...

    def failed(self, items: list[T], error: BaseException) -> list[R]: ...


class RunSteps(Generic[T, R]):
    """A plain ``run(items) -> results`` as steps: it runs in ``launch``; a failure reaches
    every item of its batch."""

    def __init__(self, run: Callable[[list[T]], list[R]]) -> None:
        self._run = run

    def stage(self, items: list[T]) -> list[T]:
        return items

    def launch(self, staged: list[T]) -> list[R]:
        return self._run(staged)

    def read(self, launched: list[R]) -> list[R]:
        return launched

    def failed(self, items: list[T], error: BaseException) -> list[R]:
        raise error


@dataclass
class _Waiting(Generic[T, R]):
    item: T
    alone: bool
    future: Future[R]


@dataclass
class _InFlight(Generic[T, R]):
    """A batch between two steps: its callers, what the last step made, or its failure."""

    waiting: list[_Waiting[T, R]]
    payload: Any = None
    error: BaseException | None = None
    launched_at: float = 0.0
    watchdog: threading.Timer | None = None


# Batches in the pipeline at once: one being staged (copied), one on the device, one being
# read. More would only hold memory; fewer would leave the device waiting for a copy.
PIPELINE_DEPTH = 3


class MicroBatcher(Generic[T, R]):
    """Run batches of items submitted from many threads at once, through a pipeline.

    Each caller submits one item and gets a future for its own result. A batch is formed
    when the pipeline has room for it, and closed when it is full (``max_batch``), when
    ``max_wait_s`` has passed since its first item arrived, or, with ``announced=True``, as
    soon as nothing else is queued and no announced caller is still preparing an item
    (``expecting``): a lone item then waits for no one, and a stream of items that arrive
    faster than the model runs fills its batches while the previous ones run. Items
    submitted with ``alone=True`` are run in a batch of their own, after the others that
    were collected with them: a suspect (say, an image whose earlier delivery died with its
    worker) cannot take innocent neighbours down with it.

    Batches go through ``steps`` (:class:`BatchSteps`) in three threads, so that while one
    batch runs on the device the next is copied and the previous one's answers are read;
    ``run`` is the one-step form. If one batch's model work takes longer than
    ``watchdog_s``, ``on_stuck`` is called with the seconds elapsed (a worker uses it to
    exit, so that its messages are delivered again instead of waiting on a hung device).
    """

    def __init__(
        self,
        run: Callable[[list[T]], list[R]] | None = None,
        *,
        steps: BatchSteps[T, R] | None = None,
        max_batch: int,
        max_wait_s: float,
        watchdog_s: float | None = None,
        on_stuck: Callable[[float], None] | None = None,
        name: str = "batcher",
        announced: bool = False,
        observer: BatchObserver | None = None,
        detector: str = "",
        device: str = "cpu",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if (run is None) == (steps is None):
            raise ValueError("give either run or steps")
        self._steps: BatchSteps[T, R] = steps if steps is not None else RunSteps(run)  # type: ignore[arg-type]
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.name = name
        self._detector = detector
        self._device = device
        self._watchdog_s = watchdog_s
        self._on_stuck = on_stuck
        self._queue: queue.Queue[_Waiting[T, R] | None] = queue.Queue()
        self._announced = announced
        self._expected = 0  # callers announced through expecting() that have not submitted
        self._expected_lock = threading.Lock()
        self._room = threading.Semaphore(PIPELINE_DEPTH)
        self._staged: queue.Queue[_InFlight[T, R] | None] = queue.Queue()
        self._launched: queue.Queue[_InFlight[T, R] | None] = queue.Queue()
        self.stats = BatchStats()
        self._observer: BatchObserver = observer or LogBatches()
        self._threads = [
            threading.Thread(target=target, name=f"{name}-{step}", daemon=True)
            for step, target in (
                ("stage", self._collect),
                ("launch", self._launch),
                ("read", self._read),
            )
        ]
        for thread in self._threads:
            thread.start()

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

    def close(self, *, cancel: bool = False) -> None:
        """Run what was submitted, then stop the pipeline's threads. With ``cancel``, what
        is still queued is cancelled instead (its callers see a cancelled future); batches
        already in the pipeline complete."""
        if cancel:
            while True:
                try:
                    waiting = self._queue.get_nowait()
                except queue.Empty:
                    break
                if waiting is not None:
                    waiting.future.cancel()
        self._queue.put(None)
        for thread in self._threads:
            thread.join()

    # --- the three steps, one thread each -------------------------------------------------

    def _collect(self) -> None:
        try:
            for collected in collect_batches(
                self._queue,
                max_batch=self.max_batch,
                max_wait_s=self.max_wait_s,
                more_coming=(lambda: self._expected > 0) if self._announced else None,
                room=self._room,
            ):
                self._stage_groups(collected)
                del collected
        finally:
            self._staged.put(None)

    def _stage_groups(self, collected: list[_Waiting[T, R]]) -> None:
        together = [w for w in collected if not w.alone]
        groups = ([together] if together else []) + [[w] for w in collected if w.alone]
        for number, group in enumerate(groups):
            if number:  # the first group's room was taken while it was collected
                self._room.acquire()
            self._stage(group)

    def _stage(self, group: list[_Waiting[T, R]]) -> None:
        live = [w for w in group if w.future.set_running_or_notify_cancel()]
        if not live:
            self._room.release()
            return
        batch: _InFlight[T, R] = _InFlight(live)
        # From here: staging copies to the device (and may decode there), which can hang.
        batch.watchdog = self._start_watchdog(time.monotonic())
        try:
            batch.payload = self._steps.stage([w.item for w in live])
        except Exception as exc:
            batch.error = exc
        self._staged.put(batch)

    # Each step hands a batch on and keeps no reference to it (a helper's locals end with
    # the call): what a batch holds is freed as soon as its callers have their results.

    def _launch(self) -> None:
        try:
            while (batch := self._staged.get()) is not None:
                self._launch_one(batch)
                del batch
        finally:
            self._launched.put(None)

    def _launch_one(self, batch: _InFlight[T, R]) -> None:
        batch.launched_at = time.monotonic()
        if batch.error is None:
            try:
                batch.payload = self._steps.launch(batch.payload)
            except Exception as exc:
                batch.error = exc
        self._launched.put(batch)

    def _read(self) -> None:
        while (batch := self._launched.get()) is not None:
            self._read_one(batch)
            del batch

    def _read_one(self, batch: _InFlight[T, R]) -> None:
        try:
            if batch.error is not None:
                raise batch.error
            results = self._steps.read(batch.payload)
        except Exception as exc:
            try:
                results = self._steps.failed([w.item for w in batch.waiting], exc)
            except Exception as final:
                self._settle(batch, None, final)
                return
        self._settle(batch, results, None)

    def _settle(
        self, batch: _InFlight[T, R], results: list[R] | None, error: BaseException | None
    ) -> None:
        if batch.watchdog is not None:
            batch.watchdog.cancel()
        size = len(batch.waiting)
        if error is None and results is not None and len(results) != size:
            error = RuntimeError(f"{len(results)} results for a batch of {size}")
        self.stats.add(size)
        self._room.release()  # before the callers hear: the next batch may form at once
        if error is not None or results is None:
            for waiting in batch.waiting:
                waiting.future.set_exception(error or RuntimeError("no results"))
        else:
            for waiting, result in zip(batch.waiting, results, strict=True):
                waiting.future.set_result(result)
        try:
            self._observer.batch_ran(
                self.name,
                size,
                time.monotonic() - batch.launched_at,
                detector=self._detector,
                device=self._device,
            )
        except Exception:  # reporting must never stop the batches
            log.exception("batch observer failed", extra={"batcher": self.name})

    def _start_watchdog(self, started: float) -> threading.Timer | None:
        if self._watchdog_s is None or self._on_stuck is None:
            return None
        on_stuck = self._on_stuck
        watchdog = threading.Timer(self._watchdog_s, lambda: on_stuck(time.monotonic() - started))
        watchdog.daemon = True
        watchdog.start()
        return watchdog


def batch_limit(detector: Detector, max_batch: int) -> int:
    """The longest batch ``detector`` is given: ``max_batch``, or its own
    ``largest_useful_batch`` where that is smaller (a large model on the CPU)."""
    useful = getattr(detector, "largest_useful_batch", None)
    return min(max_batch, useful) if isinstance(useful, int) and useful > 0 else max_batch


def detector_batcher(
    detector: Detector,
    *,
    max_batch: int,
    max_wait_s: float,
    announced: bool = True,
    observer: BatchObserver | None = None,
    watchdog_s: float | None = None,
    on_stuck: Callable[[float], None] | None = None,
) -> MicroBatcher[Prepared, DetectorResult]:
    """The engine's model stage for one detector: prepared images in, results out, batched
    and pipelined (:class:`DetectorSteps` through a :class:`MicroBatcher`). The scan, the
    evaluation and the fleet's batching worker all score through this."""
    steps = DetectorSteps(detector)
    return MicroBatcher(
        steps=steps,
        max_batch=batch_limit(detector, max_batch),
        max_wait_s=max_wait_s,
        watchdog_s=watchdog_s,
        on_stuck=on_stuck,
        name=f"batcher-{detector.spec.name}",
        announced=announced,
        observer=observer,
        detector=detector.spec.name,
        device=steps.device,
    )
