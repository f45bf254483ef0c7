"""Signed callbacks end to end on real Postgres, with real HTTP receivers (a threaded HTTP
server in this process, plain and TLS) that verify every signature with the Standard
Webhooks library: the outbox written with the verdict, delivery and retries driven with an
injected clock, 410, timeouts, the retry window, secret rotation, the address guard at
connect time, the API and the CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api.app import create_app
from db import repository
from db.models import (
    ApiToken,
    AuditEvent,
    CallbackAttempt,
    CallbackDelivery,
    CallbackEndpoint,
    CallbackSecret,
    DeliveryState,
    Scan,
    Source,
    SourceKind,
    SourceStatus,
    TokenRole,
    utcnow,
)
from db.session import make_engine, make_sessionmaker, transaction
from synthsentry.cli import build_parser
from synthsentry.cli import callbacks as callbacks_cli
from synthsentry.cli.common import CliError
from synthsentry.runtime import Runtime
from synthsentry.settings import get_settings
from workers import callbacks, fleet, tokens
from workers.callbacks import CallbackPolicy, CallbackSender, SecretBox, deliver_due
from workers.ensemble import EnsembleConfig
from workers.intake import IntakeLimits
from workers.objects import LocalObjectStore

from apitest import build_test_api
from conftest import DatabaseFactory, SettingsFactory, emptied_sessions

KEY = "a secret key for the callback tests, long and random enough"
BOX = SecretBox(KEY)
BUCKET = "media"
ENSEMBLE = "weighted-mean@test"
DAY = dt.timedelta(hours=24)


# --- receivers --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """An HTTP server in a thread that records every request and answers as told: a queue
    of answers (``status``, extra headers, body), then ``default``. The answer ``"slow"``
    holds the request until ``release`` is set; ``"trickle"`` sends a byte every 50 ms
    until then."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Received] = []
        self.answers: deque[tuple[int | str, dict[str, str], bytes]] = deque()
        self.default: tuple[int | str, dict[str, str], bytes] = (200, {}, b"ok")
        self.release = threading.Event()
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.arrived:
                    receiver.requests.append(Received(self.path, dict(self.headers), body))
                    answer = receiver.answers.popleft() if receiver.answers else receiver.default
                    receiver.arrived.notify_all()
                status, headers, payload = answer
                if status == "trickle":  # a status line, then a header a byte at a time
                    with contextlib.suppress(OSError):
                        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                        while not receiver.release.wait(0.05):
                            self.wfile.write(b"a")
                            self.wfile.flush()
                    return
                if status == "slow":
                    receiver.release.wait(60)
                    status = 200
                self.send_response(int(status))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the sender read enough and hung up
                    self.wfile.write(payload)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str = "/hooks/synthsentry", host: str = "127.0.0.1") -> str:
        scheme = "http" if not isinstance(self.server.socket, ssl.SSLSocket) else "https"
        return f"{scheme}://{host}:{self.port}{path}"

    def script(self, *answers: int | str | tuple[int, dict[str, str], bytes]) -> None:
        for answer in answers:
            self.answers.append(answer if isinstance(answer, tuple) else (answer, {}, b""))

    def wait_for(self, count: int, timeout: float = 10) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.requests) >= count, timeout), (
                f"{len(self.requests)} requests arrived, expected {count}"
            )

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def _certificate(folder: Path, host: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{host}.crt", folder / f"{host}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# --- the database and the platform ------------------------------------------------------


@pytest.fixture(scope="module")
def database(committing_database: DatabaseFactory) -> str:
    return committing_database("callbacks")


@pytest.fixture
def sessions(database: str) -> Iterator[sessionmaker[Session]]:
    yield from emptied_sessions(database)


def _policy(**changes: Any) -> CallbackPolicy:
    values: dict[str, Any] = {"box": BOX, "allow_private": True, "timeout_s": 2.0}
    values.update(changes)
    return CallbackPolicy(**values)


@dataclasses.dataclass(frozen=True)
class Platform:
    token: str
    public_id: str
    id: int
    secret: str | None

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _platform(
    sessions: sessionmaker[Session],
    hosts: tuple[str, ...] = ("127.0.0.1",),
    name: str = "acme",
    role: TokenRole = TokenRole.PLATFORM,
) -> Platform:
    with transaction(sessions) as session:
        issued = tokens.issue_token(
            session,
            role=role,
            name=name,
            actor="test",
            secret_box=BOX,
            callback_hosts=hosts if role == TokenRole.PLATFORM else (),
        )
        row = repository.token_by_public_id(session, issued.public_id)
        assert row is not None
        return Platform(issued.token, issued.public_id, row.id, issued.callback_secret)


def _scan(
    session: Session,
    platform: Platform | None,
    url: str | None,
    *,
    status: SourceStatus = SourceStatus.REJECTED,
    image_id: int | None = None,
) -> Scan:
    """A platform's scan of an object (a refused one by default: its outcome is final)."""
    number = repository.count_rows(session, Scan) + 1
    source = Source(
        kind=SourceKind.HOOK,
        ref_key=f"scan:test{number}",
        bucket=BUCKET,
        object_key=f"uploads/{number}.png",
        status=status,
        image_id=image_id,
        reject_reason="not_an_image" if status == SourceStatus.REJECTED else None,
        reject_message="not an image" if status == SourceStatus.REJECTED else None,
    )
    session.add(source)
    session.flush()
    scan = Scan(
        public_id=f"scn_test{number}",
        token_id=platform.id if platform else None,
        source_id=source.id,
        callback_url=url,
    )
    session.add(scan)
    session.flush()
    return scan


def _completed(
    sessions: sessionmaker[Session], platform: Platform, url: str, count: int = 1
) -> list[str]:
    """Scans that completed and owe ``scan.completed`` callbacks: their public ids."""
    with transaction(sessions) as session:
        scans = [_scan(session, platform, url) for _ in range(count)]
        queued = callbacks.enqueue_scan_completed(
            session, [s.source_id for s in scans], active_ensemble=ENSEMBLE
        )
        assert queued == count
        return [s.public_id for s in scans]


def _delivery(sessions: sessionmaker[Session], scan_public_id: str) -> CallbackDelivery:
    with sessions() as session:
        return session.execute(
            sa.select(CallbackDelivery)
            .join(Scan, Scan.id == CallbackDelivery.scan_id)
            .where(Scan.public_id == scan_public_id)
        ).scalar_one()


def _attempts(sessions: sessionmaker[Session], delivery_id: int) -> list[CallbackAttempt]:
    with sessions() as session:
        return list(
            session.execute(
                sa.select(CallbackAttempt)
                .where(CallbackAttempt.delivery_id == delivery_id)
                .order_by(CallbackAttempt.id)
            ).scalars()
        )


def _verify(secret: str, request: Received) -> Any:
    return Webhook(secret).verify(request.body, request.headers)


# --- signing and rotation ---------------------------------------------------------------


def test_callbacks_are_signed_and_a_rotated_secret_signs_beside_the_new_one_for_a_day(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    platform = _platform(sessions)
    assert platform.secret is not None and platform.secret.startswith("whsec_")
    sender = CallbackSender(_policy())
    (first,) = _completed(sessions, platform, receiver.url())
    assert deliver_due(sessions, sender) == 1
    (request,) = receiver.requests
    event = _verify(platform.secret, request)
    assert event["type"] == "scan.completed" and event["data"]["scan"]["id"] == first
    assert dt.datetime.fromisoformat(event["timestamp"]).tzinfo is not None
    assert request.headers["webhook-id"].startswith("msg_")
    assert request.headers["Content-Type"] == "application/json"
    assert request.path == "/hooks/synthsentry"
    delivered = _delivery(sessions, first)
    assert (delivered.state, delivered.attempts, delivered.last_status) == (
        DeliveryState.DELIVERED,
        1,
        200,
    )
    (attempt,) = _attempts(sessions, delivered.id)
    assert attempt.status_code == 200 and attempt.error is None and attempt.duration_ms > 0
    # The payload is what GET /v1/scans/{id} answered when the scan completed.
    with sessions() as session:
        scan = session.execute(sa.select(Scan).where(Scan.public_id == first)).scalar_one()
        from workers.submissions import scan_document

        assert event["data"]["scan"] == scan_document(session, scan, active_ensemble=ENSEMBLE)
    # The secret is stored encrypted, and only this key reads it.
    with sessions() as session:
        (stored,) = session.execute(sa.select(CallbackSecret)).scalars()
    assert platform.secret not in stored.secret_encrypted
    assert BOX.decrypt(stored.secret_encrypted) == platform.secret

    # Rotation: the new secret and the previous one both sign, for 24 hours.
    with transaction(sessions) as session:
        token = session.get(ApiToken, platform.id)
        assert token is not None
        rotated = callbacks.rotate_secret(session, token, BOX, actor="test")
    assert rotated.secret != platform.secret and rotated.previous_expires_at is not None
    assert abs(rotated.previous_expires_at - (utcnow() + DAY)) < dt.timedelta(minutes=1)
    (during,) = _completed(sessions, platform, receiver.url())
    assert deliver_due(sessions, sender) == 1
    request = receiver.requests[-1]
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert _verify(platform.secret, request)["data"]["scan"]["id"] == during
    assert _verify(rotated.secret, request)["data"]["scan"]["id"] == during

    # A day later the previous secret no longer signs.
    (after,) = _completed(sessions, platform, receiver.url())
    assert deliver_due(sessions, sender, now=utcnow() + DAY + dt.timedelta(minutes=1)) == 1
    request = receiver.requests[-1]
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    assert _verify(rotated.secret, request)["data"]["scan"]["id"] == after
    with pytest.raises(WebhookVerificationError):
        _verify(platform.secret, request)
    # Each event kept its own webhook-id.
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 3


def test_a_second_rotation_within_the_day_stops_the_oldest_secret_at_once(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    platform = _platform(sessions)
    assert platform.secret is not None
    with transaction(sessions) as session:
        token = session.get(ApiToken, platform.id)
        assert token is not None
        second = callbacks.rotate_secret(session, token, BOX, actor="test").secret
        third = callbacks.rotate_secret(session, token, BOX, actor="test").secret
    _completed(sessions, platform, receiver.url())
    assert deliver_due(sessions, CallbackSender(_policy())) == 1
    (request,) = receiver.requests
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert _verify(third, request) and _verify(second, request)
    with pytest.raises(WebhookVerificationError):
        _verify(platform.secret, request)


# --- retries, 410, timeouts, the retry window -------------------------------------------


def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    platform = _platform(sessions)
    assert platform.secret is not None
    sender = CallbackSender(_policy())
    (scan,) = _completed(sessions, platform, receiver.url())
    receiver.script((500, {}, b"database down\x00\n" + b"x" * 100_000), 200)
    t0 = utcnow()
    assert deliver_due(sessions, sender, now=t0) == 1
    pending = _delivery(sessions, scan)
    assert (pending.state, pending.attempts, pending.last_status) == (
        DeliveryState.PENDING,
        1,
        500,
    )
    assert pending.last_error is not None and pending.last_error.startswith(
        "answered 500: database down"
    )
    assert len(pending.last_error) < 300  # the answer was read a few KiB deep, not whole
    wait = pending.next_attempt_at - t0
    assert dt.timedelta(seconds=15) <= wait <= dt.timedelta(seconds=30)  # 30 s, jittered
    assert deliver_due(sessions, sender, now=t0 + dt.timedelta(seconds=14)) == 0  # not due yet
    assert deliver_due(sessions, sender, now=pending.next_attempt_at) == 1
    done = _delivery(sessions, scan)
    assert (done.state, done.attempts, done.last_status, done.last_error) == (
        DeliveryState.DELIVERED,
        2,
        200,
        None,
    )
    assert [a.status_code for a in _attempts(sessions, done.id)] == [500, 200]
    # Both attempts carried the same webhook-id and verify.
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    for request in receiver.requests:
        _verify(platform.secret, request)


def test_backoff_doubles_with_jitter_up_to_a_cap() -> None:
    assert callbacks.backoff(1, uniform=lambda a, b: b) == dt.timedelta(seconds=30)
    assert callbacks.backoff(3, uniform=lambda a, b: b) == dt.timedelta(seconds=120)
    assert callbacks.backoff(3, uniform=lambda a, b: a) == dt.timedelta(seconds=60)
    assert callbacks.backoff(40, uniform=lambda a, b: b) == dt.timedelta(hours=4)
    waits = {callbacks.backoff(5) for _ in range(20)}
    assert len(waits) > 1 and all(
        dt.timedelta(minutes=4) <= w <= dt.timedelta(minutes=8) for w in waits
    )


def test_410_disables_the_endpoint_and_its_pending_deliveries(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    platform = _platform(sessions)
    sender = CallbackSender(_policy())
    gone, waiting = _completed(sessions, platform, receiver.url(), count=2)
    (elsewhere,) = _completed(sessions, platform, receiver.url("/another/endpoint"))
    receiver.script(410)
    assert deliver_due(sessions, sender, limit=1) == 1
    assert [_delivery(sessions, s).state for s in (gone, waiting, elsewhere)] == [
        DeliveryState.DISABLED,
        DeliveryState.DISABLED,
        DeliveryState.PENDING,  # another URL of the same platform is another endpoint
    ]
    with sessions() as session:
        endpoint = session.execute(
            sa.select(CallbackEndpoint).where(CallbackEndpoint.url == receiver.url())
        ).scalar_one()
    assert endpoint.disabled_at is not None and "410" in (endpoint.disabled_reason or "")
    assert deliver_due(sessions, sender) == 1  # only the other endpoint's
    assert len(receiver.requests) == 2
    # A later event for the disabled endpoint is recorded, and not sent.
    (later,) = _completed(sessions, platform, receiver.url())
    assert _delivery(sessions, later).state == DeliveryState.DISABLED
    assert deliver_due(sessions, sender) == 0

    # The platform asks for one again: its endpoint is enabled (audited), the others stay.
    with transaction(sessions) as session:
        again = callbacks.redeliver(
            session, _delivery(sessions, waiting).public_id, token_id=platform.id, actor="p"
        )
    assert again.state == DeliveryState.PENDING and not again.endpoint_disabled
    assert deliver_due(sessions, sender) == 1
    assert _delivery(sessions, waiting).state == DeliveryState.DELIVERED
    assert _delivery(sessions, later).state == DeliveryState.DISABLED
    with sessions() as session:
        actions = list(session.execute(sa.select(AuditEvent.action)).scalars())
    assert {"callback_endpoint.enabled", "callback_delivery.redelivered"} <= set(actions)


def test_a_slow_receiver_runs_into_the_timeout(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    platform = _platform(sessions)
    (scan,) = _completed(sessions, platform, receiver.url())
    receiver.script("slow")
    started = time.monotonic()
    assert deliver_due(sessions, CallbackSender(_policy(timeout_s=0.3))) == 1
    assert time.monotonic() - started < 10  # the 0.3 s timeout, not the receiver's 60 s
    receiver.release.set()
    delivery = _delivery(sessions, scan)
    assert delivery.state == DeliveryState.PENDING and delivery.last_status is None
    (attempt,) = _attempts(sessions, delivery.id)
    assert attempt.error is not None and "timed out" in attempt.error
    assert attempt.duration_ms is not None and 250 <= attempt.duration_ms < 10_000


def test_a_receiver_that_trickles_its_answer_is_cut_off(receiver: Receiver) -> None:
    receiver.script("trickle")
    # Reads may wait 5 s each: only the 0.6 s limit on the whole attempt can end this one.
    answer = _post(
        _ShortLimit(box=BOX, allow_private=True, timeout_s=5.0, limit_s=0.6), receiver.url()
    )
    receiver.release.set()
    assert answer.status is None and "timed out" in (answer.error or "")
    assert "0.6 s in all" in (answer.error or "")
    assert 550 <= answer.duration_ms < 5000  # each read was quick; all of them were not


def test_the_retry_window_ends_in_failed_and_a_redelivery_is_one_more_try(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    platform = _platform(sessions)
    sender = CallbackSender(_policy())
    (scan,) = _completed(sessions, platform, receiver.url())
    receiver.default = (503, {}, b"")
    t0 = utcnow()
    assert deliver_due(sessions, sender, now=t0) == 1
    # Retried until the window's end, never past it: the last try is at its end.
    late = t0 + DAY - dt.timedelta(seconds=10)
    assert deliver_due(sessions, sender, now=late) == 1
    pending = _delivery(sessions, scan)
    assert pending.state == DeliveryState.PENDING
    assert pending.next_attempt_at == pending.created_at + DAY
    assert deliver_due(sessions, sender, now=pending.next_attempt_at) == 1
    failed = _delivery(sessions, scan)
    assert (failed.state, failed.attempts, failed.last_status) == (DeliveryState.FAILED, 3, 503)
    assert failed.finished_at is not None
    assert deliver_due(sessions, sender, now=t0 + 2 * DAY) == 0
    # Asked for again after the window: one more try, failed again when it fails.
    later = t0 + 2 * DAY
    with transaction(sessions) as session:
        callbacks.redeliver(session, failed.public_id, token_id=None, actor="ops", now=later)
    assert deliver_due(sessions, sender, now=later) == 1
    assert _delivery(sessions, scan).state == DeliveryState.FAILED
    receiver.default = (200, {}, b"")
    with transaction(sessions) as session:
        callbacks.redeliver(session, failed.public_id, token_id=None, actor="ops", now=later)
    assert deliver_due(sessions, sender, now=later) == 1
    assert _delivery(sessions, scan).state == DeliveryState.DELIVERED
    assert len(_attempts(sessions, failed.id)) == 5


def test_what_the_guard_refuses_at_send_time_fails_for_good(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    platform = _platform(sessions)
    removed, revoked = _completed(sessions, platform, receiver.url(), count=2)
    with transaction(sessions) as session:
        token = session.get(ApiToken, platform.id)
        assert token is not None
        callbacks.replace_hosts(session, token, ["hooks.example.com"], actor="ops")
    assert deliver_due(sessions, CallbackSender(_policy()), limit=1) == 1
    refused = _delivery(sessions, removed)
    assert refused.state == DeliveryState.FAILED and "not allowed" in (refused.last_error or "")
    with transaction(sessions) as session:
        callbacks.replace_hosts(session, token, ["127.0.0.1"], actor="ops")
        tokens.revoke(session, platform.public_id, actor="ops")
    assert deliver_due(sessions, CallbackSender(_policy())) == 1
    assert _delivery(sessions, revoked).last_error == "the token was revoked"
    assert receiver.requests == []


def test_every_attempt_counts_by_its_outcome(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    """``synthsentry_callback_deliveries_total``: delivered; failed (tried again later);
    gave_up (the retry window passed, or the endpoint answered 410 Gone); refused (never
    sent: the address guard)."""
    from metric_names import counted

    def counts() -> dict[str, float]:
        return {
            outcome: counted("synthsentry_callback_deliveries_total", outcome=outcome)
            for outcome in ("delivered", "failed", "gave_up", "refused")
        }

    platform = _platform(sessions)
    sender = CallbackSender(_policy())
    before = counts()
    (late,) = _completed(sessions, platform, receiver.url("/late"))
    receiver.default = (500, {}, b"")
    t0 = utcnow()
    assert deliver_due(sessions, sender, now=t0) == 1  # failed, retried later
    assert deliver_due(sessions, sender, now=t0 + DAY) == 1  # failed at the window's end
    assert _delivery(sessions, late).state == DeliveryState.FAILED
    _completed(sessions, platform, receiver.url("/ok"))
    receiver.script(200)
    assert deliver_due(sessions, sender) == 1
    _completed(sessions, platform, receiver.url("/gone"))
    receiver.script(410)
    assert deliver_due(sessions, sender) == 1
    (refused,) = _completed(sessions, platform, receiver.url("/refused"))
    with transaction(sessions) as session:
        token = session.get(ApiToken, platform.id)
        assert token is not None
        callbacks.replace_hosts(session, token, ["hooks.example.com"], actor="ops")
    assert deliver_due(sessions, sender) == 1
    assert _delivery(sessions, refused).state == DeliveryState.FAILED
    after = counts()
    assert {outcome: after[outcome] - before[outcome] for outcome in after} == {
        "delivered": 1,
        "failed": 1,
        "gave_up": 2,
        "refused": 1,
    }
    assert len(receiver.requests) == 4  # the refused one was never sent


# --- the address guard at connect time --------------------------------------------------


def _post(policy: CallbackPolicy, url: str) -> callbacks.Answer:
    return CallbackSender(policy).post(url, b"{}", {"Content-Type": "application/json"})


def test_a_host_name_that_resolves_to_a_private_address_is_never_connected_to(
    receiver: Receiver,
) -> None:
    answers = {
        "inner.example": ["127.0.0.1"],
        "mapped.example": ["::ffff:127.0.0.1"],
        "mixed.example": ["93.184.216.34", "127.0.0.1"],
        "meta.example": ["169.254.169.254"],
        "six.example": ["fd00:ec2::254"],
    }
    strict = CallbackPolicy(box=BOX, resolver=answers.__getitem__)
    for host, address in answers.items():
        answer = _post(strict, f"https://{host}:{receiver.port}/cb")
        assert answer.refused and answer.status is None, host
        assert f"{host} resolves to a forbidden address" in (answer.error or "")
        assert ipaddress.ip_address(address[-1]).compressed in (answer.error or "")
    for literal in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]", "169.254.169.254", "0.0.0.0"):
        answer = _post(strict, f"https://{literal}:{receiver.port}/cb")
        assert answer.refused, literal
    # Plain http is for development only.
    answer = _post(strict, receiver.url())
    assert answer.refused and "https" in (answer.error or "")
    assert receiver.requests == []
    # Where private addresses are allowed (development), the local receiver is reached.
    answer = _post(dataclasses.replace(strict, allow_private=True), receiver.url())
    assert answer.delivered and len(receiver.requests) == 1

    # A name that does not resolve is worth another try, not refused for good.
    def nowhere(host: str) -> list[str]:
        raise OSError("no such host")

    answer = _post(CallbackPolicy(resolver=nowhere), "https://gone.example/cb")
    assert not answer.refused and "could not resolve" in (answer.error or "")


def test_a_redirect_is_a_failed_attempt_and_never_followed(receiver: Receiver) -> None:
    inner = Receiver()  # stands for a private service the redirect points at
    try:
        receiver.script((302, {"Location": inner.url("/latest/meta-data/")}, b""))
        answer = _post(_policy(), receiver.url())
        assert answer.status == 302 and not answer.delivered and not answer.refused
        assert "redirects are not followed" in (answer.error or "")
        assert inner.url("/latest/meta-data/") in (answer.error or "")
        assert len(receiver.requests) == 1 and inner.requests == []
    finally:
        inner.close()


def test_tls_goes_to_the_checked_address_and_verifies_the_host_name(tmp_path: Path) -> None:
    cert, key = _certificate(tmp_path, "receiver.test")
    serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serving.load_cert_chain(cert, key)
    server = Receiver(tls=serving)
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        looked_up: list[str] = []

        def resolver(host: str) -> list[str]:
            looked_up.append(host)
            return ["127.0.0.1"]

        policy = _policy(tls=trust, resolver=resolver)
        answer = _post(policy, server.url(host="receiver.test"))
        assert answer.delivered, answer.error
        assert looked_up == ["receiver.test"]  # resolved once, by the guard
        assert server.requests[0].headers["Host"] == f"receiver.test:{server.port}"
        # A certificate for another name is refused, whatever address it answers on.
        answer = _post(policy, server.url(host="other.test"))
        assert not answer.delivered and "TLS failed" in (answer.error or "")
        assert "other.test" in (answer.error or "") or "mismatch" in (answer.error or "")
        assert len(server.requests) == 1
    finally:
        server.close()


def test_every_checked_address_is_tried_in_turn(receiver: Receiver) -> None:
    # A dual-stack name seen from a machine without IPv6 (or with the receiver on IPv4
    # only): the first address refuses, the second takes the request.
    answers = {
        "dual.test": ["::1", "127.0.0.1"],
        "nowhere.test": ["::1", "127.0.0.2"],  # nothing listens on either
    }
    answer = _post(_policy(resolver=answers.__getitem__), receiver.url(host="dual.test"))
    assert answer.delivered, answer.error
    assert len(receiver.requests) == 1
    assert receiver.requests[0].headers["Host"] == f"dual.test:{receiver.port}"
    answer = _post(_policy(resolver=answers.__getitem__), receiver.url(host="nowhere.test"))
    assert answer.status is None and not answer.refused
    assert (answer.error or "").startswith("could not connect to ::1 (")
    assert "127.0.0.2 (" in (answer.error or "")
    assert len(receiver.requests) == 1


@dataclasses.dataclass(frozen=True)
class _ShortLimit(CallbackPolicy):
    """Generous timeouts under a short limit for the whole attempt: only the limit can end
    an attempt that is stuck somewhere."""

    limit_s: float = 0.4

    @property
    def attempt_limit_s(self) -> float:
        return self.limit_s


def test_a_lookup_that_hangs_ends_within_the_attempts_limit() -> None:
    answered = threading.Event()

    def stuck(host: str) -> list[str]:
        answered.wait(60)
        return ["127.0.0.1"]

    policy = _ShortLimit(box=BOX, allow_private=True, timeout_s=30.0, resolver=stuck)
    try:
        answer = _post(policy, "http://stuck.test:9/cb")
    finally:
        answered.set()
    assert answer.status is None and not answer.refused  # worth another try
    assert "could not resolve stuck.test: no answer within 0.4 s" in (answer.error or "")
    assert 350 <= answer.duration_ms < 10_000  # the limit, not the 30 s timeout


def test_a_tls_handshake_that_never_ends_is_cut_off(tmp_path: Path) -> None:
    # The receiver takes the connection and starts its side of the handshake a byte at a
    # time, then nothing: the handshake never ends, and only the attempt's limit ends it.
    cert, _ = _certificate(tmp_path, "stall.test")
    listener = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()
    accepted = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            connection, _ = listener.accept()
            with connection:
                accepted.set()
                connection.sendall(b"\x16\x03\x03\x3f\xff")  # a 16 KiB handshake record
                while not release.wait(0.05):
                    connection.sendall(b"\x00")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    port = listener.getsockname()[1]
    policy = _ShortLimit(
        box=BOX,
        allow_private=True,
        timeout_s=30.0,
        tls=ssl.create_default_context(cafile=str(cert)),
        resolver=lambda host: ["127.0.0.1"],
    )
    try:
        answer = _post(policy, f"https://stall.test:{port}/cb")
    finally:
        release.set()
        listener.close()
        server.join(5)
    assert accepted.is_set()
    assert answer.status is None and not answer.refused
    assert "timed out" in (answer.error or "") and "0.4 s in all" in (answer.error or "")
    assert 350 <= answer.duration_ms < 10_000  # the limit, not the 30 s handshake timeout


# --- durability: the outbox and the sender ----------------------------------------------


def _fleet_context(sessions: sessionmaker[Session], root: Path) -> fleet.FleetContext:
    store = LocalObjectStore(root)
    return fleet.FleetContext(
        session_factory=sessions,
        s3=lambda: store,
        limits=IntakeLimits(max_bytes=1 << 20, max_pixels=1 << 22, decode_timeout_s=10),
        ensemble=EnsembleConfig(threshold=0.5),
        detectors=["alpha", "beta"],
    )


def test_the_callback_is_queued_in_the_verdicts_transaction(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    platform = _platform(sessions)
    ctx = _fleet_context(sessions, tmp_path)
    ctx.ensemble_id()
    with transaction(sessions) as session:
        image = repository.get_or_create_image(
            session, repository.ImageFacts(sha256="ab" * 32, size_bytes=10)
        )
        for name, score in (("alpha", 0.9), ("beta", 0.7)):
            repository.save_detection(
                session,
                image.id,
                repository.DetectionRecord(name, "1", None, score, {}, 5.0),
            )
        scan = _scan(
            session,
            platform,
            "http://127.0.0.1:9/cb",
            status=SourceStatus.PENDING,
            image_id=image.id,
        )
        _scan(session, platform, None, status=SourceStatus.PENDING, image_id=image.id)
        image_id, scan_id = image.id, scan.public_id

    class Crash(Exception):
        pass

    with pytest.raises(Crash), transaction(sessions) as session:
        assert fleet.conclude(session, ctx, image_id) is not None
        assert repository.count_rows(session, CallbackDelivery) == 1  # written here ...
        raise Crash  # ... and the verdict's transaction never commits
    with sessions() as session:
        assert repository.count_rows(session, CallbackDelivery) == 0
        assert (
            repository.current_verdict(session, image_id, ensemble_version=ctx.ensemble.version)
            is None
        )

    with transaction(sessions) as session:
        assert fleet.conclude(session, ctx, image_id) is not None
    with transaction(sessions) as session:  # concluded again: nothing new is owed
        fleet.conclude(session, ctx, image_id)
    delivery = _delivery(sessions, scan_id)
    assert delivery.event_type == "scan.completed" and delivery.state == DeliveryState.PENDING
    assert delivery.payload["data"]["scan"]["id"] == scan_id
    assert delivery.payload["data"]["scan"]["finished"] is True
    with sessions() as session:
        assert repository.count_rows(session, CallbackDelivery) == 1


def test_a_refused_upload_completes_its_scan(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    platform = _platform(sessions)
    ctx = _fleet_context(sessions, tmp_path)
    ctx.s3().put_object(Bucket=BUCKET, Key="uploads/1.png", Body=b"this is not an image")
    with transaction(sessions) as session:
        scan = _scan(session, platform, "http://127.0.0.1:9/cb", status=SourceStatus.PENDING)
        source_id, scan_id = scan.source_id, scan.public_id
    assert fleet.take_in(ctx, source_id) == []
    delivery = _delivery(sessions, scan_id)
    assert delivery.event_type == "scan.completed"
    document = delivery.payload["data"]["scan"]
    assert document["id"] == scan_id and document["finished"] is True
    assert "rejected" in json.dumps(document)


def test_a_moderators_decision_is_sent_to_every_scan_of_the_image(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    acme, other = _platform(sessions, name="acme"), _platform(sessions, name="other")
    assert acme.secret is not None
    with transaction(sessions) as session:
        image = repository.get_or_create_image(
            session, repository.ImageFacts(sha256="cd" * 32, size_bytes=10)
        )
        first = _scan(session, acme, receiver.url("/a"), image_id=image.id)
        second = _scan(session, other, receiver.url("/b"), image_id=image.id)
        _scan(session, acme, None, image_id=image.id)  # asked for no callback
        queued = callbacks.enqueue_review_decided(
            session,
            image.id,
            decision="ai_generated",
            decided_at=dt.datetime(2026, 11, 30, 3, 0, tzinfo=dt.UTC),
            actor="moderator:alice",
            active_ensemble=ENSEMBLE,
        )
        ids = {first.public_id: acme, second.public_id: other}
    assert queued == 2
    assert deliver_due(sessions, CallbackSender(_policy())) == 2
    for request in receiver.requests:
        platform = acme if request.path == "/a" else other
        assert platform.secret is not None
        event = _verify(platform.secret, request)
        assert event["type"] == "review.decided"
        assert ids[event["data"]["scan"]["id"]] == platform
        # What was decided and when; never by whom, nor the moderator's note.
        review = event["data"]["review"]
        assert set(review) == {"decision", "decided_at"}
        assert review["decision"] == "ai_generated"
        assert review["decided_at"] == "2026-11-30T03:00:00+00:00"  # as the case records it
        assert set(event["data"]) == {"scan", "review"}
        assert "alice" not in request.body.decode()


def test_a_killed_senders_claim_comes_back_when_its_lease_runs_out(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    platform = _platform(sessions)
    (scan,) = _completed(sessions, platform, receiver.url())
    t0 = utcnow()
    lease_until = t0 + dt.timedelta(minutes=2)
    # Another sender claimed the row and died before sending.
    with transaction(sessions) as session:
        claimed = repository.claim_due_deliveries(
            session, now=t0, limit=10, lease_until=lease_until
        )
        assert len(claimed) == 1
    sender = CallbackSender(_policy())
    assert deliver_due(sessions, sender, now=t0 + dt.timedelta(minutes=1)) == 0
    assert deliver_due(sessions, sender, now=lease_until) == 1
    assert _delivery(sessions, scan).state == DeliveryState.DELIVERED


def test_senders_side_by_side_skip_each_others_rows(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    platform = _platform(sessions)
    _completed(sessions, platform, receiver.url(), count=3)
    now = utcnow()
    with transaction(sessions) as one:
        mine = repository.claim_due_deliveries(
            one, now=now, limit=2, lease_until=now + dt.timedelta(minutes=5)
        )
        # While the first claim is not committed, a second sender neither waits for its
        # rows nor takes them: it takes the one left.
        with transaction(sessions) as two:
            two.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            theirs = repository.claim_due_deliveries(
                two, now=now, limit=10, lease_until=now + dt.timedelta(minutes=5)
            )
        assert len(mine) == 2 and len(theirs) == 1
        assert {r.id for r in mine}.isdisjoint(r.id for r in theirs)


def test_the_sender_loop_sends_until_stopped(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    platform = _platform(sessions)
    stop = threading.Event()
    thread = threading.Thread(
        target=callbacks.run_sender,
        args=(stop, sessions, CallbackSender(_policy())),
        kwargs={"idle_s": 0.05},
    )
    thread.start()
    try:
        _completed(sessions, platform, receiver.url(), count=2)
        receiver.wait_for(2)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    with sessions() as session:
        states = session.execute(sa.select(CallbackDelivery.state)).scalars().all()
    assert sorted(states) == [DeliveryState.DELIVERED] * 2


# --- the API ----------------------------------------------------------------------------


@pytest.fixture
def client(sessions: sessionmaker[Session], tmp_path: Path) -> TestClient:
    built = build_test_api(sessions, tmp_path)
    context = dataclasses.replace(built.context, callbacks=_policy())
    return TestClient(create_app(context))


def test_platforms_see_and_redeliver_only_their_own_deliveries(
    sessions: sessionmaker[Session], receiver: Receiver, client: TestClient
) -> None:
    acme, other = _platform(sessions, name="acme"), _platform(sessions, name="other")
    admin = _platform(sessions, name="ops", role=TokenRole.ADMIN)
    moderator = _platform(sessions, name="alice", role=TokenRole.MODERATOR)
    sender = CallbackSender(_policy())
    (acme_scan,) = _completed(sessions, acme, receiver.url())
    (other_scan,) = _completed(sessions, other, receiver.url())
    receiver.default = (500, {}, b"")
    t0 = utcnow()
    assert deliver_due(sessions, sender, now=t0) == 2
    assert deliver_due(sessions, sender, now=t0 + DAY + dt.timedelta(seconds=1)) == 2
    failed = _delivery(sessions, acme_scan).public_id
    theirs = _delivery(sessions, other_scan).public_id

    listed = client.get("/v1/callbacks/deliveries?state=failed", headers=acme.bearer)
    assert listed.status_code == 200, listed.text
    (entry,) = listed.json()
    assert entry["id"] == failed and entry["scan_id"] == acme_scan
    assert entry["state"] == "failed" and entry["attempts"] == 2 and entry["last_status"] == 500
    assert client.get("/v1/callbacks/deliveries?state=delivered", headers=acme.bearer).json() == []
    everyone = client.get("/v1/callbacks/deliveries", headers=admin.bearer).json()
    assert {d["id"] for d in everyone} == {failed, theirs}
    one = client.get(f"/v1/callbacks/deliveries?token={other.public_id}", headers=admin.bearer)
    assert [d["id"] for d in one.json()] == [theirs]
    snooping = client.get(f"/v1/callbacks/deliveries?token={other.public_id}", headers=acme.bearer)
    assert snooping.status_code == 403

    detail = client.get(f"/v1/callbacks/deliveries/{failed}", headers=acme.bearer)
    assert detail.status_code == 200
    assert [a["status_code"] for a in detail.json()["attempt_log"]] == [500, 500]
    for path, method in (
        (f"/v1/callbacks/deliveries/{theirs}", "GET"),
        (f"/v1/callbacks/deliveries/{theirs}/redeliver", "POST"),
        ("/v1/callbacks/deliveries/msg_nosuchdelivery", "GET"),
    ):
        answer = client.request(method, path, headers=acme.bearer)
        assert answer.status_code == 404, path
        assert answer.headers["content-type"] == "application/problem+json"
    assert client.get("/v1/callbacks/deliveries", headers=moderator.bearer).status_code == 403
    assert client.get("/v1/callbacks/deliveries").status_code == 401
    assert client.post(f"/v1/callbacks/deliveries/{failed}/redeliver").status_code == 401

    receiver.default = (200, {}, b"")
    again = client.post(f"/v1/callbacks/deliveries/{failed}/redeliver", headers=acme.bearer)
    assert again.status_code == 202 and again.json()["state"] == "pending"
    assert _delivery(sessions, other_scan).state == DeliveryState.FAILED  # untouched
    assert deliver_due(sessions, sender) == 1
    assert (
        client.get(f"/v1/callbacks/deliveries/{failed}", headers=admin.bearer).json()["state"]
        == "delivered"
    )
    with sessions() as session:
        (audit,) = session.execute(
            sa.select(AuditEvent).where(AuditEvent.action == "callback_delivery.redelivered")
        ).scalars()
    assert audit.actor == f"token:{acme.public_id}"
    assert audit.details["previous_state"] == "failed"


def test_a_platform_rotates_its_secret_and_an_admin_keeps_its_hosts(
    sessions: sessionmaker[Session], client: TestClient
) -> None:
    admin = _platform(sessions, name="ops", role=TokenRole.ADMIN)
    made = client.post(
        "/v1/tokens",
        json={"role": "platform", "name": "acme", "callback_hosts": ["Hooks.Example.com"]},
        headers=admin.bearer,
    )
    assert made.status_code == 201, made.text
    issued = made.json()
    assert issued["callback_secret"].startswith("whsec_")
    assert issued["callback_hosts"] == ["hooks.example.com"]
    platform = {"Authorization": f"Bearer {issued['token']}"}
    listed = client.get("/v1/tokens", headers=admin.bearer)
    assert issued["callback_secret"] not in listed.text

    rotated = client.post("/v1/callbacks/secret", headers=platform)
    assert rotated.status_code == 201, rotated.text
    body = rotated.json()
    assert body["secret"].startswith("whsec_") and body["secret"] != issued["callback_secret"]
    assert body["previous_secret_expires_at"] is not None
    assert client.post("/v1/callbacks/secret", headers=admin.bearer).status_code == 403
    assert client.post("/v1/callbacks/secret").status_code == 401

    hosts = f"/v1/tokens/{issued['public_id']}/callback-hosts"
    assert client.get(hosts, headers=admin.bearer).json() == {
        "token": issued["public_id"],
        "hosts": ["hooks.example.com"],
    }
    put = client.put(hosts, json={"hosts": ["b.example", "A.example."]}, headers=admin.bearer)
    assert put.status_code == 200 and put.json()["hosts"] == ["a.example", "b.example"]
    assert client.get(hosts, headers=admin.bearer).json()["hosts"] == ["a.example", "b.example"]
    bad = client.put(hosts, json={"hosts": ["not a host"]}, headers=admin.bearer)
    assert bad.status_code == 400 and "not a host name" in bad.json()["detail"]
    assert client.get(hosts, headers=platform).status_code == 403
    assert (
        client.get("/v1/tokens/000000000000/callback-hosts", headers=admin.bearer).status_code
        == 404
    )
    admin_hosts = f"/v1/tokens/{admin.public_id}/callback-hosts"
    refused = client.put(admin_hosts, json={"hosts": ["a.example"]}, headers=admin.bearer)
    assert refused.status_code == 400 and "platform tokens" in refused.json()["detail"]
    with sessions() as session:
        actions = list(session.execute(sa.select(AuditEvent.action)).scalars())
        with_hosts = repository.token_by_public_id(session, issued["public_id"])
        assert with_hosts is not None
        assert (
            callbacks.check_callback_url(
                session, with_hosts.id, "https://a.example/cb", allow_private=False
            )
            == "https://a.example/cb"
        )
        with pytest.raises(callbacks.CallbackRefused, match=r"hooks\.example\.com are not allowed"):
            callbacks.check_callback_url(
                session, with_hosts.id, "https://hooks.example.com/cb", allow_private=False
            )
    assert actions.count("callback_hosts.replaced") == 2
    assert "callback_secret.rotated" in actions


def test_without_a_secret_key_no_secret_is_made(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    # A context whose callback policy cannot sign (serve always builds one that can).
    unsigned = dataclasses.replace(
        build_test_api(sessions, tmp_path).context, callbacks=callbacks.CallbackPolicy()
    )
    client = TestClient(create_app(unsigned))
    admin = _platform(sessions, name="ops", role=TokenRole.ADMIN)
    made = client.post("/v1/tokens", json={"role": "platform", "name": "x"}, headers=admin.bearer)
    assert made.status_code == 201 and made.json()["callback_secret"] is None
    platform = {"Authorization": f"Bearer {made.json()['token']}"}
    unavailable = client.post("/v1/callbacks/secret", headers=platform)
    assert unavailable.status_code == 503
    assert unavailable.json()["type"].endswith(":callbacks-unavailable")
    # Callbacks it could not sign are refused when a scan asks for them.
    with transaction(sessions) as session:
        token = repository.token_by_public_id(session, made.json()["public_id"])
        assert token is not None
        callbacks.replace_hosts(session, token, ["hooks.example.com"], actor="ops")
        with pytest.raises(callbacks.CallbackRefused, match="no callback signing secret"):
            callbacks.check_callback_url(
                session, token.id, "https://hooks.example.com/cb", allow_private=False
            )


# --- changing the secret key ------------------------------------------------------------

NEW_KEY = "the secret key that replaces the callback tests' one, long and random"


def _stored_secrets(sessions: sessionmaker[Session]) -> list[CallbackSecret]:
    with sessions() as session:
        return list(
            session.execute(sa.select(CallbackSecret).order_by(CallbackSecret.id)).scalars()
        )


def test_a_changed_secret_key_signs_with_the_previous_one_until_rotate_key_moves_it(
    sessions: sessionmaker[Session],
    receiver: Receiver,
    database: str,
    isolated_settings: SettingsFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    platform = _platform(sessions)  # its secret stored under KEY
    assert platform.secret is not None

    def cli(*argv: str) -> str:
        args = build_parser().parse_args(["callbacks", *argv])
        assert callbacks_cli.run(args, get_settings()) == 0
        return capsys.readouterr().out

    # The new key is rolled out with the old one kept as a previous key.
    changed = isolated_settings(
        database_url=database,
        secret_key=NEW_KEY,
        secret_key_previous=json.dumps([KEY]),
        callback_allow_private_addresses="true",
    )
    box = Runtime.from_settings(changed).callback_policy().box
    assert box is not None
    (first,) = _completed(sessions, platform, receiver.url())
    assert "1 callback(s) attempted" in cli("deliver", "--once")
    assert _verify(platform.secret, receiver.requests[-1])["data"]["scan"]["id"] == first
    # The platform rotates during the change: its new secret is written under the new key,
    # the previous one (under the old key) keeps signing beside it through the overlap.
    with transaction(sessions) as session:
        token = session.get(ApiToken, platform.id)
        assert token is not None
        rotated = callbacks.rotate_secret(session, token, box, actor="test").secret
    (second,) = _completed(sessions, platform, receiver.url())
    assert "1 callback(s) attempted" in cli("deliver", "--once")
    request = receiver.requests[-1]
    assert _verify(platform.secret, request)["data"]["scan"]["id"] == second
    assert _verify(rotated, request)["data"]["scan"]["id"] == second

    out = cli("rotate-key")
    assert "1 callback signing secret(s) re-encrypted" in out and "1 already were" in out
    assert "SYNTHSENTRY_SECRET_KEY_PREVIOUS" in out
    stored = _stored_secrets(sessions)
    assert [SecretBox(NEW_KEY).decrypt(row.secret_encrypted) for row in stored] == [
        platform.secret,
        rotated,
    ]
    for row in stored:
        with pytest.raises(callbacks.SecretUnreadable):
            BOX.decrypt(row.secret_encrypted)
    with sessions() as session:
        audited = session.execute(
            sa.select(AuditEvent).where(AuditEvent.action == "callback_secrets.reencrypted")
        ).scalar_one()
    assert (audited.subject_type, audited.subject_id) == ("api_token", platform.id)
    assert audited.details == {"public_id": platform.public_id, "secrets": 1}
    assert audited.actor.startswith("cli:")

    # The old key is dropped: the new one alone signs with both secrets.
    isolated_settings(secret_key_previous="")
    (third,) = _completed(sessions, platform, receiver.url())
    assert "1 callback(s) attempted" in cli("deliver", "--once")
    request = receiver.requests[-1]
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert _verify(platform.secret, request)["data"]["scan"]["id"] == third
    assert _verify(rotated, request)["data"]["scan"]["id"] == third
    assert all(
        _delivery(sessions, scan).state == DeliveryState.DELIVERED
        for scan in (first, second, third)
    )
    # Once more: nothing is left to rewrite.
    out = cli("rotate-key")
    assert "0 callback signing secret(s) re-encrypted" in out and "2 already were" in out
    assert [row.secret_encrypted for row in _stored_secrets(sessions)] == [
        row.secret_encrypted for row in stored
    ]


def test_a_secret_under_an_unknown_key_fails_its_attempts_and_blocks_rotate_key(
    sessions: sessionmaker[Session],
    receiver: Receiver,
    database: str,
    isolated_settings: SettingsFactory,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lost = _platform(sessions, name="lost")  # under KEY, which the process no longer has
    older_key = "a key from before the callback tests' one, long and random"
    with transaction(sessions) as session:
        issued = tokens.issue_token(
            session,
            role=TokenRole.PLATFORM,
            name="kept",
            actor="test",
            secret_box=SecretBox(older_key),
            callback_hosts=("127.0.0.1",),
        )
        row = repository.token_by_public_id(session, issued.public_id)
        assert row is not None and issued.callback_secret is not None
        kept = Platform(issued.token, issued.public_id, row.id, issued.callback_secret)
    sender = CallbackSender(_policy(box=SecretBox(NEW_KEY, [older_key])))
    (unsigned,) = _completed(sessions, lost, receiver.url())
    (signed,) = _completed(sessions, kept, receiver.url())

    # The sender goes on: the other token's callback is sent, this one's attempt is
    # recorded as failed and retried, round after round.
    with caplog.at_level("ERROR", logger="workers.callbacks.sender"):
        assert deliver_due(sessions, sender) == 2
    (request,) = receiver.requests
    assert _verify(kept.secret, request)["data"]["scan"]["id"] == signed
    assert any(
        "callback not signed" in r.getMessage() and getattr(r, "token", None) == lost.public_id
        for r in caplog.records
    )
    assert deliver_due(sessions, sender, now=utcnow() + dt.timedelta(hours=1)) == 1
    failing = _delivery(sessions, unsigned)
    assert (failing.state, failing.attempts) == (DeliveryState.PENDING, 2)
    assert failing.last_error == (
        "a stored callback signing secret cannot be decrypted with this server's secret keys"
    )
    assert len(receiver.requests) == 1  # nothing unsigned was sent

    # rotate-key names the token and rewrites nothing, not even what it could read.
    before = [row.secret_encrypted for row in _stored_secrets(sessions)]
    settings = isolated_settings(
        database_url=database, secret_key=NEW_KEY, secret_key_previous=older_key
    )
    args = build_parser().parse_args(["callbacks", "rotate-key"])
    with pytest.raises(CliError, match=f"token\\(s\\) {lost.public_id} cannot be decrypted"):
        callbacks_cli.run(args, settings)
    assert [row.secret_encrypted for row in _stored_secrets(sessions)] == before
    with sessions() as session:
        assert not session.execute(
            sa.select(AuditEvent).where(AuditEvent.action == "callback_secrets.reencrypted")
        ).first()

    # A secret nothing reads again (its token revoked) is left as it is.
    with transaction(sessions) as session:
        assert tokens.revoke(session, lost.public_id, actor="ops")
    assert callbacks_cli.run(args, settings) == 0
    out = capsys.readouterr().out
    assert "1 callback signing secret(s) re-encrypted" in out and "0 already were" in out
    assert "1 no longer in use (expired, or of a revoked token)" in out
    lost_row, kept_row = _stored_secrets(sessions)
    assert lost_row.secret_encrypted == before[0]
    assert SecretBox(NEW_KEY).decrypt(kept_row.secret_encrypted) == kept.secret


# --- the CLI ----------------------------------------------------------------------------


def test_failed_deliveries_through_the_cli(
    sessions: sessionmaker[Session],
    receiver: Receiver,
    database: str,
    isolated_settings: SettingsFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = isolated_settings(
        database_url=database, secret_key=KEY, callback_allow_private_addresses="true"
    )

    def cli(*argv: str) -> str:
        args = build_parser().parse_args(["callbacks", *argv])
        assert callbacks_cli.run(args, settings) == 0
        return capsys.readouterr().out

    platform = _platform(sessions)
    assert platform.secret is not None
    (scan,) = _completed(sessions, platform, receiver.url())
    with transaction(sessions) as session:  # gave up long ago
        session.execute(
            sa.update(CallbackDelivery).values(state=DeliveryState.FAILED, last_error="gone")
        )
    delivery = _delivery(sessions, scan).public_id
    (listed,) = [
        json.loads(line)
        for line in cli("failed", "--token", platform.public_id, "--json").splitlines()
    ]
    assert listed["id"] == delivery and listed["state"] == "failed"
    assert delivery in cli("failed")
    assert "queued again" in cli("redeliver", delivery)
    assert "1 callback(s) attempted" in cli("deliver", "--once")
    (request,) = receiver.requests
    assert _verify(platform.secret, request)["data"]["scan"]["id"] == scan
    assert _delivery(sessions, scan).state == DeliveryState.DELIVERED
    with pytest.raises(CliError, match="no delivery"):
        cli("redeliver", "msg_nosuchdelivery")


def test_the_embedded_modes_sqlite_database_sends_and_retries_too(
    sqlite_url: str, receiver: Receiver
) -> None:
    from db.migrate import upgrade

    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        sessions = make_sessionmaker(engine)
        platform = _platform(sessions)
        assert platform.secret is not None
        (scan,) = _completed(sessions, platform, receiver.url())
        receiver.script(500)
        sender = CallbackSender(_policy())
        t0 = utcnow()
        assert deliver_due(sessions, sender, now=t0) == 1
        pending = _delivery(sessions, scan)
        assert pending.state == DeliveryState.PENDING and pending.last_status == 500
        assert deliver_due(sessions, sender, now=t0 + dt.timedelta(seconds=14)) == 0
        assert deliver_due(sessions, sender, now=t0 + dt.timedelta(seconds=31)) == 1
        assert _delivery(sessions, scan).state == DeliveryState.DELIVERED
        assert _verify(platform.secret, receiver.requests[-1])["data"]["scan"]["id"] == scan
    finally:
        engine.dispose()
