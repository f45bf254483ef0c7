"""Detector workers on a real broker: the fleet's batching worker against celery-batches and
against one message per process.

    .venv/bin/python benchmarks/bench_fleet.py [--images DIR] [--backlog 96] [--lone 10] [--kill]

Starts a throwaway PostgreSQL and Redis (as the tests do) and moto's S3 server, writes a
sumsub-mj5 checkpoint in the published format with random weights (MobileNetV3-L at 224 px;
the real weights are not needed for speed), puts re-encoded corpus images in a bucket and
takes them in once (fetch, hash, validate). Then, for each consumer, on a fresh database:

- backlog: ``--backlog`` detect messages sent at once; images per second from the first
  send to the last stored detection;
- lone: ``--lone`` single messages, each sent to an idle worker; latency from send to stored
  detection (median and worst);
- with ``--kill``: a backlog of 48, with the process that runs the model SIGKILLed once
  the first attempts are counted (the pool child for prefork consumers, the whole worker for
  the batching one, which is then started again) and ``synthsentry reconcile`` running as
  in a fleet; seconds until every detection is stored, how many messages were delivered
  more than once, and whether the reconciler sent work again (a message lost, or one
  still pending 35 s after its upload was recorded).

Consumers (all the same work per image: fetch from S3, decode, preprocess, one forward pass
shared by the batch, store, fan in):

- batching: ``synthsentry worker --detector sumsub-mj5 --batch-size B`` (threads pool, one
  shared batcher; what the fleet runs);
- celery-batches: a ``celery_batches.Batches`` task (flush_every B, flush_interval = the
  batch wait) on a prefork pool of one process, prefetching 2 B messages;
- per-message: ``--batch-size 1`` (prefork, one process, one message at a time).

Every worker gets the same settings: time limit 10 s, visibility timeout 25 s, so that the
messages of a dead process come back within the run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # server starters, checkpoint writers, processes

from tasks.queues import QUEUES  # noqa: E402

from fleet_processes import CLI, FleetProcess, fleet_env  # noqa: E402

DETECTOR = "sumsub-mj5"
QUEUE = QUEUES.detect(DETECTOR)
BUCKET = "bench-uploads"
# Every worker's settings, beside what fleet_env gives (database, broker, S3, the detector).
SETTINGS = {
    "fleet_detectors": f'["{DETECTOR}"]',
    "task_time_limit_seconds": "10",
    "visibility_timeout_seconds": "25",
    "log_level": "INFO",  # the batch sizes are read from the workers' logs
}


# --- the celery-batches consumer (run in its own process) -------------------------------


def serve_celery_batches(batch_size: int, batch_wait_ms: float) -> None:
    """A worker whose detect task is a celery_batches.Batches task doing the fleet's work."""
    from celery import Celery
    from celery_batches import Batches

    from synthsentry import logs
    from synthsentry.runtime import build_runtime
    from synthsentry.settings import get_settings
    from tasks.app import celery_config
    from workers import fleet

    logs.configure(get_settings().log_level)  # the batch sizes are read from this log
    app = Celery("bench-celery-batches")
    # Same settings as the fleet, but the parent must hold a whole batch (and the next).
    app.conf.update(celery_config(get_settings()), worker_prefetch_multiplier=2 * batch_size)
    loaded: dict[str, Any] = {}

    @app.task(  # type: ignore[untyped-decorator]
        name="synthsentry.detect",
        base=Batches,
        flush_every=batch_size,
        flush_interval=batch_wait_ms / 1000,
        acks_late=True,
    )
    def detect(requests: list[Any]) -> None:
        if not loaded:
            runtime = build_runtime()
            loaded.update(
                ctx=runtime.fleet_context(),
                detector=runtime.build_detector(runtime.catalog.resolve(DETECTOR)),
            )
        ctx, detector = loaded["ctx"], loaded["detector"]
        # One thread per request fetches and decodes; the forward pass is shared, as in the
        # fleet's worker. The batch is closed once every request has joined it.
        batching = fleet.Batching.for_detector(detector, max_batch=len(requests), max_wait_s=5.0)
        try:
            with ThreadPoolExecutor(len(requests)) as pool:
                list(
                    pool.map(
                        lambda r: fleet.detect(
                            ctx, detector, r.args[0], message_id=r.id, batching=batching
                        ),
                        requests,
                    )
                )
        finally:
            batching.close()
            # Straight to the log file: Celery redirects a pool process's stderr.
            for size in batching.batcher.stats.recent:
                line = json.dumps({"msg": "batch ran", "batch_size": size})
                print(line, file=sys.__stderr__, flush=True)

    app.worker_main(
        [
            "worker",
            "--queues",
            QUEUE,
            "--concurrency",
            "1",
            "--pool",
            "prefork",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "WARNING",
        ]
    )


