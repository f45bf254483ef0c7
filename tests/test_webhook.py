"""The upload webhook as a user runs it: `synthsentry webhook` in its own process (waitress),
real Postgres, Redis and S3 server, HTTP requests over loopback; and hostile requests:
records no retry can fix, JSON nested 100,000 deep, more records than the cap, half-sent
requests, a broker that is down, keys shaped like local paths."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import port_for
import pytest
import redis
import sqlalchemy as sa

from conftest import DatabaseFactory, s3_client
from fleet_processes import CLI, FleetProcess, wait_for

SECRET = "a-long-random-webhook-token-4f9c2e"
PROBLEM = "application/problem+json"


@dataclass(frozen=True)
class Webhook:
    port: int
    database: str
    process: FleetProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/s3-events"


StartWebhook = Callable[..., Webhook]


@pytest.fixture
def env(tmp_path: Path, committing_database: DatabaseFactory, redis_url: str) -> dict[str, str]:
    """The environment of this test's webhook processes: one fresh database between them."""
    redis.Redis.from_url(redis_url).flushdb()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    environment.update(
        SYNTHSENTRY_DATA_DIR=str(tmp_path / "data"),
        SYNTHSENTRY_DATABASE_URL=committing_database("webhook"),
        SYNTHSENTRY_BROKER_URL=redis_url,
        SYNTHSENTRY_ALLOWED_BUCKETS="uploads",
        SYNTHSENTRY_WEBHOOK_SECRET=SECRET,
    )
    return environment


@pytest.fixture
def start_webhook(tmp_path: Path, env: dict[str, str]) -> Iterator[StartWebhook]:
    """``start(name, SETTING=value ...)``: a webhook process with these settings, healthy."""
    started: list[FleetProcess] = []

    def start(name: str = "webhook", **settings: str) -> Webhook:
        port = port_for.select_random()
        process_env = {**env, **{f"SYNTHSENTRY_{k.upper()}": v for k, v in settings.items()}}
        process = FleetProcess(name, ["webhook", "--port", str(port)], process_env, tmp_path)
        started.append(process.start())
        wait_for(
            lambda: _get(f"http://127.0.0.1:{port}/healthz") == 200,
            timeout=60,
            what=f"the webhook {name}",
            processes=(process,),
            interval=0.1,
        )
        return Webhook(port, process_env["SYNTHSENTRY_DATABASE_URL"], process)

    try:
        yield start
    finally:
        for process in started:
            process.stop()


@pytest.fixture
def webhook(start_webhook: StartWebhook) -> Webhook:
    return start_webhook()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except (urllib.error.URLError, ConnectionError):
        return 0


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: dict[str, Any]
    headers: dict[str, str]


def _post(url: str, body: bytes, token: str = SECRET, *, scheme: str = "Bearer ") -> Reply:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Authorization": f"{scheme}{token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Reply(
                int(response.status),
                response.headers["Content-Type"],
                json.loads(response.read()),
                dict(response.headers),
            )
    except urllib.error.HTTPError as error:
        return Reply(
            error.code, error.headers["Content-Type"], json.loads(error.read()), dict(error.headers)
        )


def _record(bucket: str, key: str, etag: str) -> dict[str, Any]:
    # A record as MinIO's webhook target posts it; the key escaped with Go's QueryEscape.
    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "eventName": "s3:ObjectCreated:Put",
        "s3": {
            "bucket": {"name": bucket},
            "object": {"key": key, "size": 1234, "eTag": etag},
        },
    }


def _event(*records: dict[str, Any]) -> bytes:
    return json.dumps({"EventName": "s3:ObjectCreated:Put", "Records": list(records)}).encode()


def _minio_event(bucket: str, key: str, etag: str) -> bytes:
    return _event(_record(bucket, key, etag))


def _rows(database: str, query: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(database)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text(query)).all()]
    finally:
        engine.dispose()


def _queued(redis_url: str) -> int:
    return int(redis.Redis.from_url(redis_url).llen("intake"))


def _assert_problem(reply: Reply, status: int, kind: str) -> None:
    assert (reply.status, reply.content_type) == (status, PROBLEM)
    assert reply.body["type"] == f"urn:synthsentry:problem:{kind}"
    assert reply.body["status"] == status
    assert reply.body["title"] and reply.body["detail"]


def test_webhook_records_queues_and_refuses(webhook: Webhook, redis_url: str) -> None:
    event = _minio_event("uploads", "user+42/photo.jpg", "0123abcd")

    _assert_problem(_post(webhook.url, event, token="wrong"), 401, "unauthorised")
    _assert_problem(_post(webhook.url, event, scheme=""), 401, "unauthorised")  # bare secret
    reply = _post(webhook.url, event)
    assert (reply.status, reply.content_type) == (200, "application/json")
    assert reply.body == {
        "accepted": 1,
        "duplicates": 0,
        "ignored": 0,
        "refused": 0,
        "refusals": [],
        "test_event": False,
    }
    reply = _post(webhook.url, _minio_event("elsewhere", "x.jpg", "99"))
    assert (reply.status, reply.body["accepted"]) == (200, 0)
    assert [(r["index"], r["status"]) for r in reply.body["refusals"]] == [(0, 403)]
    _assert_problem(_post(webhook.url, b"{not json"), 400, "malformed-event")

    sources = _rows(webhook.database, "SELECT bucket, object_key FROM sources")
    assert sources == [("uploads", "user 42/photo.jpg")]  # the key is URL-decoded
    letters = _rows(webhook.database, "SELECT channel FROM dead_letters")
    assert letters == [("webhook",)]
    # The intake task is on the broker, as JSON.
    queued = redis.Redis.from_url(redis_url).lrange("intake", 0, -1)
    assert len(queued) == 1
    message = json.loads(queued[0])
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == "synthsentry.intake"


