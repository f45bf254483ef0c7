"""Batch re-scans on real Postgres, with a real S3-protocol server (moto's) and the embedded
mode's local object store: every selection, the bucket policy, bad input, progress through
listing, running and done, reuse, pages under the in-flight cap, cancellation, roles, the
audit trail, and lost bulk work sent back to the bulk queues (real Redis)."""

from __future__ import annotations

import io
import random
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.context import ApiContext
from db.models import (
    AuditEvent,
    Detection,
    Image,
    Rescan,
    RescanState,
    Scan,
    ScanPriority,
    Source,
    SourceKind,
    SourceStatus,
    TokenRole,
    Verdict,
    utcnow,
)
from db.session import make_engine, make_sessionmaker, transaction
from workers import fleet, rescans, tokens
from workers.detectors.base import DetectorOutput, DetectorSpec
from workers.ensemble import EnsembleConfig
from workers.events import BucketPolicy
from workers.intake import IntakeLimits
from workers.objects import LocalObjectStore

from badfiles import sample_picture
from conftest import DatabaseFactory, emptied_sessions, s3_client
from metric_names import counted

BUCKET = "media"
LIMITS = IntakeLimits(max_bytes=1 << 24, max_pixels=1 << 26, decode_timeout_s=10)
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def database(committing_database: DatabaseFactory) -> str:
    return committing_database("rescans")


@pytest.fixture
def sessions(database: str) -> Iterator[sessionmaker[Session]]:
    yield from emptied_sessions(database)


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    return BUCKET


class Toy:
    """A detector without a model: its score is a function of the bytes."""

    def __init__(self, name: str, version: str = "1") -> None:
        self.spec = DetectorSpec(name, "toy", version)
        self.version = version
        self.weights_sha256 = None
        self.calls = 0

    def detect_batch(self, images: Sequence[Any], raw: Sequence[bytes]) -> list[DetectorOutput]:
        self.calls += len(raw)
        return [DetectorOutput(score=(len(data) % 89) / 89) for data in raw]


@dataclass
class Queues:
    """A dispatcher that keeps what is sent, in order, as two queues would (uploads and
    bulk); ``drain`` runs it through the fleet's own steps, as the workers do."""

    sent: list[tuple[str, int, str | None, bool]] = field(default_factory=list)

    def intake(self, source_id: int, *, bulk: bool = False) -> None:
        self.sent.append(("intake", source_id, None, bulk))

    def detect(self, image_id: int, detector: str, *, bulk: bool = False) -> None:
        self.sent.append(("detect", image_id, detector, bulk))

    def drain(self, ctx: fleet.FleetContext, detectors: dict[str, Toy]) -> list[tuple[Any, ...]]:
        done = []
        while self.sent:
            kind, ident, name, bulk = self.sent.pop(0)
            done.append((kind, ident, name, bulk))
            if kind == "intake":
                for image_id, detector in fleet.take_in(ctx, ident):
                    self.detect(image_id, detector, bulk=bulk)  # as tasks.scan.intake does
            else:
                assert name is not None
                fleet.detect(ctx, detectors[name], ident, message_id=uuid.uuid4().hex)
        return done


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    sample_picture((64 + i, 48)).save(buffer, "PNG")
    return buffer.getvalue()


def _context(sessions: sessionmaker[Session], reader: Any, **kw: Any) -> fleet.FleetContext:
    values: dict[str, Any] = {
        "session_factory": sessions,
        "s3": lambda: reader,
        "limits": LIMITS,
        "ensemble": EnsembleConfig(threshold=0.5),
        "detectors": ["alpha"],
    }
    values.update(kw)
    return fleet.FleetContext(**values)


def _create(sessions: sessionmaker[Session], policy: str | None = BUCKET, **selection: Any) -> str:
    with transaction(sessions) as session:
        view = rescans.create_rescan(
            session,
            rescans.parse_selection(**selection),
            policy=BucketPolicy.parse(policy) if policy else None,
            actor="test",
        )
    return view.id


def _status(sessions: sessionmaker[Session], public_id: str) -> rescans.RescanView:
    with sessions() as session:
        return rescans.rescan_status(session, public_id)


def _row(sessions: sessionmaker[Session], public_id: str) -> Rescan:
    with sessions() as session:
        row = session.execute(sa.select(Rescan).where(Rescan.public_id == public_id)).scalar_one()
        session.expunge(row)
        return row


