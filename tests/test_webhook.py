"""The S3 event endpoint (``POST /s3-events`` of the API) on real Postgres and Redis: per-record
outcomes, retries that queue nothing twice, hostile events (records no retry can fix, JSON
nested 100,000 deep, more records than the cap, keys shaped like local paths), a database or
broker that is down, the embedded mode; the body limit every route has (``api.limits``); and
the API served for real: uvicorn over loopback, and ``synthsentry serve`` as its own process."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import port_for
import pytest
import redis
import sqlalchemy as sa
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api import limits, webhook
from api.app import create_app
from api.context import ApiContext
from db.models import TokenRole
from db.session import make_engine, make_sessionmaker, transaction
from workers import tokens

from apitest import BUCKET, build_test_api
from conftest import DatabaseFactory, s3_client
from fleet_processes import CLI, FleetProcess, wait_for

SECRET = "a-long-random-webhook-token-4f9c2e"
PROBLEM = "application/problem+json"
AUTH = {"Authorization": f"Bearer {SECRET}"}
MIB = 1024 * 1024


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def webhook_database(committing_database: DatabaseFactory) -> str:
    return committing_database("webhook")


@pytest.fixture
def sessions(webhook_database: str, redis_url: str) -> Iterator[sessionmaker[Session]]:
    """This test's view of the module's database and broker, both emptied first."""
    redis.Redis.from_url(redis_url).flushdb()
    engine = make_engine(webhook_database)
    with engine.begin() as connection:
        connection.execute(
            sa.text("TRUNCATE sources, dead_letters, api_tokens RESTART IDENTITY CASCADE")
        )
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def context(sessions: sessionmaker[Session], tmp_path: Path, redis_url: str) -> ApiContext:
    """The fleet mode: uploads recorded in Postgres, their intake sent to Redis."""
    built = build_test_api(
        sessions,
        tmp_path,
        api_mode="fleet",
        broker_url=redis_url,
        allowed_buckets="uploads",
        webhook_secret=SECRET,
    )
    assert built.worker is None
    return built.context


@pytest.fixture
def client(context: ApiContext) -> TestClient:
    return TestClient(create_app(context))


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


Body = bytes | Iterator[bytes]


def _post(client: TestClient, body: Body, headers: dict[str, str] | None = None) -> Any:
    return client.post(
        webhook.PATH,
        content=body,
        headers={"Content-Type": "application/json", **(AUTH if headers is None else headers)},
    )


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 140, 90)).save(out, "PNG")
    return out.getvalue()


def _rows(sessions: sessionmaker[Session], query: str) -> list[tuple[Any, ...]]:
    with sessions() as session:
        return [tuple(row) for row in session.execute(sa.text(query)).all()]


def _queued(redis_url: str) -> int:
    return int(redis.Redis.from_url(redis_url).llen("intake"))


def _assert_problem(reply: Any, status: int, kind: str) -> None:
    assert (reply.status_code, reply.headers["content-type"]) == (status, PROBLEM), reply.text
    document = reply.json()
    assert document["type"] == f"urn:synthsentry:problem:{kind}"
    assert document["status"] == status
    assert document["title"] and document["detail"]


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


# --- per-record outcomes --------------------------------------------------------------------


def test_events_are_recorded_queued_and_refused(
    client: TestClient, sessions: sessionmaker[Session], redis_url: str
) -> None:
    event = _minio_event("uploads", "user+42/photo.jpg", "0123abcd")

    _assert_problem(_post(client, event, {"Authorization": "Bearer wrong"}), 401, "unauthorised")
    _assert_problem(_post(client, event, {"Authorization": SECRET}), 401, "unauthorised")  # bare
    _assert_problem(_post(client, event, {}), 401, "unauthorised")
    assert _post(client, event, {}).headers["www-authenticate"] == "Bearer"
    reply = _post(client, event)
    assert (reply.status_code, reply.headers["content-type"]) == (200, "application/json")
    assert reply.json() == {
        "accepted": 1,
        "duplicates": 0,
        "ignored": 0,
        "refused": 0,
        "refusals": [],
        "test_event": False,
    }
    reply = _post(client, _minio_event("elsewhere", "x.jpg", "99"))
    assert (reply.status_code, reply.json()["accepted"]) == (200, 0)
    assert [(r["index"], r["status"]) for r in reply.json()["refusals"]] == [(0, 403)]
    _assert_problem(_post(client, b"{not json"), 400, "malformed-event")
    _assert_problem(_post(client, b""), 400, "bad-body")
    test_event = _post(client, json.dumps({"Event": "s3:TestEvent", "Bucket": "uploads"}).encode())
    assert (test_event.status_code, test_event.json()["test_event"]) == (200, True)

    sources = _rows(sessions, "SELECT bucket, object_key, submitted_by FROM sources")
    assert sources == [("uploads", "user 42/photo.jpg", "fleet")]  # the key is URL-decoded
    assert _rows(sessions, "SELECT channel FROM dead_letters") == [("webhook",)]
    # The intake task is on the broker, as JSON.
    queued = redis.Redis.from_url(redis_url).lrange("intake", 0, -1)
    assert len(queued) == 1
    message = json.loads(queued[0])
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == "synthsentry.intake"


def test_each_record_has_its_own_outcome_and_a_retry_queues_nothing_twice(
    client: TestClient, sessions: sessionmaker[Session], redis_url: str
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

    reply = _post(client, event)
    assert reply.status_code == 200
    body = reply.json()
    assert (body["accepted"], body["duplicates"], body["refused"]) == (2, 0, 4)
    refusals = body["refusals"]
    assert [(r["index"], r["status"]) for r in refusals] == [(1, 400), (2, 400), (3, 400), (4, 400)]
    assert "not UTF-8 once URL-decoded" in refusals[0]["reason"]
    assert "1025 bytes" in refusals[1]["reason"]
    assert "not a bucket name" in refusals[2]["reason"]
    assert "Records[4].s3.object is missing" in refusals[3]["reason"]
    assert _queued(redis_url) == 2

    # The sender sends the event again (a retry, a second delivery): nothing is queued twice.
    again = _post(client, event).json()
    assert (again["accepted"], again["duplicates"]) == (0, 2)
    assert again["refusals"] == refusals
    assert _queued(redis_url) == 2

    sources = _rows(sessions, "SELECT object_key, seen_count FROM sources ORDER BY id")
    assert sources == [("first good.jpg", 2), ("second good.jpg", 2)]
    # Each bad record is a dead letter of its own, with its reason, each time it is sent.
    letters = _rows(sessions, "SELECT reason, body FROM dead_letters ORDER BY id")
    assert [reason for reason, _ in letters] == [r["reason"] for r in refusals] * 2
    assert [json.loads(body) for _, body in letters[:4]] == records[1:5]


def test_a_key_with_a_surrogate_escape_is_refused_not_retried(
    client: TestClient,
    sessions: sessionmaker[Session],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for key in ("bad%ED%A0%80key.jpg", "bad\ud800key.jpg"):  # URL-escaped, and a JSON \ud800
        reply = _post(client, _minio_event("uploads", key, "e1"))
        _assert_problem(reply, 400, "invalid-records")
        assert [(r["index"], r["status"]) for r in reply.json()["refusals"]] == [(0, 400)]

    assert _queued(redis_url) == 0
    assert _rows(sessions, "SELECT count(*) FROM sources") == [(0,)]
    assert _rows(sessions, "SELECT count(*) FROM dead_letters") == [(2,)]
    _no_tracebacks(caplog)


def test_deep_json_is_refused_and_kept(
    client: TestClient, sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    for body in ("[" * 100_000 + "]" * 100_000, '{"a": ' * 100_000):
        _assert_problem(_post(client, body.encode()), 400, "malformed-event")
    reasons = _rows(sessions, "SELECT reason FROM dead_letters")
    assert reasons == [("payload nests JSON deeper than 32 levels",)] * 2
    _no_tracebacks(caplog)


def test_more_records_than_the_cap_queue_nothing(
    context: ApiContext, sessions: sessionmaker[Session], redis_url: str
) -> None:
    client = TestClient(create_app(dataclasses.replace(context, webhook_max_records=5)))
    six = _event(*(_record("uploads", f"{i}.jpg", f"e{i}") for i in range(6)))

    _assert_problem(_post(client, six), 413, "too-many-records")
    assert _queued(redis_url) == 0
    assert _rows(sessions, "SELECT count(*) FROM sources") == [(0,)]
    assert _rows(sessions, "SELECT reason FROM dead_letters") == [
        ("the payload has 6 records; at most 5 are taken at once",)
    ]
    five = _event(*(_record("uploads", f"{i}.jpg", f"e{i}") for i in range(5)))
    assert _post(client, five).json()["accepted"] == 5
    assert _queued(redis_url) == 5


def test_without_a_configured_secret_every_call_is_refused(
    context: ApiContext, sessions: sessionmaker[Session]
) -> None:
    client = TestClient(create_app(dataclasses.replace(context, webhook_secret="")))
    event = _minio_event("uploads", "a.jpg", "e1")
    for authorization in ("Bearer ", "Bearer", f"Bearer {SECRET}", ""):
        _assert_problem(_post(client, event, {"Authorization": authorization}), 401, "unauthorised")
    assert _rows(sessions, "SELECT count(*) FROM sources") == [(0,)]


def test_other_methods_and_paths_are_problems(client: TestClient) -> None:
    wrong_method = client.get(webhook.PATH, headers=AUTH)
    _assert_problem(wrong_method, 405, "method-not-allowed")
    assert wrong_method.headers["allow"] == "POST"
    _assert_problem(client.post("/s3-event", content=b"{}", headers=AUTH), 404, "not-found")


def test_a_database_outage_answers_503(
    context: ApiContext, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as closed:  # a port nothing listens on: the database is away
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    engine = make_engine(f"postgresql+psycopg2://nobody@127.0.0.1:{port}/synthsentry")
    away = dataclasses.replace(context, session_factory=make_sessionmaker(engine))
    try:
        client = TestClient(create_app(away))
        for body in (_minio_event("uploads", "a.jpg", "e1"), b"{not json"):  # record, keep
            reply = _post(client, body)
            _assert_problem(reply, 503, "unavailable")
            assert reply.headers["retry-after"] == "10"
    finally:
        engine.dispose()
    assert _queued(redis_url) == 0
    assert "could not record or dispatch an upload" in caplog.text


def test_a_key_shaped_like_a_path_is_an_s3_key(
    context: ApiContext, sessions: sessionmaker[Session], s3_endpoint: str, tmp_path: Path
) -> None:
    from db import repository
    from workers.events import BucketPolicy
    from workers.fleet import fetch_object
    from workers.intake import IntakeLimits

    bucket = f"uploads-{uuid.uuid4().hex[:10]}"
    s3 = s3_client(s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="../../etc/passwd", Body=b"an object named like a path")
    client = TestClient(
        create_app(dataclasses.replace(context, bucket_policy=BucketPolicy.parse(bucket)))
    )

    reply = _post(client, _minio_event(bucket, "..%2F..%2Fetc%2Fpasswd", "e1"))
    assert (reply.status_code, reply.json()["accepted"]) == (200, 1)
    [(source_id, key)] = _rows(sessions, "SELECT id, object_key FROM sources")
    assert key == "../../etc/passwd"  # verbatim: a name in a bucket, never normalised

    # What intake fetches for it: that object, from the S3 API.
    with sessions() as session:
        stored = repository.stored_object(session, source_id)
    assert stored is not None and stored.key == "../../etc/passwd"
    limits_ = IntakeLimits(max_bytes=1 << 20, max_pixels=1 << 20, decode_timeout_s=10)
    assert fetch_object(s3, stored, limits_) == b"an object named like a path"
    assert not [path for path in tmp_path.rglob("*") if path.name == "passwd"]


def test_the_embedded_mode_takes_events_into_its_own_worker(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    built = build_test_api(sessions, tmp_path, webhook_secret=SECRET)
    assert built.context.embedded and built.worker is not None
    built.context.store.put_object(Bucket=BUCKET, Key="events/first.png", Body=_png())
    client = TestClient(create_app(built.context))
    try:
        reply = _post(client, _minio_event(BUCKET, "events/first.png", "e1"))
        assert reply.json()["accepted"] == 1
        assert _post(client, _minio_event(BUCKET, "events/first.png", "e1")).json() == {
            "accepted": 0,
            "duplicates": 1,
            "ignored": 0,
            "refused": 0,
            "refusals": [],
            "test_event": False,
        }
        built.start()
        status = "SELECT status FROM sources WHERE object_key = 'events/first.png'"
        wait_for(
            lambda: _rows(sessions, status) == [("scored",)],
            timeout=60,
            what="the embedded worker to score the announced upload",
            interval=0.1,
        )
    finally:
        built.stop()


# --- the body limit of every route ----------------------------------------------------------


def _asgi(
    app: Any, method: str, path: str, headers: dict[str, str], receive: Callable[[], Any]
) -> tuple[int, dict[str, str], bytes]:
    """One request straight into ``app``'s ASGI interface; the answer's status, headers and
    body."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    anyio.run(app, scope, receive, send)
    [start, *bodies] = sent
    assert start["type"] == "http.response.start"
    answer = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], answer, b"".join(m.get("body", b"") for m in bodies)


