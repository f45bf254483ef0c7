"""The fleet's commands: workers, ingest, submit, reconcile, status. (S3 event notifications
sent over HTTP, MinIO's webhook target, are taken by ``synthsentry serve`` at /s3-events.)

Each is a thin call into the services the tasks and the HTTP endpoints use
(``tasks.submit``, ``workers.ingest``, ``workers.results``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from synthsentry.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    load_runtime,
    parse_s3_uri,
    with_active_ensemble,
)
from synthsentry.cli.database import prepare_database
from synthsentry.cli.output import print_json_line, print_status_line
from synthsentry.cli.probes import add_metrics_port, prepare_metrics_folder, serve_probes
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from prometheus_client.registry import Collector
    from sqlalchemy.orm import Session, sessionmaker

    from synthsentry.cli.common import Commands
    from synthsentry.runtime import Runtime
    from tasks.observe import WorkerProbes
    from tasks.worker import WorkerState
    from workers.events import BucketPolicy
    from workers.ingest import DeadLetters

log = logging.getLogger("synthsentry.cli")


def register(commands: Commands) -> None:
    _register_worker(commands)
    ingest = commands.add_parser("ingest", help="turn S3 upload events into scans")
    ingest_commands = ingest.add_subparsers(dest="ingest_command", required=True)
    sqs = ingest_commands.add_parser(
        "sqs",
        help="long-poll an SQS queue fed by S3 event notifications",
        description="Consume S3 ObjectCreated notifications from SQS. A message is deleted "
        "only after its uploads are recorded and queued; malformed messages are kept as "
        "dead letters in the database. Only SYNTHSENTRY_ALLOWED_BUCKETS are scanned.",
    )
    sqs.add_argument("--queue-url", required=True)
    sqs.add_argument("--wait-seconds", type=int, default=20, help="long-poll wait (1-20)")
    sqs.add_argument("--endpoint-url", default=None, help="SQS endpoint (default: AWS)")
    add_metrics_port(sqs)
    sqs.set_defaults(handler=ingest_sqs)

    submit = commands.add_parser(
        "submit", help="queue S3 objects for scanning (operators, re-scans, tests)"
    )
    submit.add_argument("uris", nargs="+", metavar="s3://BUCKET/KEY")
    submit.set_defaults(handler=submit_objects)

    reconcile = commands.add_parser(
        "reconcile",
        help="send again the messages of uploads that stayed pending (lost by a broker or a "
        "killed worker)",
        description="Every --every seconds, find uploads still pending --after seconds after "
        "they were recorded (doubling the delay on each further try) and send their missing "
        "intake or detect messages again. Between checks, advance the batch re-scans: list "
        "the next page of each (SYNTHSENTRY_RESCAN_PAGE_SIZE objects, while it has fewer than "
        "SYNTHSENTRY_RESCAN_MAX_IN_FLIGHT unfinished) and queue its work on the bulk queues. "
        "Safe to run beside the fleet: every step is idempotent. Run one (or more: they skip "
        "each other's rows and re-scans).",
    )
    reconcile.add_argument(
        "--after",
        type=float,
        default=None,
        help="seconds an upload may stay pending before its work is sent again (default: "
        "the visibility timeout plus the task time limit, so Redis redelivers first)",
    )
    reconcile.add_argument("--every", type=float, default=60.0, help="seconds between checks")
    reconcile.add_argument(
        "--rescan-every",
        type=float,
        default=2.0,
        help="seconds between re-scan steps when the last one listed nothing (a re-scan that "
        "listed a page lists the next at once)",
    )
    reconcile.add_argument(
        "--once", action="store_true", help="check once, take one re-scan step, and exit"
    )
    add_metrics_port(
        reconcile,
        also="; the reconciler alone exports the queue, review and re-scan gauges",
    )
    reconcile.set_defaults(handler=reconcile_stalled)

    status = commands.add_parser(
        "status", help="print the stored result of S3 objects (same shape as scan --json)"
    )
    status.add_argument("uris", nargs="+", metavar="s3://BUCKET/KEY")
    status.add_argument("--json", action="store_true", help="one JSON object per upload")
    status.set_defaults(handler=show_status)


def _register_worker(commands: Commands) -> None:
    worker = commands.add_parser(
        "worker",
        help="run a fleet worker (Celery) for the intake queue or one detector's queue",
        description="Run a Celery worker. --intake consumes the intake queue (fetch, hash, "
        "validate, fan out); --detector NAME consumes detect.NAME and loads that model once, "
        "lazily, in the process that runs it. Pin a GPU with CUDA_VISIBLE_DEVICES. Each also "
        "consumes its queue's low-priority twin (bulk.intake, bulk.detect.NAME: batch "
        "re-scans), taking from it only while the upload queue is empty.",
    )
    role = worker.add_mutually_exclusive_group(required=True)
    role.add_argument("--intake", action="store_true", help="consume the intake queue")
    role.add_argument("--detector", metavar="NAME", help="consume the queue detect.NAME")
    worker.add_argument(
        "--no-bulk",
        action="store_true",
        help="consume the upload queue only, not its low-priority twin (capacity kept for "
        "uploads alone)",
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="processes of an intake worker or of an unbatched detector worker (default 1)",
    )
    worker.add_argument(
        "--pool",
        choices=["prefork", "solo", "threads"],
        default=None,
        help="Celery pool (default prefork; a batching detector worker always uses threads)",
    )
    worker.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="detector workers: largest batch the model sees, across messages (default "
        "SYNTHSENTRY_BATCH_SIZE); 1 runs one message per prefork process, without batching",
    )
    worker.add_argument(
        "--device",
        default=None,
        help="detector workers: torch device, cpu, cuda or cuda:N (default SYNTHSENTRY_DEVICE); "
        "pin one GPU per worker with CUDA_VISIBLE_DEVICES",
    )
    worker.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help="detector workers: longest a message waits for others to fill its batch "
        "(default SYNTHSENTRY_BATCH_WAIT_MS, 50)",
    )
    add_metrics_port(worker)
    worker.set_defaults(handler=run_worker, streams_images=True)


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    # First, before anything records a metric: a pool that forks needs the multiprocess mode
    # (a batching detector worker runs on threads).
    batching = bool(args.detector) and (args.batch_size or settings.batch_size) > 1
    prepare_metrics_folder(forks=not batching and (args.pool or "prefork") == "prefork")

    from celery import signals

    from tasks import worker
    from tasks.app import configure
    from tasks.queues import QUEUES
    from workers.metrics import MetricsBatches

    runtime = load_runtime(settings, fleet=True)
    if args.detector and args.detector not in runtime.catalog.specs:
        raise CliError(f"unknown detector {args.detector!r}", EXIT_USAGE)
    if args.device is not None:
        try:
            runtime = runtime.replace(device=args.device)
        except ValueError as exc:
            raise CliError(f"--device: {exc}", EXIT_USAGE) from exc
    sizes = "--batch-size and --concurrency must be >= 1, --batch-wait-ms >= 0"
    if args.concurrency < 1:
        raise CliError(sizes, EXIT_USAGE)
    try:  # the runtime checks the values as the settings do
        if args.batch_size is not None:
            runtime = runtime.replace(batch_size=args.batch_size)
        if args.batch_wait_ms is not None:
            runtime = runtime.replace(batch_wait_s=args.batch_wait_ms / 1000)
    except ValueError as exc:
        raise CliError(sizes, EXIT_USAGE) from exc
    pool, concurrency = args.pool or "prefork", args.concurrency
    if batching:
        if args.pool not in (None, "threads"):
            raise CliError(
                "a batching detector worker runs on threads; use --batch-size 1", EXIT_USAGE
            )
        # One thread per message: a batch runs while the next one fills.
        pool, concurrency = "threads", 2 * runtime.batch_size
    runtime = with_active_ensemble(runtime, prepare_database(runtime))
    # Every batch the model runs goes to the histograms (and the log, as before).
    runtime = runtime.replace(batch_observer=MetricsBatches(device=runtime.device))
    # Installed before the pool starts: prefork children inherit it, unbuilt.
    state = worker.WorkerState(runtime, batching=runtime.batching() if batching else None)
    worker.install(state)
    probes = _worker_probes(state, args.detector if pool != "prefork" else None)
    queue = QUEUES.intake if args.intake else QUEUES.detect(args.detector)
    # The upload queue first, then its bulk twin: with the broker's "priority" queue order
    # (tasks.app), bulk work is taken only while no upload waits.
    bulk = (
        QUEUES.intake_queue(bulk=True) if args.intake else QUEUES.detect(args.detector, bulk=True)
    )
    queues = [queue] if args.no_bulk else [queue, bulk]
    app = configure(settings)
    started: list[Any] = []
    signals.worker_init.connect(lambda sender, **_: started.append(sender), weak=False)
    server = serve_probes(
        settings, args.metrics_port, live=probes.loop.alive, readiness=probes.readiness
    )
    try:
        _run_celery(
            app,
            queues=queues,
            concurrency=concurrency,
            pool=pool,
            hostname=f"{queue}@%h",
            log_level=runtime.log_level,
        )
    finally:
        if server is not None:
            server.close()
    # Celery ends an error it cannot recover from ("Unrecoverable error") with a warm
    # shutdown, and worker_main drops the worker's exit status: pass it on, so that a
    # supervisor restarts the worker. A stop asked for (SIGTERM, SIGINT) exits 0.
    if not started or started[-1].exitcode:
        log.critical("worker stopped on an error", extra={"queue": queue})
        return EXIT_FAILURE
    return EXIT_OK


def _worker_probes(state: WorkerState, loads: str | None) -> WorkerProbes:
    """The worker's liveness and readiness (``tasks.observe``), installed. ``loads``: the
    detector whose tasks run in this process (a threads or solo pool): its model is loaded
    now, in the background, and the worker is ready once it is (a prefork child loads its
    own on its first message, never this parent: CUDA must not start before a fork)."""
    from tasks import observe

    probes = observe.WorkerProbes(task_time_limit_s=state.runtime.task_time_limit_s)
    if loads is not None:
        probes.readiness.add("detector_loaded", lambda: state.warm)
        threading.Thread(target=state.warm_up, args=(loads,), name="warm-up", daemon=True).start()
    observe.install(probes)
    return probes


def _run_celery(
    app: Any, *, queues: list[str], concurrency: int, pool: str, hostname: str, log_level: str
) -> None:
    """Run the Celery worker in this process until it stops."""
    app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(queues),
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--hostname",
            hostname,
            "--loglevel",
            log_level,
            # Gossip and mingle add a channel beside the task channel (see tasks/app.py);
            # Celery's own heartbeat, published from the event loop with retries without
            # end, would hold that loop for as long as the broker is away. The worker writes
            # its own heartbeat (tasks.app.QueueHeartbeat).
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


def _policy(runtime: Runtime) -> BucketPolicy:
    from workers.events import BucketPolicy

    try:
        return BucketPolicy.parse(runtime.allowed_buckets)
    except ValueError as exc:
        raise CliError(
            f"SYNTHSENTRY_ALLOWED_BUCKETS: {exc} (e.g. 'uploads' or 'media:incoming/')",
            EXIT_USAGE,
        ) from exc


def _dead_letter(session_factory: sessionmaker[Session], channel: str) -> DeadLetters:
    from db.repository import record_dead_letter
    from db.session import transaction

    def keep(body: str, reason: str) -> None:
        with transaction(session_factory) as session:
            record_dead_letter(session, channel, reason, body)

    return keep


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def ingest_sqs(args: argparse.Namespace, settings: Settings) -> int:
    import boto3

    from tasks.app import configure
    from tasks.submit import submit_upload
    from workers.events import UploadRecord
    from workers.ingest import run_sqs_ingest
    from workers.probes import Flag, LoopProbe, Readiness

    prepare_metrics_folder(forks=False)
    runtime = load_runtime(settings, fleet=True)
    policy = _policy(runtime)
    session_factory = prepare_database(runtime)
    runtime = with_active_ensemble(runtime, session_factory)
    configure(settings)
    context = runtime.fleet_context()
    sqs = boto3.client("sqs", endpoint_url=args.endpoint_url, region_name=runtime.s3_region)

    def submit(record: UploadRecord) -> None:
        submit_upload(context, record)

    # A turn of the loop is a long poll plus its messages' submits, or a backoff (a minute
    # at most): silent much longer, it is wedged.
    loop = LoopProbe(stale_after_s=args.wait_seconds + 300)
    reached = Flag()

    def polled(ok: bool) -> None:
        loop.beat()
        reached.set(ok)

    server = serve_probes(
        settings, args.metrics_port, live=loop.alive, readiness=Readiness({"sqs": reached})
    )
    try:
        stats = run_sqs_ingest(
            sqs,
            args.queue_url,
            submit=submit,
            dead_letter=_dead_letter(session_factory, "sqs"),
            policy=policy,
            stop=_stop_on_signals(),
            wait_seconds=args.wait_seconds,
            on_poll=polled,
        )
    finally:
        if server is not None:
            server.close()
    log.info("ingest stopped", extra={"stats": vars(stats)})
    return EXIT_OK


def submit_objects(args: argparse.Namespace, settings: Settings) -> int:
    from db.models import SourceKind
    from tasks.app import configure
    from tasks.submit import submit_upload
    from workers.events import UploadRecord

    objects = [parse_s3_uri(uri) for uri in args.uris]
    runtime = load_runtime(settings, fleet=True)
    runtime = with_active_ensemble(runtime, prepare_database(runtime))
    configure(settings)
    context = runtime.fleet_context()
    s3 = runtime.s3_client()
    for bucket, key in objects:
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise CliError(f"cannot read s3://{bucket}/{key}: {exc}") from exc
        record = UploadRecord(
            bucket=bucket,
            key=key,
            size=head.get("ContentLength"),
            etag=str(head.get("ETag", "")).strip('"') or None,
            version_id=head.get("VersionId"),
            sequencer=None,
            event_name="synthsentry:Submit",
            event_time=None,
        )
        source_id = submit_upload(context, record, kind=SourceKind.RESCAN)
        if source_id is None:
            print(f"s3://{bucket}/{key}: already submitted (see `synthsentry status`)")
        else:
            print(f"s3://{bucket}/{key}: queued (source {source_id})")
    return EXIT_OK


def reconcile_stalled(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from tasks.app import configure
    from tasks.submit import CeleryDispatcher, resend_lost
    from workers import review
    from workers.probes import Flag, LoopProbe, Readiness
    from workers.rescans import ObjectLister, advance_rescans

    if not args.once:
        prepare_metrics_folder(forks=False)
    runtime = load_runtime(settings, fleet=True)
    after = args.after
    if after is None:
        after = runtime.visibility_timeout_s + runtime.task_time_limit_s
    if after <= 0 or args.every <= 0 or args.rescan_every <= 0:
        raise CliError("--after, --every and --rescan-every must be positive", EXIT_USAGE)
    runtime = with_active_ensemble(runtime, prepare_database(runtime))
    configure(settings)
    context = runtime.fleet_context()
    store = cast("ObjectLister", runtime.s3_client())  # boto3's client lists objects too
    dispatcher = CeleryDispatcher()
    stop = _stop_on_signals()
    loop = LoopProbe(stale_after_s=max(300.0, 3 * args.every))
    checked = Flag()  # the last check reached the database and the broker
    server = None
    if not args.once:
        server = serve_probes(
            settings,
            args.metrics_port,
            live=loop.alive,
            readiness=Readiness({"checked": checked}),
            collectors=_reconciler_gauges(runtime, context.session_factory),
        )

    attempt = _Attempts()
    next_check = 0.0
    try:
        while True:
            loop.beat()
            sent: int | None = 0
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + args.every
                sent = attempt("reconcile check", lambda: resend_lost(context, after_s=after))
                checked.set(sent is not None)
                # Claims nobody renews go back to the review queue (audited).
                attempt(
                    "review lease expiry", lambda: review.expire_leases(context.session_factory)
                )
            pages = attempt(
                "re-scan step",
                lambda: advance_rescans(
                    context,
                    store,
                    dispatcher,
                    page_size=runtime.rescan_page_size,
                    max_in_flight=runtime.rescan_max_in_flight,
                ),
                component="rescan",
            )
            if args.once:
                if sent is None or pages is None:
                    return EXIT_FAILURE
                print(f"sent {sent} messages again")
                print(f"listed {pages} re-scan pages")
                return EXIT_OK
            # A re-scan that listed a page goes on at once; the next check is not put off.
            pause = 0.0 if pages else min(args.rescan_every, next_check - time.monotonic())
            if stop.wait(max(0.0, pause)):
                return EXIT_OK
    finally:
        if server is not None:
            server.close()


class _Attempts:
    """Runs one step of the reconciler's loop; a step that fails is tried again later.
    The database or the broker away: one line per check until it is back (a traceback at
    every check of an outage says nothing more); anything else is logged in full. Every
    failure counts in ``synthsentry_errors_total`` under ``component``."""

    def __init__(self) -> None:
        from kombu.exceptions import OperationalError as BrokerError
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
        from sqlalchemy.exc import OperationalError as DatabaseError

        self.away = (BrokerError, RedisConnectionError, RedisTimeoutError, DatabaseError)

    def __call__(
        self, what: str, call: Callable[[], int], component: str = "reconcile"
    ) -> int | None:
        from workers import metrics

        try:
            return call()
        except Exception as exc:  # tried again later
            metrics.error(component)
            if isinstance(exc, self.away):
                log.warning("%s failed: %s", what, type(exc).__name__, extra={"error": str(exc)})
            else:
                log.exception("%s failed", what)
            return None


def _reconciler_gauges(runtime: Runtime, session_factory: sessionmaker[Session]) -> list[Collector]:
    """The gauges only the reconciler exports (one replica: nothing counted twice): every
    fleet queue's messages and consumers, read from the broker; the review backlog and the
    re-scan items pending, read from the database."""
    import functools

    from tasks.app import app, broker_redis
    from tasks.submit import RedisLayout, fleet_queues, read_depths
    from workers import metrics, rescans, review

    layout = RedisLayout.of(app.conf.broker_transport_options)
    queues = fleet_queues(runtime.fleet_detectors)

    def depths() -> list[metrics.QueueDepth]:
        with broker_redis() as client:
            return read_depths(client, queues, layout)

    return [
        metrics.QueueCollector(depths),
        metrics.ReviewCollector(functools.partial(review.backlog, session_factory)),
        metrics.RescanCollector(functools.partial(rescans.pending_items, session_factory)),
    ]


def show_status(args: argparse.Namespace, settings: Settings) -> int:
    from workers.results import status_of

    objects = [parse_s3_uri(uri) for uri in args.uris]
    runtime = load_runtime(settings, fleet=True)
    session_factory = prepare_database(runtime)
    active = with_active_ensemble(runtime, session_factory).fleet_ensemble.version
    with session_factory() as session:
        for bucket, key in objects:
            outcomes = status_of(session, bucket, key, active_ensemble=active)
            if not outcomes:
                print(f"s3://{bucket}/{key}: not known", file=sys.stderr)
            for outcome in outcomes:
                if args.json:
                    print_json_line(outcome)
                else:
                    print_status_line(outcome)
    return EXIT_OK
