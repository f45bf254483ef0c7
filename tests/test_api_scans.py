"""Platform hooks over HTTP on real Postgres: submitting objects and bytes, reading results
(with ``?wait``), idempotency, who sees what, bad input; the embedded worker running the
fleet's steps in the API process, and the fleet mode queueing on real Redis."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.models import Scan, Source, TokenRole
from db.session import transaction
from synthsentry.cli.serve import BuiltApi
from workers import tokens

from apitest import BUCKET, build_test_api
from conftest import DatabaseFactory, emptied_sessions
from provenance_fixtures import png_with_chunks, text_chunk

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def scans_database(committing_database: DatabaseFactory) -> str:
    return committing_database("api_scans")


@pytest.fixture
def sessions(scans_database: str) -> Iterator[sessionmaker[Session]]:
    yield from emptied_sessions(scans_database)


@pytest.fixture
def api(sessions: sessionmaker[Session], tmp_path: Path) -> Iterator[BuiltApi]:
    built = build_test_api(sessions, tmp_path)
    yield built
    built.stop()


@pytest.fixture
def client(api: BuiltApi) -> TestClient:
    return TestClient(create_app(api.context))


def _token(sessions: sessionmaker[Session], role: TokenRole, name: str = "platform-a") -> str:
    with transaction(sessions) as session:
        return tokens.issue_token(session, role=role, name=name, actor="test").token


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _jpeg(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    image = Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, 120))
    for x in range(0, size[0], 4):
        image.putpixel((x, x % size[1]), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _put(api: BuiltApi, key: str, data: bytes, bucket: str = BUCKET) -> None:
    api.context.store.put_object(Bucket=bucket, Key=key, Body=data)


def _finished(client: TestClient, scan_id: str, token: str) -> dict[str, Any]:
    reply = client.get(f"/v1/scans/{scan_id}", params={"wait": 30}, headers=_auth(token))
    assert reply.status_code == 200, reply.text
    document: dict[str, Any] = reply.json()
    assert document["finished"], document
    return document


def test_an_object_is_scanned_in_process_and_read_back_with_wait(
    api: BuiltApi, client: TestClient, sessions: sessionmaker[Session]
) -> None:
    token = _token(sessions, TokenRole.PLATFORM)
    _put(api, "photos/cat.jpg", _jpeg(1))
    reply = client.post(
        "/v1/scans",
        json={"object": {"bucket": BUCKET, "key": "photos/cat.jpg"}, "external_id": "post-17"},
        headers=_auth(token),
    )
    assert reply.status_code == 202, reply.text
    [scan] = reply.json()["scans"]
    assert reply.headers["location"] == f"/v1/scans/{scan['id']}" == scan["links"]["self"]

    # Nothing runs until the worker starts: a short wait answers "not finished" in time.
    pending = client.get(f"/v1/scans/{scan['id']}", params={"wait": 1}, headers=_auth(token))
    assert pending.json()["finished"] is False and pending.json()["status"] == "pending"

    api.start()
    started = time.monotonic()
    document = _finished(client, scan["id"], token)
    assert time.monotonic() - started < 25  # answered when the verdict was stored
    assert document["status"] == "scored"
    assert document["external_id"] == "post-17"
    assert document["object"] == {"bucket": BUCKET, "key": "photos/cat.jpg", "version_id": None}
    assert document["verdict"] in {"no_indication", "inconclusive", "likely_ai"}
    assert document["ensemble_version"] == api.context.active_ensemble
    assert set(document["detector_versions"]) == {"provenance"}
    assert [d["name"] for d in document["detectors"]] == ["provenance"]
    assert document["decision"] is None and document["review_state"] in {"none", "open"}
    # The result itself is what `scan --json` prints for it.
    assert (document["review"] is None) == (document["review_state"] == "none")
    assert "not a finding" in document["notice"] and "indication, not proof" in document["notice"]
    # The same object read by key, by content and by the platform's own id.
    by_key = client.get(
        "/v1/items", params={"bucket": BUCKET, "key": "photos/cat.jpg"}, headers=_auth(token)
    )
    assert [s["id"] for s in by_key.json()["scans"]] == [scan["id"]]
    by_sha = client.get(f"/v1/images/{document['sha256']}", headers=_auth(token))
    assert [s["id"] for s in by_sha.json()["scans"]] == [scan["id"]]
    by_external = client.get("/v1/scans", params={"external_id": "post-17"}, headers=_auth(token))
    assert [s["id"] for s in by_external.json()["scans"]] == [scan["id"]]


def test_a_list_of_objects_makes_one_scan_each_and_reuses_known_bytes(
    api: BuiltApi, client: TestClient, sessions: sessionmaker[Session]
) -> None:
    token = _token(sessions, TokenRole.PLATFORM)
    _put(api, "a.jpg", _jpeg(2))
    _put(api, "b.jpg", _jpeg(2))  # the same bytes under another key
    _put(api, "c.jpg", _jpeg(3))
    objects = [{"bucket": BUCKET, "key": k} for k in ("a.jpg", "b.jpg", "c.jpg")]
    reply = client.post("/v1/scans", json={"objects": objects}, headers=_auth(token))
    assert reply.status_code == 202 and "location" not in reply.headers
    ids = [s["id"] for s in reply.json()["scans"]]
    assert len(set(ids)) == 3
    api.start()
    documents = [_finished(client, i, token) for i in ids]
    assert [d["object"]["key"] for d in documents] == ["a.jpg", "b.jpg", "c.jpg"]
    assert documents[0]["sha256"] == documents[1]["sha256"] != documents[2]["sha256"]
    with sessions() as session:
        detections = session.scalar(sa.text("SELECT count(*) FROM detections"))
    assert detections == 2  # the second copy of the bytes cost no detector work


def test_posted_bytes_are_stored_then_scanned(
    api: BuiltApi, client: TestClient, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    token = _token(sessions, TokenRole.PLATFORM)
    api.start()
    data = _jpeg(4)
    reply = client.post(
        "/v1/scans",
        files={"file": ("holiday.jpg", data, "image/jpeg")},
        data={"external_id": "upload-1", "priority": "normal"},
        headers=_auth(token),
    )
    assert reply.status_code == 202, reply.text
    [scan] = reply.json()["scans"]
    document = _finished(client, scan["id"], token)
    assert document["object"]["bucket"] == api.context.upload_bucket
    assert document["object"]["key"].startswith(api.context.upload_prefix)
    assert document["external_id"] == "upload-1" and document["status"] == "scored"
    stored = api.context.store.get_object(
        Bucket=api.context.upload_bucket, Key=document["object"]["key"]
    )
    with stored["Body"] as body:
        assert body.read() == data


def test_what_is_not_an_image_is_refused_before_anything_is_written(
    api: BuiltApi, client: TestClient, sessions: sessionmaker[Session]
) -> None:
    token = _token(sessions, TokenRole.PLATFORM)
    for name, body in (("notes.txt", b"hello, not a picture"), ("doc.pdf", b"%PDF-1.7\n...")):
        reply = client.post(
            "/v1/scans", files={"file": (name, body, "image/jpeg")}, headers=_auth(token)
        )
        assert reply.status_code == 415 and reply.headers["content-type"] == PROBLEM
    empty = client.post(
        "/v1/scans", files={"file": ("e.jpg", b"", "image/jpeg")}, headers=_auth(token)
    )
    assert empty.status_code == 422
    no_file = client.post(
        "/v1/scans", data={"external_id": "x"}, files={"other": ("a", b"a")}, headers=_auth(token)
    )
    assert no_file.status_code == 422
    # A real image refused for another reason (a callback host not allowed, a text no column
    # can hold) is not stored either.
    image = ("ok.jpg", _jpeg(8), "image/jpeg")
    for fields, kind in (
        ({"callback_url": "https://hooks.example.com/x"}, "callback-not-allowed"),
        ({"external_id": "a\x00b"}, "invalid-text"),
        ({"priority": "urgent"}, "invalid-request"),
        ({"colour": "red"}, "invalid-request"),
    ):
        refused = client.post("/v1/scans", files={"file": image}, data=fields, headers=_auth(token))
        assert refused.status_code == 422, refused.text
        assert refused.json()["type"].endswith(kind)
    with sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Scan)) == 0
        assert session.scalar(sa.select(sa.func.count()).select_from(Source)) == 0
    uploads = Path(api.context.store.root) / api.context.upload_bucket  # type: ignore[attr-defined]
    assert not uploads.exists() or not any(uploads.rglob("*"))


def test_an_idempotency_key_answers_the_same_scans_and_refuses_another_body(
    api: BuiltApi, client: TestClient, sessions: sessionmaker[Session]
) -> None:
    token = _token(sessions, TokenRole.PLATFORM)
    body = {"object": {"bucket": BUCKET, "key": "x.jpg"}, "external_id": "e1"}
    headers = {**_auth(token), "Idempotency-Key": "req-0001"}
    first = client.post("/v1/scans", json=body, headers=headers)
    again = client.post("/v1/scans", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["scans"] == again.json()["scans"]
    assert (first.json()["replayed"], again.json()["replayed"]) == (False, True)
    other = client.post("/v1/scans", json={**body, "external_id": "e2"}, headers=headers)
    assert other.status_code == 422 and other.json()["type"].endswith("idempotency-key-reused")
    # Keys belong to a token: another platform may use the same key for its own request.
    second_platform = _token(sessions, TokenRole.PLATFORM, "platform-b")
    theirs = client.post(
        "/v1/scans", json=body, headers={**_auth(second_platform), "Idempotency-Key": "req-0001"}
    )
    assert theirs.status_code == 202 and theirs.json()["scans"] != first.json()["scans"]
    with sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Scan)) == 2


def test_a_platform_sees_only_its_own_scans_and_roles_are_checked(
    api: BuiltApi, client: TestClient, sessions: sessionmaker[Session]
) -> None:
    mine = _token(sessions, TokenRole.PLATFORM, "a")
    theirs = _token(sessions, TokenRole.PLATFORM, "b")
    admin = _token(sessions, TokenRole.ADMIN, "ops")
    moderator = _token(sessions, TokenRole.MODERATOR, "mo")
    _put(api, "own.jpg", _jpeg(5))
    reply = client.post(
        "/v1/scans", json={"object": {"bucket": BUCKET, "key": "own.jpg"}}, headers=_auth(mine)
    )
    scan_id = reply.json()["scans"][0]["id"]
    api.start()
    sha = _finished(client, scan_id, mine)["sha256"]
    for path, params in (
        (f"/v1/scans/{scan_id}", {}),
        ("/v1/items", {"bucket": BUCKET, "key": "own.jpg"}),
        (f"/v1/images/{sha}", {}),
    ):
        assert client.get(path, params=params, headers=_auth(theirs)).status_code == 404
        assert client.get(path, params=params, headers=_auth(admin)).status_code == 200
        assert client.get(path, params=params, headers=_auth(moderator)).status_code == 403
        assert client.get(path, params=params).status_code == 401
    assert client.get("/v1/scans/scn_doesnotexist", headers=_auth(admin)).status_code == 404
    assert (
        client.post(
            "/v1/scans", json={"object": {"bucket": BUCKET, "key": "k"}}, headers=_auth(moderator)
        ).status_code
        == 403
    )


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        (b'{"object": {"bucket": "media", "key": "a.jpg"', 400, "malformed-json"),
        (b"[1, 2", 400, "malformed-json"),
        (
            json.dumps({"object": {"bucket": BUCKET, "key": "a.jpg"}, "colour": "red"}),
            422,
            "invalid-request",
        ),
        (json.dumps({"object": {"bucket": BUCKET, "key": "a/../b.jpg"}}), 422, "invalid-key"),
        (json.dumps({"object": {"bucket": BUCKET, "key": "a\u0000b.jpg"}}), 422, "invalid-text"),
        (
            json.dumps({"object": {"bucket": "elsewhere", "key": "a.jpg"}}),
            403,
            "bucket-not-allowed",
        ),
        (
            json.dumps({"objects": [{"bucket": BUCKET, "key": f"{i}.jpg"} for i in range(1001)]}),
            422,
            "invalid-request",
        ),
        (json.dumps({"objects": []}), 422, "invalid-request"),
        (
            json.dumps(
                {
                    "object": {"bucket": BUCKET, "key": "a"},
                    "objects": [{"bucket": BUCKET, "key": "b"}],
                }
            ),
            422,
            "invalid-request",
        ),
        (
            json.dumps({"object": {"bucket": BUCKET, "key": "a"}, "priority": "urgent"}),
            422,
            "invalid-request",
        ),
        (
            json.dumps(
                {
                    "object": {"bucket": BUCKET, "key": "a"},
                    "callback_url": "https://example.com/hook",
                }
            ),
            422,
            "callback-not-allowed",
        ),
        (json.dumps([{"bucket": BUCKET, "key": "a"}]), 422, "invalid-request"),
    ],
)
def test_bad_requests_get_a_problem_and_write_nothing(
    client: TestClient, sessions: sessionmaker[Session], body: str | bytes, status: int, kind: str
) -> None:
    token = _token(sessions, TokenRole.PLATFORM)
    reply = client.post(
        "/v1/scans",
        content=body,
        headers={**_auth(token), "Content-Type": "application/json"},
    )
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM
    assert reply.json()["type"] == f"urn:synthsentry:problem:{kind}"
    with sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Source)) == 0


def test_work_left_pending_by_a_stopped_process_is_finished_by_the_next(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    first = build_test_api(sessions, tmp_path)  # never started: as if killed after recording
    client = TestClient(create_app(first.context))
    token = _token(sessions, TokenRole.PLATFORM)
    first.context.store.put_object(Bucket=BUCKET, Key="late.jpg", Body=_jpeg(6))
    reply = client.post(
        "/v1/scans", json={"object": {"bucket": BUCKET, "key": "late.jpg"}}, headers=_auth(token)
    )
    scan_id = reply.json()["scans"][0]["id"]
    second = build_test_api(sessions, tmp_path)
    second.start()
    try:
        document = _finished(TestClient(create_app(second.context)), scan_id, token)
    finally:
        second.stop()
    assert document["status"] == "scored"


def test_a_missing_object_is_a_result_with_a_reason(
    api: BuiltApi, client: TestClient, sessions: sessionmaker[Session]
) -> None:
    token = _token(sessions, TokenRole.PLATFORM)
    api.start()
    reply = client.post(
        "/v1/scans", json={"object": {"bucket": BUCKET, "key": "gone.jpg"}}, headers=_auth(token)
    )
    document = _finished(client, reply.json()["scans"][0]["id"], token)
    assert document["status"] == "rejected" and document["reason"] == "missing"


def test_the_fleet_mode_records_and_enqueues_uploads_and_low_priority_work_apart(
    sessions: sessionmaker[Session], tmp_path: Path, redis_url: str
) -> None:
    from tasks.queues import QUEUES

    built = build_test_api(sessions, tmp_path, api_mode="fleet", broker_url=redis_url)
    client = TestClient(create_app(built.context))
    token = _token(sessions, TokenRole.PLATFORM)
    with redis.Redis.from_url(redis_url) as broker:
        broker.delete(QUEUES.intake, QUEUES.intake_queue(bulk=True))
        normal = client.post(
            "/v1/scans", json={"object": {"bucket": BUCKET, "key": "n.jpg"}}, headers=_auth(token)
        )
        low = client.post(
            "/v1/scans",
            json={
                "objects": [
                    {"bucket": BUCKET, "key": "l1.jpg"},
                    {"bucket": BUCKET, "key": "l2.jpg"},
                ],
                "priority": "low",
            },
            headers=_auth(token),
        )
        assert normal.status_code == low.status_code == 202
        assert broker.llen(QUEUES.intake) == 1
        assert broker.llen(QUEUES.intake_queue(bulk=True)) == 2
        message = json.loads(broker.lindex(QUEUES.intake, 0) or b"{}")
        assert message["headers"]["task"] == "synthsentry.intake"
    assert client.get("/readyz").json()["broker"] is True


def test_the_api_process_never_imports_torch_in_either_mode(tmp_path: Path) -> None:
    code = f"""