def test_a_declared_length_over_the_limit_is_refused_before_any_byte_is_read(
    client: TestClient, context: ApiContext
) -> None:
    async def receive() -> dict[str, Any]:
        raise AssertionError("the body was read")

    app = client.app
    json_limit = context.max_body_bytes
    for path, limit in ((webhook.PATH, webhook.MAX_BODY_BYTES), ("/v1/tokens", json_limit)):
        headers = {**AUTH, "content-length": str(limit + 1), "content-type": "application/json"}
        status, answer, body = _asgi(app, "POST", path, headers, receive)
        assert (status, answer["content-type"], answer["connection"]) == (413, PROBLEM, "close")
        document = json.loads(body)
        assert document["type"] == "urn:synthsentry:problem:body-too-large"
        assert document["detail"] == f"the body is over {limit} bytes"
    status, _, body = _asgi(app, "POST", webhook.PATH, {"content-length": "12a"}, receive)
    assert status == 400 and json.loads(body)["status"] == 400


def test_a_streamed_body_stops_being_read_once_it_passes_the_limit(client: TestClient) -> None:
    chunk = b" " * (256 * 1024)
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        assert calls <= 5, "read past the limit"
        return {"type": "http.request", "body": chunk, "more_body": True}  # never ends

    status, answer, body = _asgi(client.app, "POST", webhook.PATH, AUTH, receive)
    # Four chunks are exactly 1 MiB, within the limit; the fifth passes it.
    assert (status, calls, answer["content-type"]) == (413, 5, PROBLEM)
    assert json.loads(body)["type"] == "urn:synthsentry:problem:body-too-large"


