"""The fleet as separate processes: Celery workers on Redis, Postgres, an S3-protocol server.
Nothing is mocked; workers are killed with real signals."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from badfiles import sample_picture
from conftest import DatabaseFactory, s3_client
from fleet_processes import (
    FleetProcess,
    PersistentRedis,
    cli,
    fleet_env,
    running,
    stop_holding_work,
    wait_for,
)

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


def _put_images(
    s3_endpoint: str, prefix: str, count: int, *, bucket: str = BUCKET, first: int = 0
) -> list[str]:
    """``count`` distinct pictures (sizes from the ``first``-th on) and one broken file."""
    client = s3_client(s3_endpoint)
    keys = []
    for i in range(count):
        buffer = io.BytesIO()
        sample_picture((96 + 4 * (first + i), 72)).save(buffer, "PNG")
        key = f"{prefix}/img {i:02d}.png"
        client.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
        keys.append(key)
    client.put_object(Bucket=bucket, Key=f"{prefix}/broken.jpg", Body=b"\xff\xd8\xff\xe0 junk")
    keys.append(f"{prefix}/broken.jpg")
    return keys


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
        submitted = cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys])
        assert submitted.returncode == 0, submitted.stderr
        counts = wait_for(
            lambda: (c := _counts(clean_database))["pending"] == 0 and c["sources"] == 7 and c,
            timeout=180,
            what="every upload to be scored or rejected",
            processes=processes,
        )
        # Submitting the same objects again is a no-op.
        again = cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys])
        assert again.stdout.count("already submitted") == 7
    # Six scored, and broken.jpg "not scored": a JPEG the decoder refused goes to review.
    assert counts["verdicts"] == 7 and counts["detections"] == 6
    assert counts["review_cases"] == 7 and counts["rejected"] == 1
    status = cli(env, "status", f"s3://{BUCKET}/batch/img 00.png", "--json")
    assert status.returncode == 0, status.stderr
    assert '"status": "scored"' in status.stdout and '"sumsub-mj5"' in status.stdout
    broken = cli(env, "status", f"s3://{BUCKET}/batch/broken.jpg", "--json")
    assert '"reason": "decode_error"' in broken.stdout or '"reason": "truncated"' in broken.stdout
    assert '"verdict": "not_scored"' in broken.stdout and '"flagged": true' in broken.stdout


def test_sigkilled_model_process_loses_nothing(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, clean_database: str
) -> None:
    keys = _put_images(s3_endpoint, "killed", 12)
    intake, mj5 = _workers(env, tmp_path, "--batch-size", "1")  # prefork, one per process
    with running(intake, mj5) as processes:
        submitted = cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys])
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
        assert len(children) == 1, mj5.log_tail()  # --concurrency 1
        stop_holding_work(
            children[0],
            lambda: (c := _counts(clean_database))["attempts"] > c["detections"],
            timeout=180,
            what="the pool process stopped holding a task",
            processes=processes,
        )
        os.kill(children[0], signal.SIGKILL)
        counts = wait_for(
            lambda: (c := _counts(clean_database))["pending"] == 0 and c["sources"] == 13 and c,
            timeout=240,
            what="every upload to be scored after the kill",
            processes=processes,
        )
        # Then kill the whole worker and start a new one: nothing is left to do twice.
        mj5.kill()
        mj5.start()
    assert counts["verdicts"] == 13 and counts["detections"] == 12  # + broken.jpg, not scored
    assert counts["review_cases"] == 13 and counts["rejected"] == 1
    # The killed task was delivered again (requeued on worker loss) and finished once.
    assert counts["attempts"] > 12
    assert "WorkerLostError" in mj5.log_path.read_text(errors="replace")
    assert _counts(clean_database)["verdicts"] == 13


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
        submitted = cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys])
        assert submitted.returncode == 0, submitted.stderr
        wait_for(
            lambda: _counts(clean_database)["images"] == 17,
            timeout=180,
            what="intake to send every detect message",
            processes=processes,
        )
        mj5.start()
        in_flight = stop_holding_work(
            mj5.pid,
            lambda: (c := _counts(clean_database))["attempts"] > c["detections"] and c,
            timeout=180,
            what="the worker stopped holding detector tasks",
            processes=processes,
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
    assert counts["verdicts"] == 17 and counts["detections"] == 16  # + broken.jpg, not scored
    assert counts["review_cases"] == 17 and counts["rejected"] == 1
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
        submitted = cli(env, "submit", f"s3://{BUCKET}/poison/p.png")
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
    submitted = cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys])
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
    # Four scored and broken.jpg "not scored"; copies of work sent again add nothing.
    assert counts["verdicts"] == 5 and counts["detections"] == 4 and counts["rejected"] == 1
    assert "sending again the work of stalled uploads" in reconcile.log_path.read_text()
    # Nothing is pending, so a check finds nothing to send.
    once = cli(env, "reconcile", "--after", "1", "--once")
    assert once.returncode == 0 and "sent 0 messages again" in once.stdout, once.stderr


def _alive(processes: tuple[FleetProcess, ...]) -> None:
    """Every process still runs, the one the test started (none was restarted), and none met
    an error Celery calls unrecoverable."""
    for process in processes:
        assert process.process is not None and process.process.poll() is None, (
            f"{process.name} exited with {process.process and process.process.returncode}\n"
            f"{process.log_tail()}"
        )
        assert "Unrecoverable error" not in process.log_path.read_text(errors="replace")


def _scored_once(url: str) -> dict[str, int]:
    """The images of scored uploads, their detections and verdicts: each has one detection
    (one detector) and exactly one verdict."""
    engine = sa.create_engine(url)
    scored = "SELECT DISTINCT image_id FROM sources WHERE status = 'scored'"
    with engine.connect() as connection:
        row = connection.execute(
            sa.text(
                f"SELECT (SELECT count(*) FROM ({scored}) s) AS images, "
                f"(SELECT count(*) FROM detections WHERE image_id IN ({scored})) AS detections, "
                f"(SELECT count(DISTINCT image_id) FROM verdicts WHERE image_id IN ({scored})) "
                "AS verdicted, "
                "(SELECT count(*) FROM (SELECT image_id FROM verdicts "
                f"WHERE image_id IN ({scored}) GROUP BY image_id HAVING count(*) > 1) twice) "
                "AS verdicted_twice"
            )
        ).one()
    engine.dispose()
    return dict(row._mapping)


def _queued(broker_url: str, queue: str) -> int:
    from tasks.app import broker_redis

    with broker_redis(broker_url) as client:
        return int(client.llen(queue))


def test_broker_restart_mid_run_loses_nothing(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, clean_database: str
) -> None:
    """Redis stopped while the workers hold messages and started again: the workers reconnect
    and take the work sent after the restart too, without being restarted."""
    broker = PersistentRedis(tmp_path)
    broker.start()
    env = {
        **env,
        "SYNTHSENTRY_BROKER_URL": broker.url,
        # A message popped by a worker but not yet marked unacknowledged when the broker went
        # away is lost; the reconciler sends its work again after 35 s.
        "SYNTHSENTRY_TASK_TIME_LIMIT_SECONDS": "10",
        "SYNTHSENTRY_VISIBILITY_TIMEOUT_SECONDS": "25",
    }
    keys = _put_images(s3_endpoint, "restart", 10)
    reconcile = FleetProcess("reconcile", ["reconcile", "--every", "2"], env, tmp_path)
    try:
        with running(*_workers(env, tmp_path), reconcile) as processes:
            submitted = cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys[:6]])
            assert submitted.returncode == 0, submitted.stderr
            wait_for(
                lambda: _counts(clean_database)["detections"] >= 1,
                timeout=180,
                what="the first detection",
                processes=processes,
                interval=0.05,
            )
            broker.stop()
            wait_for(
                lambda: all(_lost_broker(p) for p in processes[:2]),
                timeout=30,
                what="both workers to see the broker gone",
                processes=processes,
            )
            broker.start()
            # Work sent after the restart is taken by the reconnected workers too.
            submitted = cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys[6:]])
            assert submitted.returncode == 0, submitted.stderr
            counts = wait_for(
                lambda: (c := _counts(clean_database))["pending"] == 0 and c["sources"] == 11 and c,
                timeout=240,
                what="every upload to be scored after the broker restart",
                processes=processes,
            )
            _alive(processes)
    finally:
        broker.stop()
    assert counts["detections"] == 10 and counts["rejected"] == 1
    scored = _scored_once(clean_database)
    assert scored["images"] == scored["detections"] == scored["verdicted"] == 10, scored
    assert scored["verdicted_twice"] == 0


def _lost_broker(process: FleetProcess) -> bool:
    return "Connection to broker lost" in process.log_path.read_text(errors="replace")


SQS_BUCKET = "fleet-broker-loss"


def _notified_bucket(s3_endpoint: str, name: str) -> str:
    """``SQS_BUCKET``, whose ObjectCreated events go to a new SQS queue; returns its URL."""
    import boto3

    sqs = boto3.client(
        "sqs",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    queue_url = str(sqs.create_queue(QueueName=name)["QueueUrl"])
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    s3 = s3_client(s3_endpoint)
    if SQS_BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=SQS_BUCKET)
    s3.put_bucket_notification_configuration(
        Bucket=SQS_BUCKET,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"QueueArn": arn["Attributes"]["QueueArn"], "Events": ["s3:ObjectCreated:*"]}
            ]
        },
    )
    return queue_url


def test_broker_sigkilled_mid_backlog_loses_nothing(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, clean_database: str
) -> None:
    """The fleet of docs/fleet.md (SQS ingest, an intake worker, a batching detector worker,
    the reconciler) while Redis (append-only, fsync always) is SIGKILLed with a backlog
    queued and batches in flight, uploads arrive while it is down, and it is started again
    on the same port: every process reconnects by itself, and every upload gets its verdict,
    those that arrived during and after the outage included."""
    broker = PersistentRedis(tmp_path)
    broker.start()
    env = {
        **env,
        "SYNTHSENTRY_BROKER_URL": broker.url,
        "SYNTHSENTRY_ALLOWED_BUCKETS": SQS_BUCKET,
        "SYNTHSENTRY_TASK_TIME_LIMIT_SECONDS": "10",
        "SYNTHSENTRY_VISIBILITY_TIMEOUT_SECONDS": "25",
    }
    queue_url = _notified_bucket(s3_endpoint, f"uploads-{tmp_path.name[-20:]}")
    ingest = FleetProcess(
        "ingest",
        [
            "ingest",
            "sqs",
            "--queue-url",
            queue_url,
            "--endpoint-url",
            s3_endpoint,
            "--wait-seconds",
            "1",
        ],
        env,
        tmp_path,
    )
    intake, mj5 = _workers(env, tmp_path, "--batch-size", "4", "--batch-wait-ms", "200")
    reconcile = FleetProcess("reconcile", ["reconcile", "--every", "2"], env, tmp_path)
    try:
        with running(ingest, intake, reconcile) as fleet:
            processes = (*fleet, mj5)  # the model worker starts once its backlog is queued
            _put_images(s3_endpoint, "wave-1", 24, bucket=SQS_BUCKET)
            wait_for(
                lambda: _queued(broker.url, "detect.sumsub-mj5") == 24,
                timeout=180,
                what="intake to queue every detect message of the first wave",
                processes=processes,
            )
            mj5.start()
            wait_for(
                lambda: (
                    (c := _counts(clean_database))["attempts"] > c["detections"]
                    and _queued(broker.url, "detect.sumsub-mj5") > 0
                ),
                timeout=180,
                what="batches in flight with a backlog still queued",
                processes=processes,
                interval=0.01,
            )
            broker.kill()
            assert _counts(clean_database)["detections"] < 24, "the kill came too late to test"
            wait_for(
                lambda: _lost_broker(intake) and _lost_broker(mj5),
                timeout=30,
                what="both workers to see the broker gone",
                processes=processes,
            )
            _put_images(s3_endpoint, "wave-2", 4, bucket=SQS_BUCKET, first=24)  # Redis down
            broker.start()
            _put_images(s3_endpoint, "wave-3", 4, bucket=SQS_BUCKET, first=28)
            counts = wait_for(
                lambda: (c := _counts(clean_database))["pending"] == 0 and c["sources"] == 35 and c,
                timeout=240,
                what="every upload to be scored after the broker was killed",
                processes=processes,
            )
            _alive(processes)
    finally:
        mj5.stop()
        broker.stop()
    assert counts["detections"] == 32 and counts["rejected"] == 3
    # A check that met the outage says so in one line, not with a traceback.
    assert "Traceback" not in reconcile.log_path.read_text(errors="replace")
    scored = _scored_once(clean_database)
    assert scored["images"] == scored["detections"] == scored["verdicted"] == 32, scored
    assert scored["verdicted_twice"] == 0


def test_reconcile_warns_of_work_no_worker_consumes(
    env: dict[str, str], tmp_path: Path, s3_endpoint: str, clean_database: str
) -> None:
    """Detect messages queued for a detector whose worker is not running: the reconciler
    says which queue, how long and how old, and sends nothing into it (nobody would read
    it). Once a worker consumes the queue, the work is done and the warning stops."""
    keys = _put_images(s3_endpoint, "unconsumed", 3)
    intake = FleetProcess("intake", ["worker", "--intake"], env, tmp_path)
    with running(intake) as processes:
        submitted = cli(env, "submit", *[f"s3://{BUCKET}/{key}" for key in keys])
        assert submitted.returncode == 0, submitted.stderr
        # Every upload taken in: three detect messages queued, broken.jpg rejected (the
        # last in line; a worker stopped before it would leave it for the reconciler).
        wait_for(
            lambda: (
                _queued(env["SYNTHSENTRY_BROKER_URL"], "detect.sumsub-mj5") == 3
                and _counts(clean_database)["rejected"] == 1
            ),
            timeout=180,
            what="intake to queue the detect messages and reject broken.jpg",
            processes=processes,
        )
    # Past a window of 1 s: the uploads were recorded before their detect messages were sent.
    wait_for(
        lambda: _oldest_age(env["SYNTHSENTRY_BROKER_URL"], "detect.sumsub-mj5") > 1.5,
        timeout=10,
        what="the oldest detect message to be past the window",
    )
    once = cli(env, "reconcile", "--after", "1", "--once")
    assert once.returncode == 0 and "sent 0 messages again" in once.stdout, once.stderr
    warning = next(
        json.loads(line[line.index("{") :])
        for line in once.stderr.splitlines()
        if "work waits in a queue that no worker consumes" in line
    )
    assert warning["level"] == "warning" and warning["queue"] == "detect.sumsub-mj5"
    assert warning["length"] == 3 and warning["consumers"] == 0
    assert warning["oldest_age_s"] >= 1
    assert _counts(clean_database)["pending"] == 3

    mj5 = FleetProcess("mj5", ["worker", "--detector", "sumsub-mj5"], env, tmp_path)
    with running(mj5) as processes:
        wait_for(
            lambda: _counts(clean_database)["pending"] == 0,
            timeout=180,
            what="the worker to drain its queue",
            processes=processes,
        )
        again = cli(env, "reconcile", "--after", "1", "--once")
    assert again.returncode == 0 and "no worker consumes" not in again.stderr, again.stderr


def _oldest_age(broker_url: str, queue: str) -> float:
    from tasks.app import broker_redis
    from tasks.submit import read_queue

    with broker_redis(broker_url) as client:
        return read_queue(client, queue).oldest_age_s or 0.0


def test_a_worker_exits_non_zero_on_an_error_it_cannot_recover_from(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A broker that refuses writes (out of memory under noeviction) is no connection loss:
    Celery stops the worker ("Unrecoverable error"), and the command exits non-zero so that
    a supervisor restarts it."""
    broker = PersistentRedis(tmp_path)
    broker.start()
    client = broker.client()
    client.config_set("maxmemory", "1")
    client.close()
    env = {**env, "SYNTHSENTRY_BROKER_URL": broker.url}
    intake = FleetProcess("intake", ["worker", "--intake"], env, tmp_path)
    try:
        with running(intake):
            assert intake.process is not None
            status = intake.process.wait(120)
    finally:
        broker.stop()
    log = intake.log_path.read_text(errors="replace")
    assert status != 0 and "Unrecoverable error" in log and "maxmemory" in log, intake.log_tail()
