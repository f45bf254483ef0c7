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
- no result backend: results live in Postgres;
- a broker that vanishes and comes back is ridden out: workers reconnect forever and resume
  consuming, senders retry a publish for about 15 s, and a worker that cannot recover exits
  non-zero (``synthsentry worker``) for its supervisor to restart. The consumer connection
  holds one channel only (no remote control, gossip or mingle): kombu 5.7.0 cannot close a
  Redis connection that has a second one while the broker is down (see ``celery_config``);
- every worker writes a heartbeat on the queues it consumes (``QueueHeartbeat``; it also
  reconnects a worker whose broker went away while all its slots were busy), and every
  message carries the time it was sent, so the reconciler can tell a queue waiting its turn
  from one that nobody drains.

Importing this module (to send a task by name) loads Celery and the settings, nothing
more: no database driver, no image library, no torch. A worker imports the task
definitions (``tasks.scan``) when it starts.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from celery import Celery, bootsteps

from synthsentry.settings import Settings, get_settings
from tasks.queues import QUEUES

if TYPE_CHECKING:
    import redis

# The task names, for senders; the definitions live in tasks.scan.
INTAKE_TASK = "synthsentry.intake"
DETECT_TASK = "synthsentry.detect"

# A header on every message: when it was sent (Unix time, the sender's clock), so the age of
# the oldest message waiting in a queue can be read from the broker.
SENT_AT_HEADER = "synthsentry_sent_at"

HEARTBEAT_S = 10.0  # between a worker's heartbeats on the queues it consumes
CONSUMER_GONE_S = 3 * HEARTBEAT_S  # a worker silent this long no longer consumes
_FORGET_S = 3600  # a heartbeat this old is removed from the broker

log = logging.getLogger(__name__)

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
        # Remote control (``celery inspect``/``control``; the fleet uses neither) opens a second
        # channel on the consumer connection, with an auto-delete fanout queue. When the broker
        # vanishes, kombu 5.7.0 closes that channel first and it fails (deleting the queue
        # needs the broker); kombu stops closing channels there, drops the transport's client
        # and leaves the task channel half closed, and Celery's reconnect then closes it a
        # second time: restoring its unacknowledged messages rebuilds a connection pool from
        # the dropped client and raises AttributeError ("'NoneType' object has no attribute
        # 'hostname'", celery/kombu#582 is the same failure through the gossip channel),
        # which Celery treats as unrecoverable. With one channel, kombu closes it cleanly.
        # Gossip and mingle, with the same kind of channel, are off in `synthsentry worker`,
        # and so is Celery's worker heartbeat: its publish retries without end on the event
        # loop, which then stops for as long as the broker is away.
        "worker_enable_remote_control": False,
        # A task running when the broker vanishes finishes and stores its result; its
        # acknowledgement is lost with the connection, so the message comes back after the
        # visibility timeout and finds its work done. Cancelling it instead (Celery 6's
        # default) would throw away the work and count a delivery towards the poison limit.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A send retries for about 15 s (0 + 1 + 2 + 3 + 4 + 5), long enough for a broker
        # restart; a send that still fails raises, and the caller keeps its event or the
        # reconciler sends the work of the upload left pending.
        "task_publish_retry_policy": {
            "max_retries": 6,
            "interval_start": 0,
            "interval_step": 1,
            "interval_max": 5,
        },
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_seconds,
            # How often a worker looks for messages whose holder vanished (kombu's default
            # looks every 100 s); each look is one indexed range query on Redis.
            "unacked_restore_interval": restore_interval(settings.visibility_timeout_seconds),
            "unacked_restore_throttle": 1,
            # A worker consumes its upload queue first and that queue's bulk twin after it
            # (`synthsentry worker`: ``--queues intake,bulk.intake``). kombu polls all of a
            # worker's queues with one BRPOP, whose keys Redis tries in the order given and
            # pops from the first that is not empty; "priority" keeps that order as the
            # queues were named (kombu's default, "round_robin", moves the queue just read
            # to the end, so a bulk queue would get every other message).
            "queue_order_strategy": "priority",
            # A broker host that vanishes without closing its sockets must fail a call, not
            # hang it (kombu passes no timeout to redis-py by default), and an idle pooled
            # connection is checked before it is used again.
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "health_check_interval": 10,
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


