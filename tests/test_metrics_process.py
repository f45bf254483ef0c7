"""Metrics of real fleet processes: a prefork intake worker (its pool's children report
through the multiprocess folder it makes), a batching detector worker and the reconciler,
on a real Redis broker, Postgres and an S3-protocol server; each scraped on its own port."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import port_for
import pytest
import sqlalchemy as sa

from badfiles import sample_picture
from conftest import DatabaseFactory, s3_client
from fleet_processes import FleetProcess, cli, fleet_env, running, wait_for
from metric_names import Samples, parse, value

BUCKET = "metrics-procs"
DETECTOR = "sumsub-mj5"
IMAGES = 5


@pytest.fixture(scope="module")
def database(committing_database: DatabaseFactory) -> str:
    return committing_database("metrics_procs")


@pytest.fixture
def env(tmp_path: Path, database: str, redis_url: str, s3_endpoint: str) -> dict[str, str]:
    engine = sa.create_engine(database)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "TRUNCATE review_cases, verdicts, detections, detection_attempts, sources, "
                "images, dead_letters RESTART IDENTITY CASCADE"
            )
        )
    engine.dispose()
    client = s3_client(s3_endpoint)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return fleet_env(
        tmp_path,
        database=database,
        redis_url=redis_url,
        s3_endpoint=s3_endpoint,
        fleet_detectors=f'["{DETECTOR}"]',
        flag_threshold="0.0",  # every scored image is flagged: a known verdict per image
        log_level="INFO",
    )


def _put_images(s3_endpoint: str) -> list[str]:
    """``IMAGES`` distinct pictures and one broken file."""
    client = s3_client(s3_endpoint)
    keys = []
    for i in range(IMAGES):
        buffer = io.BytesIO()
        sample_picture((100 + 4 * i, 72)).save(buffer, "PNG")
        keys.append(f"m/img {i}.png")
        client.put_object(Bucket=BUCKET, Key=keys[-1], Body=buffer.getvalue())
    client.put_object(Bucket=BUCKET, Key="m/broken.jpg", Body=b"\xff\xd8\xff\xe0 junk")
    return [*keys, "m/broken.jpg"]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def _scrape(port: int) -> Samples | None:
    status, text = _get(port, "/metrics")
    return parse(text) if status == 200 else None


def _ready(port: int) -> bool:
    return _get(port, "/readyz")[0] == 200


def _pending(url: str) -> dict[str, Any]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        pending = connection.execute(
            sa.text("SELECT count(*) FROM sources WHERE status = 'pending'")
        ).scalar_one()
        sources = connection.execute(sa.text("SELECT count(*) FROM sources")).scalar_one()
        reason = connection.execute(
            sa.text("SELECT reject_reason FROM sources WHERE status = 'rejected'")
        ).scalar()
    engine.dispose()
    return {"pending": pending, "sources": sources, "reason": reason}


def test_workers_and_the_reconciler_export_what_they_did(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, database: str
) -> None:
    keys = _put_images(s3_endpoint)
    ports = {name: port_for.select_random() for name in ("intake", "detect", "reconcile")}
    reconcile = FleetProcess(
        "reconcile",
        ["reconcile", "--every", "3600", "--metrics-port", str(ports["reconcile"])],
        env,
        tmp_path,
    )
    intake = FleetProcess(
        "intake",
        ["worker", "--intake", "--concurrency", "2", "--metrics-port", str(ports["intake"])],
        env,
        tmp_path,
    )
    detect = FleetProcess(
        "detect",
        ["worker", "--detector", DETECTOR, "--metrics-port", str(ports["detect"])],
        env,
        tmp_path,
    )
    intake_queue, detect_queue = "intake", f"detect.{DETECTOR}"
    with running(reconcile) as processes:
        # Work waits before any worker runs: the reconciler shows it, and nobody consuming.
        submitted = cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys])
        assert submitted.returncode == 0, submitted.stderr

        def waiting() -> Samples | None:
            samples = _scrape(ports["reconcile"])
            ready = samples and value(
                samples, "synthsentry_queue_messages", queue=intake_queue, state="ready"
            )
            return samples if ready == len(keys) else None

        samples = wait_for(
            waiting, timeout=60, what="the reconciler to show the backlog", processes=processes
        )
        assert (
            value(samples, "synthsentry_queue_messages", queue=intake_queue, state="unacked") == 0
        )
        assert value(samples, "synthsentry_queue_consumers", queue=intake_queue) == 0
        assert _get(ports["reconcile"], "/livez")[0] == 200
        assert _ready(ports["reconcile"])

        with running(intake, detect) as workers:
            everyone = (*processes, *workers)
            wait_for(
                lambda: _ready(ports["detect"]) and _ready(ports["intake"]),
                timeout=180,
                what="both workers to be ready (the model loaded)",
                processes=everyone,
            )
            done = wait_for(
                lambda: (
                    (c := _pending(database))["pending"] == 0 and c["sources"] == len(keys) and c
                ),
                timeout=240,
                what="every upload to be scored or rejected",
                processes=everyone,
            )

            def caught_up(port: int, *counts: tuple[str, dict[str, str], float]) -> Samples:
                """The process's metrics once each counter has reached its count: a process
                bumps its counters after the work they count is stored, so they may trail
                the database by a moment."""

                def check() -> Samples | None:
                    samples = _scrape(port)
                    reached = samples and all(value(samples, n, **ls) >= c for n, ls, c in counts)
                    return samples if reached else None

                return wait_for(check, timeout=30, what=f"{counts} counted", processes=everyone)

            taken_in = caught_up(
                ports["intake"],
                ("synthsentry_queue_wait_seconds_count", {"queue": intake_queue}, len(keys)),
                ("synthsentry_verdicts_total", {"outcome": "not_scored"}, 1),
            )
            detected = caught_up(
                ports["detect"],
                ("synthsentry_batch_size_sum", {"detector": DETECTOR}, IMAGES),
                ("synthsentry_verdicts_total", {"outcome": "flagged"}, IMAGES),
                (
                    "synthsentry_detections_total",
                    {"detector": DETECTOR, "outcome": "scored"},
                    IMAGES,
                ),
            )
            for port in ports.values():
                assert _get(port, "/livez") == (200, json.dumps({"ok": True}))

            def drained() -> Samples | None:
                samples = _scrape(ports["reconcile"])
                depths = samples and [
                    value(samples, "synthsentry_queue_messages", queue=q, state=s)
                    for q in (intake_queue, detect_queue)
                    for s in ("ready", "unacked")
                ]
                live = samples and value(samples, "synthsentry_queue_consumers", queue=detect_queue)
                return samples if depths == [0, 0, 0, 0] and live == 1 else None

            wait_for(drained, timeout=60, what="the queues to drain", processes=everyone)
            # A batch is logged just after it is counted.
            batches = wait_for(
                lambda: (sizes := detect.batch_sizes()) and sum(sizes) >= IMAGES and sizes,
                timeout=30,
                what="every batch logged",
                processes=everyone,
            )

    # The intake worker's tasks ran in its pool's children, and its parent exports them.
    assert value(taken_in, "synthsentry_queue_wait_seconds_count", queue=intake_queue) == len(keys)
    reason = done["reason"]
    assert value(taken_in, "synthsentry_intake_rejections_total", reason=reason) == 1
    assert value(taken_in, "synthsentry_verdicts_total", outcome="not_scored") == 1
    assert value(taken_in, "synthsentry_errors_total", component="intake") == 0
    assert value(taken_in, "synthsentry_worker_ready") == 1

    # The detector worker: one detection and one verdict per image, each message's wait.
    scored = {"detector": DETECTOR, "outcome": "scored"}
    assert value(detected, "synthsentry_detections_total", **scored) == IMAGES
    assert value(detected, "synthsentry_verdicts_total", outcome="flagged") == IMAGES
    assert value(detected, "synthsentry_queue_wait_seconds_count", queue=detect_queue) == IMAGES
    assert value(detected, "synthsentry_errors_total", component="detect") == 0
    assert value(detected, "synthsentry_worker_ready") == 1
    # Every batch the model ran, as its log lines tell them.
    assert sum(batches) == IMAGES and batches
    assert value(detected, "synthsentry_batch_size_count", detector=DETECTOR) == len(batches)
    assert value(detected, "synthsentry_batch_size_sum", detector=DETECTOR) == IMAGES
    latency = {"detector": DETECTOR, "device": "cpu"}
    assert value(detected, "synthsentry_model_latency_seconds_count", **latency) == len(batches)
    assert value(detected, "synthsentry_model_latency_seconds_sum", **latency) > 0


def test_the_callback_sender_serves_its_metrics_and_probes(
    env: dict[str, str], tmp_path: Path
) -> None:
    """``callbacks deliver`` runs until stopped like the workers: its port answers
    /livez, /readyz once a round reached the database, and /metrics with its counters."""
    port = port_for.select_random()
    command = ["callbacks", "deliver", "--metrics-port", str(port)]
    with running(FleetProcess("callbacks", command, env, tmp_path)) as processes:
        wait_for(
            lambda: _ready(port),
            timeout=60,
            what="the callback sender to be ready",
            processes=processes,
        )
        assert _get(port, "/livez")[0] == 200
        samples = _scrape(port)
        assert samples is not None
        for outcome in ("delivered", "failed", "gave_up", "refused"):
            key = ("synthsentry_callback_deliveries_total", frozenset({("outcome", outcome)}))
            assert samples[key] == 0, f"no {outcome} series before any delivery"