def test_each_record_has_its_own_outcome_and_a_retry_queues_nothing_twice(
    webhook: Webhook, redis_url: str
) -> None:
    no_object = _record("uploads", "x.jpg", "1")
    del no_object["s3"]["object"]
    records = [
        _record("uploads", "first+good.jpg", "e1"),
        _record("uploads", "bad%ED%A0%80key.jpg", "e2"),  # not UTF-8 once decoded
        _record("uploads", "k" * 1025, "e3"),
        _record("Not_A_Bucket", "x.jpg", "e4"),
        no_object,
        _record("uploads", "second+good.jpg", "e5"),
    ]
    event = _event(*records)

    reply = _post(webhook.url, event)
    assert reply.status == 200
    assert (reply.body["accepted"], reply.body["duplicates"], reply.body["refused"]) == (2, 0, 4)
    refusals = reply.body["refusals"]
    assert [(r["index"], r["status"]) for r in refusals] == [(1, 400), (2, 400), (3, 400), (4, 400)]
    assert "not UTF-8 once URL-decoded" in refusals[0]["reason"]
    assert "1025 bytes" in refusals[1]["reason"]
    assert "not a bucket name" in refusals[2]["reason"]
    assert "Records[4].s3.object is missing" in refusals[3]["reason"]
    assert _queued(redis_url) == 2

    # The sender sends the event again (a retry, a second delivery): nothing is queued twice.
    again = _post(webhook.url, event)
    assert (again.status, again.body["accepted"], again.body["duplicates"]) == (200, 0, 2)
    assert again.body["refusals"] == refusals
    assert _queued(redis_url) == 2

    sources = _rows(webhook.database, "SELECT object_key, seen_count FROM sources ORDER BY id")
    assert sources == [("first good.jpg", 2), ("second good.jpg", 2)]
    # Each bad record is a dead letter of its own, with its reason, each time it is sent.
    letters = _rows(webhook.database, "SELECT reason, body FROM dead_letters ORDER BY id")
    assert [reason for reason, _ in letters] == [r["reason"] for r in refusals] * 2
    assert [json.loads(body) for _, body in letters[:4]] == records[1:5]


def test_a_key_with_a_surrogate_escape_is_refused_not_retried(
    webhook: Webhook, redis_url: str
) -> None:
    for key in (
        "bad%ED%A0%80key.jpg",
        "bad\ud800key.jpg",
    ):  # URL-escaped, and a JSON \\ud800 escape
        reply = _post(webhook.url, _minio_event("uploads", key, "e1"))
        _assert_problem(reply, 400, "invalid-records")
        assert [(r["index"], r["status"]) for r in reply.body["refusals"]] == [(0, 400)]

    assert _queued(redis_url) == 0
    assert _rows(webhook.database, "SELECT count(*) FROM sources") == [(0,)]
    assert _rows(webhook.database, "SELECT count(*) FROM dead_letters") == [(2,)]
    assert _get(f"http://127.0.0.1:{webhook.port}/healthz") == 200
    # Nothing failed on the way: no traceback in the process's (JSON) log.
    assert "Traceback" not in webhook.process.log_path.read_text(errors="replace")


def test_deep_json_is_refused_and_kept(webhook: Webhook) -> None:
    for body in ("[" * 100_000 + "]" * 100_000, '{"a": ' * 100_000):
        _assert_problem(_post(webhook.url, body.encode()), 400, "malformed-event")
    reasons = _rows(webhook.database, "SELECT reason FROM dead_letters")
    assert reasons == [("payload nests JSON deeper than 32 levels",)] * 2
    assert "Traceback" not in webhook.process.log_path.read_text(errors="replace")


def test_more_records_than_the_cap_queue_nothing(
    start_webhook: StartWebhook, redis_url: str
) -> None:
    webhook = start_webhook(webhook_max_records="5")
    six = _event(*(_record("uploads", f"{i}.jpg", f"e{i}") for i in range(6)))

    reply = _post(webhook.url, six)
    _assert_problem(reply, 413, "too-many-records")
    assert _queued(redis_url) == 0
    assert _rows(webhook.database, "SELECT count(*) FROM sources") == [(0,)]
    assert _rows(webhook.database, "SELECT reason FROM dead_letters") == [
        ("the payload has 6 records; at most 5 are taken at once",)
    ]
    five = _event(*(_record("uploads", f"{i}.jpg", f"e{i}") for i in range(5)))
    assert _post(webhook.url, five).body["accepted"] == 5
    assert _queued(redis_url) == 5


