"""Thin Celery tasks: IDs in, IDs out; the work is in ``workers.fleet``, what the process
holds (context, models, batchers) in ``tasks.worker``."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import OperationalError

# Imported for its signal handlers: every worker reports queue waits and task errors.
from tasks import (
    observe,  # noqa: F401
    worker,
)
from tasks.app import DETECT_TASK, INTAKE_TASK, app, send_detect
from workers.scoring import TransientError

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


@app.task(name=INTAKE_TASK, **DELIVERY)
def intake(self: Any, source_id: int, bulk: bool = False) -> None:
    from workers import fleet

    pending = fleet.take_in(worker.current().context(), source_id)
    for image_id, detector in pending:
        # Sent after take_in's transaction committed: the worker will find the rows. Bulk
        # work stays bulk all the way through.
        send_detect(image_id, detector, bulk=bulk)
    log.info(
        "taken in",
        extra={"task_id": self.request.id, "source_id": source_id, "sent": len(pending)},
    )


@app.task(name=DETECT_TASK, **DELIVERY)
def detect(self: Any, image_id: int, detector: str) -> None:
    from workers import fleet

    state = worker.current()
    verdict = fleet.detect(
        state.context(),
        state.detector(detector),
        image_id,
        # A retry after trouble that may pass is a new message under the same task id; a
        # redelivery after a dead worker is the same message again, and counts.
        message_id=f"{self.request.id}/{self.request.retries}",
        batching=state.batching(detector),
    )
    log.info(
        "detected",
        extra={
            "task_id": self.request.id,
            "image_id": image_id,
            "detector": detector,
            "verdict_id": verdict.id if verdict is not None else None,
        },
    )