import sys
from pathlib import Path
from apitest import build_test_api
from api.app import create_app
from db import migrate
from db.session import make_engine, make_sessionmaker
url = "sqlite:///{tmp_path}/t.db"
migrate.upgrade(url)
sessions = make_sessionmaker(make_engine(url))
for mode in ("embedded", "fleet"):
    create_app(build_test_api(sessions, Path("{tmp_path}"), api_mode=mode).context)
print("torch" in sys.modules)
"""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONPATH": f"{root}:{root / 'tests'}", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


class _Receiver:
    """A platform's callback endpoint: a real HTTP server in a thread, keeping what it got."""

    def __init__(self) -> None:
        received: list[tuple[dict[str, str], bytes]] = []
        self.received = received
        self.arrived = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()
                outer.arrived.set()

            def log_message(self, *args: Any) -> None:
                pass

        outer = self
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/synthsentry"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_result_and_a_moderators_decision_are_called_back_signed(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    from standardwebhooks import Webhook

    built = build_test_api(sessions, tmp_path, callback_allow_private_addresses=True)
    client = TestClient(create_app(built.context))
    admin = _token(sessions, TokenRole.ADMIN, "ops")
    moderator = _token(sessions, TokenRole.MODERATOR, "mo")
    made = client.post(
        "/v1/tokens",
        json={"role": "platform", "name": "hooks", "callback_hosts": ["127.0.0.1"]},
        headers=_auth(admin),
    )
    assert made.status_code == 201, made.text
    platform, secret = made.json()["token"], made.json()["callback_secret"]
    receiver = _Receiver()
    # Generation settings in a PNG text chunk: the provenance detector flags it for review.
    flagged = png_with_chunks([text_chunk("parameters", "a fox\nSteps: 20, Seed: 1, Model: x")])
    built.start()
    try:
        built.context.store.put_object(Bucket=BUCKET, Key="cb.png", Body=flagged)
        reply = client.post(
            "/v1/scans",
            json={
                "object": {"bucket": BUCKET, "key": "cb.png"},
                "external_id": "p-9",
                "callback_url": receiver.url,
            },
            headers=_auth(platform),
        )
        assert reply.status_code == 202, reply.text
        scan_id = reply.json()["scans"][0]["id"]
        assert receiver.arrived.wait(30), "no callback within 30 s"
        document = _finished(client, scan_id, platform)
        assert document["flagged"] and document["review_state"] == "open"
        assert document["decision"] is None

        receiver.arrived.clear()
        decision = f"/v1/reviews/{document['sha256']}/decision"
        body = {"decision": "ai_generated", "note": "internal: matches a known generator"}
        assert client.post(decision, json=body, headers=_auth(platform)).status_code == 403
        unclaimed = client.post(decision, json=body, headers=_auth(moderator))
        assert unclaimed.status_code == 409, "only the holder of the case's lease may decide"
        claimed = client.post("/v1/reviews/next", headers=_auth(moderator))
        assert claimed.status_code == 200 and claimed.json()["sha256"] == document["sha256"]
        decided = client.post(decision, json=body, headers=_auth(moderator))
        assert decided.status_code == 200, decided.text
        assert decided.json()["callbacks"] == 1 and decided.json()["decided_from"] == "claimed"
        assert decided.json()["state"] == "decided"
        again = client.post(decision, json=body, headers=_auth(moderator))
        assert again.status_code == 409
        assert receiver.arrived.wait(30), "no decision callback within 30 s"
        after = client.get(f"/v1/scans/{scan_id}", headers=_auth(platform)).json()
    finally:
        built.stop()
        receiver.close()
    completed, decided_event = (Webhook(secret).verify(b, h) for h, b in receiver.received)
    assert completed["type"] == "scan.completed"
    assert completed["data"]["scan"]["id"] == scan_id
    assert completed["data"]["scan"]["external_id"] == "p-9"
    assert completed["data"]["scan"]["flagged"] is True
    assert decided_event["type"] == "review.decided"
    assert decided_event["data"]["review"]["decision"] == "ai_generated"
    assert "internal" not in json.dumps(decided_event)  # a moderator's note stays with us
    # The flag and the decision stay apart: the flag asked for review, the label is a person's.
    assert after["flagged"] is True and after["decision"]["label"] == "ai_generated"
    assert after["review_state"] == "decided"
    first_headers, first_body = receiver.received[0]
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + "A" * 43 + "=").verify(first_body, first_headers)


