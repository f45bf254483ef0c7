"""Prometheus metrics: the API's /metrics after real requests on real Postgres, the queue
depths read from a real Redis broker through kombu, the probes' HTTP endpoints, and the
contract's names in what the processes export."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.models import ReviewState, SourceKind, TokenRole
from db.session import transaction
from synthsentry.cli.serve import BuiltApi
from synthsentry.settings import Settings
from tasks.app import DETECT_TASK, celery_config, write_heartbeat
from tasks.queues import QUEUES
from tasks.submit import RedisLayout, read_depths
from workers import metrics, review, scoring, tokens
from workers.intake import Rejected, RejectReason
from workers.probes import Flag, LoopProbe, ProbeServer, Readiness

import metric_names
from apitest import BUCKET, build_test_api
from conftest import DatabaseFactory, emptied_sessions
from metric_names import Samples, counted, parse, value
from provenance_fixtures import png_with_chunks, text_chunk

# The names the dashboards and alert rules are written against.
CONTRACT = {
    "synthsentry_uploads_received_total",
    "synthsentry_uploads_refused_total",
    "synthsentry_intake_rejections_total",
    "synthsentry_detections_total",
    "synthsentry_verdicts_total",
    "synthsentry_review_lease_expiries_total",
    "synthsentry_review_decisions_total",
    "synthsentry_callback_deliveries_total",
    "synthsentry_rescan_items_total",
    "synthsentry_reconciler_resends_total",
    "synthsentry_errors_total",
    *(
        f"synthsentry_{name}{suffix}"
        for name in ("batch_size", "model_latency_seconds", "queue_wait_seconds")
        for suffix in ("_bucket", "_sum", "_count")
    ),
    "synthsentry_queue_messages",
    "synthsentry_queue_consumers",
    "synthsentry_review_cases",
    "synthsentry_review_oldest_open_case_age_seconds",
    "synthsentry_rescan_items_pending",
    "synthsentry_worker_ready",
}


def moved(before: Samples, after: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The synthsentry counters that changed, by how much."""
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if key[0].startswith("synthsentry_")
        and key[0].endswith("_total")
        and after[key] != before.get(key, 0.0)
    }