def test_a_body_that_stops_arriving_is_answered_408() -> None:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        raise AssertionError("the body never ends")

    sent = False

    async def stalls() -> dict[str, Any]:  # a piece of the body, then nothing
        nonlocal sent
        if sent:
            await anyio.sleep_forever()
        sent = True
        return {"type": "http.request", "body": b'{"Records": [', "more_body": True}

    guarded = limits.BodyLimit(
        inner, limits=limits.BodyLimits(json_bytes=MIB, upload_bytes=MIB), read_timeout_s=0.2
    )
    started = time.monotonic()
    status, answer, body = _asgi(guarded, "POST", "/anything", {}, stalls)
    assert (status, answer["connection"]) == (408, "close")
    assert json.loads(body)["type"] == "urn:synthsentry:problem:body-timeout"
    assert 0.2 <= time.monotonic() - started < 5


def test_each_route_has_its_limit_and_a_body_exactly_at_it_passes(
    context: ApiContext, sessions: sessionmaker[Session], redis_url: str
) -> None:
    with transaction(sessions) as session:
        admin = tokens.issue_token(session, role=TokenRole.ADMIN, name="ops", actor="test").token
    small = dataclasses.replace(context, max_body_bytes=2048)
    client = TestClient(create_app(small))
    as_admin = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}

    def token_request(size: int) -> bytes:
        return json.dumps({"role": "moderator", "name": "alice"}).encode().ljust(size)

    def whole(body: bytes) -> Body:  # with a Content-Length
        return body

    def chunked(body: bytes) -> Body:  # without one: sent chunked
        return iter([body[i : i + 500] for i in range(0, len(body), 500)])

    for n, send in enumerate((whole, chunked)):
        made = client.post("/v1/tokens", content=send(token_request(2048)), headers=as_admin)
        assert made.status_code == 201, made.text
        over = client.post("/v1/tokens", content=send(token_request(2049)), headers=as_admin)
        _assert_problem(over, 413, "body-too-large")

        # The S3 event route keeps its own 1 MiB, whatever the JSON limit.
        event = _minio_event("uploads", f"exactly-at-the-limit-{n}.jpg", "e1")
        assert _post(client, send(event.ljust(MIB))).json()["accepted"] == 1
        _assert_problem(_post(client, send(event.ljust(MIB + 1))), 413, "body-too-large")
    assert _queued(redis_url) == 2

    # An upload to POST /v1/scans may carry an image of the intake limit plus the form.
    body_limits = limits.BodyLimits.of(small)
    upload = small.limits.max_bytes + limits.UPLOAD_OVERHEAD_BYTES

    def scope(method: str, path: str, content_type: str) -> dict[str, Any]:
        headers = [(b"content-type", content_type.encode())]
        return {"method": method, "path": path, "headers": headers}

    form = "multipart/form-data; boundary=x"
    assert body_limits.for_request(scope("POST", "/v1/scans", form)) == upload
    assert body_limits.for_request(scope("POST", "/v1/scans/", "Multipart/Form-Data")) == upload
    assert body_limits.for_request(scope("POST", "/v1/scans", "application/json")) == 2048
    assert body_limits.for_request(scope("POST", "/v1/tokens", form)) == 2048
    assert body_limits.for_request(scope("PUT", webhook.PATH, "text/plain")) == MIB