def test_an_embedded_rescan_lists_scores_and_finishes_in_process(
    api: BuiltApi, client: TestClient, sessions: sessionmaker[Session]
) -> None:
    admin = _token(sessions, TokenRole.ADMIN, "ops")
    for i in range(5):
        _put(api, f"old/{i}.jpg", _jpeg(10 + i % 3))  # three distinct images among five
    _put(api, "other/x.jpg", _jpeg(20))
    api.start()
    # Scored before the re-scan: the bytes of old/0.jpg (and old/3.jpg, the same bytes).
    first = client.post(
        "/v1/scans", json={"object": {"bucket": BUCKET, "key": "old/0.jpg"}}, headers=_auth(admin)
    )
    _finished(client, first.json()["scans"][0]["id"], admin)
    reply = client.post(
        "/v1/rescans", json={"bucket": BUCKET, "prefix": "old/"}, headers=_auth(admin)
    )
    assert reply.status_code == 202, reply.text
    rescan = reply.json()["links"]["self"]
    deadline = time.monotonic() + 60
    while (status := client.get(rescan, headers=_auth(admin)).json())["state"] != "done":
        assert time.monotonic() < deadline, status
        time.sleep(0.1)  # polling a condition with a deadline
    counts = status["counts"]
    assert (counts["listed"], counts["done"], counts["pending"]) == (5, 5, 0)
    assert counts["reused"] == 2  # bytes scored before cost no detector work
    with sessions() as session:
        assert session.scalar(sa.text("SELECT count(*) FROM detections")) == 3