def series(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


# --- the API --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_database(committing_database: DatabaseFactory) -> str:
    return committing_database("metrics")


@pytest.fixture
def sessions(metrics_database: str) -> Iterator[sessionmaker[Session]]:
    yield from emptied_sessions(metrics_database)


@pytest.fixture
def api(sessions: sessionmaker[Session], tmp_path: Path) -> Iterator[BuiltApi]:
    built = build_test_api(sessions, tmp_path, webhook_secret=SECRET)
    yield built
    built.stop()


SECRET = "a-webhook-secret-for-metrics-0123456789"


def _token(sessions: sessionmaker[Session], role: TokenRole, name: str) -> dict[str, str]:
    with transaction(sessions) as session:
        token = tokens.issue_token(session, role=role, name=name, actor="test").token
    return {"Authorization": f"Bearer {token}"}


def _scrape(client: TestClient) -> Samples:
    reply = client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return parse(reply.text)


def _event(*buckets_and_keys: tuple[str, str]) -> bytes:
    return json.dumps(
        {
            "EventName": "s3:ObjectCreated:Put",
            "Records": [
                {
                    "eventVersion": "2.0",
                    "eventSource": "minio:s3",
                    "eventName": "s3:ObjectCreated:Put",
                    "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 10}},
                }
                for bucket, key in buckets_and_keys
            ],
        }
    ).encode()


def test_the_api_counts_what_its_requests_did(
    api: BuiltApi, sessions: sessionmaker[Session]
) -> None:
    client = TestClient(create_app(api.context, collectors=api.collectors))
    platform = _token(sessions, TokenRole.PLATFORM, "platform-m")
    moderator = _token(sessions, TokenRole.MODERATOR, "moderator-m")
    # Generation settings in a PNG text chunk: the provenance detector flags it for review.
    flagged = png_with_chunks([text_chunk("parameters", "a fox\nSteps: 20, Seed: 1, Model: x")])
    api.context.store.put_object(Bucket=BUCKET, Key="m/flagged.png", Body=flagged)
    before = _scrape(client)
    api.start()

    accepted = client.post(
        "/v1/scans", json={"object": {"bucket": BUCKET, "key": "m/flagged.png"}}, headers=platform
    )
    assert accepted.status_code == 202, accepted.text
    refused = [
        client.post(
            "/v1/scans", json={"object": {"bucket": "elsewhere", "key": "a.png"}}, headers=platform
        ),
        client.post(
            "/v1/scans",
            content=b"{not json",
            headers={**platform, "Content-Type": "application/json"},
        ),
        client.post("/v1/scans", json={"object": {"bucket": BUCKET, "key": "m/flagged.png"}}),
    ]
    assert [r.status_code for r in refused] == [403, 400, 401]
    # One record taken (its object is missing: intake rejects it), one refused.
    event = client.post(
        "/s3-events",
        content=_event((BUCKET, "m/gone.png"), ("elsewhere", "x.png")),
        headers={"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"},
    )
    assert event.status_code == 200 and event.json()["accepted"] == 1, event.text

    scan_id = accepted.json()["scans"][0]["id"]
    document = client.get(f"/v1/scans/{scan_id}?wait=30", headers=platform).json()
    assert document["finished"] and document["flagged"], document
    event_scan = _wait_for_rejection(sessions)
    assert event_scan == "missing"

    claimed = client.post("/v1/reviews/next", headers=moderator)
    assert claimed.status_code == 200 and claimed.json()["sha256"] == document["sha256"]
    decided = client.post(
        f"/v1/reviews/{document['sha256']}/decision",
        json={"decision": "ai_generated"},
        headers=moderator,
    )
    assert decided.status_code == 200, decided.text
    api.stop()

    after = _scrape(client)
    assert moved(before, after) == {
        series("synthsentry_uploads_received_total", source="api"): 1,
        series("synthsentry_uploads_received_total", source="s3_event"): 1,
        series("synthsentry_uploads_refused_total", source="api", reason="bucket-not-allowed"): 1,
        series("synthsentry_uploads_refused_total", source="api", reason="malformed-json"): 1,
        series("synthsentry_uploads_refused_total", source="api", reason="unauthenticated"): 1,
        series(
            "synthsentry_uploads_refused_total", source="s3_event", reason="bucket-not-allowed"
        ): 1,
        series("synthsentry_detections_total", detector="provenance", outcome="scored"): 1,
        series("synthsentry_verdicts_total", outcome="flagged"): 1,
        series("synthsentry_intake_rejections_total", reason="missing"): 1,
        series("synthsentry_review_decisions_total", label="ai_generated"): 1,
    }
    # The embedded mode has no reconciler: its own /metrics carries the database's gauges.
    assert "synthsentry_review_cases" in {name for name, _ in after}
    assert ("synthsentry_rescan_items_pending", frozenset()) in after


def _wait_for_rejection(sessions: sessionmaker[Session]) -> str | None:
    from sqlalchemy import select

    from db.models import Source, SourceStatus

    from fleet_processes import wait_for

    def rejected() -> str | None:
        with sessions() as session:
            return session.scalar(
                select(Source.reject_reason).where(
                    Source.kind == SourceKind.UPLOAD_EVENT, Source.status == SourceStatus.REJECTED
                )
            )

    return wait_for(rejected, timeout=30, what="the event's upload to be rejected", interval=0.1)


def test_metrics_is_not_in_the_schema(api: BuiltApi) -> None:
    client = TestClient(create_app(api.context))
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]
    assert client.get("/metrics").status_code == 200


def test_a_request_that_raises_counts_an_api_error(api: BuiltApi) -> None:
    app = create_app(api.context)

    @app.get("/raise-for-test", include_in_schema=False)
    def fail() -> None:
        raise RuntimeError("a bug")

    client = TestClient(app, raise_server_exceptions=False)
    before = _scrape(client)
    assert client.get("/raise-for-test").status_code == 500
    assert moved(before, _scrape(client)) == {
        series("synthsentry_errors_total", component="api"): 1
    }