def _items(sessions: sessionmaker[Session]) -> list[Source]:
    with sessions() as session:
        rows = list(
            session.execute(
                sa.select(Source).where(Source.rescan_id.is_not(None)).order_by(Source.id)
            )
            .scalars()
            .all()
        )
        session.expunge_all()
        return rows


def _actions(sessions: sessionmaker[Session]) -> list[tuple[str, str]]:
    with sessions() as session:
        rows = session.execute(
            sa.select(AuditEvent.action, AuditEvent.actor)
            .where(AuditEvent.subject_type == "rescan")
            .order_by(AuditEvent.id)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


def _score_upload(
    ctx: fleet.FleetContext, queues: Queues, toys: dict[str, Toy], bucket: str, key: str
) -> None:
    source_id = fleet.record_upload(ctx, fleet.Upload(bucket, key, f"{bucket}/{key}@upload"))
    assert source_id is not None
    queues.intake(source_id)
    queues.drain(ctx, toys)


def test_a_prefix_rescan_pages_through_a_bucket_under_the_in_flight_cap(
    sessions: sessionmaker[Session], s3_endpoint: str, bucket: str
) -> None:
    client = s3_client(s3_endpoint)
    keys = [f"set/{i:02d}.png" for i in range(9)]
    for i, key in enumerate(keys):
        client.put_object(Bucket=bucket, Key=key, Body=_png(i))
    client.put_object(Bucket=bucket, Key="set/zz-broken.jpg", Body=b"\xff\xd8\xff\xe0 junk")
    client.put_object(Bucket=bucket, Key="setx/outside.png", Body=_png(50))
    ctx, queues, toys = _context(sessions, client), Queues(), {"alpha": Toy("alpha")}
    for key in keys[:2]:  # scored before as uploads: the re-scan reuses their answers
        _score_upload(ctx, queues, toys, bucket, key)
    assert toys["alpha"].calls == 2

    public_id = _create(sessions, bucket=bucket, prefix="set/")
    view = _status(sessions, public_id)
    assert view.state == RescanState.LISTING and view.listed == 0 and view.total is None

    def step() -> int:
        return rescans.advance_rescans(ctx, client, queues, page_size=4, max_in_flight=6)

    assert step() == 1  # 4 listed (a page)
    row = _row(sessions, public_id)
    assert (row.listed, row.queued, row.cursor) == (4, 4, "set/03.png")
    assert step() == 1  # 2 more: the cap is 6 unfinished
    assert step() == 0  # paused: 6 items queued, none finished
    view = _status(sessions, public_id)
    assert view.state == RescanState.LISTING
    assert (view.listed, view.counts.pending, view.counts.done) == (6, 6, 0)
    assert all(bulk for *_, bulk in queues.sent) and len(queues.sent) == 6

    counted_at = view.counted_at
    assert counted_at is not None

    ran = queues.drain(ctx, toys)
    # Every message of the re-scan, intakes and the detects they sent, went to bulk queues.
    assert ran and all(bulk for *_, bulk in ran)
    assert {kind for kind, *_ in ran} == {"intake", "detect"}
    # A read counts nothing: what finished is counted at the fleet's next step.
    view = _status(sessions, public_id)
    assert (view.counts.done, view.counts.pending, view.counted_at) == (0, 6, counted_at)

    assert step() == 1  # counts the 6 finished; 4 more, the last page ends the listing
    view = _status(sessions, public_id)
    assert view.state == RescanState.RUNNING and view.listed_at is not None
    assert view.counted_at is not None and view.counted_at > counted_at
    counts = view.counts
    assert (view.total, counts.done, counts.reused, counts.pending) == (10, 6, 2, 4)
    assert view.throughput > 0 and view.eta_seconds is not None
    assert step() == 0 and _status(sessions, public_id).state == RescanState.RUNNING
    queues.drain(ctx, toys)
    assert step() == 0
    view = _status(sessions, public_id)
    assert view.state == RescanState.DONE and view.eta_seconds == 0
    counts = view.counts
    assert (view.listed, counts.done, counts.reused, counts.rejected, counts.failed) == (
        10,
        9,
        2,
        1,
        0,
    )
    recorded = [item.object_key for item in _items(sessions)]
    assert sorted(recorded) == [*keys, "set/zz-broken.jpg"]  # each once, nothing outside
    assert toys["alpha"].calls == 2 + 7  # the reused bytes were not scored again
    assert [action for action, _ in _actions(sessions)] == [
        "rescan.created",
        "rescan.running",
        "rescan.done",
    ]
    assert rescans.advance_rescans(ctx, client, queues, page_size=4, max_in_flight=6) == 0


def test_a_list_of_keys_in_the_embedded_object_store(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    for i, key in enumerate(["a.png", "sub/b.png", "c.png"]):
        store.put_object(Bucket=BUCKET, Key=key, Body=_png(i))
    ctx, queues, toys = _context(sessions, store), Queues(), {"alpha": Toy("alpha")}
    series = {
        "listed": ("synthsentry_uploads_received_total", {"source": "rescan"}),
        "done": ("synthsentry_rescan_items_total", {"outcome": "done"}),
        "failed": ("synthsentry_rescan_items_total", {"outcome": "failed"}),
    }
    before = {name: counted(metric, **labels) for name, (metric, labels) in series.items()}
    public_id = _create(
        sessions, bucket=BUCKET, keys=["sub/b.png", "gone.png", "a.png", "sub/b.png", "c.png"]
    )
    view = _status(sessions, public_id)
    assert view.selection == {"bucket": BUCKET, "keys": ["sub/b.png", "gone.png", "a.png", "c.png"]}
    assert view.total == 4  # known from the start: the ETA needs no finished listing
    assert rescans.advance_rescans(ctx, store, queues, page_size=2, max_in_flight=100) == 1
    assert _row(sessions, public_id).cursor == "2"
    queues.drain(ctx, toys)
    # The next step counts what finished (one scored, one gone) and lists one more key.
    assert rescans.advance_rescans(ctx, store, queues, page_size=1, max_in_flight=100) == 1
    view = _status(sessions, public_id)
    assert view.state == RescanState.LISTING and _row(sessions, public_id).cursor == "3"
    assert (view.counts.done, view.counts.failed, view.counts.pending) == (1, 1, 1)
    assert rescans.pending_items(sessions) == 1  # the reconciler's gauge
    assert view.eta_seconds is not None and view.eta_seconds >= 0
    queues.drain(ctx, toys)
    assert rescans.advance_rescans(ctx, store, queues, page_size=3, max_in_flight=100) == 1
    queues.drain(ctx, toys)
    rescans.advance_rescans(ctx, store, queues, page_size=3, max_in_flight=100)
    view = _status(sessions, public_id)
    assert view.state == RescanState.DONE
    assert (view.counts.done, view.counts.failed, view.listed) == (3, 1, 4)
    assert view.counts.pending == 0 and view.eta_seconds == 0
    assert rescans.pending_items(sessions) == 0
    # Each item counted once as it was listed, and once as it finished.
    moved = {
        name: counted(metric, **labels) - before[name] for name, (metric, labels) in series.items()
    }
    assert moved == {"listed": 4, "done": 3, "failed": 1}
    assert [item.object_key for item in _items(sessions)] == [
        "sub/b.png",
        "gone.png",
        "a.png",
        "c.png",
    ]


def test_stored_images_are_concluded_or_sent_only_the_detectors_they_miss(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    first, queues = _context(sessions, store), Queues()
    toys = {"alpha": Toy("alpha"), "beta": Toy("beta")}
    for i in range(3):
        store.put_object(Bucket=BUCKET, Key=f"u/{i}.png", Body=_png(i))
        _score_upload(first, queues, toys, BUCKET, f"u/{i}.png")
    store.put_object(Bucket=BUCKET, Key="u/broken.png", Body=b"not an image")
    _score_upload(first, queues, toys, BUCKET, "u/broken.png")  # refused: nothing to score
    assert toys["alpha"].calls == 3

    def run(ctx: fleet.FleetContext, **selection: Any) -> tuple[rescans.RescanView, list[Any]]:
        public_id = _create(sessions, policy=None, **selection)
        sent = []
        for _ in range(10):
            rescans.advance_rescans(ctx, store, queues, page_size=2, max_in_flight=100)
            sent += list(queues.sent)
            queues.drain(ctx, toys)
        return _status(sessions, public_id), sent

    # Nothing is stale under the configuration that scored them.
    view, sent = run(first, images="stale")
    assert (view.state, view.listed, sent) == (RescanState.DONE, 0, [])

    # Another ensemble configuration: every answer is current, so each image is concluded
    # under it here, without a message or a detector.
    stricter = _context(sessions, store, ensemble=EnsembleConfig(threshold=0.9))
    view, sent = run(stricter, images="stale")
    assert sent == [] and toys["alpha"].calls == 3
    assert (view.state, view.listed, view.counts.done, view.counts.reused) == (
        RescanState.DONE,
        3,
        3,
        3,
    )
    with sessions() as session:
        versions = session.execute(
            sa.select(Verdict.ensemble_version).where(
                Verdict.ensemble_version == stricter.ensemble.version
            )
        ).all()
    assert len(versions) == 3
    assert run(stricter, images="stale")[0].listed == 0  # no longer stale

    # A detector joins the ensemble: only it runs, on the low-priority queue, reading the
    # stored bytes (no intake again).
    wider = _context(sessions, store, detectors=["alpha", "beta"])
    view, sent = run(wider, images="stale")
    assert {(kind, name, bulk) for kind, _, name, bulk in sent} == {("detect", "beta", True)}
    assert len(sent) == 3 and toys["beta"].calls == 3 and toys["alpha"].calls == 3
    assert (view.listed, view.queued, view.counts.done, view.counts.reused) == (3, 3, 3, 0)

    view, sent = run(wider, detector="beta")
    assert (view.listed, view.counts.reused, sent) == (3, 3, [])
    view, sent = run(wider, images="all")
    assert (view.listed, view.counts.done, sent) == (3, 3, [])  # the refused bytes left out
    assert run(wider, detector="gamma")[0].listed == 0


def test_cancelling_stops_the_listing_and_skips_what_was_not_taken_in(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    for i in range(6):
        store.put_object(Bucket=BUCKET, Key=f"c/{i}.png", Body=_png(i))
    ctx, queues, toys = _context(sessions, store), Queues(), {"alpha": Toy("alpha")}
    client, admin = _api(sessions, tmp_path, store)
    created = client.post("/v1/rescans", json={"bucket": BUCKET, "prefix": "c/"}, headers=admin)
    assert created.status_code == 202, created.text
    public_id = created.json()["id"]
    assert rescans.advance_rescans(ctx, store, queues, page_size=3, max_in_flight=100) == 1
    queues.sent, waiting = queues.sent[:1], queues.sent[1:]  # one taken in, two still queued
    queues.drain(ctx, toys)

    cancelled = client.delete(f"/v1/rescans/{public_id}", headers=admin)
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["state"] == "cancelled" and body["counts"]["cancelled"] == 2
    assert body["counts"]["done"] == 1 and body["eta_seconds"] == 0

    queues.sent = waiting  # the queued intakes arrive after the cancel: nothing is done
    assert len(queues.drain(ctx, toys)) == 2
    with sessions() as session:
        assert session.execute(sa.select(sa.func.count()).select_from(Image)).scalar_one() == 1
    assert toys["alpha"].calls == 1
    assert rescans.advance_rescans(ctx, store, queues, page_size=3, max_in_flight=100) == 0
    assert _row(sessions, public_id).listed == 3
    assert {(i.status, i.reject_reason) for i in _items(sessions)} == {
        (SourceStatus.SCORED, None),
        (SourceStatus.REJECTED, "cancelled"),
    }
    # Cancelling again changes nothing; a re-scan that finished cannot be cancelled.
    assert client.delete(f"/v1/rescans/{public_id}", headers=admin).status_code == 200
    actions = _actions(sessions)
    assert [a for a, _ in actions] == ["rescan.created", "rescan.cancelled"]
    assert actions[1][1].startswith("token:")
    finished = _create(sessions, bucket=BUCKET, prefix="nothing-here/")
    rescans.advance_rescans(ctx, store, queues, page_size=3, max_in_flight=100)
    assert _status(sessions, finished).state == RescanState.DONE
    refused = client.delete(f"/v1/rescans/{finished}", headers=admin)
    assert refused.status_code == 409 and refused.headers["content-type"] == PROBLEM
    assert client.delete("/v1/rescans/rs_0000", headers=admin).status_code == 404


# --- the HTTP API -------------------------------------------------------------------------


def _api(
    sessions: sessionmaker[Session], tmp_path: Path, store: Any = None, policy: str | None = None
) -> tuple[TestClient, dict[str, str]]:
    context = ApiContext(
        session_factory=sessions,
        dispatcher=Queues(),
        store=store or LocalObjectStore(tmp_path / "objects"),
        embedded=True,
        bucket_policy=BucketPolicy.parse(policy or f"{BUCKET},photos:ok/"),
        limits=LIMITS,
        upload_bucket="uploads",
        upload_prefix="api/",
        max_body_bytes=1 << 20,
        active_ensemble=EnsembleConfig(threshold=0.5).version,
        detectors=("alpha",),
        webhook_secret="",
        webhook_max_records=100,
        rescan_page_size=100,
        rescan_max_in_flight=1000,
    )
    return TestClient(create_app(context)), _bearer(sessions, TokenRole.ADMIN)


def _bearer(sessions: sessionmaker[Session], role: TokenRole) -> dict[str, str]:
    with transaction(sessions) as session:
        token = tokens.issue_token(session, role=role, name=role.value, actor="test").token
    return {"Authorization": f"Bearer {token}"}


def test_an_admin_starts_reads_and_lists_rescans_over_http(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    client, admin = _api(sessions, tmp_path)
    created = client.post("/v1/rescans", json={"images": {"detector": "alpha"}}, headers=admin)
    assert created.status_code == 202, created.text
    body = created.json()
    assert body["state"] == "listing" and body["selection"] == {"images": {"detector": "alpha"}}
    assert body["links"]["self"] == f"/v1/rescans/{body['id']}" == created.headers["location"]
    assert set(body["counts"]) == {
        "listed",
        "queued",
        "pending",
        "done",
        "reused",
        "rejected",
        "failed",
        "cancelled",
    }
    read = client.get(body["links"]["self"], headers=admin)
    assert read.status_code == 200 and read.json()["id"] == body["id"]
    client.post("/v1/rescans", json={"bucket": "photos", "prefix": "ok/2026/"}, headers=admin)
    listed = client.get("/v1/rescans", params={"limit": 5}, headers=admin)
    assert [r["selection"] for r in listed.json()] == [
        {"bucket": "photos", "prefix": "ok/2026/"},
        {"images": {"detector": "alpha"}},
    ]
    assert client.get("/v1/rescans/rs_nope", headers=admin).status_code == 404
    with sessions() as session:
        row = session.execute(sa.select(Rescan).order_by(Rescan.id)).scalars().first()
        assert row is not None and row.created_by.startswith("token:")
    assert [a for a, _ in _actions(sessions)] == ["rescan.created", "rescan.created"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"bucket": BUCKET},
        {"prefix": "a/"},
        {"bucket": BUCKET, "prefix": "a/", "keys": ["a/b"]},
        {"bucket": BUCKET, "keys": []},
        {"bucket": BUCKET, "keys": ["ok.png", "a/../etc/passwd"]},
        {"bucket": BUCKET, "keys": ["../up.png"]},
        {"bucket": BUCKET, "keys": ["nul\u0000.png"]},
        {"bucket": BUCKET, "keys": [""]},
        {"bucket": BUCKET, "keys": [f"k{i}" for i in range(1001)]},
        {"bucket": BUCKET, "prefix": "a/../"},
        {"bucket": "Not_A_Bucket", "prefix": ""},
        {"bucket": BUCKET, "prefix": "a/", "extra": 1},
        {"images": "some"},
        {"images": {"detector": "x", "version": "2"}},
        {"images": "all", "bucket": BUCKET},
        {"images": {"detector": "bad name!"}},
    ],
)
def test_bad_selections_are_refused_with_a_problem(
    sessions: sessionmaker[Session], tmp_path: Path, body: dict[str, Any]
) -> None:
    client, admin = _api(sessions, tmp_path)
    reply = client.post("/v1/rescans", json=body, headers=admin)
    assert reply.status_code == 422, reply.text
    assert reply.headers["content-type"] == PROBLEM
    with sessions() as session:
        assert session.execute(sa.select(sa.func.count()).select_from(Rescan)).scalar_one() == 0


def test_buckets_outside_the_policy_are_refused(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    client, admin = _api(sessions, tmp_path)
    for body in (
        {"bucket": "elsewhere", "prefix": ""},
        {"bucket": "photos", "prefix": ""},  # only photos:ok/ is allowed
        {"bucket": "photos", "prefix": "o"},
        {"bucket": "photos", "keys": ["ok/a.png", "secret/b.png"]},
    ):
        reply = client.post("/v1/rescans", json=body, headers=admin)
        assert reply.status_code == 403, (body, reply.text)
        assert reply.json()["type"].endswith(":bucket-not-allowed")
    allowed = client.post(
        "/v1/rescans", json={"bucket": "photos", "keys": ["ok/a.png"]}, headers=admin
    )
    assert allowed.status_code == 202
    # A deployment without a bucket policy refuses every bucket, not stored images.
    with transaction(sessions) as session:
        with pytest.raises(rescans.BucketRefused):
            rescans.create_rescan(
                session, rescans.ObjectPrefix(BUCKET, ""), policy=None, actor="test"
            )
        rescans.create_rescan(session, rescans.StoredImages("all"), policy=None, actor="test")


def test_only_admins_may_touch_rescans(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    client, admin = _api(sessions, tmp_path)
    public_id = client.post("/v1/rescans", json={"images": "all"}, headers=admin).json()["id"]
    calls = [
        ("post", "/v1/rescans", {"json": {"images": "all"}}),
        ("get", "/v1/rescans", {}),
        ("get", f"/v1/rescans/{public_id}", {}),
        ("delete", f"/v1/rescans/{public_id}", {}),
    ]
    for role in (TokenRole.MODERATOR, TokenRole.PLATFORM):
        headers = _bearer(sessions, role)
        for method, path, extra in calls:
            reply = getattr(client, method)(path, headers=headers, **extra)
            assert reply.status_code == 403, (role, method, path)
    for method, path, extra in calls:
        reply = getattr(client, method)(path, **extra)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
    assert _status(sessions, public_id).state == RescanState.LISTING  # nothing changed it


# --- lost work goes back to the bulk queues ------------------------------------------------


def test_lost_rescan_work_is_sent_again_to_the_bulk_queue(
    sessions: sessionmaker[Session], tmp_path: Path, redis_url: str
) -> None:
    import redis

    from synthsentry.settings import Settings
    from tasks.app import configure, write_heartbeat
    from tasks.queues import QUEUES
    from tasks.submit import resend_lost

    configure(Settings(broker_url=redis_url))
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store = LocalObjectStore(tmp_path / "objects")
    store.put_object(Bucket=BUCKET, Key="lost.png", Body=_png(1))
    ctx, queues = _context(sessions, store), Queues()
    _create(sessions, bucket=BUCKET, keys=["lost.png"])
    rescans.advance_rescans(ctx, store, queues, page_size=10, max_in_flight=10)
    queues.sent.clear()  # the intake message was lost
    (item,) = _items(sessions)
    with transaction(sessions) as session:  # recorded long ago
        session.execute(
            sa.update(Source)
            .where(Source.id == item.id)
            .values(created_at=utcnow() - timedelta(hours=1))
        )

    def resent() -> float:
        return counted("synthsentry_reconciler_resends_total", kind="intake")

    before = resent()
    assert resend_lost(ctx, after_s=60) == 1
    assert client.llen(QUEUES.intake_queue(bulk=True)) == 1
    assert client.llen(QUEUES.intake) == 0
    assert resent() == before + 1

    # While its bulk queue holds work that a live worker consumes, the item is left (it is
    # most likely waiting its turn behind uploads, however old) and looked at later.
    write_heartbeat(client, "intake@test", [QUEUES.intake_queue(bulk=True)])
    with transaction(sessions) as session:
        session.execute(sa.update(Source).where(Source.id == item.id).values(recheck_at=utcnow()))
    assert resend_lost(ctx, after_s=60) == 0
    assert client.llen(QUEUES.intake_queue(bulk=True)) == 1
    assert resent() == before + 1
    (left,) = _items(sessions)
    assert left.resend_count == 1 and left.recheck_at is not None
    assert left.recheck_at > utcnow() + timedelta(seconds=30)
    client.close()


class _BulkBusy:
    """The low-priority queues hold work a live worker will reach; the upload queues none."""

    def intake_waiting(self, *, bulk: bool = False) -> bool:
        return bulk

    def detection_waiting(self, detector: str, *, bulk: bool = False) -> bool:
        return bulk


@contextmanager
def _statements(sessions: sessionmaker[Session]) -> Iterator[list[str]]:
    """The SQL statements sent to the database while the block runs."""
    engine = sessions.kw["bind"]
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def test_lost_work_of_low_priority_scans_goes_back_to_the_bulk_queues(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A scan asked for at low priority was sent to the bulk queues; its lost work is sent
    there again (and waits, like a re-scan's, while they are being worked through), while a
    normal scan's goes to the upload queues. One query asks which scans are low priority."""
    store = LocalObjectStore(tmp_path / "objects")
    ctx = _context(sessions, store)
    sources: dict[str, int] = {}
    for i, name in enumerate(("low-intake", "low-detect", "normal-intake", "normal-detect")):
        store.put_object(Bucket=BUCKET, Key=f"{name}.png", Body=_png(i))
        upload = fleet.Upload(BUCKET, f"{name}.png", f"scan:sc_{name}")
        source_id = fleet.record_upload(ctx, upload, kind=SourceKind.HOOK)
        assert source_id is not None
        sources[name] = source_id
    with transaction(sessions) as session:
        for name, source_id in sources.items():
            priority = ScanPriority.LOW if name.startswith("low") else ScanPriority.NORMAL
            session.add(Scan(public_id=f"sc_{name}", source_id=source_id, priority=priority))
    # Taken in, then the detect message was lost.
    images = {name: fleet.take_in(ctx, sources[name])[0][0] for name in sources if "detect" in name}

    later = utcnow() + timedelta(hours=1)
    with _statements(sessions) as seen:
        urgent = fleet.resend_stalled(ctx, after_s=60, now=later, backlog=_BulkBusy())
    assert len([sql for sql in seen if "FROM scans" in sql]) == 1
    # The bulk queues are busy: the low-priority work waits its turn there; uploads' goes.
    assert urgent == fleet.Resend(
        intake=[sources["normal-intake"]], detect=[(images["normal-detect"], "alpha")]
    )

    work = fleet.resend_stalled(ctx, after_s=60, now=later + timedelta(seconds=61))
    assert work == fleet.Resend(
        intake=[sources["low-intake"]],
        detect=[(images["low-detect"], "alpha")],
        bulk_intake=[sources["low-intake"]],
        bulk_detect=[(images["low-detect"], "alpha")],
    )


_COUNTS = ("pending", "done", "reused", "rejected", "failed", "cancelled")


def _reference_counts(sessions: sessionmaker[Session], public_id: str) -> dict[str, Any]:
    """What a count over every item of the re-scan says (the test's own query)."""
    with sessions() as session:
        rescan_id = session.execute(
            sa.select(Rescan.id).where(Rescan.public_id == public_id)
        ).scalar_one()
        fresh = sa.exists().where(
            Detection.image_id == Source.image_id, Detection.created_at >= Source.created_at
        )
        rows = session.execute(
            sa.select(Source.id, Source.status, Source.reject_reason, fresh).where(
                Source.rescan_id == rescan_id
            )
        ).all()
    counts: dict[str, Any] = dict.fromkeys(_COUNTS, 0)
    counts["pending_ids"] = []
    for source_id, status, reason, was_fresh in rows:
        if status == SourceStatus.PENDING:
            counts["pending"] += 1
            counts["pending_ids"].append(source_id)
        elif status == SourceStatus.SCORED:
            counts["done"] += 1
            counts["reused"] += not was_fresh
        elif reason == "cancelled":
            counts["cancelled"] += 1
        elif reason in ("missing", "unreadable"):
            counts["failed"] += 1
        else:
            counts["rejected"] += 1
    return counts


def test_counts_kept_on_the_row_agree_with_the_items_and_a_read_counts_nothing(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Items finishing out of order, refused bytes, missing objects, reuse and a cancel: after
    every step the counts kept on the row equal a count over every item and add up to
    ``listed``; what a count looks at again is only what was unfinished (within the
    in-flight cap); and a read, or a list of a hundred re-scans, is one query."""
    rng = random.Random(7)
    store = LocalObjectStore(tmp_path / "objects")
    keys = []
    for i in range(30):
        key = f"m/{i:02d}.png"
        keys.append(key)
        if i % 7 == 3:
            store.put_object(Bucket=BUCKET, Key=key, Body=b"not an image")
        elif i % 11 != 5:  # the others are gone before their intake
            store.put_object(Bucket=BUCKET, Key=key, Body=_png(i))
    ctx, queues, toys = _context(sessions, store), Queues(), {"alpha": Toy("alpha")}
    _score_upload(ctx, queues, toys, BUCKET, "m/00.png")  # the re-scan reuses its answer
    public_id = _create(sessions, bucket=BUCKET, keys=keys)

    def check() -> rescans.RescanView:
        with _statements(sessions) as seen:
            view = _status(sessions, public_id)
        assert len(seen) == 1
        row = _row(sessions, public_id)
        expected = _reference_counts(sessions, public_id)
        shown = view.counts
        assert {k: getattr(shown, k) for k in _COUNTS} == {k: expected[k] for k in _COUNTS}
        finished = shown.done + shown.rejected + shown.failed + shown.cancelled
        assert shown.pending + finished == view.listed
        # Looked at again next time: the items pending when counted, within the cap; the
        # items above the mark were listed after the count, and all are pending.
        assert len(row.unfinished) <= 8
        pending_ids = expected["pending_ids"]
        assert row.unfinished == sorted(i for i in pending_ids if i <= row.counted_through)
        assert shown.pending == len(row.unfinished) + sum(
            1 for i in pending_ids if i > row.counted_through
        )
        return view

    seen_done = set()
    for _ in range(12):
        rescans.advance_rescans(ctx, store, queues, page_size=5, max_in_flight=8)
        view = check()
        seen_done.add(view.counts.done)
        if view.state == RescanState.RUNNING:
            break
        # Finish about half the work queued so far, in another order than it was sent.
        rng.shuffle(queues.sent)
        half = len(queues.sent) // 2
        queues.sent, rest = queues.sent[:half], queues.sent[half:]
        queues.drain(ctx, toys)
        queues.sent += rest
    assert view.state == RescanState.RUNNING and view.listed == 30
    assert len(seen_done) > 2  # counted along the way, not only at the end
    assert 0 < view.counts.pending <= 8
    with transaction(sessions) as session:
        cancelled = rescans.cancel_rescan(session, public_id, actor="test")
    assert cancelled.counts.pending == 0 and cancelled.counts.cancelled > 0
    final = check()
    assert final.state == RescanState.CANCELLED and final.counts == cancelled.counts
    assert _row(sessions, public_id).unfinished == []
    assert final.counts.failed >= 1 and final.counts.rejected >= 1 and final.counts.reused == 1

    for _ in range(100):
        _create(sessions, policy=None, images="all")
    with sessions() as session, _statements(sessions) as seen:
        listed = rescans.list_rescans(session, limit=100)
    assert len(listed) == 100 and len(seen) == 1


def test_selection_documents_round_trip() -> None:
    for selection in (
        rescans.ObjectPrefix("media", ""),
        rescans.ObjectKeys("media", ("a", "b/c")),
        rescans.StoredImages("stale"),
        rescans.StoredImages("detector", "alpha"),
    ):
        assert rescans.selection_of(rescans.selection_document(selection)) == selection
    with pytest.raises(rescans.InvalidSelection, match="NUL"):
        rescans.check_key("a\x00b")
    assert rescans.check_key("a..b/c..d.png") == "a..b/c..d.png"  # only a '..' segment is refused


def test_the_embedded_mode_rescans_on_sqlite(sqlite_url: str, tmp_path: Path) -> None:
    """The embedded mode's database: the same listing, items and counts on SQLite."""
    from db.migrate import upgrade

    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    sessions = make_sessionmaker(engine)
    store = LocalObjectStore(tmp_path / "objects")
    for i in range(5):
        store.put_object(Bucket=BUCKET, Key=f"e/{i}.png", Body=_png(i))
    ctx, queues, toys = _context(sessions, store), Queues(), {"alpha": Toy("alpha")}
    _score_upload(ctx, queues, toys, BUCKET, "e/0.png")
    public_id = _create(sessions, bucket=BUCKET, prefix="e/")
    for _ in range(5):
        rescans.advance_rescans(ctx, store, queues, page_size=2, max_in_flight=3)
        queues.drain(ctx, toys)
    view = _status(sessions, public_id)
    assert (view.state, view.listed, view.counts.done, view.counts.reused) == (
        RescanState.DONE,
        5,
        5,
        1,
    )
    stale = _create(sessions, policy=None, images="stale")
    stricter = _context(sessions, store, ensemble=EnsembleConfig(threshold=0.9))
    while rescans.advance_rescans(stricter, store, queues, page_size=2, max_in_flight=3):
        pass  # pages of 2, 2 and 1 (each image concluded after its page), then done
    assert queues.sent == []
    view = _status(sessions, stale)
    assert (view.state, view.listed, view.counts.reused) == (RescanState.DONE, 5, 5)
    engine.dispose()
