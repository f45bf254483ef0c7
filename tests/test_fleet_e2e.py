"""The whole fleet, end to end, as separate processes: uploads to an S3-protocol server
notify an SQS queue (a real bucket notification on moto's server), `synthsentry ingest sqs`
turns events into scans, an intake worker and two detector workers (provenance and a model
built from a published-format checkpoint) consume their own queues over Redis, and Postgres
holds the results. Then again with every event delivered twice and the model's process
SIGKILLed mid-run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
import sqlalchemy as sa

from badfiles import SPARSE_SIZE, write_bad_files
from conftest import DatabaseFactory, s3_client
from fleet_processes import FleetProcess, fleet_env, running, wait_for

BUCKET = "e2e-uploads"


@pytest.fixture
def database(committing_database: DatabaseFactory) -> str:
    return committing_database("e2e")


def _sqs(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def notified_bucket(s3_endpoint: str, tmp_path: Path) -> str:
    """A bucket whose ObjectCreated events go to a fresh SQS queue; returns the queue URL."""
    sqs = _sqs(s3_endpoint)
    queue_url = sqs.create_queue(QueueName=f"uploads-{tmp_path.name[-20:]}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    s3 = s3_client(s3_endpoint)
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_notification_configuration(
        Bucket=BUCKET,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    return str(queue_url)


def _env(tmp_path: Path, database: str, redis_url: str, s3_endpoint: str) -> dict[str, str]:
    return fleet_env(
        tmp_path,
        database=database,
        redis_url=redis_url,
        s3_endpoint=s3_endpoint,
        fleet_detectors='["provenance", "sumsub-mj5"]',
        # The random-weight model says nothing real; a threshold above its scores leaves the
        # review cases to what provenance finds, which the corpus manifest predicts.
        flag_threshold="1.0",
        allowed_buckets=BUCKET,
        # Short, so that the messages of the worker killed below come back within the test.
        task_time_limit_seconds="10",
        visibility_timeout_seconds="25",
    )


def _fleet(
    env: dict[str, str], tmp_path: Path, queue_url: str, endpoint: str
) -> list[FleetProcess]:
    return [
        FleetProcess(
            "ingest",
            [
                "ingest",
                "sqs",
                "--queue-url",
                queue_url,
                "--endpoint-url",
                endpoint,
                "--wait-seconds",
                "1",
            ],
            env,
            tmp_path,
        ),
        FleetProcess("intake", ["worker", "--intake", "--concurrency", "2"], env, tmp_path),
        FleetProcess("provenance", ["worker", "--detector", "provenance"], env, tmp_path),
        FleetProcess("mj5", ["worker", "--detector", "sumsub-mj5"], env, tmp_path),
        # Sends again the work of uploads pending past the visibility timeout plus the time
        # limit (35 s here): what a kill between Redis's pop and its unacked mark would lose.
        FleetProcess("reconcile", ["reconcile", "--every", "2"], env, tmp_path),
    ]


def _upload_all(s3_endpoint: str, corpus_dir: Path, tmp_path: Path, prefix: str) -> dict[str, str]:
    """Every corpus image and every bad file except the sparse 3 GiB one; returns
    {key: expected status or rejection reason}."""
    s3 = s3_client(s3_endpoint)
    expected = {}
    for path in sorted((corpus_dir / "images").iterdir()):
        key = f"{prefix}/corpus/{path.name}"
        s3.upload_file(str(path), BUCKET, key)
        expected[key] = "scored"
    bad = write_bad_files(tmp_path / "bad")
    for name, reason in bad.items():
        path = tmp_path / "bad" / name
        if path.stat().st_size >= SPARSE_SIZE:
            continue  # 3 GiB through moto is no test of ours; the size check is unit-tested
        key = f"{prefix}/bad files/{name}"
        s3.upload_file(str(path), BUCKET, key)
        expected[key] = reason.value
    assert len(expected) >= 50
    return expected


def _state(url: str) -> dict[str, Any]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT object_key, status, reject_reason, image_id FROM sources")
        ).all()
        verdicts = connection.execute(
            sa.text("SELECT image_id, count(*) FROM verdicts GROUP BY image_id")
        ).all()
        cases = connection.execute(sa.text("SELECT count(*) FROM review_cases")).scalar_one()
        flagged = connection.execute(
            sa.text("SELECT count(DISTINCT image_id) FROM verdicts WHERE flagged")
        ).scalar_one()
        duplicates = connection.execute(
            sa.text(
                "SELECT count(*) FROM (SELECT image_id, detector_name, detector_version "
                "FROM detections GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
            )
        ).scalar_one()
        attempts = connection.execute(
            sa.text(
                "SELECT coalesce(sum(attempts), 0) FROM detection_attempts "
                "WHERE detector_name = 'sumsub-mj5'"
            )
        ).scalar_one()
        detections = connection.execute(
            sa.text("SELECT count(*) FROM detections WHERE detector_name = 'sumsub-mj5'")
        ).scalar_one()
    engine.dispose()
    return {
        "sources": {r.object_key: (r.status, r.reject_reason, r.image_id) for r in rows},
        "verdicts": dict(verdicts),
        "cases": cases,
        "flagged": flagged,
        "duplicate_detections": duplicates,
        "attempts": attempts,
        "detections": detections,
    }


def _finished(url: str, expected: dict[str, str]) -> dict[str, Any] | None:
    state = _state(url)
    sources = state["sources"]
    if set(sources) != set(expected) or any(s[0] == "pending" for s in sources.values()):
        return None
    return state


def _check(state: dict[str, Any], expected: dict[str, str]) -> None:
    for key, want in expected.items():
        status, reason, _ = state["sources"][key]
        if want == "scored":
            assert status == "scored", (key, status, reason)
        else:
            assert (status, reason) == ("rejected", want), key
    # Every image whose bytes were read has its verdict: scored, or "not scored".
    read_images = {s[2] for s in state["sources"].values() if s[2] is not None}
    assert set(state["verdicts"]) == read_images
    assert all(count == 1 for count in state["verdicts"].values()), "one verdict per image"
    assert state["duplicate_detections"] == 0
    assert state["cases"] == state["flagged"]
    # Provenance flags the images whose files say they are AI-made (see the manifest).
    assert state["flagged"] >= 10


def test_uploads_to_verdicts_through_sqs_and_workers(
    tmp_path: Path,
    database: str,
    redis_url: str,
    s3_endpoint: str,
    notified_bucket: str,
    corpus_dir: Path,
) -> None:
    env = _env(tmp_path, database, redis_url, s3_endpoint)
    processes = _fleet(env, tmp_path, notified_bucket, s3_endpoint)
    with running(*processes):
        expected = _upload_all(s3_endpoint, corpus_dir, tmp_path, "first")
        state = wait_for(
            lambda: _finished(database, expected),
            timeout=600,
            what="a result for every upload",
            processes=tuple(processes),
            interval=1.0,
        )
    _check(state, expected)


def test_duplicated_events_and_a_killed_model_process(
    tmp_path: Path,
    database: str,
    redis_url: str,
    s3_endpoint: str,
    notified_bucket: str,
    corpus_dir: Path,
) -> None:
    env = _env(tmp_path, database, redis_url, s3_endpoint)
    processes = _fleet(env, tmp_path, notified_bucket, s3_endpoint)
    sqs = _sqs(s3_endpoint)
    with running(*processes):
        expected = _upload_all(s3_endpoint, corpus_dir, tmp_path, "second")
        # Deliver every upload's event a second time, as S3's at-least-once delivery may.
        for key in expected:
            head = s3_client(s3_endpoint).head_object(Bucket=BUCKET, Key=key)
            record = {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": BUCKET},
                    "object": {
                        "key": quote_plus(key, safe="/"),
                        "size": head["ContentLength"],
                        "eTag": head["ETag"].strip('"'),
                    },
                },
            }
            sqs.send_message(
                QueueUrl=notified_bucket, MessageBody=json.dumps({"Records": [record]})
            )
        mj5 = processes[3]
        wait_for(
            lambda: (s := _state(database))["attempts"] > s["detections"],
            timeout=300,
            what="a model task in flight",
            processes=tuple(processes),
            interval=0.005,
        )
        # SIGKILL the whole batching worker, as a lost node would, and start a new one.
        mj5.kill()
        mj5.start()
        state = wait_for(
            lambda: _finished(database, expected),
            timeout=600,
            what="a result for every upload after the kill",
            processes=tuple(processes),
            interval=1.0,
        )
    _check(state, expected)
