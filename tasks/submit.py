"""Turn an upload record into a scan: the one path shared by the SQS ingest, the webhook and
``synthsentry submit``. The source row is committed before the intake task is sent, so the
worker always finds it; an upload recorded before sends nothing, so a retried event queues
no work twice. If the send after the commit fails, the caller sees the error; its retry is
then a duplicate and sends nothing, and :func:`resend_lost` (``synthsentry reconcile``)
sends the intake of the upload left pending."""

from __future__ import annotations

import json
import logging
from bisect import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from db.models import SourceKind
from tasks.app import (
    CONSUMER_GONE_S,
    SENT_AT_HEADER,
    broker_redis,
    broker_time,
    send_detect,
    send_intake,
)
from tasks.queues import QUEUES
from workers import metrics, uploads
from workers.events import UploadRecord
from workers.fleet import FleetContext, resend_stalled

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)


def submit_upload(
    ctx: FleetContext, record: UploadRecord, *, kind: SourceKind = SourceKind.UPLOAD_EVENT
) -> int | None:
    """Record the upload and queue its intake (``workers.uploads.submit_upload`` with the
    fleet's queues); returns the source id, or None for an upload recorded before (nothing is
    sent). Raises if the database or the broker cannot be reached (the caller keeps the event
    and tries again)."""
    return uploads.submit_upload(ctx.session_factory, CeleryDispatcher(), record, kind=kind)


@dataclass(frozen=True)
class QueueState:
    """One queue as the broker shows it at one check."""

    queue: str
    length: int
    oldest_age_s: float | None  # the message next in line; None if empty or sent unstamped
    consumers: int  # workers whose heartbeat on this queue is recent (tasks.app)


def read_queue(client: redis.Redis, queue: str, now: float | None = None) -> QueueState:
    """The queue's length, its oldest message's age (from the sent-at header, so against the
    sender's clock) and its live consumers (heartbeats, on the broker's clock)."""
    now = broker_time(client) if now is None else now
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(queue)
        pipe.lindex(queue, -1)  # kombu LPUSHes and BRPOPs: the right end is the oldest
        pipe.zcount(QUEUES.consumers(queue), now - CONSUMER_GONE_S, "+inf")
        length, oldest, consumers = pipe.execute()
    return QueueState(queue, int(length), _age(oldest, now), int(consumers))


def _age(message: bytes | None, now: float) -> float | None:
    if message is None:
        return None
    try:
        sent_at = float(json.loads(message)["headers"][SENT_AT_HEADER])
    except (ValueError, KeyError, TypeError):
        return None  # sent without the header (by an earlier release)
    return max(0.0, now - sent_at)


class BrokerBacklog:
    """Whether stalled work of each kind should be left where it is, read from the broker
    once per queue per check (``window_s``: the reconciler's ``--after``):

    - an empty queue: the work was lost; send it again;
    - messages, a live consumer, the oldest younger than the window: a backlog being worked,
      where the work most likely waits its turn; leave it;
    - messages, a live consumer, the oldest older than the window: the queue is behind by
      more than the window, and lost work would wait for a lull that may never come; send
      it again (a copy that arrives second finds its work done);
    - messages and no live consumer: nobody drains the queue, and sending more into it
      cannot help; leave it, and warn at every check until a worker consumes it again (a
      supervisor must start one: that is not the reconciler's to do).

    A low-priority (bulk) queue is served only when the upload queues are empty, so its
    oldest message may wait any time behind a busy day of uploads: lost bulk work is sent
    again once its queue drains, never because the queue is behind.
    """

    def __init__(self, client: redis.Redis, *, window_s: float) -> None:
        self.client = client
        self.window_s = window_s
        self._states: dict[str, QueueState] = {}

    def check(self, queues: Iterable[str]) -> list[QueueState]:
        """Read ``queues`` and warn of each that holds work nobody consumes, or whose oldest
        message has waited longer than the window."""
        states = [self._state(queue) for queue in queues]
        for state in states:
            if not state.length:
                continue
            facts = {
                "queue": state.queue,
                "length": state.length,
                "oldest_age_s": None if state.oldest_age_s is None else round(state.oldest_age_s),
                "consumers": state.consumers,
            }
            if not state.consumers:
                log.warning("work waits in a queue that no worker consumes", extra=facts)
            elif self._behind(state) and not state.queue.startswith(QUEUES.bulk_prefix):
                log.warning("a queue is behind by more than the reconcile window", extra=facts)
        return states

    def intake_waiting(self, *, bulk: bool = False) -> bool:
        return self._leave(QUEUES.intake_queue(bulk=bulk), patient=bulk)

    def detection_waiting(self, detector: str, *, bulk: bool = False) -> bool:
        return self._leave(QUEUES.detect(detector, bulk=bulk), patient=bulk)

    def _leave(self, queue: str, *, patient: bool = False) -> bool:
        state = self._state(queue)
        if not state.length:
            return False
        return patient or not state.consumers or not self._behind(state)

    def _behind(self, state: QueueState) -> bool:
        return state.oldest_age_s is not None and state.oldest_age_s > self.window_s

    def _state(self, queue: str) -> QueueState:
        if queue not in self._states:
            self._states[queue] = read_queue(self.client, queue)
        return self._states[queue]