def test_malformed_json_on_any_route_is_a_problem_never_a_500(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    with transaction(sessions) as session:
        admin = tokens.issue_token(session, role=TokenRole.ADMIN, name="ops", actor="test").token
    headers = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}
    bodies = [
        b"{not json",
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,  # well formed, nested past the recursion limit
        b'{"role": "admin", "name": "\xff"}',  # not UTF-8
        b"",
    ]
    for body in bodies:
        reply = client.post("/v1/tokens", content=body, headers=headers)
        assert reply.status_code in (400, 422), (body[:20], reply.text)
        assert reply.headers["content-type"] == PROBLEM
    with sessions() as session:
        assert [t.name for t in tokens.list_tokens(session)] == ["ops"]


# --- served for real --------------------------------------------------------------------------


@contextmanager
def _uvicorn(app: Any) -> Iterator[int]:
    """``app`` under uvicorn in a thread of this process, with the options ``synthsentry
    serve`` runs it with; yields the port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        http="h11",
        lifespan="off",
        log_config=None,
        timeout_keep_alive=5,
        limit_concurrency=200,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=30, what="uvicorn", interval=0.05)
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
        listener.close()


def _answer_and_close(connection: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection. Closed with bytes of
    ours still unread, it resets the connection: that ends the answer too."""
    connection.settimeout(timeout)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def _request_head(port: int, **headers: str) -> bytes:
    lines = [f"POST {webhook.PATH} HTTP/1.1", "Host: localhost", f"Authorization: Bearer {SECRET}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_over_the_limit_is_refused_on_the_wire_before_the_body_is_sent(
    client: TestClient,
) -> None:
    with _uvicorn(client.app) as port:
        # Declared: 413 at once, without a byte of the body sent, and the connection closed.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(_request_head(port, Content_Length=str(2 * MIB)))
            answer = _answer_and_close(connection, timeout=10)
        assert _status_of(answer) == 413 and PROBLEM.encode() in answer

        # Chunked: 413 once 1 MiB has passed, while the body has not ended.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(_request_head(port, Transfer_Encoding="chunked"))
            chunk = b" " * (64 * 1024)
            for _ in range(17):  # 1 MiB + 64 KiB, and no last chunk
                connection.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            answer = _answer_and_close(connection, timeout=10)
        assert _status_of(answer) == 413 and b"body-too-large" in answer