def test_a_body_over_the_size_limit_is_refused_unread(webhook: Webhook) -> None:
    with socket.create_connection(("127.0.0.1", webhook.port), timeout=10) as connection:
        connection.sendall(
            b"POST /s3-events HTTP/1.1\r\nHost: localhost\r\n"
            + f"Authorization: Bearer {SECRET}\r\nContent-Length: {2 << 20}\r\n\r\n".encode()
        )
        assert connection.recv(64).startswith(b"HTTP/1.1 413 ")


def _half_sent_request(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(
        b"POST /s3-events HTTP/1.1\r\nHost: localhost\r\n"
        + f"Authorization: Bearer {SECRET}\r\nContent-Length: 1000\r\n\r\n".encode()
        + b'{"Records": ['
    )
    return connection


def _still_open(connection: socket.socket) -> bool:
    connection.setblocking(False)
    try:
        return connection.recv(1) != b""
    except BlockingIOError:
        return True
    finally:
        connection.setblocking(True)


def test_half_sent_requests_hold_no_thread_and_are_closed_when_idle(
    start_webhook: StartWebhook, redis_url: str
) -> None:
    timeout_s = 5
    webhook = start_webhook(webhook_timeout_seconds=str(timeout_s), webhook_threads="2")
    held = [_half_sent_request(webhook.port) for _ in range(50)]
    last_byte_at = time.monotonic()
    try:
        # 50 half-sent requests and 2 threads: a whole request is still answered, at once.
        reply = _post(webhook.url, _minio_event("uploads", "during.jpg", "e1"))
        assert (reply.status, reply.body["accepted"]) == (200, 1)
        assert all(_still_open(connection) for connection in held)
        assert _queued(redis_url) == 1

        # Each idle one is closed once the timeout has passed (checked every second here).
        deadline = last_byte_at + timeout_s + 15
        for connection in held:
            connection.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                assert connection.recv(1) == b""
            except ConnectionResetError:
                pass
            except TimeoutError:
                pytest.fail("a half-sent request was still open 15 s after the timeout")
        assert time.monotonic() - last_byte_at >= timeout_s - 0.5
    finally:
        for connection in held:
            connection.close()
    assert _get(f"http://127.0.0.1:{webhook.port}/healthz") == 200


def test_a_broker_outage_answers_503_and_the_retry_queues_nothing_twice(
    start_webhook: StartWebhook, env: dict[str, str], redis_url: str
) -> None:
    event = _minio_event("uploads", "during+outage.jpg", "e1")
    down = start_webhook(
        "webhook-down", broker_url=f"redis://127.0.0.1:{port_for.select_random()}/0"
    )
    reply = _post(down.url, event)
    _assert_problem(reply, 503, "unavailable")
    assert reply.headers["Retry-After"]
    # The upload was recorded before its intake could not be sent.
    status = "SELECT object_key, status FROM sources"
    assert _rows(down.database, status) == [("during outage.jpg", "pending")]
    down.process.stop()

    webhook = start_webhook()
    again = _post(webhook.url, event)
    assert (again.status, again.body["accepted"], again.body["duplicates"]) == (200, 0, 1)
    assert _queued(redis_url) == 0  # a retry queues nothing ...
    # ... and the reconciler sends the intake of the upload left pending.
    subprocess.run(
        [*CLI, "reconcile", "--once", "--after", "0.001"], env=env, check=True, timeout=60
    )
    assert _queued(redis_url) == 1
    assert _rows(webhook.database, status) == [("during outage.jpg", "pending")]


def test_a_key_shaped_like_a_path_is_an_s3_key(
    start_webhook: StartWebhook, s3_endpoint: str, tmp_path: Path
) -> None:
    from db import repository
    from db.session import make_engine, make_sessionmaker
    from workers.fleet import fetch_object
    from workers.intake import IntakeLimits

    bucket = f"uploads-{uuid.uuid4().hex[:10]}"
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="../../etc/passwd", Body=b"an object named like a path")
    webhook = start_webhook(allowed_buckets=bucket, s3_endpoint_url=s3_endpoint)

    reply = _post(webhook.url, _minio_event(bucket, "..%2F..%2Fetc%2Fpasswd", "e1"))
    assert (reply.status, reply.body["accepted"]) == (200, 1)
    [(source_id, key)] = _rows(webhook.database, "SELECT id, object_key FROM sources")
    assert key == "../../etc/passwd"  # verbatim: a name in a bucket, never normalised

    # What intake fetches for it: that object, from the S3 API.
    engine = make_engine(webhook.database)
    try:
        with make_sessionmaker(engine)() as session:
            stored = repository.stored_object(session, source_id)
    finally:
        engine.dispose()
    assert stored is not None and stored.key == "../../etc/passwd"
    limits = IntakeLimits(max_bytes=1 << 20, max_pixels=1 << 20, decode_timeout_s=10)
    assert fetch_object(s3, stored, limits) == b"an object named like a path"
    assert not [path for path in tmp_path.rglob("*") if path.name == "passwd"]
