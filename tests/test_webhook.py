"""The upload webhook as a user runs it: `synthsentry webhook` in its own process, real
Postgres and Redis, HTTP requests over loopback."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import port_for
import pytest
import redis
import sqlalchemy as sa

from conftest import DatabaseFactory
from fleet_processes import FleetProcess, running, wait_for

SECRET = "a-long-random-webhook-token-4f9c2e"


@pytest.fixture
def webhook(
    tmp_path: Path, committing_database: DatabaseFactory, redis_url: str
) -> Iterator[tuple[str, str]]:
    database = committing_database("webhook")
    redis.Redis.from_url(redis_url).flushdb()
    port = port_for.select_random()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    env.update(
        SYNTHSENTRY_DATA_DIR=str(tmp_path / "data"),
        SYNTHSENTRY_DATABASE_URL=database,
        SYNTHSENTRY_BROKER_URL=redis_url,
        SYNTHSENTRY_ALLOWED_BUCKETS="uploads",
        SYNTHSENTRY_WEBHOOK_SECRET=SECRET,
    )
    process = FleetProcess("webhook", ["webhook", "--port", str(port)], env, tmp_path)
    base = f"http://127.0.0.1:{port}"
    with running(process):
        wait_for(
            lambda: _get(base + "/healthz") == 200,
            timeout=60,
            what="the webhook",
            processes=(process,),
            interval=0.2,
        )
        yield base, database


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except (urllib.error.URLError, ConnectionError):
        return 0


def _post(url: str, body: bytes, token: str = SECRET) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _minio_event(bucket: str, key: str, etag: str) -> bytes:
    # The shape MinIO's webhook target posts: S3 records plus EventName/Key at the top.
    return json.dumps(
        {
            "EventName": "s3:ObjectCreated:Put",
            "Key": f"{bucket}/{key}",
            "Records": [
                {
                    "eventVersion": "2.0",
                    "eventSource": "minio:s3",
                    "eventName": "s3:ObjectCreated:Put",
                    "s3": {
                        "bucket": {"name": bucket},
                        "object": {"key": key, "size": 1234, "eTag": etag},
                    },
                }
            ],
        }
    ).encode()


def test_webhook_records_queues_and_refuses(webhook: tuple[str, str], redis_url: str) -> None:
    base, database = webhook
    url = base + "/s3-events"
    event = _minio_event("uploads", "user+42/photo.jpg", "0123abcd")

    assert _post(url, event, token="wrong")[0] == 401
    status, body = _post(url, event)
    assert (status, body["accepted"]) == (200, 1)
    status, body = _post(url, _minio_event("elsewhere", "x.jpg", "99"))
    assert (status, body["refused"], body["accepted"]) == (200, 1, 0)
    status, body = _post(url, b"{not json")
    assert status == 400

    engine = sa.create_engine(database)
    with engine.connect() as connection:
        sources = connection.execute(sa.text("SELECT bucket, object_key FROM sources")).all()
        letters = connection.execute(sa.text("SELECT channel FROM dead_letters")).scalars().all()
    engine.dispose()
    assert sources == [("uploads", "user 42/photo.jpg")]  # the key is URL-decoded
    assert letters == ["webhook"]
    # The intake task is on the broker, as JSON.
    queued = redis.Redis.from_url(redis_url).lrange("intake", 0, -1)
    assert len(queued) == 1
    message = json.loads(queued[0])
    assert message["content-type"] == "application/json"
    assert message["headers"]["task"] == "synthsentry.intake"