def resend_lost(ctx: FleetContext, *, after_s: float) -> int:
    """Send again the messages of uploads pending longer than ``after_s``; returns how many
    messages were sent. Marked in the database before sending: a crash in between only
    delays that upload to its next check. Every check also warns of queues that hold work
    no worker consumes, or that are behind by more than ``after_s`` (``BrokerBacklog``)."""
    with broker_redis() as client:
        backlog = BrokerBacklog(client, window_s=after_s)
        backlog.check(fleet_queues(ctx.detectors))
        work = resend_stalled(ctx, after_s=after_s, backlog=backlog)
    bulk_intake, bulk_detect = set(work.bulk_intake), set(work.bulk_detect)
    # A batch re-scan's lost work goes back to the low-priority queues it came from.
    for source_id in work.intake:
        send_intake(source_id, bulk=source_id in bulk_intake)
    for image_id, detector in work.detect:
        send_detect(image_id, detector, bulk=(image_id, detector) in bulk_detect)
    metrics.RECONCILER_RESENDS.labels("intake").inc(len(work.intake))
    metrics.RECONCILER_RESENDS.labels("detect").inc(len(work.detect))
    return len(work.intake) + len(work.detect)


def fleet_queues(detectors: Iterable[str]) -> list[str]:
    """Every queue of a fleet with these detectors: intake, one per detector, and their bulk
    twins."""
    names = list(detectors)
    return [
        queue
        for bulk in (False, True)
        for queue in (
            QUEUES.intake_queue(bulk=bulk),
            *(QUEUES.detect(name, bulk=bulk) for name in names),
        )
    ]


@dataclass(frozen=True)
class RedisLayout:
    """Where kombu's Redis transport keeps a queue's messages (``kombu.transport.redis``):

    - waiting messages in one list per priority step: priority 0 under the queue's own
      name, every other step under ``<queue><sep><step>`` (``Channel._q_for_pri``), so a
      queue's length is the sum of its lists (what ``LLEN queue`` alone would miss);
    - messages delivered to a consumer and not acknowledged yet in the hash ``unacked``
      (delivery tag -> ``[message, exchange, routing key]``), until the ack removes them
      or the visibility timeout puts them back in their queue;
    - the bindings of an exchange in the set ``_kombu.binding.<exchange>``, whose members
      are ``<routing key><sep><pattern><sep><queue>``.

    The names are kombu's own (its ``Channel`` attributes), overridden by the same broker
    transport options kombu reads (``sep``, ``priority_steps``, ``unacked_key``,
    ``global_keyprefix``)."""

    sep: str
    priority_steps: tuple[int, ...]
    unacked_key: str
    binding_key: str  # with %s for the exchange
    key_prefix: str = ""

    @classmethod
    def of(cls, transport_options: Mapping[str, Any] | None = None) -> RedisLayout:
        from kombu.transport.redis import Channel

        options = transport_options or {}
        return cls(
            sep=str(options.get("sep", Channel.sep)),
            priority_steps=tuple(options.get("priority_steps", Channel.priority_steps)),
            unacked_key=str(options.get("unacked_key", Channel.unacked_key)),
            binding_key=str(Channel.keyprefix_queue),
            key_prefix=str(options.get("global_keyprefix", "")),
        )

    def priority_lists(self, queue: str) -> list[str]:
        """The Redis lists of ``queue``, one per priority step."""
        return [self.key_prefix + self.list_of(queue, step) for step in self.priority_steps]

    def list_of(self, queue: str, priority: int) -> str:
        steps = self.priority_steps
        step = steps[max(0, bisect(steps, priority) - 1)]
        return f"{queue}{self.sep}{step}" if step else queue

    def bindings(self, exchange: str) -> str:
        return self.key_prefix + self.binding_key % exchange


