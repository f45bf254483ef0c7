"""Thin Celery tasks: IDs in, IDs out; the work is in ``workers.fleet``.

The worker's context (database engine, S3 client, loaded models) is built lazily inside
the process that runs the task, never in a parent that forks: CUDA must not be initialised
before the pool forks, and ``worker_process_init`` is too short for loading models.
"""

from __future__ import annotations

import logging
from functools import cache, lru_cache
from typing import Any

from sqlalchemy.exc import OperationalError

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


@lru_cache(maxsize=1)
def _context() -> Any:
    from tasks.runtime import build_context

    return build_context()


@cache
def _detector(name: str) -> Any:
    from tasks.runtime import load_detector

    return load_detector(name)


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

    verdict = fleet.detect(_context(), _detector(detector), image_id)
    log.info(
        "detected",
        extra={
            "task_id": self.request.id,
            "image_id": image_id,
            "detector": detector,
            "verdict_id": verdict.id if verdict is not None else None,
        },
    )
