"""The SQS ingest loop against a real S3 + SQS server (moto over HTTP), with real bucket
notifications: S3 puts the events on the queue, the loop long-polls them, submits uploads
and deletes messages. Nothing of boto3 is mocked; the submitter and dead-letter callbacks
are plain functions that record what they were given.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from workers.events import BucketPolicy, UploadRecord
from workers.ingest import IngestStats, run_sqs_ingest

from conftest import s3_client
from metric_names import counted

DEADLINE_S = 10.0
# No botocore retries: the loop under test does its own, and a stopped server should fail
# fast instead of after botocore's five attempts.
CLIENT_CONFIG = Config(
    retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=2, read_timeout=10
)


def sqs_client(endpoint: str) -> Any:
    return boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=CLIENT_CONFIG,
    )


def unique(prefix: str) -> str:
    """A bucket or queue name no other test on the session-wide server uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(
    condition: Callable[[], bool], what: str, loop: Future[IngestStats], timeout: float = DEADLINE_S
) -> None:
    """Poll ``condition`` until it holds; fail at the deadline or as soon as the loop exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if loop.done():
            pytest.fail(f"the ingest loop exited ({loop.result()!r}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def queue_depth(sqs: Any, queue_url: str) -> tuple[int, int]:
    """(visible, in flight) messages on the queue."""
    attributes = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


def assert_queue_empty(sqs: Any, queue_url: str) -> None:
    assert queue_depth(sqs, queue_url) == (0, 0)
    assert "Messages" not in sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1)


def create_queue(sqs: Any, name: str, **attributes: str) -> tuple[str, str]:
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return url, arn


def notify_queue(s3: Any, bucket: str, queue_arn: str, events: list[str]) -> None:
    """A real bucket notification; S3 answers it with an s3:TestEvent on the queue."""
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"Id": "synthsentry-ingest", "QueueArn": queue_arn, "Events": events}
            ]
        },
    )


def s3_record(
    bucket: str, encoded_key: str, etag: str = "9dd4e461268c8034f5c8564e155c67a6"
) -> dict[str, Any]:
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventTime": "2024-05-01T12:00:00.000Z",
        "eventName": "ObjectCreated:Put",
        "s3": {
            "bucket": {"name": bucket},
            "object": {"key": encoded_key, "size": 1, "eTag": etag},
        },
    }


def s3_event_body(
    bucket: str, encoded_key: str, etag: str = "9dd4e461268c8034f5c8564e155c67a6"
) -> str:
    return json.dumps({"Records": [s3_record(bucket, encoded_key, etag)]})


class Recorder:
    """Submitter, dead-letter and backoff callbacks that remember their calls.

    ``fail_once`` names keys whose first submit raises, as a database outage would.
    """

    def __init__(self, fail_once: tuple[str, ...] = ()) -> None:
        self.submitted: list[UploadRecord] = []
        self.attempts: list[UploadRecord] = []
        self.dead: list[tuple[str, str]] = []
        self.backoffs: list[int] = []
        self._fail_once = set(fail_once)

    def submit(self, record: UploadRecord) -> None:
        self.attempts.append(record)
        if record.key in self._fail_once:
            self._fail_once.remove(record.key)
            raise RuntimeError("database unavailable")
        self.submitted.append(record)

    def dead_letter(self, body: str, reason: str) -> None:
        self.dead.append((body, reason))

    def backoff(self, attempt: int) -> float:
        self.backoffs.append(attempt)
        return 0.05


@contextmanager
def ingesting(
    sqs: Any,
    queue_url: str,
    recorder: Recorder,
    policy: str,
    *,
    backoff: Callable[[int], float] | None = None,
    **options: Any,
) -> Iterator[tuple[threading.Event, Future[IngestStats]]]:
    """Run the loop in a thread; on exit, stop it and require it to finish promptly."""
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(
            run_sqs_ingest,
            sqs,
            queue_url,
            submit=recorder.submit,
            dead_letter=recorder.dead_letter,
            policy=BucketPolicy.parse(policy),
            stop=stop,
            wait_seconds=1,
            backoff=backoff or recorder.backoff,
            **options,
        )
        try:
            yield stop, future
        finally:
            stop.set()
            # One long poll (1 s) plus the batch in hand, with room for a loaded machine.
            future.result(timeout=30)


@pytest.fixture
def sqs(s3_endpoint: str) -> Any:
    return sqs_client(s3_endpoint)


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    return s3_client(s3_endpoint)


def test_bucket_notifications_are_submitted_once_and_deleted(sqs: Any, s3: Any) -> None:
    bucket = unique("uploads")
    s3.create_bucket(Bucket=bucket)
    queue_url, queue_arn = create_queue(sqs, unique("ingest"))
    notify_queue(s3, bucket, queue_arn, ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"])
    keys = ["plain.jpg", "incoming/red flower.jpg", "c++ notes+1.png", "café (1).jpg"]
    for index, key in enumerate(keys):
        s3.put_object(Bucket=bucket, Key=key, Body=f"image {index}".encode())
    s3.copy_object(Bucket=bucket, Key="copies/plain.jpg", CopySource=f"{bucket}/plain.jpg")
    s3.put_object(Bucket=bucket, Key="removed.jpg", Body=b"short-lived")
    s3.delete_object(Bucket=bucket, Key="removed.jpg")
    # test event + 4 puts + copy + put + delete
    assert queue_depth(sqs, queue_url) == (8, 0)

    recorder = Recorder()
    with ingesting(sqs, queue_url, recorder, bucket) as (_, future):
        wait_until(lambda: queue_depth(sqs, queue_url) == (0, 0), "the queue to drain", future)
    stats = future.result()

    submitted = sorted(recorder.submitted, key=lambda r: r.key)
    assert [r.key for r in submitted] == sorted([*keys, "copies/plain.jpg", "removed.jpg"])
    assert {r.bucket for r in submitted} == {bucket}
    assert len({r.ref_key() for r in submitted}) == len(submitted)
    by_key = {r.key: r for r in submitted}
    assert by_key["copies/plain.jpg"].event_name == "ObjectCreated:Copy"
    assert by_key["c++ notes+1.png"].event_name == "ObjectCreated:Put"
    assert by_key["café (1).jpg"].size == len(b"image 3")
    assert recorder.dead == []
    assert stats == IngestStats(
        received=8,
        submitted=6,
        skipped_test_events=1,
        ignored_records=1,
        deleted=8,
    )
    assert_queue_empty(sqs, queue_url)


def test_uploads_outside_the_policy_are_refused(sqs: Any, s3: Any) -> None:
    allowed, other = unique("media"), unique("elsewhere")
    queue_url, queue_arn = create_queue(sqs, unique("ingest"))
    for bucket in (allowed, other):
        s3.create_bucket(Bucket=bucket)
        notify_queue(s3, bucket, queue_arn, ["s3:ObjectCreated:*"])
    s3.put_object(Bucket=allowed, Key="incoming/a.jpg", Body=b"a")
    s3.put_object(Bucket=allowed, Key="private/b.jpg", Body=b"b")
    s3.put_object(Bucket=other, Key="incoming/c.jpg", Body=b"c")

    recorder = Recorder()

    def moved() -> tuple[float, float]:
        return (
            counted("synthsentry_uploads_received_total", source="sqs"),
            counted("synthsentry_uploads_refused_total", source="sqs", reason="bucket-not-allowed"),
        )

    before = moved()
    polls: list[bool] = []
    policy = f"{allowed}:incoming/"
    with ingesting(sqs, queue_url, recorder, policy, on_poll=polls.append) as (_, future):
        wait_until(lambda: queue_depth(sqs, queue_url) == (0, 0), "the queue to drain", future)
    stats = future.result()

    assert [(r.bucket, r.key) for r in recorder.submitted] == [(allowed, "incoming/a.jpg")]
    assert stats.refused_bucket == 2
    # The metrics say the same, and every poll reached the queue (the readiness probe).
    after = moved()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 2)
    assert polls and all(polls)
    assert stats.skipped_test_events == 2
    assert stats.deleted == stats.received == 5
    assert_queue_empty(sqs, queue_url)


PRESIGNED = "https://uploads.s3.amazonaws.com/a.jpg?X-Amz-Expires=300&X-Amz-Signature=feedface"


def test_malformed_messages_are_dead_lettered_and_deleted(
    sqs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="workers.ingest")
    queue_url, _ = create_queue(sqs, unique("ingest"))
    bodies = [
        f"this is not json {PRESIGNED}",
        # 100,000 levels: refused before the JSON decoder recurses into it.
        "[" * 100_000 + "]" * 100_000,
        json.dumps({PRESIGNED: "a field name the parser quotes in its reason"}),
    ]
    for body in bodies:
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)
    # The loop carries on after them.
    sqs.send_message(QueueUrl=queue_url, MessageBody=s3_event_body("uploads", "after+bad.jpg"))

    recorder = Recorder()
    with ingesting(sqs, queue_url, recorder, "uploads") as (_, future):
        wait_until(lambda: queue_depth(sqs, queue_url) == (0, 0), "the queue to drain", future)
    stats = future.result()

    assert sorted(body for body, _ in recorder.dead) == sorted(bodies)
    reasons = dict(recorder.dead)
    assert "not JSON" in reasons[bodies[0]]
    assert "deeper than 32 levels" in reasons[bodies[1]]
    assert "not an S3 event notification" in reasons[bodies[2]]
    assert [r.key for r in recorder.submitted] == ["after bad.jpg"]
    assert stats.malformed == 3
    assert stats.deleted == 4
    assert_queue_empty(sqs, queue_url)
    # The dead letters keep the bodies; the logs name messages without quoting them.
    logged = [json.dumps(vars(record), default=str) for record in caplog.records]
    assert sum("dead-lettering" in line for line in logged) == 3
    assert not [line for line in logged if "X-Amz-Signature" in line]


def test_bad_records_are_dead_lettered_one_by_one_and_the_good_ones_submitted(
    sqs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="workers.ingest")
    queue_url, _ = create_queue(sqs, unique("ingest"))
    no_bucket_name = s3_record("uploads", "x.jpg")
    del no_bucket_name["s3"]["bucket"]["name"]
    records = [
        s3_record("uploads", "first+good.jpg", etag="e1"),
        # %ED%A0%80 is a UTF-16 surrogate encoded as if it were UTF-8: no key is that.
        s3_record("uploads", "bad%ED%A0%80key.jpg"),
        no_bucket_name,
        s3_record("uploads", "k" * 1025),
        s3_record("Not_A_Bucket", "x.jpg"),
        s3_record("uploads", "second+good.jpg", etag="e2"),
    ]
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"Records": records}))

    recorder = Recorder()
    with ingesting(sqs, queue_url, recorder, "uploads") as (_, future):
        wait_until(lambda: queue_depth(sqs, queue_url) == (0, 0), "the queue to drain", future)
    stats = future.result()

    assert [r.key for r in recorder.submitted] == ["first good.jpg", "second good.jpg"]
    # Each bad record is kept on its own, as the JSON it came as, with its own reason.
    assert [json.loads(body) for body, _ in recorder.dead] == records[1:5]
    reasons = [reason for _, reason in recorder.dead]
    assert "Records[1].s3.object.key is not UTF-8 once URL-decoded" in reasons[0]
    assert "Records[2].s3.bucket.name is missing" in reasons[1]
    assert "Records[3].s3.object.key is 1025 bytes" in reasons[2]
    assert "Records[4].s3.bucket.name is not a bucket name" in reasons[3]
    assert stats == IngestStats(received=1, submitted=2, invalid_records=4, deleted=1)
    assert_queue_empty(sqs, queue_url)
    # The logs are JSON-safe whatever the keys held.
    for record in caplog.records:
        json.dumps(vars(record), default=str, ensure_ascii=False).encode("utf-8")


def test_failed_submit_leaves_the_message_for_redelivery(sqs: Any, s3: Any) -> None:
    bucket = unique("uploads")
    s3.create_bucket(Bucket=bucket)
    # Redelivery comes after the visibility timeout: 3 s keeps the test short, and is time
    # enough to submit and delete the redelivered message before it would show again.
    queue_url, queue_arn = create_queue(sqs, unique("ingest"), VisibilityTimeout="3")
    notify_queue(s3, bucket, queue_arn, ["s3:ObjectCreated:*"])
    s3.put_object(Bucket=bucket, Key="retry me.jpg", Body=b"x")

    recorder = Recorder(fail_once=("retry me.jpg",))
    with ingesting(sqs, queue_url, recorder, bucket) as (_, future):
        wait_until(lambda: len(recorder.submitted) == 1, "the redelivered upload", future)
        wait_until(lambda: queue_depth(sqs, queue_url) == (0, 0), "the queue to drain", future)
    stats = future.result()

    first, second = recorder.attempts
    assert first == second
    assert first.key == "retry me.jpg"
    assert recorder.backoffs == [1]  # one backoff after the failed batch
    assert stats.failed == 1
    assert stats.submitted == 1
    assert stats.received == 3  # test event, the upload, the upload again
    assert stats.deleted == 2
    assert_queue_empty(sqs, queue_url)


def test_partly_submitted_message_is_submitted_again_whole(sqs: Any) -> None:
    # Two uploads in one message, the second fails once: the first is submitted twice. The
    # submitter's idempotence on ref_key is what makes that harmless.
    queue_url, _ = create_queue(sqs, unique("ingest"))  # default visibility timeout: 30 s
    first = json.loads(s3_event_body("uploads", "one.jpg", etag="e1"))["Records"]
    second = json.loads(s3_event_body("uploads", "two.jpg", etag="e2"))["Records"]
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps({"Records": first + second}))

    recorder = Recorder(fail_once=("two.jpg",))
    # The loop's own visibility timeout overrides the queue's: redelivery after 3 s.
    with ingesting(sqs, queue_url, recorder, "uploads", visibility_timeout=3) as (_, future):
        wait_until(lambda: queue_depth(sqs, queue_url) == (0, 0), "the queue to drain", future)
    stats = future.result()

    assert [r.key for r in recorder.attempts] == ["one.jpg", "two.jpg", "one.jpg", "two.jpg"]
    assert [r.ref_key() for r in recorder.submitted] == [
        "uploads/one.jpg@etag:e1",
        "uploads/one.jpg@etag:e1",
        "uploads/two.jpg@etag:e2",
    ]
    assert stats.failed == 1
    assert stats.deleted == 1


def test_sqs_errors_are_retried_until_the_queue_is_back(sqs: Any) -> None:
    name = unique("ingest")
    queue_url, _ = create_queue(sqs, name)
    sqs.delete_queue(QueueUrl=queue_url)

    recorder = Recorder()
    with ingesting(sqs, queue_url, recorder, "uploads") as (_, future):
        wait_until(lambda: len(recorder.backoffs) >= 3, "three failed receives", future)
        assert not future.done()
        assert recorder.backoffs[:3] == [1, 2, 3]  # consecutive failures count up

        assert create_queue(sqs, name)[0] == queue_url
        sqs.send_message(QueueUrl=queue_url, MessageBody=s3_event_body("uploads", "back.jpg"))
        wait_until(lambda: len(recorder.submitted) == 1, "the upload after recovery", future)
    stats = future.result()

    assert stats.sqs_errors >= 3
    assert stats.submitted == stats.deleted == 1


@pytest.fixture
def restartable_server() -> Iterator[Callable[[], tuple[str, Callable[[], None]]]]:
    """Start moto servers on one port, one after another: a broker restart.

    moto keeps its state in the process, so a queue outlives the server that served it,
    like a durable broker's queues.
    """
    running: list[ThreadedMotoServer] = []
    port = 0

    def start() -> tuple[str, Callable[[], None]]:
        nonlocal port
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        running.append(server)
        host, port = server.get_host_and_port()

        def stop() -> None:
            running.remove(server)
            server.stop()

        return f"http://{host}:{port}", stop

    yield start
    for server in running:
        server.stop()


def test_loop_survives_a_server_restart(
    restartable_server: Callable[[], tuple[str, Callable[[], None]]],
) -> None:
    endpoint, stop_server = restartable_server()
    sqs = sqs_client(endpoint)
    queue_url, _ = create_queue(sqs, unique("ingest"))

    recorder = Recorder()
    with ingesting(sqs, queue_url, recorder, "uploads") as (_, future):
        stop_server()
        wait_until(
            lambda: len(recorder.backoffs) >= 2, "failed receives while the server is down", future
        )
        assert not future.done()

        assert restartable_server()[0] == endpoint
        sqs.send_message(QueueUrl=queue_url, MessageBody=s3_event_body("uploads", "up+again.jpg"))
        wait_until(lambda: len(recorder.submitted) == 1, "the upload after the restart", future)
    stats = future.result()

    assert [r.key for r in recorder.submitted] == ["up again.jpg"]
    assert stats.sqs_errors >= 2


def test_stop_interrupts_a_backoff(sqs: Any) -> None:
    missing_queue = sqs.create_queue(QueueName=unique("ingest"))["QueueUrl"]
    sqs.delete_queue(QueueUrl=missing_queue)
    attempts: list[int] = []

    def long_backoff(attempt: int) -> float:
        attempts.append(attempt)
        return 60.0

    recorder = Recorder()
    with ingesting(sqs, missing_queue, recorder, "uploads", backoff=long_backoff) as (stop, future):
        wait_until(lambda: attempts == [1], "the first failed receive", future)
        started = time.monotonic()
        stop.set()
        stats = future.result(timeout=30)
        assert time.monotonic() - started < 20  # not the 60 s backoff
    assert stats.sqs_errors == 1


@pytest.mark.parametrize(
    "options",
    [{"wait_seconds": 0}, {"wait_seconds": 21}, {"max_messages": 11}, {"visibility_timeout": -1}],
)
def test_rejects_out_of_range_options(sqs: Any, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        run_sqs_ingest(
            sqs,
            "http://unused/123456789012/q",
            submit=Recorder().submit,
            dead_letter=Recorder().dead_letter,
            policy=BucketPolicy.parse("uploads"),
            stop=threading.Event(),
            **options,
        )