def read_depths(
    client: redis.Redis,
    queues: Sequence[str],
    layout: RedisLayout,
    now: float | None = None,
) -> list[metrics.QueueDepth]:
    """Each queue's messages waiting (every priority), reserved and not acknowledged, and
    its live consumers, at one read of the broker. A reserved message of a queue not in
    ``queues`` is reported too."""
    now = broker_time(client) if now is None else now
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for key in layout.priority_lists(queue):
                pipe.llen(key)
        for queue in queues:
            pipe.zcount(QUEUES.consumers(queue), now - CONSUMER_GONE_S, "+inf")
        pipe.hvals(layout.key_prefix + layout.unacked_key)
        answers = pipe.execute()
    steps = len(layout.priority_steps)
    ready = {
        queue: sum(int(n) for n in answers[i * steps : (i + 1) * steps])
        for i, queue in enumerate(queues)
    }
    consumers = dict(zip(queues, answers[len(queues) * steps : -1], strict=True))
    unacked = _unacked_by_queue(client, answers[-1], layout)
    names = list(queues) + sorted(set(unacked) - set(queues))
    return [
        metrics.QueueDepth(
            queue=name,
            ready=ready.get(name, 0),
            unacked=unacked.get(name, 0),
            consumers=int(consumers.get(name, 0)),
        )
        for name in names
    ]


def _unacked_by_queue(
    client: redis.Redis, entries: Sequence[bytes], layout: RedisLayout
) -> dict[str, int]:
    """How many of the reserved messages (``unacked`` values) belong to each queue: the
    queues their exchange binds their routing key to (each of Celery's task queues is bound
    to an exchange of its own name by the queue's name; sent to the default exchange, the
    routing key is the queue)."""
    routes: dict[tuple[str, str], int] = {}
    for entry in entries:
        try:
            _, exchange, routing_key = json.loads(entry)
        except (ValueError, TypeError):
            continue  # not a kombu entry
        route = (str(exchange or ""), str(routing_key or ""))
        routes[route] = routes.get(route, 0) + 1
    tables: dict[str, list[tuple[str, str]]] = {}
    counts: dict[str, int] = {}
    for (exchange, routing_key), count in routes.items():
        if exchange and exchange not in tables:
            members = client.smembers(layout.bindings(exchange))
            tables[exchange] = [
                (parts[0], parts[-1])
                for parts in (_text(member).split(layout.sep) for member in members)
                if len(parts) == 3
            ]
        bound = [queue for key, queue in tables.get(exchange, []) if key == routing_key]
        for queue in bound or [routing_key]:
            counts[queue] = counts.get(queue, 0) + count
    return counts


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class CeleryDispatcher:
    """The fleet's dispatcher (``workers.dispatch.Dispatcher``): work goes to the broker's
    queues, bulk work to their low-priority twins."""

    def intake(self, source_id: int, *, bulk: bool = False) -> None:
        send_intake(source_id, bulk=bulk)

    def detect(self, image_id: int, detector: str, *, bulk: bool = False) -> None:
        send_detect(image_id, detector, bulk=bulk)
