"""The callback sender: takes due deliveries from the outbox, signs and sends them, and
records every attempt.

    claim      (one transaction) due pending rows, locked with SKIP LOCKED and leased:
               their next attempt moves past the time the batch may take, so a sender
               killed mid-batch gives its rows back when the lease runs out
    send       (no transaction held) sign with every live secret, POST through the guard
    record     (one transaction per delivery) the attempt, then the delivery's new state:
               2xx delivered; 410 Gone disables the endpoint and its pending deliveries;
               refused by the guard fails for good; anything else is retried with
               exponential backoff and jitter until the retry window has passed, then
               fails

Any number of senders may run (the ``callbacks deliver`` command, the API process in the
embedded mode): a row is claimed by one at a time. A receiver may still see a delivery
twice (a sender killed after sending, before recording); the ``webhook-id`` header is the
same on every attempt, so it can tell.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from random import SystemRandom

from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import CallbackDelivery, DeliveryState, as_utc, utcnow
from db.session import transaction
from workers import metrics
from workers.callbacks.guard import CallbackRefused, check_url
from workers.callbacks.secrets import SecretUnreadable, sign
from workers.callbacks.service import signing_secrets
from workers.callbacks.transport import Answer, CallbackSender, host_of

log = logging.getLogger(__name__)

FIRST_RETRY = timedelta(seconds=30)
LONGEST_RETRY = timedelta(hours=4)
USER_AGENT = "synthsentry-callbacks/1"
# Beyond the sending itself, a claim's lease covers the claim's own transaction, the
# signing, the recording of earlier attempts where rows are sent one at a time, and the
# few milliseconds an attempt runs past its limit (the watchdog waking a blocked thread,
# closing the socket).
LEASE_MARGIN = timedelta(seconds=60)
_jitter = SystemRandom()


def backoff(
    attempts: int, *, uniform: Callable[[float, float], float] = _jitter.uniform
) -> timedelta:
    """The wait after the ``attempts``-th failure: doubling from 30 s up to 4 h, each
    between half and all of it at random (receivers that failed together do not come
    back together)."""
    full = min(FIRST_RETRY * (1 << min(max(attempts - 1, 0), 20)), LONGEST_RETRY)
    return full * uniform(0.5, 1.0)


@dataclass(frozen=True)
class _Outgoing:
    """A claimed delivery, as plain values for the sending thread."""

    delivery_id: int
    public_id: str
    url: str
    body: str
    signing: list[str]
    lease_until: datetime
    problem: str | None = None  # why it cannot be sent now (then nothing is sent)
    refused: bool = False  # ... and never will be


def deliver_due(
    session_factory: sessionmaker[Session],
    sender: CallbackSender,
    *,
    now: datetime | None = None,
    limit: int = 32,
    concurrency: int = 8,
) -> int:
    """Send up to ``limit`` deliveries due at ``now`` (``concurrency`` at a time); returns
    how many were attempted. ``now`` decides what is due and when the next attempt is; the
    ``webhook-timestamp`` a receiver checks is always the real time of sending."""
    now = now or utcnow()
    # No other sender may claim a row while this one may still send it (it would be sent
    # twice), so the lease outlasts the batch's longest possible sending: one attempt ends
    # within ``attempt_limit_s`` of its start, lookup, connecting, handshake and reading
    # included (see ``transport``); ``concurrency`` threads take the claimed rows in turn,
    # so the last attempt starts at the latest after ``ceil(limit / concurrency) - 1``
    # attempt limits, and ends within ``rounds * attempt_limit_s`` of the claim. With the
    # defaults (15 s timeout, so 30 s per attempt; 32 rows, 8 at a time): 4 * 30 s + 60 s =
    # 3 minutes.
    rounds = math.ceil(limit / max(1, concurrency))
    lease_until = now + timedelta(seconds=rounds * sender.policy.attempt_limit_s) + LEASE_MARGIN
    with transaction(session_factory) as session:
        claimed = repository.claim_due_deliveries(
            session, now=now, limit=limit, lease_until=lease_until
        )
        outgoing = [
            _prepare(session, sender, row, now=now, lease_until=lease_until) for row in claimed
        ]
    if not outgoing:
        return 0
    if len(outgoing) == 1 or concurrency <= 1:
        for item in outgoing:
            _finish(session_factory, sender, item, _send(sender, item), now=now)
    else:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="callback") as pool:
            for item, answer in zip(
                outgoing, pool.map(lambda item: _send(sender, item), outgoing), strict=True
            ):
                _finish(session_factory, sender, item, answer, now=now)
    return len(outgoing)


def _prepare(
    session: Session,
    sender: CallbackSender,
    row: CallbackDelivery,
    *,
    now: datetime,
    lease_until: datetime,
) -> _Outgoing:
    policy = sender.policy
    endpoint = repository.get_callback_endpoint(session, row.endpoint_id)
    token = repository.get_token(session, row.token_id)
    assert endpoint is not None and token is not None
    body = json.dumps(row.payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False)

    def outgoing(
        signing: list[str], problem: str | None = None, *, refused: bool = False
    ) -> _Outgoing:
        return _Outgoing(
            row.id, row.public_id, endpoint.url, body, signing, lease_until, problem, refused
        )

    if token.revoked_at is not None:
        return outgoing([], "the token was revoked", refused=True)
    try:
        check_url(
            endpoint.url,
            repository.callback_hosts(session, token.id),
            allow_private=policy.allow_private,
        )
    except CallbackRefused as exc:
        return outgoing([], str(exc), refused=True)
    if policy.box is None:
        return outgoing([], "callback signing is not configured on this server (no secret key)")
    try:
        signing = signing_secrets(session, token.id, policy.box, now=now)
    except SecretUnreadable as exc:
        # Retried like any failed attempt (the operator may yet add the missing key), and
        # said loudly: no delivery of this token goes out until then.
        log.error(
            "callback not signed: a signing secret of its token cannot be decrypted; was the "
            "secret key changed without keeping the previous one among the previous keys?",
            extra={"delivery": row.public_id, "token": token.public_id},
        )
        return outgoing([], str(exc))
    if not signing:
        return outgoing([], "the token has no signing secret (POST /v1/callbacks/secret makes one)")
    return outgoing(signing)


def _send(sender: CallbackSender, item: _Outgoing) -> Answer:
    if item.problem is not None:
        return Answer(None, item.problem, 0.0, refused=item.refused)
    sent_at = datetime.now(UTC).replace(microsecond=0)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": item.public_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": sign(item.public_id, sent_at, item.body, item.signing),
    }
    try:
        return sender.post(item.url, item.body.encode("utf-8"), headers)
    except Exception as exc:  # a bug in one attempt must not lose the batch's records
        metrics.error("callbacks")
        log.exception("callback attempt failed unexpectedly", extra={"delivery": item.public_id})
        return Answer(None, f"unexpected error: {type(exc).__name__}", 0.0)


def _finish(
    session_factory: sessionmaker[Session],
    sender: CallbackSender,
    item: _Outgoing,
    answer: Answer,
    *,
    now: datetime,
) -> None:
    with transaction(session_factory) as session:
        repository.add_callback_attempt(
            session,
            item.delivery_id,
            at=now,
            status_code=answer.status,
            error=answer.error,
            duration_ms=answer.duration_ms,
        )
        row = repository.lock_delivery(session, item.delivery_id)
        assert row is not None
        if row.state != DeliveryState.PENDING or as_utc(row.next_attempt_at) != item.lease_until:
            return  # redelivered, or taken over after the lease ran out: theirs to record
        row.attempts += 1
        row.last_status = answer.status
        row.last_error = answer.error
        outcome = _decide(session, sender, row, answer, now=now)
    metrics.CALLBACK_DELIVERIES.labels(_counted_as(outcome, answer)).inc()
    log.info(
        "callback attempt",
        extra={
            "delivery": item.public_id,
            "host": host_of(item.url),
            "status": answer.status,
            "error": answer.error,
            "outcome": outcome,
            "duration_ms": round(answer.duration_ms, 1),
        },
    )


def _counted_as(outcome: str, answer: Answer) -> str:
    """An attempt's outcome as ``synthsentry_callback_deliveries_total`` counts it: a retry
    is a failed attempt; a delivery that will not be sent again gave up (its window
    passed, or the endpoint answered 410 Gone), unless it was refused without being sent."""
    if outcome == "delivered":
        return "delivered"
    if outcome == "retry":
        return "failed"
    return "refused" if answer.refused else "gave_up"


def _decide(
    session: Session,
    sender: CallbackSender,
    row: CallbackDelivery,
    answer: Answer,
    *,
    now: datetime,
) -> str:
    if answer.delivered:
        row.state = DeliveryState.DELIVERED
        row.finished_at = now
        return "delivered"
    if answer.status == 410:
        reason = f"the endpoint answered 410 Gone at {now.isoformat()}"
        row.state = DeliveryState.DISABLED
        row.finished_at = now
        session.flush()
        stopped = repository.disable_callback_endpoint(
            session, row.endpoint_id, reason=reason, now=now
        )
        log.warning(
            "callback endpoint disabled", extra={"endpoint_id": row.endpoint_id, "stopped": stopped}
        )
        return "disabled"
    deadline = as_utc(row.created_at) + sender.policy.retry_window
    if answer.refused or now >= deadline:
        row.state = DeliveryState.FAILED
        row.finished_at = now
        return "failed"
    # Retried until the window has passed: the last try is at its end, not short of it.
    row.next_attempt_at = min(now + backoff(row.attempts), deadline)
    return "retry"


def run_sender(
    stop: threading.Event,
    session_factory: sessionmaker[Session],
    sender: CallbackSender,
    *,
    idle_s: float = 2.0,
    limit: int = 32,
    concurrency: int = 8,
    on_round: Callable[[bool], None] | None = None,
) -> None:
    """Send due callbacks until ``stop`` is set: at once while there is more to send,
    otherwise every ``idle_s`` seconds. Trouble (the database away) is logged and waited
    out, longer each time, up to a minute. ``on_round`` hears after every round whether it
    went through (a probe: the loop turns, the database answers)."""
    log.info("callback sender started", extra={"concurrency": concurrency})
    failures = 0
    while not stop.is_set():
        try:
            sent = deliver_due(session_factory, sender, limit=limit, concurrency=concurrency)
        except Exception:
            failures += 1
            metrics.error("callbacks")
            log.exception("callback sender: a round failed", extra={"failures": failures})
            if on_round is not None:
                on_round(False)
            stop.wait(min(60.0, idle_s * 2**failures))
            continue
        if on_round is not None:
            on_round(True)
        failures = 0
        if sent < limit:
            stop.wait(idle_s)
    log.info("callback sender stopped")
