"""``synthsentry``: the command line. It sits on top of everything else and holds no logic of
its own beyond parsing, wiring and printing."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from synthsentry.settings import Settings, get_settings

POLICY = (
    "A flag is an indication for human review, not proof that an image is AI-generated: "
    "the detectors' own authors say their output may be wrong, and missing provenance "
    "says nothing about where a picture came from."
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("synthsentry.cli")


class CliError(Exception):
    """A usage or system error: printed as one line, exit status 2 (usage) or 1."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthsentry",
        description="Score images for signs of AI generation and queue likely ones for "
        "human review. " + POLICY,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scan = commands.add_parser(
        "scan",
        help="scan local files or folders and store one verdict per file",
        description="Scan image files (folders are walked recursively) with the detector "
        "ensemble, store every result in the configured database and print one result per "
        "file. Rejected files (not images, truncated, too large, ...) are results too. " + POLICY,
    )
    scan.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    scan.add_argument(
        "--detector",
        action="append",
        default=[],
        metavar="SPEC",
        help="NAME or NAME=WEIGHTS_URI (local path, s3://bucket/key, hf://org/repo[@rev][/file]);"
        " repeatable. Default: every built-in detector that can run on this machine.",
    )
    scan.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    scan.add_argument(
        "--threshold", type=float, default=None, help="review threshold for ai_score (0..1)"
    )
    scan.add_argument(
        "--batch-size", type=int, default=None, help="images per model batch (default: setting)"
    )
    scan.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    detectors = commands.add_parser("detectors", help="inspect the detector catalog")
    detector_commands = detectors.add_subparsers(dest="detectors_command", required=True)
    listing = detector_commands.add_parser(
        "list", help="list known detectors and whether their weights are on this machine"
    )
    listing.add_argument("--json", action="store_true")
    verify = detector_commands.add_parser(
        "verify",
        help="load a detector (downloading its weights if needed), check the pinned hash, "
        "run one forward pass and print timings",
    )
    verify.add_argument("selector", metavar="NAME[=WEIGHTS_URI]")

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

    webhook = commands.add_parser(
        "webhook",
        help="serve the HTTP endpoint for S3-style upload notifications (MinIO webhook)",
    )
    webhook.add_argument("--host", default="127.0.0.1")
    webhook.add_argument("--port", type=int, default=8080)

    submit = commands.add_parser(
        "submit", help="queue S3 objects for scanning (operators, re-scans, tests)"
    )
    submit.add_argument("uris", nargs="+", metavar="s3://BUCKET/KEY")

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

    status = commands.add_parser(
        "status", help="print the stored result of S3 objects (same shape as scan --json)"
    )
    status.add_argument("uris", nargs="+", metavar="s3://BUCKET/KEY")
    status.add_argument("--json", action="store_true", help="one JSON object per upload")

    database = commands.add_parser("db", help="database maintenance")
    db_commands = database.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply all migrations (alembic upgrade head)")
    db_commands.add_parser("current", help="print the applied and the latest revision")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
    except Exception as exc:  # pydantic ValidationError: a bad SYNTHSENTRY_* variable
        print(f"synthsentry: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from synthsentry import logs

    logs.configure(settings.log_level, json_lines=settings.log_json)
    commands: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
        "scan": _scan,
        "detectors": _detectors,
        "db": _db,
        "worker": _worker,
        "ingest": _ingest_sqs,
        "webhook": _webhook,
        "submit": _submit,
        "status": _status,
        "reconcile": _reconcile,
    }
    try:
        if args.command in commands:
            return commands[args.command](args, settings)
    except CliError as exc:
        print(f"synthsentry: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("synthsentry: interrupted; results stored so far are kept", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE  # pragma: no cover - parser.error exits


# --- database ---------------------------------------------------------------------------


def _prepare_database(settings: Settings) -> Any:
    """A session factory for the configured database, migrated where that is safe.

    The embedded SQLite file is created and migrated on first use; a shared Postgres is
    migrated by a deploy step (``synthsentry db upgrade``), so here it is only checked.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from db import migrate
    from db.session import make_engine, make_sessionmaker

    url = settings.resolved_database_url
    try:
        if url.startswith("sqlite"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            migrate.upgrade(url)
        else:
            current, head = migrate.current_revision(url), migrate.head_revision()
            if current != head:
                raise CliError(
                    f"the database is at revision {current or 'none'}, this release needs "
                    f"{head}: run `synthsentry db upgrade` first"
                )
    except SQLAlchemyError as exc:
        raise CliError(
            f"cannot use the database {_safe_url(url)}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    except OSError as exc:
        raise CliError(f"cannot create the data folder {settings.data_dir}: {exc}") from exc
    return make_sessionmaker(make_engine(url, echo=settings.database_echo))


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from db import migrate

    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    if args.db_command == "upgrade":
        migrate.upgrade(url)
        print(f"{_safe_url(url)} is at revision {migrate.current_revision(url)}")
    else:
        print(
            f"applied: {migrate.current_revision(url) or 'none'}  latest: {migrate.head_revision()}"
        )
    return EXIT_OK


# --- detectors --------------------------------------------------------------------------


def _catalog(settings: Settings) -> Any:
    from workers.detectors.registry import Catalog, SpecError

    try:
        return Catalog.build(settings.detector_config)
    except SpecError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def _weights_status(spec: Any, settings: Settings) -> str:
    """Where the weights stand, without downloading anything."""
    from synthsentry.runtime import resolver as _resolver
    from workers.detectors.base import DetectorUnavailable

    if spec.weights is None:
        return "none needed"
    if spec.weights.startswith("s3://"):
        return "remote (s3, fetched on first use)"
    try:
        _resolver(settings, local_only=True)(spec.weights, spec.name)
    except DetectorUnavailable:
        return "not on this machine" if spec.weights.startswith("hf://") else "missing"
    return "cached" if spec.weights.startswith("hf://") else "local"


def _detectors_list(args: argparse.Namespace, settings: Settings) -> int:
    catalog = _catalog(settings)
    rows = [
        {
            "name": spec.name,
            "family": spec.family,
            "version": spec.version,
            "weights": spec.weights,
            "weights_status": _weights_status(spec, settings),
            "device": "cpu" if spec.family == "provenance" else settings.device,
            "description": spec.description,
        }
        for spec in catalog.specs.values()
    ]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return EXIT_OK
    print(
        f"{'NAME':<16} {'FAMILY':<10} {'VERSION':<8} {'DEVICE':<7} {'WEIGHTS STATUS':<20} WEIGHTS"
    )
    for row in rows:
        print(
            f"{row['name']:<16} {row['family']:<10} {row['version']:<8} {row['device']:<7} "
            f"{row['weights_status']:<20} {row['weights'] or '-'}"
        )
    return EXIT_OK


def _detectors_verify(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from PIL import Image

    from synthsentry.runtime import resolver as _resolver
    from workers.detectors.base import DetectorUnavailable
    from workers.detectors.registry import SpecError, build_detector

    catalog = _catalog(settings)
    try:
        spec = catalog.resolve(args.selector)
    except SpecError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
    resolve = _resolver(settings)
    started = time.perf_counter()
    try:
        detector = build_detector(spec, device=settings.device, resolve=resolve)
    except DetectorUnavailable as exc:
        raise CliError(f"detector {spec.name} cannot run: {exc}") from exc
    loaded = time.perf_counter()
    # A smooth synthetic picture: enough to prove the forward pass runs end to end.
    probe = Image.linear_gradient("L").resize((512, 384)).convert("RGB")
    (output,) = detector.detect_batch([probe], [b""])
    first = time.perf_counter()
    detector.detect_batch([probe], [b""])
    second = time.perf_counter()
    print(f"detector        {spec.name} ({spec.family})")
    print(f"weights         {spec.weights or '-'}")
    print(f"weights sha256  {detector.weights_sha256 or '-'}")
    print(f"version         {detector.version}")
    print(f"device          {settings.device}")
    print(f"load            {(loaded - started) * 1000:.0f} ms (fetch, hash check, build)")
    print(f"first forward   {(first - loaded) * 1000:.0f} ms")
    print(f"second forward  {(second - first) * 1000:.0f} ms")
    score = "abstained" if output.score is None else f"{output.score:.4f}"
    print(f"probe score     {score} (a synthetic gradient; says nothing about real images)")
    return EXIT_OK


def _load_detectors(selectors: list[str], settings: Settings) -> list[Any]:
    from synthsentry.runtime import resolver as _resolver
    from workers.detectors.base import DetectorUnavailable
    from workers.detectors.registry import SpecError, build_available, build_detector

    catalog = _catalog(settings)
    if selectors:
        resolve = _resolver(settings)
        detectors = []
        for selector in selectors:
            try:
                spec = catalog.resolve(selector)
                detectors.append(build_detector(spec, device=settings.device, resolve=resolve))
            except SpecError as exc:
                raise CliError(str(exc), EXIT_USAGE) from exc
            except DetectorUnavailable as exc:
                # Asked for by name: running without it would answer a different question.
                raise CliError(f"detector {selector.partition('=')[0]} cannot run: {exc}") from exc
        return detectors
    # The default ensemble uses what is already on this machine: a scan should not start
    # gigabytes of downloads as a side effect. Naming a detector downloads its weights.
    built, skipped = build_available(
        catalog.specs.values(),
        device=settings.device,
        resolve=_resolver(settings, local_only=True),
    )
    for item in skipped:
        print(f"skipped detector {item.name}: {item.why}", file=sys.stderr)
    if not built:
        print(
            "warning: no detector can run on this machine; every scored file will be "
            "'inconclusive'. Provide weights with --detector NAME=/path/to/weights.",
            file=sys.stderr,
        )
    return built


# --- fleet ------------------------------------------------------------------------------


def _parse_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise CliError(f"expected s3://BUCKET/KEY, got {uri!r}", EXIT_USAGE)
    return bucket, key


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from tasks.app import configure
    from workers.fleet import INTAKE_QUEUE, queue_for

    if args.detector and args.detector not in _catalog(settings).specs:
        raise CliError(f"unknown detector {args.detector!r}", EXIT_USAGE)
    batch_size = args.batch_size if args.batch_size is not None else settings.batch_size
    batch_wait_ms = args.batch_wait_ms if args.batch_wait_ms is not None else settings.batch_wait_ms
    if args.device is not None:
        # Through the environment: every process of this worker reads it (prefork children
        # inherit it), and the settings validate it.
        os.environ["SYNTHSENTRY_DEVICE"] = args.device
        get_settings.cache_clear()
        try:
            settings = get_settings()
        except ValueError as exc:  # pydantic's ValidationError
            raise CliError(f"--device: {exc}", EXIT_USAGE) from exc
    if batch_size < 1 or batch_wait_ms < 0 or args.concurrency < 1:
        raise CliError(
            "--batch-size and --concurrency must be >= 1, --batch-wait-ms >= 0", EXIT_USAGE
        )
    pool, concurrency = args.pool or "prefork", args.concurrency
    if args.detector and batch_size > 1:
        if args.pool not in (None, "threads"):
            raise CliError(
                "a batching detector worker runs on threads; use --batch-size 1", EXIT_USAGE
            )
        # One thread per message: a batch runs while the next one fills.
        pool, concurrency = "threads", 2 * batch_size
        import tasks.scan

        tasks.scan.use_batching(
            max_batch=batch_size,
            max_wait_s=batch_wait_ms / 1000,
            watchdog_s=float(settings.task_time_limit_seconds),
        )
    _prepare_database(settings)
    queue = INTAKE_QUEUE if args.intake else queue_for(args.detector)
    app = configure(settings)
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
            settings.log_level,
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return EXIT_OK


def _policy(settings: Settings) -> Any:
    from workers.events import BucketPolicy

    try:
        return BucketPolicy.parse(settings.allowed_buckets)
    except ValueError as exc:
        raise CliError(
            f"SYNTHSENTRY_ALLOWED_BUCKETS: {exc} (e.g. 'uploads' or 'media:incoming/')",
            EXIT_USAGE,
        ) from exc


def _dead_letter(session_factory: Any, channel: str) -> Any:
    from db.repository import record_dead_letter
    from db.session import transaction

    def keep(body: str, reason: str) -> None:
        with transaction(session_factory) as session:
            record_dead_letter(session, channel, reason, body)

    return keep


def _ingest_sqs(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import threading

    import boto3

    from tasks.app import configure
    from tasks.runtime import build_context
    from tasks.submit import submit_upload
    from workers.events import UploadRecord
    from workers.ingest import run_sqs_ingest

    policy = _policy(settings)
    session_factory = _prepare_database(settings)
    configure(settings)
    context = build_context()
    sqs = boto3.client("sqs", endpoint_url=args.endpoint_url, region_name=settings.s3_region)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def submit(record: UploadRecord) -> None:
        submit_upload(context, record)

    stats = run_sqs_ingest(
        sqs,
        args.queue_url,
        submit=submit,
        dead_letter=_dead_letter(session_factory, "sqs"),
        policy=policy,
        stop=stop,
        wait_seconds=args.wait_seconds,
    )
    log.info("ingest stopped", extra={"stats": vars(stats)})
    return EXIT_OK


def _webhook(args: argparse.Namespace, settings: Settings) -> int:
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIServer, make_server

    from api.webhook import make_app
    from tasks.app import configure
    from tasks.runtime import build_context
    from tasks.submit import submit_upload

    secret = settings.webhook_secret.get_secret_value()
    if not secret:
        raise CliError(
            "set SYNTHSENTRY_WEBHOOK_SECRET: the webhook refuses to run open", EXIT_USAGE
        )
    policy = _policy(settings)
    session_factory = _prepare_database(settings)
    configure(settings)
    context = build_context()
    application = make_app(
        secret=secret,
        policy=policy,
        submit=lambda record: submit_upload(context, record),
        dead_letter=_dead_letter(session_factory, "webhook"),
    )

    class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    with make_server(args.host, args.port, application, ThreadingWSGIServer) as server:
        log.info("webhook listening", extra={"host": args.host, "port": args.port})
        server.serve_forever()
    return EXIT_OK


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    import boto3

    from db.models import SourceKind
    from tasks.app import configure
    from tasks.runtime import build_context
    from tasks.submit import submit_upload
    from workers.events import UploadRecord

    objects = [_parse_s3_uri(uri) for uri in args.uris]
    _prepare_database(settings)
    configure(settings)
    context = build_context()
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region)
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
            print(f"s3://{bucket}/{key}: already scanned (see `synthsentry status`)")
        else:
            print(f"s3://{bucket}/{key}: queued (source {source_id})")
    return EXIT_OK


def _detectors(args: argparse.Namespace, settings: Settings) -> int:
    if args.detectors_command == "verify":
        return _detectors_verify(args, settings)
    return _detectors_list(args, settings)


def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import threading

    from tasks.app import configure
    from tasks.runtime import build_context
    from tasks.submit import resend_lost

    after = args.after
    if after is None:
        after = settings.visibility_timeout_seconds + settings.task_time_limit_seconds
    if after <= 0 or args.every <= 0:
        raise CliError("--after and --every must be positive", EXIT_USAGE)
    _prepare_database(settings)
    configure(settings)
    context = build_context()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while True:
        try:
            sent = resend_lost(context, after_s=after)
        except Exception:  # the database or broker is away: try again at the next check
            log.exception("reconcile check failed")
            if args.once:
                return EXIT_FAILURE
        else:
            if args.once:
                print(f"sent {sent} messages again")
                return EXIT_OK
        if stop.wait(args.every):
            return EXIT_OK


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from workers.fleet import status_of

    objects = [_parse_s3_uri(uri) for uri in args.uris]
    session_factory = _prepare_database(settings)
    with session_factory() as session:
        for bucket, key in objects:
            outcomes = status_of(session, bucket, key)
            if not outcomes:
                print(f"s3://{bucket}/{key}: not known", file=sys.stderr)
            for outcome in outcomes:
                if args.json:
                    print(json.dumps(outcome.to_json()))
                else:
                    score = "-" if outcome.ai_score is None else f"{outcome.ai_score:.3f}"
                    print(f"{outcome.verdict:<14} {score:>8}  {outcome.path}")
    return EXIT_OK


# --- scan -------------------------------------------------------------------------------


def _scan(args: argparse.Namespace, settings: Settings) -> int:
    from workers.ensemble import EnsembleConfig
    from workers.intake import IntakeLimits
    from workers.scan import Scanner, iter_image_paths

    threshold = settings.flag_threshold if args.threshold is None else args.threshold
    if not 0.0 <= threshold <= 1.0:
        raise CliError("--threshold must be between 0 and 1", EXIT_USAGE)
    batch_size = settings.batch_size if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise CliError("--batch-size must be at least 1", EXIT_USAGE)
    paths = list(iter_image_paths(args.paths))
    session_factory = _prepare_database(settings)
    detectors = _load_detectors(args.detector, settings)
    scanner = Scanner(
        detectors,
        session_factory,
        IntakeLimits.from_settings(settings),
        EnsembleConfig(threshold=threshold, weights=settings.ensemble_weights),
        batch_size=batch_size,
        decode_threads=settings.intake_threads,
    )
    progress = _Progress(len(paths), enabled=not args.no_progress and sys.stderr.isatty())
    outcomes = []
    for outcome in scanner.scan(paths):
        if args.json:
            print(json.dumps(outcome.to_json()), flush=True)
        else:
            outcomes.append(outcome)
        progress.advance()
    progress.close()
    if not args.json:
        _print_table(outcomes, sys.stdout)
    return EXIT_OK


class _Progress:
    def __init__(self, total: int, *, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled and total > 1

    def advance(self) -> None:
        self.done += 1
        if self.enabled:
            width = 30
            filled = width * self.done // max(1, self.total)
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\rscanning [{bar}] {self.done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _print_table(outcomes: Sequence[Any], out: TextIO) -> None:
    header = f"{'VERDICT':<14} {'AI_SCORE':>8}  {'DETECTORS':<40} PATH"
    print(header, file=out)
    for o in outcomes:
        score = "-" if o.ai_score is None else f"{o.ai_score:.3f}"
        if o.status == "rejected":
            detail = f"rejected: {o.reason}"
        else:
            detail = (
                ", ".join(
                    f"{d.name}={'err' if d.error else '-' if d.score is None else f'{d.score:.2f}'}"
                    for d in o.detectors
                )
                or "(no detector)"
            )
        verdict = o.verdict + (" *" if o.flagged else "")
        print(f"{verdict:<14} {score:>8}  {detail:<40} {o.path}", file=out)
        for d in o.detectors:
            # What a detector found, in its own words (provenance: which signal, which tool).
            summary = d.evidence.get("summary") if isinstance(d.evidence, dict) else None
            if summary:
                text = f"{d.name}: {summary}"
                print(f"{'':<25}{text[:160]}{'...' if len(text) > 160 else ''}", file=out)
    flagged = sum(1 for o in outcomes if o.flagged)
    rejected = sum(1 for o in outcomes if o.status == "rejected")
    print(
        f"\n{len(outcomes)} files: {flagged} flagged for review (*), {rejected} rejected.",
        file=out,
    )
    print(POLICY, file=out)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