def _half_sent_request(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(_request_head(port, Content_Length="1000") + b'{"Records": [')
    return connection


def _still_open(connection: socket.socket) -> bool:
    connection.setblocking(False)
    try:
        return connection.recv(1) != b""
    except BlockingIOError:
        return True
    finally:
        connection.setblocking(True)


def _http_post(port: int, body: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{webhook.PATH}",
        data=body,
        method="POST",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            return int(response.status), headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        headers = {k.lower(): v for k, v in error.headers.items()}
        return error.code, headers, json.loads(error.read())


def test_half_sent_requests_hold_no_thread_and_are_closed_when_idle(
    context: ApiContext, redis_url: str
) -> None:
    timeout_s = 2.0
    app = limits.BodyLimit(
        create_app(context), limits=limits.BodyLimits.of(context), read_timeout_s=timeout_s
    )
    with _uvicorn(app) as port:
        held = [_half_sent_request(port) for _ in range(50)]
        last_byte_at = time.monotonic()
        try:
            # 50 requests wait for their bodies, on the event loop: a whole one is answered.
            status, _, body = _http_post(port, _minio_event("uploads", "during.jpg", "e1"))
            assert (status, body["accepted"]) == (200, 1)
            assert all(_still_open(connection) for connection in held)
            assert _queued(redis_url) == 1

            # Each is answered 408 and closed once its body has stalled for the timeout.
            for connection in held:
                answer = _answer_and_close(connection, timeout=timeout_s + 15)
                assert _status_of(answer) == 408 and b"body-timeout" in answer
            assert time.monotonic() - last_byte_at >= timeout_s - 0.5
        finally:
            for connection in held:
                connection.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.status == 200


def _serve(
    tmp_path: Path, name: str, env: dict[str, str], started: list[FleetProcess]
) -> tuple[int, FleetProcess]:
    """``synthsentry serve`` in its own process, healthy."""
    port = port_for.select_random()
    process = FleetProcess(name, ["serve", "--port", str(port)], env, tmp_path).start()
    started.append(process)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, ConnectionError):
            assert process.process is not None and process.process.poll() is None, (
                process.log_tail()
            )
            return False

    wait_for(healthy, timeout=60, what=f"synthsentry serve ({name})", processes=(process,))
    return port, process


def test_synthsentry_serve_takes_events_and_a_broker_outage_answers_503(
    sessions: sessionmaker[Session], webhook_database: str, redis_url: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    env.update(
        SYNTHSENTRY_DATA_DIR=str(tmp_path / "data"),
        SYNTHSENTRY_DATABASE_URL=webhook_database,
        SYNTHSENTRY_BROKER_URL=redis_url,
        SYNTHSENTRY_API_MODE="fleet",
        SYNTHSENTRY_ALLOWED_BUCKETS="uploads",
        SYNTHSENTRY_WEBHOOK_SECRET=SECRET,
    )
    with socket.socket() as closed:  # a port nothing listens on: the broker is away
        closed.bind(("127.0.0.1", 0))
        away = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"
    event = _minio_event("uploads", "during+outage.jpg", "e1")
    status = "SELECT object_key, status FROM sources"
    started: list[FleetProcess] = []
    try:
        port, down = _serve(
            tmp_path, "serve-down", {**env, "SYNTHSENTRY_BROKER_URL": away}, started
        )
        code, headers, problem = _http_post(port, event)
        assert (code, headers["content-type"], problem["type"]) == (
            503,
            PROBLEM,
            "urn:synthsentry:problem:unavailable",
        )
        assert headers["retry-after"] == "10"
        # The upload was recorded before its intake could not be sent.
        assert _rows(sessions, status) == [("during outage.jpg", "pending")]
        down.stop()

        port, _ = _serve(tmp_path, "serve", env, started)
        code, _, body = _http_post(port, event)
        assert (code, body["accepted"], body["duplicates"]) == (200, 0, 1)
        assert _queued(redis_url) == 0  # a retry queues nothing ...
    finally:
        for process in started:
            process.stop()
    # ... and the reconciler sends the intake of the upload left pending.
    subprocess.run(
        [*CLI, "reconcile", "--once", "--after", "0.001"], env=env, check=True, timeout=60
    )
    assert _queued(redis_url) == 1
    assert _rows(sessions, status) == [("during outage.jpg", "pending")]
