"""Thin Celery tasks: IDs in, IDs out; the work is in ``workers.fleet``.

The worker's context (database engine, S3 client, loaded models) is built lazily inside
the process that runs the task, never in a parent that forks: CUDA must not be initialised
before the pool forks, and ``worker_process_init`` is too short for loading models.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import cache, lru_cache
from typing import Any

from sqlalchemy.exc import OperationalError

from synthsentry.settings import get_settings
from tasks.app import app
from workers.fleet import TransientError

# Worth another try later: storage, database or network trouble, never a bad upload.
RETRYABLE = (TransientError, ConnectionError, OperationalError)

# Every task: acknowledged after it ran, retried with backoff on trouble that may pass.
DELIVERY: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "autoretry_for": RETRYABLE,
    "retry_backoff": 2,
    "retry_backoff_max": 300,
    "max_retries": 10,
}

log = logging.getLogger(__name__)


# A threads-pool worker starts many tasks at once: build each shared object once.
_building = threading.RLock()


@lru_cache(maxsize=1)
def _context_once() -> Any:
    from tasks.runtime import build_context

    # A batching worker runs two batches' worth of tasks at once, one thread each.
    return build_context(threads=2 * int(_batch_options.get("max_batch", 1)))


def _context() -> Any:
    with _building:
        return _context_once()


@cache
def _detector_once(name: str) -> Any:
    from tasks.runtime import load_detector

    return load_detector(name)


def _detector(name: str) -> Any:
    with _building:
        return _detector_once(name)


# Set by a batching detector worker (threads pool) before it starts consuming.
_batch_options: dict[str, float] = {}


def use_batching(*, max_batch: int, max_wait_s: float, watchdog_s: float) -> None:
    """Make this process's detect tasks share one batch per detector (threads pool only: a
    prefork child sees one message at a time and would only wait)."""
    _batch_options.update(max_batch=max_batch, max_wait_s=max_wait_s, watchdog_s=watchdog_s)


def _batching(name: str) -> Any:
    if not _batch_options:
        return None
    with _building:
        return _batching_once(name)


@cache
def _batching_once(name: str) -> Any:
    from workers.fleet import Batching

    return Batching.for_detector(
        _detector(name),
        max_batch=int(_batch_options["max_batch"]),
        max_wait_s=_batch_options["max_wait_s"],
        decode_threads=get_settings().intake_threads,
        watchdog_s=_batch_options["watchdog_s"],
        on_stuck=_exit_stuck,
    )


def _exit_stuck(seconds: float) -> None:
    # A batch that hangs (a wedged device, a runaway decode) cannot be interrupted in a
    # thread. Exiting hands its messages back to the broker (visibility timeout); the
    # attempt counter stops an image that hangs every time.
    log.critical("a batch ran %.0f s, past the task time limit; exiting", seconds)
    logging.shutdown()
    os._exit(70)


@app.task(
    name="synthsentry.intake",
    **DELIVERY,
)
def intake(self: Any, source_id: int) -> None:
    from workers import fleet

    pending = fleet.take_in(_context(), source_id)
    for image_id, detector in pending:
        # Sent after take_in's transaction committed: the worker will find the rows.
        detect.apply_async((image_id, detector), queue=fleet.queue_for(detector))
    log.info(
        "taken in",
        extra={"task_id": self.request.id, "source_id": source_id, "sent": len(pending)},
    )


@app.task(
    name="synthsentry.detect",
    **DELIVERY,
)
def detect(self: Any, image_id: int, detector: str) -> None:
    from workers import fleet

    verdict = fleet.detect(_context(), _detector(detector), image_id, batching=_batching(detector))
    log.info(
        "detected",
        extra={
            "task_id": self.request.id,
            "image_id": image_id,
            "detector": detector,
            "verdict_id": verdict.id if verdict is not None else None,
        },
    )