def test_the_cli_submits_and_shows_scans_through_the_same_services(
    api: BuiltApi,
    client: TestClient,
    sessions: sessionmaker[Session],
    scans_database: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from synthsentry.cli import main
    from synthsentry.settings import get_settings

    for name, value in {
        "SYNTHSENTRY_DATA_DIR": str(tmp_path),
        "SYNTHSENTRY_DATABASE_URL": scans_database,
        "SYNTHSENTRY_API_MODE": "embedded",
        "SYNTHSENTRY_ALLOWED_BUCKETS": BUCKET,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        _put(api, "cli/one.jpg", _jpeg(30))
        assert (
            main(["scans", "submit", f"s3://{BUCKET}/cli/one.jpg", "--external-id", "c1", "--json"])
            == 0
        )
        [scan_id] = json.loads(capsys.readouterr().out)["scans"]
        refused = main(["scans", "submit", "s3://elsewhere/x.jpg"])
        assert refused == 2 and "not in a bucket" in capsys.readouterr().err
        api.start()  # the embedded worker finds the scan the CLI left in the database
        assert main(["scans", "show", scan_id, "--wait", "30", "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
    finally:
        get_settings.cache_clear()
    admin = _token(sessions, TokenRole.ADMIN, "ops")
    over_http = client.get(f"/v1/scans/{scan_id}", headers=_auth(admin)).json()
    assert shown["finished"] and shown["external_id"] == "c1"
    assert shown == over_http


def test_an_upload_that_finds_no_turn_in_time_is_told_to_come_back(
    api: BuiltApi,
    client: TestClient,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from api import scans

    token = _token(sessions, TokenRole.PLATFORM)
    monkeypatch.setattr(scans, "_UPLOAD_WAIT_S", 0.2)
    turns = client.app.state.upload_turns  # type: ignore[attr-defined]
    client.app.state.upload_turns = asyncio.Semaphore(0)  # type: ignore[attr-defined]
    busy = client.post(
        "/v1/scans", files={"file": ("a.jpg", _jpeg(40), "image/jpeg")}, headers=_auth(token)
    )
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
    assert busy.json()["type"].endswith(":busy")
    client.app.state.upload_turns = turns  # type: ignore[attr-defined]
    again = client.post(
        "/v1/scans", files={"file": ("a.jpg", _jpeg(40), "image/jpeg")}, headers=_auth(token)
    )
    assert again.status_code == 202, again.text
    with sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Scan)) == 1
