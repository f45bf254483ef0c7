"""The fleet as separate processes: Celery workers on Redis, Postgres, an S3-protocol server.
Nothing is mocked; workers are killed with real signals."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import servers
from badfiles import sample_picture
from conftest import DatabaseFactory, s3_client
from fleet_processes import FleetProcess, fleet_env, running, wait_for

BUCKET = "fleet-procs"


@pytest.fixture(scope="module")
def database(committing_database: DatabaseFactory) -> str:
    return committing_database("procs")


@pytest.fixture
def clean_database(database: str) -> str:
    engine = sa.create_engine(database)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "TRUNCATE review_cases, verdicts, detections, detection_attempts, sources, "
                "images, dead_letters RESTART IDENTITY CASCADE"
            )
        )
    engine.dispose()
    return database


@pytest.fixture
def env(tmp_path: Path, clean_database: str, redis_url: str, s3_endpoint: str) -> dict[str, str]:
    client = s3_client(s3_endpoint)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return fleet_env(
        tmp_path,
        database=clean_database,
        redis_url=redis_url,
        s3_endpoint=s3_endpoint,
        fleet_detectors='["sumsub-mj5"]',
        flag_threshold="0.0",
        log_level="INFO",
    )


def _put_images(s3_endpoint: str, prefix: str, count: int) -> list[str]:
    client = s3_client(s3_endpoint)
    keys = []
    for i in range(count):
        buffer = io.BytesIO()
        sample_picture((96 + 4 * i, 72)).save(buffer, "PNG")
        key = f"{prefix}/img {i:02d}.png"
        client.put_object(Bucket=BUCKET, Key=key, Body=buffer.getvalue())
        keys.append(key)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/broken.jpg", Body=b"\xff\xd8\xff\xe0 junk")
    keys.append(f"{prefix}/broken.jpg")
    return keys


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "synthsentry.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _counts(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        counts = {
            table: connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("sources", "images", "detections", "verdicts", "review_cases")
        }
        counts["pending"] = connection.execute(
            sa.text("SELECT count(*) FROM sources WHERE status = 'pending'")
        ).scalar_one()
        counts["attempts"] = connection.execute(
            sa.text("SELECT coalesce(sum(attempts), 0) FROM detection_attempts")
        ).scalar_one()
        counts["rejected"] = connection.execute(
            sa.text("SELECT count(*) FROM sources WHERE status = 'rejected'")
        ).scalar_one()
    engine.dispose()
    return counts


def _workers(
    env: dict[str, str], tmp_path: Path, *detector_args: str
) -> tuple[FleetProcess, FleetProcess]:
    return (
        FleetProcess("intake", ["worker", "--intake", "--concurrency", "2"], env, tmp_path),
        FleetProcess("mj5", ["worker", "--detector", "sumsub-mj5", *detector_args], env, tmp_path),
    )


def test_submit_to_verdict_through_real_workers(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, clean_database: str
) -> None:
    keys = _put_images(s3_endpoint, "batch", 6)
    with running(*_workers(env, tmp_path)) as processes:
        submitted = _cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys])
        assert submitted.returncode == 0, submitted.stderr
        counts = wait_for(
            lambda: (c := _counts(clean_database))["pending"] == 0 and c["sources"] == 7 and c,
            timeout=180,
            what="every upload to be scored or rejected",
            processes=processes,
        )
        # Submitting the same objects again is a no-op.
        again = _cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys])
        assert again.stdout.count("already scanned") == 7
    assert counts["verdicts"] == 6 and counts["detections"] == 6
    assert counts["review_cases"] == 6 and counts["rejected"] == 1
    status = _cli(env, "status", f"s3://{BUCKET}/batch/img 00.png", "--json")
    assert status.returncode == 0, status.stderr
    assert '"status": "scored"' in status.stdout and '"sumsub-mj5"' in status.stdout
    broken = _cli(env, "status", f"s3://{BUCKET}/batch/broken.jpg", "--json")
    assert '"reason": "decode_error"' in broken.stdout or '"reason": "truncated"' in broken.stdout


def test_sigkilled_model_process_loses_nothing(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, clean_database: str
) -> None:
    keys = _put_images(s3_endpoint, "killed", 12)
    intake, mj5 = _workers(env, tmp_path, "--batch-size", "1")  # prefork, one per process
    with running(intake, mj5) as processes:
        submitted = _cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys])
        assert submitted.returncode == 0, submitted.stderr
        # Kill the pool process that runs the model while a task is in flight: its attempt is
        # recorded, its detection is not yet stored.
        wait_for(
            lambda: (c := _counts(clean_database))["attempts"] > c["detections"],
            timeout=180,
            what="a detector task in flight",
            processes=processes,
            interval=0.005,
        )
        children = mj5.children()
        assert children, mj5.log_tail()
        os.kill(children[0], 9)
        counts = wait_for(
            lambda: (c := _counts(clean_database))["pending"] == 0 and c["sources"] == 13 and c,
            timeout=240,
            what="every upload to be scored after the kill",
            processes=processes,
        )
        # Then kill the whole worker and start a new one: nothing is left to do twice.
        mj5.kill()
        mj5.start()
    assert counts["verdicts"] == 12 and counts["detections"] == 12
    assert counts["review_cases"] == 12 and counts["rejected"] == 1
    # The killed task was delivered again (requeued on worker loss) and finished once.
    assert counts["attempts"] > 12
    assert "WorkerLostError" in mj5.log_path.read_text(errors="replace")
    assert _counts(clean_database)["verdicts"] == 12


def test_sigkilled_batching_worker_loses_nothing(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, clean_database: str
) -> None:
    """A batching worker holds a batch running and a batch filling, all in one process: when
    that process dies, Redis hands its messages out again after the visibility timeout, and
    the restarted worker finishes them, once each."""
    env = {
        **env,
        "SYNTHSENTRY_TASK_TIME_LIMIT_SECONDS": "10",
        "SYNTHSENTRY_VISIBILITY_TIMEOUT_SECONDS": "25",
    }
    keys = _put_images(s3_endpoint, "killed-batch", 16)
    intake, mj5 = _workers(env, tmp_path, "--batch-size", "4", "--batch-wait-ms", "200")
    # Redis pops a message before it marks it unacknowledged: a kill between the two loses
    # the message, and the reconciler sends its work again (after 35 s, the default here).
    reconcile = FleetProcess("reconcile", ["reconcile", "--every", "2"], env, tmp_path)
    with running(intake, reconcile, mj5) as processes:
        mj5.stop()  # a backlog first: the model worker starts on 16 waiting messages
        sent = time.monotonic()
        submitted = _cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys])
        assert submitted.returncode == 0, submitted.stderr
        wait_for(
            lambda: _counts(clean_database)["images"] == 17,
            timeout=180,
            what="intake to send every detect message",
            processes=processes,
        )
        mj5.start()
        in_flight = wait_for(
            lambda: (c := _counts(clean_database))["attempts"] > c["detections"] and c,
            timeout=180,
            what="detector tasks in flight",
            processes=processes,
            interval=0.005,
        )
        mj5.kill()
        assert _counts(clean_database)["detections"] < 16, "the kill came too late to test"
        mj5.start()
        counts = wait_for(
            lambda: (c := _counts(clean_database))["pending"] == 0 and c["sources"] == 17 and c,
            timeout=240,
            what="every upload to be scored after the kill",
            processes=processes,
        )
        finished_after = time.monotonic() - sent
    assert counts["verdicts"] == 16 and counts["detections"] == 16
    assert counts["review_cases"] == 16 and counts["rejected"] == 1
    # The messages the dead process held were delivered again and counted again.
    assert counts["attempts"] > 16 and in_flight["attempts"] > in_flight["detections"]
    # Redelivery waited for the visibility timeout, counted from the first delivery: the
    # restarted worker could not take the held messages earlier.
    assert finished_after >= 25, finished_after
    # The waiting messages met in batches larger than one.
    assert max(mj5.batch_sizes()) > 1


POISON_WIDTH = 97  # tests/dying_worker.py kills the model process on images this wide


def test_a_message_that_kills_its_worker_every_time_is_given_up(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, clean_database: str
) -> None:
    """An upload whose every delivery takes the model's process down (SIGKILL at the model
    call, after the attempt was counted and before a result is stored) ends as a failed
    detection after SYNTHSENTRY_MAX_DETECT_ATTEMPTS, with a verdict, instead of looping."""
    env = {**env, "SYNTHSENTRY_MAX_DETECT_ATTEMPTS": "2"}
    buffer = io.BytesIO()
    sample_picture((POISON_WIDTH, 61)).save(buffer, "PNG")
    s3_client(s3_endpoint).put_object(Bucket=BUCKET, Key="poison/p.png", Body=buffer.getvalue())
    intake = FleetProcess("intake", ["worker", "--intake"], env, tmp_path)
    dying = [sys.executable, str(Path(__file__).with_name("dying_worker.py")), str(POISON_WIDTH)]
    mj5 = FleetProcess(
        "mj5", ["worker", "--detector", "sumsub-mj5", "--batch-size", "1"], env, tmp_path, dying
    )
    with running(intake, mj5) as processes:
        submitted = _cli(env, "submit", f"s3://{BUCKET}/poison/p.png")
        assert submitted.returncode == 0, submitted.stderr
        counts = wait_for(
            lambda: (c := _counts(clean_database))["verdicts"] == 1 and c,
            timeout=180,
            what="the poison upload's verdict",
            processes=processes,
        )
    # Two deliveries reached the model and died with their process; the third gave up.
    assert counts["attempts"] == 3
    log = mj5.log_path.read_text(errors="replace")
    assert log.count('"msg": "Task handler raised error: WorkerLostError') == 2
    engine = sa.create_engine(clean_database)
    with engine.connect() as connection:
        score, error = connection.execute(sa.text("SELECT score, error FROM detections")).one()
        reason = connection.execute(sa.text("SELECT reason FROM verdicts")).scalar_one()
    engine.dispose()
    assert score is None and "gave up after 2 attempts" in error
    assert "sumsub-mj5" in reason


def test_work_the_broker_lost_is_sent_again(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, clean_database: str
) -> None:
    """Uploads recorded while the broker loses every queued message (a Redis without its
    disk) are finished anyway: the reconciler finds them pending in Postgres."""
    import redis

    keys = _put_images(s3_endpoint, "lost", 4)
    submitted = _cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys])
    assert submitted.returncode == 0, submitted.stderr
    redis.Redis.from_url(env["SYNTHSENTRY_BROKER_URL"]).flushdb()
    assert _counts(clean_database)["pending"] == 5
    reconcile = FleetProcess(
        "reconcile", ["reconcile", "--after", "1", "--every", "1"], env, tmp_path
    )
    with running(*_workers(env, tmp_path), reconcile) as processes:
        counts = wait_for(
            lambda: (c := _counts(clean_database))["pending"] == 0 and c,
            timeout=180,
            what="every lost upload to be scored",
            processes=processes,
        )
    assert counts["verdicts"] == 4 and counts["detections"] == 4 and counts["rejected"] == 1
    assert "sending again the work of stalled uploads" in reconcile.log_path.read_text()
    # Nothing is pending, so a check finds nothing to send.
    once = _cli(env, "reconcile", "--after", "1", "--once")
    assert once.returncode == 0 and "sent 0 messages again" in once.stdout, once.stderr


class PersistentRedis:
    """A redis-server as a broker should run: append-only file on, so a restart keeps the
    queued messages. Restartable on the same port (pytest-redis's executor)."""

    def __init__(self, folder: Path) -> None:
        import port_for
        from pytest_redis.executor import RedisExecutor

        self.executor = RedisExecutor(
            str(servers.find_redis_server()),
            databases=16,
            redis_timeout=0,
            loglevel="notice",
            host="127.0.0.1",
            port=port_for.select_random(),
            datadir=folder,
            appendonly="yes",
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.executor.port}/0"

    def start(self) -> None:
        import redis

        self.executor.start()
        client = redis.Redis.from_url(self.url)
        # Its port opens before the append-only file is loaded (LOADING errors until then).
        wait_for(lambda: _pings(client), timeout=20, what="redis to accept connections")
        # Not among the executor's options: each write on disk before it is acknowledged, no
        # RDB snapshots, and refuse writes when full rather than evict queued messages.
        client.config_set("appendfsync", "always")
        client.config_set("save", "")
        client.config_set("maxmemory-policy", "noeviction")
        client.close()

    def stop(self) -> None:
        self.executor.stop()


def _pings(client: object) -> bool:
    import redis

    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except redis.ConnectionError:
        return False


def test_broker_restart_mid_run_loses_nothing(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, clean_database: str
) -> None:
    broker = PersistentRedis(tmp_path)
    broker.start()
    env = {**env, "SYNTHSENTRY_BROKER_URL": broker.url}
    keys = _put_images(s3_endpoint, "restart", 10)
    try:
        with running(*_workers(env, tmp_path)) as processes:
            submitted = _cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys[:6]])
            assert submitted.returncode == 0, submitted.stderr
            wait_for(
                lambda: _counts(clean_database)["detections"] >= 1,
                timeout=180,
                what="the first detection",
                processes=processes,
                interval=0.05,
            )
            broker.stop()
            broker.start()
            # Work sent after the restart is taken by the reconnected workers too.
            submitted = _cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys[6:]])
            assert submitted.returncode == 0, submitted.stderr
            counts = wait_for(
                lambda: (c := _counts(clean_database))["pending"] == 0 and c["sources"] == 11 and c,
                timeout=240,
                what="every upload to be scored after the broker restart",
                processes=processes,
            )
    finally:
        broker.stop()
    assert counts["verdicts"] == 10 and counts["detections"] == 10 and counts["rejected"] == 1
