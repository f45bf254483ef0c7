"""The SQS consumer that turns S3 upload events into scan submissions.

S3 (directly, or through SNS or EventBridge) puts an event on an SQS queue for every upload;
:func:`run_sqs_ingest` long-polls that queue and hands each upload the bucket policy allows to
a :class:`Submitter`, which records it durably and enqueues its scan. The loop owns only the
queue protocol; what "submit" means is injected, so it runs without Celery or a database.

Delivery guarantees, and what they ask of the submitter:

- A message is deleted only after every upload in it was submitted. A submit that raises
  leaves the message on the queue; it comes back after its visibility timeout. So the same
  upload can be submitted more than once (S3 itself also delivers at least once): the
  submitter must be idempotent on :meth:`UploadRecord.ref_key`.
- A message that will never parse goes to the dead-letter callback, then is deleted; one bad
  message never stops the loop. A bad record among good ones (a missing field, a key that is
  not UTF-8 once decoded ...) goes to the dead-letter callback on its own, with its reason;
  the good ones are submitted and the message is deleted. A message that always fails to
  submit keeps coming back: give the queue a redrive policy (``maxReceiveCount``) so SQS
  moves it aside.
- Errors talking to SQS (throttling, a deleted queue, a network or broker restart) are logged
  and retried with capped exponential backoff, forever, until ``stop`` is set. Missing
  credentials or invalid parameters are programming errors and propagate.

Shutdown: ``stop`` is checked between polls, and a backoff wait ends as soon as it is set;
a poll in flight finishes first, so stopping takes up to ``wait_seconds`` (plus finishing the
at most ``max_messages`` messages already received).

The SQS client's read timeout must exceed ``wait_seconds`` (botocore's default, 60 s, does).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotocoreConnectionError

from workers import metrics
from workers.events import BucketPolicy, MalformedEvent, UploadRecord, parse_s3_notification

logger = logging.getLogger(__name__)

# Failures of the SQS call itself that retrying can cure. ClientError covers throttling and
# server errors as well as a queue that does not exist (yet, or any more): retrying those is
# what lets a consumer outlive a queue being recreated.
SQS_CALL_ERRORS: tuple[type[Exception], ...] = (
    ClientError,
    BotocoreConnectionError,
    HTTPClientError,
)

# SQS limits: long polls last at most 20 s, a receive returns at most 10 messages, a
# visibility timeout is at most 12 hours.
_MAX_WAIT_SECONDS = 20
_MAX_MESSAGES = 10
_MAX_VISIBILITY_TIMEOUT = 12 * 60 * 60


class SQSClient(Protocol):
    """The two calls the consumer makes; a boto3 ``sqs`` client satisfies it."""

    def receive_message(self, **kwargs: Any) -> Mapping[str, Any]: ...

    def delete_message(self, **kwargs: Any) -> object: ...


class Submitter(Protocol):
    """Records the upload durably and enqueues its scan; raises on failure.

    Called again for an upload it has seen before (redelivery, S3 duplicates): it must treat
    a known :meth:`UploadRecord.ref_key` as done.
    """

    def __call__(self, record: UploadRecord) -> None: ...


class DeadLetters(Protocol):
    """Keeps an unprocessable message for an operator; raises if it could not."""

    def __call__(self, body: str, reason: str) -> None: ...


@dataclass
class IngestStats:
    """Counters for one run of the loop. Messages and records are counted separately."""

    received: int = 0  # messages received from SQS
    submitted: int = 0  # upload records submitted
    skipped_test_events: int = 0  # s3:TestEvent messages (deleted)
    ignored_records: int = 0  # records that announce no upload (ObjectRemoved:*, ...)
    refused_bucket: int = 0  # upload records the bucket policy refused (not submitted)
    malformed: int = 0  # messages that could not be parsed (sent to dead_letter)
    invalid_records: int = 0  # unusable records of messages otherwise parsed (dead-lettered)
    failed: int = 0  # messages left on the queue for redelivery after a failure
    deleted: int = 0  # messages deleted from the queue
    sqs_errors: int = 0  # SQS calls (receive or delete) that failed


def exponential_backoff(attempt: int, *, base: float = 1.0, cap: float = 60.0) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): doubling, capped, jittered.

    Half the delay is fixed and half random ("equal jitter"), so a fleet that lost its broker
    at the same moment does not come back in lockstep.
    """
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 1) - 1, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - jitter, not security


