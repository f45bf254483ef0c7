"""Upload latency with and without a batch re-scan running beside it, on one fleet.

    .venv/bin/python benchmarks/bench_rescan_latency.py [--uploads 50] [--objects 5000]

Starts a throwaway PostgreSQL and Redis (as the tests do) and moto's S3 server, puts
``--objects`` distinct JPEGs in a bucket, and runs the default fleet's processes on the
provenance detector (model-free): ``synthsentry worker --intake --concurrency 2``,
``synthsentry worker --detector provenance`` and ``synthsentry reconcile`` (which lists
re-scans). Both workers consume their upload queue and its bulk twin, as in production.

Then, with the same processes:

- quiet: ``--uploads`` uploads, one every ``--every`` seconds: each is put in the bucket and
  submitted (recorded, intake sent), and its latency runs from before the put until its
  verdict is stored (the source marked scored, in the verdict's transaction);
- busy: a re-scan of the ``--objects`` objects is started and, once its work fills the bulk
  queues, the same number of uploads again (new content), measured the same way.

It prints p50 / p95 / max of both, their ratio, and how fast the re-scan went meanwhile.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # server starters, fleet processes

from fleet_processes import FleetProcess, fleet_env, wait_for  # noqa: E402

BUCKET = "bench-rescan"


def picture(i: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """A distinct JPEG per ``i`` (a corner block encodes it)."""
    from PIL import Image

    from badfiles import sample_picture

    image: Image.Image = sample_picture(size)
    image.paste((i % 256, i // 256 % 256, 77), (0, 0, 16, 16))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class Uploads:
    """Puts and submits uploads, and times each until its verdict is stored."""

    def __init__(self, database: str, s3: Any) -> None:
        import sqlalchemy as sa

        from db.session import make_engine, make_sessionmaker
        from workers.ensemble import EnsembleConfig
        from workers.fleet import FleetContext
        from workers.intake import IntakeLimits

        self.sa = sa
        self.engine = make_engine(database)
        self.sessions = make_sessionmaker(self.engine)
        self.s3 = s3
        # What the ingest and the webhook submit with (only its database is used here).
        self.context = FleetContext(
            session_factory=self.sessions,
            s3=lambda: s3,
            limits=IntakeLimits(max_bytes=1 << 24, max_pixels=1 << 26, decode_timeout_s=10),
            ensemble=EnsembleConfig(),
            detectors=["provenance"],
        )
        self.started: dict[int, float] = {}
        self.finished: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def submit(self, key: str, data: bytes) -> None:
        from tasks.submit import submit_upload
        from workers.events import UploadRecord

        started = time.perf_counter()
        etag = self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)["ETag"].strip('"')
        record = UploadRecord(BUCKET, key, len(data), etag, None, None, "ObjectCreated:Put", None)
        source_id = submit_upload(self.context, record)
        assert source_id is not None
        with self._lock:
            self.started[source_id] = started

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            with self._lock:
                waiting = [i for i in self.started if i not in self.finished]
            if not waiting:
                continue
            with self.engine.connect() as connection:
                done = connection.execute(
                    self.sa.text(
                        "SELECT id FROM sources WHERE id = ANY(:ids) AND status <> 'pending'"
                    ),
                    {"ids": waiting},
                ).scalars()
                now = time.perf_counter()
                with self._lock:
                    for source_id in done:
                        self.finished[source_id] = now

    def run(self, prefix: str, count: int, every: float, first: int) -> list[float]:
        """``count`` uploads, one every ``every`` seconds; their latencies in ms."""
        ids_before = set(self.started)
        for i in range(count):
            due = time.perf_counter() + every
            self.submit(f"{prefix}/{i:03d}.jpg", picture(first + i))
            time.sleep(max(0.0, due - time.perf_counter()))  # the schedule, not a wait for luck
        mine = [i for i in self.started if i not in ids_before]
        wait_for(
            lambda: all(i in self.finished for i in mine),
            timeout=600,
            what=f"every {prefix} upload's verdict",
            interval=0.05,
        )
        return [(self.finished[i] - self.started[i]) * 1000 for i in mine]

    def close(self) -> None:
        self._stop.set()
        self._poller.join()
        self.engine.dispose()


def rescan_progress(database: str, public_id: str) -> tuple[int, int]:
    """(items finished, items listed) of the re-scan."""
    import sqlalchemy as sa

    engine = sa.create_engine(database)
    try:
        with engine.connect() as connection:
            finished = connection.execute(
                sa.text(
                    "SELECT count(*) FROM sources s JOIN rescans r ON r.id = s.rescan_id "
                    "WHERE r.public_id = :id AND s.status <> 'pending'"
                ),
                {"id": public_id},
            ).scalar_one()
            listed = connection.execute(
                sa.text("SELECT listed FROM rescans WHERE public_id = :id"), {"id": public_id}
            ).scalar_one()
        return int(finished), int(listed)
    finally:
        engine.dispose()


def percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95, ordered[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--every", type=float, default=0.4, help="seconds between uploads")
    parser.add_argument("--objects", type=int, default=5000)
    args = parser.parse_args()

    import logging

    import boto3

    from db import migrate
    from db.session import make_engine, make_sessionmaker, transaction
    from synthsentry.settings import Settings
    from tasks.app import configure
    from workers import rescans
    from workers.events import BucketPolicy

    import servers

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(variable, "bench")  # moto takes any credentials
    with (
        tempfile.TemporaryDirectory() as tmp,
        servers.start_postgres() as postgres,
        servers.start_redis() as redis_url,
        servers.start_s3() as s3_endpoint,
    ):
        folder = Path(tmp)
        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        database = servers.recreate_database(postgres.url, "bench_rescan")
        migrate.upgrade(database)
        configure(Settings(broker_url=redis_url))

        print(f"putting {args.objects} objects ...", file=sys.stderr, flush=True)
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: s3.put_object(
                        Bucket=BUCKET, Key=f"library/{i:05d}.jpg", Body=picture(100_000 + i)
                    ),
                    range(args.objects),
                )
            )

        env = fleet_env(
            folder,
            database=database,
            redis_url=redis_url,
            s3_endpoint=s3_endpoint,
            model=False,
            fleet_detectors='["provenance"]',
            allowed_buckets=BUCKET,
            log_level="WARNING",
        )
        fleet = [
            FleetProcess("intake", ["worker", "--intake", "--concurrency", "2"], env, folder),
            FleetProcess("provenance", ["worker", "--detector", "provenance"], env, folder),
            FleetProcess(
                "reconcile", ["reconcile", "--every", "600", "--rescan-every", "0.5"], env, folder
            ),
        ]
        uploads = Uploads(database, s3)
        try:
            for process in fleet:
                process.start()
            print("warming up ...", file=sys.stderr, flush=True)
            uploads.run("warm", 3, 0.5, first=0)
            print("quiet: uploads alone ...", file=sys.stderr, flush=True)
            quiet = uploads.run("quiet", args.uploads, args.every, first=1000)

            sessions = make_sessionmaker(make_engine(database))
            with transaction(sessions) as session:
                public_id = rescans.create_rescan(
                    session,
                    rescans.ObjectPrefix(BUCKET, "library/"),
                    policy=BucketPolicy.parse(BUCKET),
                    actor="bench",
                ).id
            wait_for(
                lambda: rescan_progress(database, public_id)[0] >= 100,
                timeout=600,
                what="the re-scan to be under way",
                processes=tuple(fleet),
                interval=0.2,
            )
            print("busy: uploads beside the re-scan ...", file=sys.stderr, flush=True)
            before, started = rescan_progress(database, public_id)[0], time.perf_counter()
            busy = uploads.run("busy", args.uploads, args.every, first=2000)
            after, listed = rescan_progress(database, public_id)
            rate = (after - before) / (time.perf_counter() - started)
        finally:
            uploads.close()
            for process in fleet:
                process.stop()
    report(args, quiet, busy, rate, after, listed)
    return 0


def report(
    args: argparse.Namespace,
    quiet: list[float],
    busy: list[float],
    rate: float,
    finished: int,
    listed: int,
) -> None:
    q, b = percentiles(quiet), percentiles(busy)
    print(
        f"\nUpload latency, put + submit -> verdict stored; provenance detector; "
        f"{os.cpu_count()} CPU cores; {args.uploads} uploads each, one every {args.every:g} s"
    )
    print(f"{'':<34}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    print(f"{'no re-scan':<34}{q[0]:>10.0f}{q[1]:>10.0f}{q[2]:>10.0f}")
    label = f"re-scan of {args.objects} running"
    print(f"{label:<34}{b[0]:>10.0f}{b[1]:>10.0f}{b[2]:>10.0f}")
    print(f"{'ratio':<34}{b[0] / q[0]:>10.2f}{b[1] / q[1]:>10.2f}{b[2] / q[2]:>10.2f}")
    print(
        f"\nre-scan meanwhile: {rate:.1f} items/s; {finished} of {listed} listed items finished "
        f"when the busy uploads were done (of {args.objects})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
