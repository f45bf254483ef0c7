"""Why a worker's consumer connection holds its task channel only (``tasks/app.py``): what
kombu's Redis transport does when Celery cleans up a connection whose broker was SIGKILLed,
with messages held and a BRPOP in flight, as in a worker that lost its broker mid-batch.

Celery first calls ``Connection.collect()``, then ``Connection.close()``; with a second
channel that has an auto-delete fanout queue (remote control's, gossip's) beside the task
channel, kombu 5.7.0 leaves the task channel half closed and the second close raises
AttributeError, which Celery takes for an unrecoverable error."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from fleet_processes import PersistentRedis


def _held_then_broker_killed(broker: PersistentRedis, *, second_channel: bool) -> Connection:
    """A connection that holds two unacknowledged messages and waits on a BRPOP for a third,
    whose broker was just SIGKILLed."""
    connection = Connection(broker.url, transport_options={"visibility_timeout": 60})
    connection.connect()
    work = Queue("work", Exchange("work", "direct"), "work")
    with Producer(connection) as producer:
        for i in range(3):
            producer.publish({"i": i}, exchange=work.exchange, routing_key="work", declare=[work])
    held: list[Any] = []
    channel = connection.default_channel
    consumer = Consumer(channel, [work], callbacks=[lambda _body, message: held.append(message)])
    consumer.qos(prefetch_count=2)
    consumer.consume()
    if second_channel:
        # What remote control adds: a channel consuming an auto-delete fanout queue.
        broadcast = Queue("broadcast", Exchange("broadcast", "fanout"), auto_delete=True)
        Consumer(connection.channel(), [broadcast], callbacks=[lambda *_: None]).consume()
    while len(held) < 2:
        connection.drain_events(timeout=5)
    consumer.qos(prefetch_count=3)
    channel._brpop_start()  # what the event loop does once there is credit again
    assert channel._in_poll
    broker.kill()
    return connection


def _clean_up_as_celery_does(connection: Connection) -> None:
    # celery.worker.consumer.Consumer.on_connection_error_after_connected (Celery 5.7.0)
    with contextlib.suppress(Exception):
        connection.collect(socket_timeout=5)
    connection.close()


def test_a_connection_with_only_its_task_channel_closes_after_a_broker_sigkill(
    tmp_path: Path,
) -> None:
    broker = PersistentRedis(tmp_path)
    broker.start()
    try:
        connection = _held_then_broker_killed(broker, second_channel=False)
        _clean_up_as_celery_does(connection)
    finally:
        broker.stop()


@pytest.mark.xfail(
    strict=True,
    raises=AttributeError,
    reason="kombu 5.7.0: Transport.close_connection stops at the first channel that fails to "
    "close, Connection.collect then drops the transport's client, and closing the task "
    "channel again rebuilds a pool from it. If this passes, kombu is fixed: remote control "
    "could be turned on again.",
)
def test_a_second_channel_leaves_the_task_channel_unclosable(tmp_path: Path) -> None:
    broker = PersistentRedis(tmp_path)
    broker.start()
    try:
        connection = _held_then_broker_killed(broker, second_channel=True)
        _clean_up_as_celery_does(connection)
    finally:
        broker.stop()
