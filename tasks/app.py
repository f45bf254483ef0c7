"""The Celery application: every broker and delivery setting in one place.

Guarantees and the settings that give them (docs/fleet.md explains each):
- at least once in: ``task_acks_late`` acknowledges a message only after its task returned,
  ``task_reject_on_worker_lost`` requeues the message of a process that died (SIGKILL, OOM),
  and the Redis ``visibility_timeout`` redelivers what a vanished worker held (swept for
  every few seconds, not kombu's default 100 s);
- each pool slot holds one message (``worker_prefetch_multiplier = 1``), so a crash loses
  no buffered work and queue lengths show the real backlog to an autoscaler; a batching
  detector worker has two batches' worth of slots (threads), one running, one filling;
- JSON only, never pickle, on the wire;
- no result backend: results live in Postgres.

Importing this module (to send a task by name) loads Celery and the settings, nothing
more: no database driver, no image library, no torch. A worker imports the task
definitions (``tasks.scan``) when it starts.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from synthsentry.settings import Settings, get_settings
from tasks.queues import QUEUES

# The task names, for senders; the definitions live in tasks.scan.
INTAKE_TASK = "synthsentry.intake"
DETECT_TASK = "synthsentry.detect"

app = Celery("synthsentry", set_as_current=False, include=["tasks.scan"])


def restore_interval(visibility_timeout: int) -> int:
    """Seconds between sweeps for messages to redeliver: a tenth of the visibility timeout,
    1 to 30 s, so a dead worker's messages come back soon after the timeout."""
    return max(1, min(30, visibility_timeout // 10))


def celery_config(settings: Settings) -> dict[str, Any]:
    """Every Celery setting the fleet runs with."""
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # keep reconnecting through a broker restart
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_seconds,
            # How often a worker looks for messages whose holder vanished (kombu's default
            # looks every 100 s); each look is one indexed range query on Redis.
            "unacked_restore_interval": restore_interval(settings.visibility_timeout_seconds),
            "unacked_restore_throttle": 1,
        },
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit_seconds,
        "task_soft_time_limit": settings.task_time_limit_seconds
        - max(1, min(30, settings.task_time_limit_seconds // 4)),
        "task_default_queue": QUEUES.intake,
        "task_routes": {INTAKE_TASK: {"queue": QUEUES.intake}},
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


def configure(settings: Settings | None = None) -> Celery:
    """Apply settings to the app; called by every process that sends or runs tasks."""
    app.conf.update(celery_config(settings or get_settings()))
    return app


def send_intake(source_id: int) -> None:
    app.send_task(INTAKE_TASK, args=(source_id,), queue=QUEUES.intake)


def send_detect(image_id: int, detector: str) -> None:
    app.send_task(DETECT_TASK, args=(image_id, detector), queue=QUEUES.detect(detector))