# --- counted when committed ------------------------------------------------------------------


def test_a_rejection_counts_when_its_transaction_commits_not_when_it_rolls_back(
    sessions: sessionmaker[Session],
) -> None:
    from db import repository

    def rejections() -> float:
        return counted("synthsentry_intake_rejections_total", reason="empty")

    refused = scoring.Intake.refused(Rejected(RejectReason.EMPTY, "the file has no bytes"))

    def source(session: Session, key: str) -> int:
        ref = repository.SourceRef(kind=SourceKind.CLI, ref_key=key, bucket=None, object_key=key)
        return repository.record_source(session, ref, None)[0].id

    start = rejections()
    with pytest.raises(RuntimeError), transaction(sessions) as session:
        scoring.record_intake(session, source(session, "a"), refused)
        assert rejections() == start  # not yet: the transaction may still fail
        raise RuntimeError("the transaction fails")
    assert rejections() == start
    with transaction(sessions) as session:
        scoring.record_intake(session, source(session, "b"), refused)
    assert rejections() == start + 1


def test_the_review_backlog_counts_unfinished_cases_and_the_oldest_open(
    sessions: sessionmaker[Session],
) -> None:
    from datetime import timedelta

    from db.models import utcnow

    empty = review.backlog(sessions)
    assert empty.cases == {"open": 0, "claimed": 0, "escalated": 0}
    assert empty.oldest_open_age_s is None
    collector = metrics.ReviewCollector(lambda: review.backlog(sessions), ttl_s=0)
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert value(parse(text), "synthsentry_review_cases", state="open") == 0
    assert value(parse(text), "synthsentry_review_oldest_open_case_age_seconds") == 0

    _open_cases(sessions, [timedelta(hours=3), timedelta(minutes=5)], ReviewState.OPEN)
    _open_cases(sessions, [timedelta(hours=9)], ReviewState.ESCALATED)
    now = utcnow()
    backlog = review.backlog(sessions, now=now)
    assert backlog.cases == {"open": 2, "claimed": 0, "escalated": 1}
    assert backlog.oldest_open_age_s == pytest.approx(3 * 3600, abs=5)
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "synthsentry_review_cases", state="open") == 2
    assert value(samples, "synthsentry_review_cases", state="escalated") == 1
    age = value(samples, "synthsentry_review_oldest_open_case_age_seconds")
    assert age == pytest.approx(3 * 3600, abs=60)


def test_a_claim_that_runs_out_counts_one_lease_expiry(sessions: sessionmaker[Session]) -> None:
    from datetime import timedelta

    from db.models import utcnow

    _open_cases(sessions, [timedelta(minutes=1)], ReviewState.OPEN)
    policy = review.ReviewPolicy(active_ensemble="test@0", lease=timedelta(minutes=10))
    claim = review.claim_next(sessions, review.Reviewer("token:mod"), policy)
    assert claim is not None
    name = "synthsentry_review_lease_expiries_total"
    start = counted(name)
    assert review.expire_leases(sessions) == 0  # the lease still runs
    assert review.expire_leases(sessions, now=utcnow() + timedelta(minutes=11)) == 1
    assert counted(name) == start + 1