def send_intake(source_id: int, *, bulk: bool = False) -> None:
    """Queue the intake of a recorded upload; ``bulk``: on the low-priority queue."""
    app.send_task(
        INTAKE_TASK,
        args=(source_id,),
        kwargs={"bulk": True} if bulk else {},
        queue=QUEUES.intake_queue(bulk=bulk),
        headers={SENT_AT_HEADER: time.time()},
    )


def send_detect(image_id: int, detector: str, *, bulk: bool = False) -> None:
    app.send_task(
        DETECT_TASK,
        args=(image_id, detector),
        queue=QUEUES.detect(detector, bulk=bulk),
        headers={SENT_AT_HEADER: time.time()},
    )


def broker_redis(broker_url: str | None = None) -> redis.Redis:
    """A plain Redis client on the broker, for heartbeats and queue inspection; short
    timeouts, so a broker that is away fails the call instead of hanging it."""
    import redis

    return redis.Redis.from_url(
        broker_url or app.conf.broker_url, socket_timeout=5, socket_connect_timeout=5
    )


def broker_time(client: redis.Redis) -> float:
    """The broker's clock (Unix seconds): heartbeats are written and read against it, so the
    clocks of the workers and of the reconciler need not agree."""
    seconds, microseconds = client.time()
    return float(seconds) + microseconds / 1_000_000


def write_heartbeat(
    client: redis.Redis, worker: str, queues: list[str], now: float | None = None
) -> None:
    """Record that ``worker`` consumes ``queues`` now (the broker's clock); heartbeats of
    workers gone an hour are dropped, and so is a queue's whole set an hour after its last
    heartbeat."""
    now = broker_time(client) if now is None else now
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            key = QUEUES.consumers(queue)
            pipe.zadd(key, {worker: now})
            pipe.zremrangebyscore(key, "-inf", now - _FORGET_S)
            pipe.expire(key, _FORGET_S)
        pipe.execute()


class QueueHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """While a worker consumes, it writes a heartbeat on its queues every ``HEARTBEAT_S``,
    and makes sure the broker it consumes from is still the one it connected to.

    A step of the consumer, after its task consumer: it starts when the worker (re)connects
    and starts consuming, runs on the consumer's event loop, and stops with the consumer. A
    worker that lost the broker, whose loop is stuck or that exited stops beating, and
    ``synthsentry reconcile`` reports a queue that holds messages but has no worker that
    beat in the last ``CONSUMER_GONE_S``.

    The check is needed because a worker whose every slot is busy stops polling its Redis
    connection (kombu pauses the BRPOP until a slot frees), so it does not see the broker
    go; the acknowledgements of its running tasks then fail, the slots never free, and the
    worker would wait forever on a dead connection. A beat that cannot reach the broker, or
    finds that it restarted (another ``run_id``) since the worker connected, raises a
    connection error on the event loop, and Celery reconnects the worker.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._timer_entry: Any = None
        self._run_id: str | None = None

    def start(self, c: Any) -> None:
        queues = sorted(queue.name for queue in c.task_consumer.queues)
        beat = (c.app.conf.broker_url, c.hostname, queues)
        self._run_id = None
        self._beat(*beat)
        self._timer_entry = c.timer.call_repeatedly(HEARTBEAT_S, self._beat, beat)

    def stop(self, c: Any) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)

    def _beat(self, broker_url: str, worker: str, queues: list[str]) -> None:
        import redis

        try:
            with broker_redis(broker_url) as client:
                run_id = str(client.info("server")["run_id"])
                write_heartbeat(client, worker, queues)
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # a connection error on the event loop: Celery reconnects the worker
        except redis.RedisError as exc:
            # A broker that answers but refuses the write (full, read-only): consuming may
            # still work, and the missing heartbeat tells the reconciler.
            log.warning("heartbeat not written", extra={"worker": worker, "error": repr(exc)})
            return
        if self._run_id is None:
            self._run_id = run_id
        elif run_id != self._run_id:
            raise redis.ConnectionError("the broker restarted since this worker connected")


app.steps["consumer"].add(QueueHeartbeat)
