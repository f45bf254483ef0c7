"""The HTTP API on real Postgres: health, roles on every route, problem documents, tokens
over HTTP, and ``synthsentry serve`` as a real process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api import webhook
from api.app import ROUTERS, create_app
from api.auth import Authenticator
from db.models import TokenRole
from db.session import make_engine, transaction
from workers import tokens

from apitest import build_test_api
from conftest import DatabaseFactory, emptied_sessions

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def api_database(committing_database: DatabaseFactory) -> str:
    return committing_database("api")


@pytest.fixture
def sessions(api_database: str) -> Iterator[sessionmaker[Session]]:
    yield from emptied_sessions(api_database)


@pytest.fixture
def client(sessions: sessionmaker[Session], tmp_path: Path) -> TestClient:
    return TestClient(create_app(build_test_api(sessions, tmp_path).context))


def _token(sessions: sessionmaker[Session], role: TokenRole, name: str = "someone") -> str:
    with transaction(sessions) as session:
        return tokens.issue_token(session, role=role, name=name, actor="test").token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_health_and_readiness(
    client: TestClient, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    assert client.get("/healthz").json() == {"ok": True}
    assert client.get("/readyz").json()["database"] is True
    with socket.socket() as closed:  # a port nothing listens on: the broker is away
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    context = build_test_api(sessions, tmp_path).context
    away = TestClient(
        create_app(dataclasses.replace(context, broker_url=f"redis://127.0.0.1:{port}/0"))
    )
    reply = away.get("/readyz")
    assert reply.status_code == 503 and reply.headers["content-type"] == PROBLEM
    assert reply.json()["detail"] == "the broker does not answer"


def test_no_token_a_bad_one_and_the_wrong_role_are_told_apart(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    platform = _token(sessions, TokenRole.PLATFORM)
    admin = _token(sessions, TokenRole.ADMIN)
    missing = client.get("/v1/tokens")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.headers["content-type"] == PROBLEM
    assert missing.json()["type"] == "urn:synthsentry:problem:unauthenticated"
    assert client.get("/v1/tokens", headers=_bearer(admin[:-2] + "xx")).status_code == 401
    assert client.get("/v1/tokens", headers={"Authorization": admin}).status_code == 401
    forbidden = client.get("/v1/tokens", headers=_bearer(platform))
    assert forbidden.status_code == 403 and forbidden.json()["status"] == 403
    assert "platform token may not" in forbidden.json()["detail"]
    assert client.get("/v1/tokens", headers=_bearer(admin)).status_code == 200


def test_an_admin_makes_lists_and_revokes_tokens_over_http(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    admin = _bearer(_token(sessions, TokenRole.ADMIN, "ops"))
    made = client.post("/v1/tokens", json={"role": "moderator", "name": "alice"}, headers=admin)
    assert made.status_code == 201, made.text
    issued = made.json()
    assert issued["role"] == "moderator" and issued["token"].startswith("sst_")
    listed = client.get("/v1/tokens", headers=admin)
    assert issued["token"] not in listed.text
    assert {t["name"] for t in listed.json()} == {"ops", "alice"}
    with sessions() as session:
        assert tokens.authenticate(session, issued["token"]) is not None
    assert client.delete(f"/v1/tokens/{issued['public_id']}", headers=admin).status_code == 204
    with sessions() as session:
        assert tokens.authenticate(session, issued["token"]) is None
        actors = session.execute(sa.text("SELECT action, actor FROM audit_log ORDER BY id"))
        rows = [tuple(r) for r in actors]
    caller = f"token:{listed.json()[0]['public_id']}"
    assert rows[-2:] == [("token.created", caller), ("token.revoked", caller)]
    unknown = client.delete("/v1/tokens/000000000000", headers=admin)
    assert unknown.status_code == 404 and unknown.headers["content-type"] == PROBLEM
    extra = client.post("/v1/tokens", json={"role": "admin", "name": "x", "x": 1}, headers=admin)
    assert extra.status_code == 422 and extra.headers["content-type"] == PROBLEM
    bad_role = client.post("/v1/tokens", json={"role": "root", "name": "x"}, headers=admin)
    assert bad_role.status_code == 422


def test_every_v1_route_names_the_roles_that_may_call_it(client: TestClient) -> None:
    def dependencies_of(route: APIRoute) -> list[Any]:
        found: list[Any] = []
        stack = list(route.dependant.dependencies)
        while stack:
            dependency = stack.pop()
            found.append(dependency.call)
            stack.extend(dependency.dependencies)
        return found

    def roles_of(route: APIRoute) -> set[TokenRole]:
        found: set[TokenRole] = set()
        for call in dependencies_of(route):
            if isinstance(call, Authenticator):
                found |= call.roles
        return found

    every = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]
    routes = [r for r in every if r.path.startswith("/v1")]
    assert routes, "no /v1 routes found"
    assert {(r.path, m) for r in routes for m in r.methods if not roles_of(r)} == set()
    # The one route outside /v1 is the S3 event webhook: a storage server calls it, with no
    # API token, so it takes the shared secret instead of a role.
    others = [r for r in every if not r.path.startswith("/v1")]
    assert {(r.path, m) for r in others for m in r.methods} == {(webhook.PATH, "POST")}
    for route in others:
        assert webhook.require_shared_secret in dependencies_of(route) and not roles_of(route)
    # The schema the app serves has no /v1 operation outside those routers, and each of
    # them asks for a bearer token.
    schema = client.get("/openapi.json").json()
    served = {
        (path, method.upper())
        for path, operations in schema["paths"].items()
        if path.startswith("/v1")
        for method in operations
    }
    assert served == {(r.path, m) for r in routes for m in r.methods}
    for path, method in served:
        assert schema["paths"][path][method.lower()]["security"] == [{"HTTPBearer": []}]
    assert schema["paths"][webhook.PATH]["post"]["security"] == [{"S3EventSecret": []}]


def test_every_v1_route_answers_each_role_as_it_declares(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    """Behaviour, not only declarations: every route, called with a token of every role,
    refuses exactly the roles it does not name (403) and a missing token (401)."""
    bearers = {role: _bearer(_token(sessions, role, f"walker-{role.value}")) for role in TokenRole}
    routes = [
        r
        for router in ROUTERS
        for r in router.routes
        if isinstance(r, APIRoute) and r.path.startswith("/v1")
    ]
    checked = 0
    for route in routes:
        allowed: set[TokenRole] = set()
        stack = list(route.dependant.dependencies)
        while stack:
            dependency = stack.pop()
            if isinstance(dependency.call, Authenticator):
                allowed |= dependency.call.roles
            stack.extend(dependency.dependencies)
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        for method in route.methods:
            anonymous = client.request(method, path, json={})
            assert anonymous.status_code == 401, (method, path, anonymous.text)
            for role, bearer in bearers.items():
                reply = client.request(method, path, json={}, headers=bearer)
                refused = reply.status_code == 403
                assert refused == (role not in allowed), (method, path, role, reply.text)
                assert reply.status_code != 401 and reply.status_code < 500, (method, path, role)
                checked += 1
    assert checked >= 3 * len(routes)


def test_the_api_never_imports_torch() -> None:
    code = "import sys, api.app; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    assert result.stdout.strip() == "False"


def test_synthsentry_serve_answers_over_http(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    env["SYNTHSENTRY_DATA_DIR"] = str(tmp_path)
    server = subprocess.Popen(
        [sys.executable, "-m", "synthsentry.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                    body = json.loads(r.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "the server did not answer within 60 s"
                time.sleep(0.1)  # polling a condition with a deadline
        assert body == {"ok": True, "database": True, "broker": False}
    finally:
        server.terminate()
        server.wait(30)


def test_a_write_is_committed_before_the_answer_is_sent(
    client: TestClient, sessions: sessionmaker[Session], api_database: str
) -> None:
    """Seen from another connection at the moment the answer starts, the token the answer
    shows is already stored."""
    admin = _token(sessions, TokenRole.ADMIN, "ops")
    app = client.app
    body = json.dumps({"role": "moderator", "name": "committed-first"}).encode()
    seen_at_start: list[int] = []
    engine = make_engine(api_database)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            with engine.connect() as other:
                seen_at_start.append(
                    other.execute(
                        sa.text("SELECT count(*) FROM api_tokens WHERE name = 'committed-first'")
                    ).scalar_one()
                )
            assert message["status"] == 201

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/tokens",
        "raw_path": b"/v1/tokens",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"authorization", f"Bearer {admin}".encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    try:
        asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    finally:
        engine.dispose()
    assert seen_at_start == [1]
