"""The embedded mode's worker: the fleet's own steps (``workers.fleet``), run by one
background thread in the API process instead of Celery workers, so a laptop needs no
broker and no S3.

It is a ``Dispatcher``: ``intake``/``detect`` put work on one of two bounded in-memory
queues (uploads, and bulk work that waits until no upload does). The database stays the
record of what is owed, as in the fleet: work that does not fit in a queue, or that a
stopped process held, is still pending there, and the worker's sweep finds it (the
reconciler's ``resend_stalled``), at start and every ``sweep_every_s``. Extra sweepers
(re-scan listing) run at each sweep; one that reports progress (a non-zero count) is
run again as soon as the queues drain.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from workers import fleet
from workers.detectors.base import Detector
from workers.fleet import FleetContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Work:
    kind: str  # "intake" or "detect"
    ident: int  # source id or image id
    detector: str | None
    bulk: bool


class EmbeddedWorker:
    def __init__(
        self,
        ctx: FleetContext,
        detector: Callable[[str], Detector],
        *,
        queue_size: int = 256,
        sweep_every_s: float = 5.0,
        sweepers: Sequence[Callable[[], object]] = (),
    ) -> None:
        self.ctx = ctx
        self._detector = detector
        self._uploads: queue.Queue[_Work] = queue.Queue(queue_size)
        self._bulk: queue.Queue[_Work] = queue.Queue(queue_size)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sweep_every_s = sweep_every_s
        self._sweepers = list(sweepers)
        # Work was left in the database because its queue was full: sweep as soon as that
        # queue drains (uploads) or both do (bulk work, and sweepers that made progress).
        self._uploads_left = False
        self._bulk_left = False
        self._next_sweep = 0.0
        self._thread: threading.Thread | None = None
        self.idle = threading.Event()  # set while nothing is queued or running

    # --- Dispatcher ---------------------------------------------------------------------

    def intake(self, source_id: int, *, bulk: bool = False) -> None:
        self._put(_Work("intake", source_id, None, bulk))

    def detect(self, image_id: int, detector: str, *, bulk: bool = False) -> None:
        self._put(_Work("detect", image_id, detector, bulk))

    def add_sweeper(self, sweeper: Callable[[], object]) -> None:
        self._sweepers.append(sweeper)

    def _put(self, work: _Work) -> None:
        try:
            (self._bulk if work.bulk else self._uploads).put_nowait(work)
        except queue.Full:
            # Left pending in the database: a sweep finds it once the queue drains.
            if work.bulk:
                self._bulk_left = True
            else:
                self._uploads_left = True
        self.idle.clear()
        self._wake.set()

    # --- the thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="embedded-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        self._sweep(after_s=0.0)  # at start nothing is in flight: everything pending is owed
        while not self._stop.is_set():
            if self._sweep_due():
                self._sweep()
                continue
            work = self._next()
            if work is None:
                self.idle.set()
                self._wake.wait(max(0.0, self._next_sweep - time.monotonic()))
                self._wake.clear()
                continue
            self._do(work)

    def _sweep_due(self) -> bool:
        """Every ``sweep_every_s`` whatever the traffic (failed work, re-scan counts, work
        recorded by other processes), and early for work a full queue left behind."""
        if time.monotonic() >= self._next_sweep:
            return True
        if self._uploads_left and self._uploads.empty():
            return True
        return self._bulk_left and self._uploads.empty() and self._bulk.empty()

    def _next(self) -> _Work | None:
        for source in (self._uploads, self._bulk):
            try:
                return source.get_nowait()
            except queue.Empty:
                continue
        return None

    def _do(self, work: _Work) -> None:
        try:
            if work.kind == "intake":
                for image_id, name in fleet.take_in(self.ctx, work.ident):
                    self._detect(image_id, name)
            else:
                assert work.detector is not None
                self._detect(work.ident, work.detector)
        except Exception:
            # Left pending: the sweep tries again later (with the reconciler's backoff).
            log.exception("embedded work failed; left for the sweep", extra={"work": repr(work)})

    def _detect(self, image_id: int, name: str) -> None:
        fleet.detect(
            self.ctx, self._detector(name), image_id, message_id=f"embedded/{uuid.uuid4().hex}"
        )

    def _sweep(self, *, after_s: float = 1.0) -> None:
        """Queue the work of uploads still pending (a stopped process, a full queue), then
        run the sweepers. Items found here run in order, uploads first; what does not fit
        waits for the next sweep."""
        self._uploads_left = self._bulk_left = False
        self._next_sweep = time.monotonic() + self._sweep_every_s
        try:
            # Work ``after_s`` old or more: what a dispatch left in the database, or a
            # stopped process. Each further try of the same work waits twice as long (2 s,
            # 4 s, ... about 4 minutes at most), so work that keeps failing does not spin.
            resend = fleet.resend_stalled(self.ctx, after_s=after_s)
            bulk_intake, bulk_detect = set(resend.bulk_intake), set(resend.bulk_detect)
            for source_id in resend.intake:
                self._requeue(_Work("intake", source_id, None, source_id in bulk_intake))
            for image_id, name in resend.detect:
                self._requeue(_Work("detect", image_id, name, (image_id, name) in bulk_detect))
        except Exception:
            log.exception("embedded sweep failed")
        for sweeper in self._sweepers:
            try:
                progressed = sweeper()
            except Exception:
                log.exception("embedded sweeper failed")
                continue
            if isinstance(progressed, int) and progressed > 0:
                self._bulk_left = True  # more to do: sweep again once the queues drain

    def _requeue(self, work: _Work) -> None:
        with contextlib.suppress(queue.Full):  # still pending: the next periodic sweep
            (self._bulk if work.bulk else self._uploads).put_nowait(work)