def run_sqs_ingest(
    sqs: SQSClient,
    queue_url: str,
    *,
    submit: Submitter,
    dead_letter: DeadLetters,
    policy: BucketPolicy,
    stop: threading.Event,
    wait_seconds: int = 20,
    max_messages: int = 10,
    visibility_timeout: int | None = None,
    backoff: Callable[[int], float] = exponential_backoff,
    log: logging.Logger = logger,
    on_poll: Callable[[bool], None] | None = None,
) -> IngestStats:
    """Consume S3 upload events from ``queue_url`` until ``stop`` is set; return the counters.

    ``visibility_timeout`` (seconds) overrides the queue's for the messages received here; it
    must comfortably exceed the time ``submit`` takes for one message, or a message being
    processed reappears and is submitted twice. ``backoff(n)`` is the pause after the n-th
    consecutive failure (of SQS calls, or of a batch with a failed submit). ``on_poll``
    hears after every receive whether it reached SQS (a probe: the loop turns, the queue
    answers).
    """
    if not 1 <= wait_seconds <= _MAX_WAIT_SECONDS:
        # 0 would be short polling: a busy loop against an empty queue.
        raise ValueError(f"wait_seconds must be 1..{_MAX_WAIT_SECONDS}, got {wait_seconds}")
    if not 1 <= max_messages <= _MAX_MESSAGES:
        raise ValueError(f"max_messages must be 1..{_MAX_MESSAGES}, got {max_messages}")
    if visibility_timeout is not None and not 0 <= visibility_timeout <= _MAX_VISIBILITY_TIMEOUT:
        raise ValueError(
            f"visibility_timeout must be 0..{_MAX_VISIBILITY_TIMEOUT}, got {visibility_timeout}"
        )
    consumer = _Consumer(
        sqs=sqs,
        queue_url=queue_url,
        submit=submit,
        dead_letter=dead_letter,
        policy=policy,
        log=log,
    )
    request: dict[str, Any] = {
        "QueueUrl": queue_url,
        "WaitTimeSeconds": wait_seconds,
        "MaxNumberOfMessages": max_messages,
        "MessageSystemAttributeNames": ["ApproximateReceiveCount"],
    }
    if visibility_timeout is not None:
        request["VisibilityTimeout"] = visibility_timeout

    log.info(
        "sqs ingest started",
        extra={"queue_url": queue_url, "bucket_policy": str(policy), "wait_seconds": wait_seconds},
    )
    sqs_failures = 0
    batch_failures = 0
    while not stop.is_set():
        try:
            response = sqs.receive_message(**request)
        except SQS_CALL_ERRORS as exc:
            consumer.stats.sqs_errors += 1
            metrics.error("ingest")
            if on_poll is not None:
                on_poll(False)
            sqs_failures += 1
            delay = backoff(sqs_failures)
            log.warning(
                "sqs receive failed; retrying",
                extra={
                    "queue_url": queue_url,
                    "error": _describe(exc),
                    "attempt": sqs_failures,
                    "delay_s": round(delay, 3),
                },
            )
            stop.wait(delay)
            continue
        if on_poll is not None:
            on_poll(True)
        if sqs_failures:
            log.info("sqs receive recovered", extra={"queue_url": queue_url})
            sqs_failures = 0

        messages = response.get("Messages") or []
        consumer.stats.received += len(messages)
        # The whole batch is handled even if stop is set meanwhile: these messages are
        # already invisible to other consumers, and each takes one submit per upload.
        outcomes = [consumer.handle(message) for message in messages]
        if all(outcomes):
            batch_failures = 0
            continue
        batch_failures += 1
        delay = backoff(batch_failures)
        log.warning(
            "batch had failures; backing off",
            extra={
                "failed_messages": outcomes.count(False),
                "attempt": batch_failures,
                "delay_s": round(delay, 3),
            },
        )
        stop.wait(delay)

    log.info("sqs ingest stopped", extra={"queue_url": queue_url, **asdict(consumer.stats)})
    return consumer.stats