def _open_cases(sessions: sessionmaker[Session], ages: list[Any], state: ReviewState) -> None:
    """Review cases opened ``ages`` ago, in ``state``, each on an image of its own."""
    import secrets

    from sqlalchemy import update

    from db import repository
    from db.models import ReviewCase, VerdictLabel, utcnow

    with transaction(sessions) as session:
        ensemble_id = repository.register_ensemble(
            session, repository.EnsembleRecord(version="test@0", digest="0" * 64, definition={})
        ).id
    for age in ages:
        with transaction(sessions) as session:
            image = repository.get_or_create_image(
                session, repository.ImageFacts(sha256=secrets.token_hex(32), size_bytes=1)
            )
            repository.save_verdict(
                session,
                image.id,
                repository.VerdictRecord(
                    ensemble_id=ensemble_id,
                    ensemble_version="test@0",
                    detector_set_digest=secrets.token_hex(8),
                    detector_set={"detectors": []},
                    ai_score=0.9,
                    label=VerdictLabel.LIKELY_AI,
                    flagged=True,
                    reason="test",
                ),
                actor="test",
                active=True,
            )
            case = repository.case_for_image(session, image.id)
            assert case is not None, "a flagging verdict opens a case"
            session.execute(
                update(ReviewCase)
                .where(ReviewCase.id == case.id)
                .values(state=state, opened_at=utcnow() - age)
            )


# --- the broker's queues -----------------------------------------------------------------------


def test_queue_depth_counts_every_priority_and_the_reserved(redis_url: str) -> None:
    from celery import Celery
    from kombu import Queue

    app = Celery("depth-test", set_as_current=False)
    app.conf.update(celery_config(Settings(broker_url=redis_url)))
    layout = RedisLayout.of(app.conf.broker_transport_options)
    queue = QUEUES.detect("depth-test")
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    for priority in (0, 3, 5, 9, 9):
        app.send_task(DETECT_TASK, args=(priority, "depth-test"), queue=queue, priority=priority)
    # kombu keeps each priority step in a list of its own: the queue's own name holds few.
    assert client.llen(queue) == 1
    assert sum(client.llen(key) for key in layout.priority_lists(queue)) == 5
    write_heartbeat(client, "worker-1@host", [queue])

    (depth,) = read_depths(client, [queue], layout)
    assert depth == metrics.QueueDepth(queue, ready=5, unacked=0, consumers=1)

    with app.connection_for_read() as connection:
        reserved = Queue(queue).bind(connection.default_channel).get(no_ack=False)
        assert reserved is not None and reserved.headers["task"] == DETECT_TASK
        (depth,) = read_depths(client, [queue], layout)
        assert (depth.ready, depth.unacked) == (4, 1)
        # The collector shows both states, summed per queue by a KEDA query.
        registry = CollectorRegistry()
        registry.register(metrics.QueueCollector(lambda: read_depths(client, [queue], layout)))
        samples = parse(generate_latest(registry).decode())
        assert value(samples, "synthsentry_queue_messages", queue=queue, state="ready") == 4
        assert value(samples, "synthsentry_queue_messages", queue=queue, state="unacked") == 1
        assert value(samples, "synthsentry_queue_consumers", queue=queue) == 1
        reserved.ack()
    (depth,) = read_depths(client, [queue], layout)
    assert (depth.ready, depth.unacked) == (4, 0)


def test_the_layout_names_kombus_priority_lists(redis_url: str) -> None:
    from kombu import Connection

    layout = RedisLayout.of({})
    with Connection(redis_url) as connection:
        channel = connection.default_channel
        for priority in range(10):
            assert layout.list_of("intake", priority) == channel._q_for_pri("intake", priority)
        assert layout.unacked_key == channel.unacked_key


