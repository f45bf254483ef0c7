"""The fleet's commands: workers, ingest, the upload webhook, submit, reconcile, status.

Each is a thin call into the services the tasks and the HTTP endpoints use
(``tasks.submit``, ``workers.ingest``, ``workers.results``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from synthsentry.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    load_runtime,
    parse_s3_uri,
)
from synthsentry.cli.database import prepare_database
from synthsentry.cli.output import print_json_line, print_status_line
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from synthsentry.cli.common import Commands
    from synthsentry.runtime import Runtime
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
    sqs.set_defaults(handler=ingest_sqs)

    webhook = commands.add_parser(
        "webhook",
        help="serve the HTTP endpoint for S3-style upload notifications (MinIO webhook)",
        description="Serve POST /s3-events with waitress. Each record of an event is answered "
        "on its own: good ones are recorded and queued once, bad ones kept as dead letters. "
        "Limits: SYNTHSENTRY_WEBHOOK_TIMEOUT_SECONDS, SYNTHSENTRY_WEBHOOK_CONNECTION_LIMIT, "
        "SYNTHSENTRY_WEBHOOK_THREADS, SYNTHSENTRY_WEBHOOK_MAX_RECORDS.",
    )
    webhook.add_argument("--host", default="127.0.0.1")
    webhook.add_argument("--port", type=int, default=8080)
    webhook.set_defaults(handler=serve_webhook)

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
        "intake or detect messages again. Safe to run beside the fleet: every step is "
        "idempotent. Run one (or more: they skip each other's rows).",
    )
    reconcile.add_argument(
        "--after",
        type=float,
        default=None,
        help="seconds an upload may stay pending before its work is sent again (default: "
        "the visibility timeout plus the task time limit, so Redis redelivers first)",
    )
    reconcile.add_argument("--every", type=float, default=60.0, help="seconds between checks")
    reconcile.add_argument("--once", action="store_true", help="check once and exit")
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
        "lazily, in the process that runs it. Pin a GPU with CUDA_VISIBLE_DEVICES.",
    )
    role = worker.add_mutually_exclusive_group(required=True)
    role.add_argument("--intake", action="store_true", help="consume the intake queue")
    role.add_argument("--detector", metavar="NAME", help="consume the queue detect.NAME")
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
    worker.set_defaults(handler=run_worker)


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    from celery import signals

    from tasks import worker
    from tasks.app import configure
    from tasks.queues import QUEUES

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
    pool, concurrency, batching = args.pool or "prefork", args.concurrency, None
    if args.detector and runtime.batch_size > 1:
        if args.pool not in (None, "threads"):
            raise CliError(
                "a batching detector worker runs on threads; use --batch-size 1", EXIT_USAGE
            )
        batching = runtime.batching()
        # One thread per message: a batch runs while the next one fills.
        pool, concurrency = "threads", 2 * runtime.batch_size
    prepare_database(runtime)
    # Installed before the pool starts: prefork children inherit it, unbuilt.
    worker.install(worker.WorkerState(runtime, batching=batching))
    queue = QUEUES.intake if args.intake else QUEUES.detect(args.detector)
    app = configure(settings)
    started: list[Any] = []
    signals.worker_init.connect(lambda sender, **_: started.append(sender), weak=False)
    app.worker_main(
        [
            "worker",
            "--queues",
            queue,
            "--concurrency",
            str(concurrency),
            "--pool",
            pool,
            "--hostname",
            f"{queue}@%h",
            "--loglevel",
            runtime.log_level,
            # Gossip and mingle add a channel beside the task channel (see tasks/app.py);
            # Celery's own heartbeat, published from the event loop with retries without
            # end, would hold that loop for as long as the broker is away. The worker writes
            # its own heartbeat (tasks.app.QueueHeartbeat).
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
    # Celery ends an error it cannot recover from ("Unrecoverable error") with a warm
    # shutdown, and worker_main drops the worker's exit status: pass it on, so that a
    # supervisor restarts the worker. A stop asked for (SIGTERM, SIGINT) exits 0.
    if not started or started[-1].exitcode:
        log.critical("worker stopped on an error", extra={"queue": queue})
        return EXIT_FAILURE
    return EXIT_OK


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

    runtime = load_runtime(settings, fleet=True)
    policy = _policy(runtime)
    session_factory = prepare_database(runtime)
    configure(settings)
    context = runtime.fleet_context()
    sqs = boto3.client("sqs", endpoint_url=args.endpoint_url, region_name=runtime.s3_region)

    def submit(record: UploadRecord) -> None:
        submit_upload(context, record)

    stats = run_sqs_ingest(
        sqs,
        args.queue_url,
        submit=submit,
        dead_letter=_dead_letter(session_factory, "sqs"),
        policy=policy,
        stop=_stop_on_signals(),
        wait_seconds=args.wait_seconds,
    )
    log.info("ingest stopped", extra={"stats": vars(stats)})
    return EXIT_OK


def serve_webhook(args: argparse.Namespace, settings: Settings) -> int:
    from waitress.server import create_server

    from api.webhook import MAX_BODY_BYTES, make_app
    from tasks.app import configure
    from tasks.submit import submit_upload

    runtime = load_runtime(settings, fleet=True)
    secret = runtime.webhook_secret.get_secret_value()
    if not secret:
        raise CliError(
            "set SYNTHSENTRY_WEBHOOK_SECRET: the webhook refuses to run open", EXIT_USAGE
        )
    policy = _policy(runtime)
    session_factory = prepare_database(runtime)
    configure(settings)
    context = runtime.fleet_context()
    application = make_app(
        secret=secret,
        policy=policy,
        submit=lambda record: submit_upload(context, record),
        dead_letter=_dead_letter(session_factory, "webhook"),
        max_records=runtime.webhook_max_records,
    )
    # waitress reads each request whole (headers and body, both capped) before a worker
    # thread sees it, so a slow or half-sent request holds a socket, not a thread; a
    # connection idle for the timeout is closed, checked a few times per timeout.
    server = create_server(
        application,
        host=args.host,
        port=args.port,
        threads=runtime.webhook_threads,
        connection_limit=runtime.webhook_connection_limit,
        channel_timeout=runtime.webhook_timeout_s,
        cleanup_interval=max(1, min(30, runtime.webhook_timeout_s // 4)),
        # MinIO and S3 send a few hundred bytes of headers; waitress allows 256 KiB.
        max_request_header_size=32 * 1024,
        # waitress refuses a body of this size or more; the app allows exactly 1 MiB.
        max_request_body_size=MAX_BODY_BYTES + 1,
        ident="synthsentry",
    )
    log.info(
        "webhook listening",
        extra={
            "host": args.host,
            "port": args.port,
            "threads": runtime.webhook_threads,
            "connection_limit": runtime.webhook_connection_limit,
            "timeout_s": runtime.webhook_timeout_s,
            "max_records": runtime.webhook_max_records,
        },
    )

    # On SIGTERM (as on Ctrl-C) waitress stops accepting and lets the requests in hand
    # finish for a few seconds; a request cut short is answered by no one and sent again.
    def exit_on_signal(signum: int, frame: object) -> None:
        raise SystemExit(EXIT_OK)

    signal.signal(signal.SIGTERM, exit_on_signal)
    server.run()
    log.info("webhook stopped")
    return EXIT_OK


def submit_objects(args: argparse.Namespace, settings: Settings) -> int:
    from db.models import SourceKind
    from tasks.app import configure
    from tasks.submit import submit_upload
    from workers.events import UploadRecord

    objects = [parse_s3_uri(uri) for uri in args.uris]
    runtime = load_runtime(settings, fleet=True)
    prepare_database(runtime)
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
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import OperationalError as DatabaseError

    from tasks.app import configure
    from tasks.submit import resend_lost

    # The database or the broker is away: one line per check until it is back (a traceback
    # at every check of an outage says nothing more). Anything else is logged in full.
    away = (BrokerError, RedisConnectionError, RedisTimeoutError, DatabaseError)

    runtime = load_runtime(settings, fleet=True)
    after = args.after
    if after is None:
        after = runtime.visibility_timeout_s + runtime.task_time_limit_s
    if after <= 0 or args.every <= 0:
        raise CliError("--after and --every must be positive", EXIT_USAGE)
    prepare_database(runtime)
    configure(settings)
    context = runtime.fleet_context()
    stop = _stop_on_signals()
    while True:
        try:
            sent = resend_lost(context, after_s=after)
        except Exception as exc:  # try again at the next check
            if isinstance(exc, away):
                log.warning(
                    "reconcile check failed: %s", type(exc).__name__, extra={"error": str(exc)}
                )
            else:
                log.exception("reconcile check failed")
            if args.once:
                return EXIT_FAILURE
        else:
            if args.once:
                print(f"sent {sent} messages again")
                return EXIT_OK
        if stop.wait(args.every):
            return EXIT_OK


def show_status(args: argparse.Namespace, settings: Settings) -> int:
    from workers.results import status_of

    objects = [parse_s3_uri(uri) for uri in args.uris]
    runtime = load_runtime(settings, fleet=True)
    session_factory = prepare_database(runtime)
    active = runtime.fleet_ensemble.version
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