# --- the bench ----------------------------------------------------------------------------


def consumers(batch_size: int, batch_wait_ms: float) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (command, arguments) of each consumer's worker process."""
    batching = ["--batch-size", str(batch_size), "--batch-wait-ms", str(batch_wait_ms)]
    worker = ["worker", "--detector", DETECTOR]
    return {
        "batching": (CLI, [*worker, *batching]),
        "celery-batches": ([sys.executable, __file__], ["--serve-celery-batches", *batching]),
        "per-message": (CLI, [*worker, "--batch-size", "1"]),
    }


def corpus_variants(folder: Path, count: int) -> list[bytes]:
    """``count`` distinct JPEGs made from the corpus images (a corner block differs)."""
    from PIL import Image

    sources = []
    for path in sorted(folder.iterdir()):
        try:
            with Image.open(path) as image:
                if min(image.size) >= 64:  # the 1-pixel metadata carriers are no model load
                    sources.append(image.convert("RGB"))
        except Exception:
            continue
    out = []
    for i in range(count):
        image = sources[i % len(sources)].copy()
        # Colours far apart (JPEG quantisation merges neighbouring ones), one per upload.
        image.paste((i * 37 % 256, i * 101 % 256, i // 256 * 64 % 256), (0, 0, 16, 16))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        out.append(buffer.getvalue())
    assert len(set(out)) == count, "every upload must be distinct content"
    return out


def take_in_all(database: str, s3_endpoint: str, payloads: list[bytes]) -> list[int]:
    """Record and take in every upload in this process; returns image ids in order."""
    import boto3

    from db.session import make_engine, make_sessionmaker
    from workers import fleet
    from workers.ensemble import EnsembleConfig
    from workers.intake import IntakeLimits

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    ctx = fleet.FleetContext(
        session_factory=make_sessionmaker(make_engine(database)),
        s3=lambda: client,
        limits=IntakeLimits(max_bytes=50 << 20, max_pixels=100_000_000, decode_timeout_s=60),
        ensemble=EnsembleConfig(threshold=0.5),
        detectors=[DETECTOR],
    )
    ids = []
    for i, data in enumerate(payloads):
        key = f"bench/{i:04d}.jpg"
        etag = client.put_object(Bucket=BUCKET, Key=key, Body=data)["ETag"].strip('"')
        upload = fleet.Upload(BUCKET, key, f"{BUCKET}/{key}@etag:{etag}", etag=etag)
        source_id = fleet.record_upload(ctx, upload)
        assert source_id is not None
        ((image_id, _),) = fleet.take_in(ctx, source_id)
        ids.append(image_id)
    return ids


class Probe:
    """Reads the database the workers write to."""

    def __init__(self, database: str) -> None:
        import sqlalchemy as sa

        self.sa = sa
        self.engine = sa.create_engine(database)

    def _number(self, query: str, ids: list[int]) -> Any:
        with self.engine.connect() as connection:
            return connection.execute(self.sa.text(query), {"ids": ids}).scalar_one()

    def detections(self, ids: list[int]) -> int:
        return int(self._number("SELECT count(*) FROM detections WHERE image_id = ANY(:ids)", ids))

    def last_stored(self, ids: list[int]) -> float:
        """When the last of these detections was stored (seconds since the epoch)."""
        return float(
            self._number(
                "SELECT extract(epoch FROM max(created_at)) FROM detections "
                "WHERE image_id = ANY(:ids)",
                ids,
            )
        )

    def attempts(self, ids: list[int]) -> int:
        return int(
            self._number(
                "SELECT coalesce(sum(attempts), 0) FROM detection_attempts "
                "WHERE image_id = ANY(:ids)",
                ids,
            )
        )


class CpuMeter:
    """CPU time (user + system) of every process on this machine, read from ``/proc``, so
    that a run's cost can be split between the worker, the S3 server (moto, a thread of this
    process), Postgres and Redis. On a saturated machine throughput is the cores divided by
    the CPU time an image costs, and that cost moves far less from run to run than a rate."""

    TICK = os.sysconf("SC_CLK_TCK")

    @classmethod
    def snapshot(cls) -> dict[int, tuple[str, int, int, float]]:
        """pid -> (command name, parent pid, start time, CPU seconds so far). A process's CPU
        includes its ended children's, so the work of a process that ends between two
        snapshots (a Postgres autovacuum worker) is counted with its parent."""
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # ended meanwhile
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
            found[int(entry.name)] = (name, int(fields[1]), int(fields[19]), ticks / cls.TICK)
        return found

    @staticmethod
    def spent(
        before: dict[int, tuple[str, int, int, float]],
        after: dict[int, tuple[str, int, int, float]],
        worker: int | None = None,
    ) -> dict[str, float]:
        """CPU seconds between two snapshots, by group: ``worker`` and its children, this
        process (the S3 server's threads, the probe, the engine when it runs here), the
        Postgres and Redis servers this process started, and the rest of the machine."""
        me = os.getpid()

        def group(pid: int) -> str:
            name = after[pid][0]
            if pid == me:
                return "this process"
            ancestor = pid
            while ancestor in after and ancestor not in (worker, me):
                ancestor = after[ancestor][1]
            if ancestor == worker and worker is not None:
                return "worker"
            if ancestor == me and name in ("postgres", "redis-server"):
                return name
            return "other"

        totals: dict[str, float] = {}
        for pid, (_, _, started, cpu) in after.items():
            known = before.get(pid)
            # A pid used again by a new process: all of the new one's time is in the window.
            spent = cpu - known[3] if known and known[2] == started else cpu
            if spent > 0:
                key = group(pid)
                totals[key] = totals.get(key, 0.0) + spent
        return totals


def wait(check: Callable[[], bool], timeout: float, interval: float = 0.002) -> float | None:
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > timeout:
            return None
        time.sleep(interval)
    return time.perf_counter() - started


def run_consumer(
    name: str,
    command: tuple[list[str], list[str]],
    env: dict[str, str],
    ids: list[int],
    args: argparse.Namespace,
    log_dir: Path,
    take_in_more: Callable[[], list[int]],
) -> dict[str, Any]:
    from tasks.app import send_detect

    probe = Probe(env["SYNTHSENTRY_DATABASE_URL"])
    worker = FleetProcess(name, command[1], env, log_dir, command=command[0]).start()
    result: dict[str, Any] = {}
    send = lambda image_id: send_detect(image_id, DETECTOR)  # noqa: E731
    try:
        warm, ids = ids[:1], ids[1:]
        send(warm[0])  # loads the model
        if wait(lambda: probe.detections(warm) == 1, 300) is None:
            raise RuntimeError(f"{name}: no detection after 300 s; see {worker.log_path}")
        lone, ids = ids[: args.lone], ids[args.lone :]
        latencies = []
        for image_id in lone:
            time.sleep(0.3)  # an idle worker
            started = time.time()
            send(image_id)
            if wait(lambda i=image_id: probe.detections([i]) == 1, 60, 0.05) is None:
                raise RuntimeError(f"{name}: a lone message took over 60 s")
            latencies.append((probe.last_stored([image_id]) - started) * 1000)
        result["lone_ms"] = latencies
        backlog, ids = ids[: args.backlog], ids[args.backlog :]
        cpu_before = CpuMeter.snapshot()
        started = time.time()
        for image_id in backlog:
            send(image_id)
        # Polled seldom, so that the probe takes next to nothing from the worker it measures;
        # the end is when the last detection was stored, as the database recorded it.
        if wait(lambda: probe.detections(backlog) == len(backlog), 600, 0.25) is None:
            raise RuntimeError(f"{name}: backlog not done in 600 s")
        result["cpu"] = CpuMeter.spent(cpu_before, CpuMeter.snapshot(), worker.pid)
        result["backlog_s"] = probe.last_stored(backlog) - started
        result["backlog"] = len(backlog)
        result["batches"] = worker.batch_sizes()
        if args.kill:
            # As in a fleet: a reconciler sends again what stays pending past the visibility
            # timeout plus the time limit (35 s here).
            reconcile = FleetProcess(
                f"{name}-reconcile", ["reconcile", "--every", "2"], env, log_dir
            )
            fresh = take_in_more()  # uploads recorded now, as the reconciler sees them
            reconcile.start()
            try:
                result["kill"] = kill_run(name, worker, probe, fresh, send)
            finally:
                reconcile.stop()
            text = reconcile.log_path.read_text(errors="replace")
            result["kill"]["resent"] = text.count("sending again the work of stalled uploads")
    finally:
        worker.stop()
        probe.engine.dispose()
    return result


def kill_run(
    name: str, worker: FleetProcess, probe: Probe, ids: list[int], send: Callable[[int], Any]
) -> dict[str, Any]:
    started = time.perf_counter()
    for image_id in ids:
        send(image_id)
    if wait(lambda: probe.attempts(ids) > probe.detections(ids), 60, 0.001) is None:
        return {"error": "nothing in flight to kill"}
    before = probe.detections(ids)
    children = worker.children()
    if name == "batching" or not children:
        worker.kill()  # one process: the whole worker dies, and is started again
        what = "worker"
        worker.start()
    else:
        os.kill(children[0], signal.SIGKILL)  # the model's process; the parent lives on
        what = "pool child"
    took = wait(lambda: probe.detections(ids) == len(ids), 150, 0.05)
    return {
        "killed": what,
        "done_at_kill": before,
        "seconds": None if took is None else time.perf_counter() - started,
        "stored": probe.detections(ids),
        "sent": len(ids),
        "redelivered": probe.attempts(ids) - len(ids),
    }


def main() -> int:
    from workers import allocator

    allocator.tune_for_images()  # the engine below runs as the synthsentry command does
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared/corpus/images")
    parser.add_argument("--backlog", type=int, default=96)
    parser.add_argument("--lone", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=50.0)
    parser.add_argument("--kill", action="store_true", help="also SIGKILL a worker mid-backlog")
    parser.add_argument("--only", action="append", help="run only these consumers")
    parser.add_argument("--serve-celery-batches", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_celery_batches:
        serve_celery_batches(args.batch_size, args.batch_wait_ms)
        return 0
    if not args.images.is_dir():
        parser.error(f"{args.images} is not a folder of images (see --images)")

    import logging

    from db import migrate
    from synthsentry.settings import Settings
    from tasks.app import configure

    import servers

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    total = 1 + args.lone + args.backlog
    payloads = corpus_variants(args.images, total + (48 if args.kill else 0))
    chosen = consumers(args.batch_size, args.batch_wait_ms)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only}
    results = {}
    engine: dict[str, Any] | None = None
    with (
        tempfile.TemporaryDirectory() as tmp,
        servers.start_postgres() as postgres,
        servers.start_redis() as redis_url,
        servers.start_s3() as s3_endpoint,
    ):
        folder = Path(tmp)
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.setdefault(variable, "bench")  # moto takes any credentials
        import boto3

        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
            Bucket=BUCKET
        )
        configure(Settings(broker_url=redis_url))
        for name, argv in chosen.items():
            database = servers.recreate_database(postgres.url, f"bench_{name}".replace("-", "_"))
            migrate.upgrade(database)
            ids = take_in_all(database, s3_endpoint, payloads[:total])
            # The tests' fleet environment: a published-format sumsub-mj5 checkpoint with
            # random weights, this database, an emptied broker, moto's S3.
            env = fleet_env(
                folder,
                database=database,
                redis_url=redis_url,
                s3_endpoint=s3_endpoint,
                **SETTINGS,
            )
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_consumer(
                name,
                argv,
                env,
                ids,
                args,
                folder,
                lambda db=database: take_in_all(db, s3_endpoint, payloads[total:]),
            )
        if not args.only or "engine" in args.only:
            database = servers.recreate_database(postgres.url, "bench_engine")
            migrate.upgrade(database)
            print("running the scan engine on the same images ...", file=sys.stderr, flush=True)
            engine = engine_backlog(
                database,
                folder,
                payloads[args.lone : 1 + args.lone + args.backlog],
                args.batch_size,
            )
    report(results, args)
    if engine is not None:
        rate = engine["backlog"] / engine["backlog_s"]
        print(f"\nscan engine, the same {engine['backlog']} images from files: {rate:.1f} img/s")
        for name, r in results.items():
            print(f"  {name} / engine: {r['backlog'] / r['backlog_s'] / rate:.2f}")
    report_cpu(results, engine)
    return 0


def engine_backlog(
    database: str, folder: Path, payloads: list[bytes], batch_size: int
) -> dict[str, Any]:
    """The same images through ``synthsentry scan``'s streaming engine (files on disk, the
    same checkpoint and database server): the rate a batching worker should approach."""
    from db.session import make_engine, make_sessionmaker
    from synthsentry.settings import Settings
    from workers.detectors.registry import BUILTIN_SPECS, build_detector
    from workers.ensemble import EnsembleConfig
    from workers.intake import IntakeLimits
    from workers.scan import Scanner

    files = folder / "engine-images"
    files.mkdir(exist_ok=True)
    paths = []
    for i, payload in enumerate(payloads):
        path = files / f"{i:04d}.jpg"
        path.write_bytes(payload)
        paths.append(path)
    settings = Settings(database_url=database)
    detector = build_detector(
        BUILTIN_SPECS[DETECTOR], device="cpu", resolve=lambda _u, _n: folder / "mj5.pt"
    )
    engine = make_engine(database)
    limits = IntakeLimits(max_bytes=50 << 20, max_pixels=100_000_000, decode_timeout_s=60)
    scanner = Scanner(
        [detector],
        make_sessionmaker(engine),
        limits,
        EnsembleConfig(),
        batch_size=batch_size,
        decode_threads=settings.intake_threads,
    )
    list(scanner.scan(paths[:1]))  # warm-up, as the workers' first message
    cpu_before = CpuMeter.snapshot()
    started = time.perf_counter()
    count = sum(1 for _ in scanner.scan(paths[1:]))
    elapsed = time.perf_counter() - started
    cpu = CpuMeter.spent(cpu_before, CpuMeter.snapshot())
    engine.dispose()
    return {"backlog": count, "backlog_s": elapsed, "cpu": cpu}


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    cpu = os.cpu_count()
    print(
        f"\nDetector worker, sumsub-mj5 shape (MobileNetV3-L 224, random weights), {cpu} CPU "
        f"cores, batch {args.batch_size}, wait {args.batch_wait_ms:g} ms"
    )
    print(f"{'consumer':<16}{'backlog img/s':>15}{'vs per-message':>16}{'mean batch':>12}"
          f"{'lone median ms':>16}{'lone max ms':>13}")  # fmt: skip
    base = results.get("per-message")
    base_rate = base["backlog"] / base["backlog_s"] if base else None
    for name, r in results.items():
        rate = r["backlog"] / r["backlog_s"]
        ratio = f"{rate / base_rate:.2f}x" if base_rate else "-"
        # Batches logged by the batcher (not by the per-message worker, whose batch is 1).
        backlog_batches = r["batches"][1 + len(r["lone_ms"]) :] or [1]
        mean_batch = sum(backlog_batches) / len(backlog_batches)
        print(
            f"{name:<16}{rate:>15.1f}{ratio:>16}{mean_batch:>12.1f}"
            f"{statistics.median(r['lone_ms']):>16.0f}"
            f"{max(r['lone_ms']):>13.0f}"
        )
    if args.kill:
        print("\nSIGKILL mid-backlog (48 messages; visibility timeout 25 s):")
        for name, r in results.items():
            k = r["kill"]
            if "error" in k:
                print(f"{name:<16}{k['error']}")
                continue
            seconds = "NOT ALL STORED in 150 s" if k["seconds"] is None else f"{k['seconds']:.1f} s"
            print(
                f"{name:<16}killed {k['killed']:<11} stored {k['stored']}/{k['sent']} "
                f"(done before the kill: {k['done_at_kill']}), all stored after {seconds}, "
                f"{k['redelivered']} extra deliveries counted, reconciler sent work again "
                f"{k['resent']} times"
            )


def report_cpu(results: dict[str, dict[str, Any]], engine: dict[str, Any] | None) -> None:
    """CPU time per image of each backlog, by process, in ms: where the cores went."""
    runs = {name: r for name, r in results.items() if "cpu" in r and r["backlog"]}
    if engine is not None and engine["backlog"]:
        cpu = dict(engine["cpu"])
        cpu["engine"] = cpu.pop("this process", 0.0)  # the engine runs in this process
        runs["engine"] = {**engine, "cpu": cpu}
    if not runs:
        return
    columns = ["worker", "engine", "this process", "postgres", "redis-server", "other"]
    heads = ["worker", "engine", "S3+bench", "postgres", "redis", "rest"]
    print(
        "\nCPU time per image of the backlog, ms (S3+bench: moto's server and the probe, "
        f"threads of the bench process; total: all but the rest; {os.cpu_count()} cores)"
    )
    print(f"{'run':<16}" + "".join(f"{h:>10}" for h in heads) + f"{'total':>10}{'vs engine':>11}")
    base = None
    if "engine" in runs:
        engine_cpu = runs["engine"]["cpu"]
        base = sum(v for k, v in engine_cpu.items() if k != "other") / engine["backlog"]
    for name, r in runs.items():
        per = {k: v * 1000 / r["backlog"] for k, v in r["cpu"].items()}
        total = sum(v for k, v in per.items() if k != "other")  # not the rest of the machine
        ratio = f"{total / (base * 1000):.2f}x" if base else "-"
        print(
            f"{name:<16}"
            + "".join(f"{per.get(c, 0.0):>10.1f}" for c in columns)
            + f"{total:>10.1f}{ratio:>11}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
