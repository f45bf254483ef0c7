"""Batch re-scans as real processes: `synthsentry rescan` and `synthsentry reconcile` on
real Postgres, Redis and an S3-protocol server; a lister SIGKILLed mid-listing goes on
where it stopped, and a worker serves an upload before bulk work queued earlier."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from badfiles import sample_picture
from conftest import DatabaseFactory, empty_tables, s3_client
from fleet_processes import FleetProcess, cli, fleet_env, running, wait_for

BUCKET = "rescan-procs"


@pytest.fixture(scope="module")
def database(committing_database: DatabaseFactory) -> str:
    return committing_database("rescan_procs")


@pytest.fixture
def env(tmp_path: Path, database: str, redis_url: str, s3_endpoint: str) -> dict[str, str]:
    engine = sa.create_engine(database)
    empty_tables(engine)
    engine.dispose()
    client = s3_client(s3_endpoint)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return fleet_env(
        tmp_path,
        database=database,
        redis_url=redis_url,
        s3_endpoint=s3_endpoint,
        model=False,
        fleet_detectors='["provenance"]',
        allowed_buckets=BUCKET,
        log_level="INFO",
    )


def _query(url: str, sql: str) -> list[tuple[object, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text(sql))]
    finally:
        engine.dispose()


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    sample_picture((48 + i, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_lister_killed_mid_listing_goes_on_where_it_stopped(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, database: str, redis_url: str
) -> None:
    client = s3_client(s3_endpoint)
    total = 240
    for i in range(total):  # the lister never reads the bytes: any will do
        client.put_object(Bucket=BUCKET, Key=f"big/{i:04d}.png", Body=b"x")
    created = cli(
        env, "rescan", "create", "--bucket", BUCKET, "--prefix", "big/", "--json", timeout=120
    )
    assert created.returncode == 0, created.stderr
    public_id = json.loads(created.stdout)["id"]
    env = {**env, "SYNTHSENTRY_RESCAN_PAGE_SIZE": "3"}
    args = ["reconcile", "--every", "600", "--rescan-every", "0.2"]

    def listed() -> tuple[str, int, str | None]:
        ((state, count, cursor),) = _query(
            database, f"SELECT state, listed, cursor FROM rescans WHERE public_id = '{public_id}'"
        )
        return str(state), int(str(count)), None if cursor is None else str(cursor)

    lister = FleetProcess("reconcile", args, env, tmp_path).start()
    try:
        wait_for(
            lambda: listed()[1] >= 30,
            timeout=60,
            what="the listing to be under way",
            processes=(lister,),
            interval=0.005,
        )
        lister.kill()
    finally:
        lister.stop()
    state, at_kill, cursor = listed()
    assert state == "listing" and at_kill < total, "the kill came too late to test"
    # What was committed is whole: the items, the counter and the cursor agree.
    ((recorded, last_key),) = _query(
        database, "SELECT count(*), max(object_key) FROM sources WHERE rescan_id IS NOT NULL"
    )
    assert (recorded, last_key) == (at_kill, cursor)

    with running(FleetProcess("reconcile-again", args, env, tmp_path)) as processes:
        wait_for(
            lambda: listed()[0] == "running",
            timeout=60,
            what="the listing to finish",
            processes=processes,
        )
    rows = _query(
        database,
        "SELECT object_key, count(*) FROM sources WHERE rescan_id IS NOT NULL GROUP BY object_key",
    )
    assert len(rows) == total and {count for _, count in rows} == {1}
    assert listed()[1] == total
    # No page was sent twice; a kill between a page's commit and its sends loses at most
    # that page's messages (the reconciler sends them once they count as stalled).
    queued = redis.Redis.from_url(redis_url).llen("bulk.intake")
    assert total - 3 <= queued <= total
    status = cli(env, "rescan", "status", public_id, "--json", timeout=120)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["state"] == "running" and shown["counts"]["listed"] == total
    assert shown["counts"]["pending"] == total and shown["total"] == total
    listing = cli(env, "rescan", "list", timeout=120)
    assert public_id in listing.stdout and "running" in listing.stdout
    cancelled = cli(env, "rescan", "cancel", public_id, timeout=120)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled.stderr
    actions = _query(database, "SELECT action FROM audit_log WHERE subject_type = 'rescan'")
    assert [a for (a,) in actions] == ["rescan.created", "rescan.running", "rescan.cancelled"]


def test_a_worker_serves_uploads_before_bulk_work_queued_earlier(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, database: str, redis_url: str
) -> None:
    """Three re-scan items on bulk.intake, then two uploads on intake: one worker process
    takes in both uploads first. (With kombu's default queue order, round robin, the queue
    just read goes last, so the second upload would wait behind a bulk item.)"""
    client = s3_client(s3_endpoint)
    keys = [f"order/{i}.png" for i in range(5)]
    for i, key in enumerate(keys):
        client.put_object(Bucket=BUCKET, Key=key, Body=_png(i))
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("\n".join(keys[:3]) + "\n", encoding="utf-8")
    created = cli(
        env, "rescan", "create", "--bucket", BUCKET, "--keys-from", str(keys_file), timeout=120
    )
    assert created.returncode == 0, created.stderr
    once = cli(env, "reconcile", "--once", timeout=120)  # lists the three keys onto bulk.intake
    assert once.returncode == 0 and "listed 1 re-scan pages" in once.stdout, once.stderr
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen("bulk.intake") == 3 and broker.llen("intake") == 0
    uploads = [f"s3://{BUCKET}/{key}" for key in keys[3:]]
    submitted = cli(env, "submit", *uploads, timeout=120)  # two uploads, queued last
    assert submitted.returncode == 0, submitted.stderr
    assert broker.llen("intake") == 2

    worker = FleetProcess("intake", ["worker", "--intake", "--concurrency", "1"], env, tmp_path)
    with running(worker) as processes:
        wait_for(
            lambda: (
                _query(database, "SELECT count(*) FROM sources WHERE image_id IS NULL") == [(0,)]
            ),
            timeout=90,
            what="every upload and item to be taken in",
            processes=processes,
        )
    order = [
        key
        for (key,) in _query(
            database,
            "SELECT s.object_key FROM sources s JOIN images i ON i.id = s.image_id "
            "ORDER BY i.first_seen_at",
        )
    ]
    assert sorted(order[:2]) == keys[3:], order  # the uploads first, though queued last
    assert sorted(order[2:]) == keys[:3]
    # Taken in as bulk work, the items' detects went to the bulk twin of the detector queue.
    assert broker.llen("bulk.detect.provenance") == 3
    assert broker.llen("detect.provenance") == 2
    broker.close()
