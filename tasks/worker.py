"""What one worker process holds: the fleet's context, its loaded detectors and, in a
batching detector worker, one batcher per detector.

Built lazily inside the process that runs the tasks, never in a parent that forks: CUDA
must not be initialised before the pool forks, and ``worker_process_init`` is too short for
loading models. The ``synthsentry worker`` command installs the state (with its runtime and
batching options) before it starts consuming; a prefork child inherits it unbuilt.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from synthsentry.runtime import Batching, Runtime, build_runtime

if TYPE_CHECKING:
    from workers import fleet
    from workers.detectors.base import Detector

log = logging.getLogger(__name__)


class WorkerState:
    def __init__(self, runtime: Runtime, *, batching: Batching | None = None) -> None:
        """``batching``: this process's detect tasks share one batch per detector (a threads
        pool only: a prefork child sees one message at a time and would only wait)."""
        self.runtime = runtime
        self.batching_options = batching
        # A threads-pool worker starts many tasks at once: each shared object is built once.
        self._building = threading.RLock()
        self._context: fleet.FleetContext | None = None
        self._detectors: dict[str, Detector] = {}
        self._batchers: dict[str, fleet.Batching] = {}
        self._loads: str | None = None  # the detector ``warm_up`` loads

    @property
    def threads(self) -> int:
        """Tasks this process runs at once: a batching worker runs two batches' worth (one
        running, one filling), one thread each."""
        return 2 * self.batching_options.max_batch if self.batching_options else 1

    def context(self) -> fleet.FleetContext:
        with self._building:
            if self._context is None:
                self._context = self.runtime.fleet_context(threads=self.threads)
            return self._context

    def detector(self, name: str) -> Detector:
        with self._building:
            if name not in self._detectors:
                spec = self.runtime.catalog.resolve(name)
                self._detectors[name] = self.runtime.build_detector(spec)
            return self._detectors[name]

    def batching(self, name: str) -> fleet.Batching | None:
        options = self.batching_options
        if options is None:
            return None
        with self._building:
            if name not in self._batchers:
                from workers import fleet

                self._batchers[name] = fleet.Batching.for_detector(
                    self.detector(name),
                    max_batch=options.max_batch,
                    max_wait_s=options.max_wait_s,
                    decode_threads=self.runtime.intake_threads,
                    watchdog_s=options.watchdog_s,
                    on_stuck=_exit_stuck,
                    observer=self.runtime.batch_observer,
                )
            return self._batchers[name]

    def warm_up(self, detector: str | None = None) -> None:
        """Build what the tasks need now rather than on the first message: the context and,
        for a detector worker, its model and batcher. Only in the process that runs the
        tasks (a threads or solo pool), never in a parent that forks. A failure is logged;
        the worker is not ready until a task builds what failed (``warm``)."""
        self._loads = detector
        try:
            self.context()
            if detector is not None:
                self.detector(detector)
                self.batching(detector)
        except Exception:
            log.exception(
                "the worker could not load what its tasks need", extra={"detector": detector}
            )
            return
        log.info("worker loaded", extra={"detector": detector})

    @property
    def warm(self) -> bool:
        """What the tasks need is built: the context and the detector ``warm_up`` loads (by
        it, or by a task after a failed warm-up). Read without the lock, which a build holds
        for as long as a model loads: a probe never waits for it."""
        return self._context is not None and (self._loads is None or self._loads in self._detectors)


def _exit_stuck(seconds: float) -> None:
    # A batch that hangs (a wedged device, a runaway decode) cannot be interrupted in a
    # thread. Exiting hands its messages back to the broker (visibility timeout); the
    # attempt counter stops an image that hangs every time.
    log.critical("a batch ran %.0f s, past the task time limit; exiting", seconds)
    logging.shutdown()
    os._exit(70)


class _Installed:
    """The one worker state of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: WorkerState | None = None

    def set(self, state: WorkerState) -> None:
        with self._lock:
            self._state = state

    def get(self) -> WorkerState:
        with self._lock:
            if self._state is None:
                # Started without `synthsentry worker` (celery's own command): the settings,
                # and the configuration an operator activated, as that command reads them.
                runtime = build_runtime()
                self._state = WorkerState(runtime.with_active_ensemble(runtime.session_factory()))
            return self._state


_INSTALLED = _Installed()


def install(state: WorkerState) -> None:
    """Make ``state`` this process's worker state (before the worker starts consuming)."""
    _INSTALLED.set(state)


def current() -> WorkerState:
    """This process's worker state; one built from the settings when none was installed
    (a worker started with ``celery -A tasks.app worker``)."""
    return _INSTALLED.get()