@dataclass
class _Consumer:
    sqs: SQSClient
    queue_url: str
    submit: Submitter
    dead_letter: DeadLetters
    policy: BucketPolicy
    log: logging.Logger

    def __post_init__(self) -> None:
        self.stats = IngestStats()

    def handle(self, message: Mapping[str, Any]) -> bool:
        """Process one message; False when it was left on the queue after a failure."""
        body = str(message.get("Body", ""))
        # Bodies are never logged: an event can carry presigned URLs or user file names in
        # bulk. Message ids and sizes are enough to find one in the queue or dead letters.
        context: dict[str, Any] = {
            "message_id": message.get("MessageId"),
            "body_bytes": len(body.encode("utf-8")),
            "receive_count": (message.get("Attributes") or {}).get("ApproximateReceiveCount"),
        }
        try:
            notification = parse_s3_notification(body)
        except MalformedEvent as exc:
            return self._dead_letter(message, body, str(exc), context)

        if notification.is_test_event:
            self.stats.skipped_test_events += 1
            self.log.info("skipping s3:TestEvent", extra=context)
            self._delete(message, context)
            return True

        self.stats.ignored_records += len(notification.ignored_events)
        for record in notification.uploads:
            if not self.policy.allows(record):
                self.stats.refused_bucket += 1
                metrics.upload_refused("sqs", "bucket-not-allowed")
                self.log.warning(
                    "upload refused by bucket policy",
                    extra={**context, "bucket": record.bucket, "object_key": record.key},
                )
                continue
            try:
                self.submit(record)
            except Exception:
                # Uploads of this message submitted before this one will be submitted again
                # on redelivery; the submitter is idempotent on ref_key.
                self.stats.failed += 1
                metrics.error("ingest")
                self.log.exception(
                    "submit failed; message left for redelivery",
                    extra={**context, "ref_key": record.ref_key()},
                )
                return False
            self.stats.submitted += 1
            metrics.upload_received("sqs")
            self.log.debug("upload submitted", extra={**context, "ref_key": record.ref_key()})
        # After the uploads: if keeping one fails, the redelivered message submits its uploads
        # again, which the submitter absorbs.
        for invalid in notification.invalid_records:
            self.stats.invalid_records += 1
            metrics.upload_refused("sqs", "invalid-record")
            self.log.warning(
                "invalid record; dead-lettering",
                extra={**context, "index": invalid.index, "reason": invalid.reason},
            )
            try:
                self.dead_letter(invalid.record, invalid.reason)
            except Exception:
                self.stats.failed += 1
                metrics.error("ingest")
                self.log.exception("dead letter failed; message left on the queue", extra=context)
                return False
        self._delete(message, context)
        return True

    def _dead_letter(
        self, message: Mapping[str, Any], body: str, reason: str, context: dict[str, Any]
    ) -> bool:
        self.stats.malformed += 1
        metrics.upload_refused("sqs", "malformed-event")
        self.log.warning("malformed message; dead-lettering", extra={**context, "reason": reason})
        try:
            self.dead_letter(body, reason)
        except Exception:
            # Deleting now would lose the message; SQS will offer it again.
            self.stats.failed += 1
            metrics.error("ingest")
            self.log.exception("dead letter failed; message left on the queue", extra=context)
            return False
        self._delete(message, context)
        return True

    def _delete(self, message: Mapping[str, Any], context: dict[str, Any]) -> None:
        try:
            self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        except SQS_CALL_ERRORS as exc:
            # The work is done; the message will be redelivered and its uploads submitted
            # again, which the submitter absorbs.
            self.stats.sqs_errors += 1
            metrics.error("ingest")
            self.log.warning(
                "sqs delete failed; message will be redelivered",
                extra={**context, "error": _describe(exc)},
            )
            return
        self.stats.deleted += 1


def _describe(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'ClientError')}: {error.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"