def test_an_unreachable_broker_serves_the_families_without_samples() -> None:
    def unreachable() -> list[metrics.QueueDepth]:
        with redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1) as client:
            return read_depths(client, ["intake"], RedisLayout.of({}))

    before = counted("synthsentry_errors_total", component="reconcile")
    registry = CollectorRegistry()
    registry.register(metrics.QueueCollector(unreachable))
    text = generate_latest(registry).decode()
    assert "# TYPE synthsentry_queue_messages gauge" in text
    assert not [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert counted("synthsentry_errors_total", component="reconcile") == before + 1
    generate_latest(registry)  # within the cache's time: the broker is not asked again
    assert counted("synthsentry_errors_total", component="reconcile") == before + 1


# --- probes --------------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_loop_is_alive_while_it_beats_paused_or_busy_within_its_limit() -> None:
    clock = _Clock()
    loop = LoopProbe(stale_after_s=60, busy_limit_s=300, clock=clock)
    assert loop.alive()  # starting up
    loop.beat()
    clock.now += 61
    assert not loop.alive()
    loop.pause()  # reconnecting to its broker: a restart would not help
    assert loop.alive()
    loop.beat()
    with loop.busy():  # a task in the loop's own thread
        clock.now += 200
        assert loop.alive()
        clock.now += 200
        assert not loop.alive()
    assert not loop.alive()
    loop.beat()
    assert loop.alive()


def test_the_probe_server_answers_metrics_liveness_and_readiness() -> None:
    alive = Flag(True)
    loaded = Flag(False)
    readiness = Readiness({"consuming": Flag(True), "detector_loaded": loaded})
    registry = metrics.exposition_registry([metrics.ReadyCollector(readiness.ready)])
    server = ProbeServer(registry, live=alive, readiness=readiness, host="127.0.0.1", port=0)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert _get(f"{base}/livez") == (200, {"ok": True})
        status, body = _get(f"{base}/readyz")
        assert (status, body["checks"]) == (503, {"consuming": True, "detector_loaded": False})
        samples = parse(_text(f"{base}/metrics"))
        assert value(samples, "synthsentry_worker_ready") == 0
        assert ("synthsentry_errors_total", frozenset({("component", "api")})) in samples
        loaded.set()
        alive.set(False)
        assert _get(f"{base}/readyz")[0] == 200
        assert value(parse(_text(f"{base}/metrics")), "synthsentry_worker_ready") == 1
        assert _get(f"{base}/livez") == (503, {"ok": False})
        assert _get(f"{base}/nothing")[0] == 404
    finally:
        server.close()


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


def test_batches_go_to_the_histograms_and_the_log(caplog: pytest.LogCaptureFixture) -> None:
    observer = metrics.MetricsBatches(device="cuda:0")
    registry = metrics.exposition_registry()
    before = parse(generate_latest(registry).decode())
    with caplog.at_level("INFO", logger="workers.metrics"):
        observer.batch_ran("batcher-sumsub-test", 8, 0.12)
        observer.batch_ran("batcher-x", 3, 0.02, detector="sumsub-test", device="cpu")
    after = parse(generate_latest(registry).decode())

    def change(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert change("synthsentry_batch_size_count", detector="sumsub-test") == 2
    assert change("synthsentry_batch_size_sum", detector="sumsub-test") == 11
    assert change("synthsentry_batch_size_bucket", detector="sumsub-test", le="4.0") == 1
    gpu = {"detector": "sumsub-test", "device": "cuda:0"}
    assert change("synthsentry_model_latency_seconds_count", **gpu) == 1
    assert change("synthsentry_model_latency_seconds_sum", **gpu) == pytest.approx(0.12)
    assert (
        change("synthsentry_model_latency_seconds_count", detector="sumsub-test", device="cpu") == 1
    )
    assert [r.batch_size for r in caplog.records if r.msg == "batch ran"] == [8, 3]


def test_stale_value_files_are_removed_but_this_processes_and_live_ones(
    tmp_path: Path,
) -> None:
    import os

    gone = 4_194_305  # past Linux's largest possible pid: never a running process
    live = os.getppid()
    names = [f"counter_{gone}.db", f"histogram_{gone}.db", f"gauge_livesum_{gone}.db"]
    names += [f"counter_{live}.db", "counter_99.db"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("kept")
    assert metrics.clear_stale_files(str(tmp_path), keep_pid=99) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{live}.db", "counter_99.db", "notes.txt"]
    )


# --- the names ----------------------------------------------------------------------------------


def test_the_processes_export_every_name_of_the_contract() -> None:
    exported = metric_names.exported_metric_names()
    assert exported >= CONTRACT, sorted(CONTRACT - exported)
    # Nothing of ours that the contract does not name: a new metric is a contract change.
    assert {name for name in exported if name.startswith("synthsentry_")} == CONTRACT
