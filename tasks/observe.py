"""What a worker process tells its observers: how long each message waited in its queue,
the errors of its tasks, whether its consumer loop is alive and whether it can take work.

- Queue wait: every message carries the time it was sent (``tasks.app.SENT_AT_HEADER``);
  when its task starts, the wait is observed in ``synthsentry_queue_wait_seconds`` by
  queue. A retry is left out: it waited its backoff on purpose.
- Errors: a task that raises (and is retried, or fails for good) counts one in
  ``synthsentry_errors_total`` under its component (``intake``, ``detect``).
- Liveness: a step of the consumer beats a :class:`workers.probes.LoopProbe` every few
  seconds from the consumer's own event loop, and pauses it while the consumer is down
  (reconnecting to the broker). A task running in the loop's thread (a solo pool) counts
  as alive within the task time limit; in a threads or prefork pool the loop keeps turning
  while batches run.
- Readiness: the consumer is consuming (its broker connection is up), and the worker's
  own checks (its detector loaded) pass.

The signal handlers are connected when this module is imported (``tasks.scan`` imports it,
so every worker has them); the probes are installed by ``synthsentry worker``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import bootsteps, signals

from tasks.app import DETECT_TASK, INTAKE_TASK, SENT_AT_HEADER, app
from workers import metrics
from workers.probes import Flag, LoopProbe, Readiness

log = logging.getLogger(__name__)

TICK_S = 5.0  # between the consumer loop's beats
LOOP_STALE_S = 60.0  # a consuming loop silent this long is wedged
_COMPONENTS = {INTAKE_TASK: "intake", DETECT_TASK: "detect"}


class WorkerProbes:
    """The liveness and readiness of one worker process (see the module's description)."""

    def __init__(self, *, task_time_limit_s: float) -> None:
        self.loop = LoopProbe(stale_after_s=LOOP_STALE_S, busy_limit_s=task_time_limit_s + 30)
        self.consuming = Flag()
        self.readiness = Readiness({"consuming": self.consuming})

    def ready(self) -> bool:
        return self.readiness.ready()


_installed: WorkerProbes | None = None


def install(probes: WorkerProbes) -> None:
    """Make ``probes`` the ones this process's consumer and tasks report to."""
    global _installed  # noqa: PLW0603 - one worker per process
    _installed = probes


class ConsumerProbe(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Beats the installed probe from the consumer's event loop while it consumes; a stop
    (the broker went away, the worker shuts down) pauses it and marks the worker not ready
    until the consumer starts again."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._timer_entry: Any = None

    def start(self, c: Any) -> None:
        probes = _installed
        if probes is None:
            return
        probes.consuming.set(True)
        probes.loop.beat()
        self._timer_entry = c.timer.call_repeatedly(TICK_S, probes.loop.beat)

    def stop(self, c: Any) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None
        probes = _installed
        if probes is not None:
            probes.consuming.set(False)
            probes.loop.pause()

    def shutdown(self, c: Any) -> None:
        self.stop(c)


app.steps["consumer"].add(ConsumerProbe)


def queue_of(request: Any) -> str | None:
    """The queue a task's message came from (its routing key: each queue is bound to the
    exchange of its own name)."""
    delivery = getattr(request, "delivery_info", None) or {}
    queue = delivery.get("routing_key") or None
    return str(queue) if queue is not None else None


@signals.task_prerun.connect
def _task_started(task: Any = None, **_: Any) -> None:
    if task is None:
        return
    request = task.request
    if _installed is not None:
        _installed.loop.started_task()
    if getattr(request, "retries", 0):
        return
    sent_at, queue = getattr(request, SENT_AT_HEADER, None), queue_of(request)
    if sent_at is None or queue is None:
        return  # sent by an earlier release, or run directly
    try:
        metrics.observe_queue_wait(queue, time.time() - float(sent_at))
    except (TypeError, ValueError):
        log.debug("a message's sent-at header is not a time", extra={"queue": queue})


@signals.task_postrun.connect
def _task_finished(**_: Any) -> None:
    if _installed is not None:
        _installed.loop.finished_task()


def _task_error(sender: Any = None, **_: Any) -> None:
    component = _COMPONENTS.get(str(getattr(sender, "name", "")))
    if component is not None:
        metrics.error(component)


signals.task_retry.connect(_task_error, weak=False)
signals.task_failure.connect(_task_error, weak=False)
