"""``synthsentry serve``: the HTTP API (``api.app``) under uvicorn, in one of two modes.

- embedded (the SQLite default): the object store is a local folder, and scans run in this
  process in a bounded background worker (``workers.embedded``): no broker, no S3.
- fleet (a server database): the API records and enqueues; the workers scan.
"""

from __future__ import annotations

import argparse
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from synthsentry.cli.common import EXIT_OK, CliError, load_runtime, with_active_ensemble
from synthsentry.cli.database import prepare_database
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from prometheus_client.registry import Collector
    from sqlalchemy.orm import Session, sessionmaker

    from api.context import ApiContext
    from synthsentry.cli.common import Commands
    from synthsentry.runtime import Runtime
    from workers.budget import MemoryBudget
    from workers.detectors.base import Detector
    from workers.embedded import EmbeddedWorker
    from workers.objects import ObjectStore
    from workers.review_media import ReviewMedia


def register(commands: Commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the HTTP API (OpenAPI at /openapi.json)",
        description="Serve the HTTP API with uvicorn: /healthz, /readyz, /openapi.json, "
        "/metrics (Prometheus), the "
        "/v1 endpoints (each answering only to tokens of its roles: `synthsentry tokens "
        "create`) and the S3 event webhook. On the embedded defaults scans run in this "
        "process; with a server database they go to the fleet's queues "
        "(SYNTHSENTRY_API_MODE).",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(handler=run, streams_images=True)


@dataclass
class BuiltApi:
    """The API's context and what runs beside it in this process (the embedded worker and
    the threads started with it), and the gauges its ``/metrics`` serves."""

    context: ApiContext
    worker: EmbeddedWorker | None = None
    threads: list[Callable[[threading.Event], None]] = field(default_factory=list)
    collectors: list[Collector] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _running: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        if self.worker is not None:
            self.worker.start()
        for target in self.threads:
            thread = threading.Thread(target=target, args=(self._stop,), daemon=True)
            thread.start()
            self._running.append(thread)

    def stop(self) -> None:
        self._stop.set()
        if self.worker is not None:
            self.worker.stop()
        for thread in self._running:
            thread.join(30)


def build_api(
    runtime: Runtime, session_factory: sessionmaker[Session], settings: Settings
) -> BuiltApi:
    """The API's context for ``runtime``'s mode (``settings``: the broker's, in the fleet
    mode); nothing started yet."""
    from api.context import ApiContext
    from workers import callbacks
    from workers.budget import MemoryBudget
    from workers.events import BucketPolicy

    try:
        buckets = BucketPolicy.parse(runtime.allowed_buckets) if runtime.allowed_buckets else None
    except ValueError as exc:
        raise CliError(f"SYNTHSENTRY_ALLOWED_BUCKETS: {exc}") from exc
    ensemble = runtime.fleet_ensemble
    policy = runtime.callback_policy()
    # What both modes share; each adds where work goes and where objects are.
    context_of = functools.partial(
        ApiContext,
        session_factory=session_factory,
        bucket_policy=buckets,
        limits=runtime.limits,
        upload_bucket=runtime.upload_bucket,
        upload_prefix=runtime.upload_prefix,
        max_body_bytes=runtime.api_max_body_bytes,
        active_ensemble=ensemble.version,
        detectors=tuple(runtime.fleet_detectors),
        webhook_secret=runtime.webhook_secret.get_secret_value(),
        webhook_max_records=runtime.webhook_max_records,
        rescan_page_size=runtime.rescan_page_size,
        rescan_max_in_flight=runtime.rescan_max_in_flight,
        callbacks=policy,
        body_read_timeout_s=runtime.api_read_timeout_s,
        review_lease=timedelta(minutes=runtime.review_lease_minutes),
        second_review_share=runtime.review_second_opinion_share,
        session_hours=runtime.dashboard_session_hours,
        secure_cookies=runtime.environment != "development",
    )
    if not runtime.embedded_api:
        from tasks.app import configure
        from tasks.submit import CeleryDispatcher

        celery = configure(settings)
        s3 = runtime.s3_client()  # boto3's client answers the ObjectStore calls
        return BuiltApi(
            context=context_of(
                dispatcher=CeleryDispatcher(),
                store=s3,
                embedded=False,
                broker_url=str(celery.conf.broker_url),
                media=_review_media(
                    runtime, session_factory, s3, MemoryBudget(runtime.intake_memory_bytes)
                ),
            )
        )
    from workers import metrics, rescans, review
    from workers.embedded import EmbeddedWorker
    from workers.fleet import FleetContext
    from workers.objects import LocalObjectStore
    from workers.rescans import advance_rescans

    runtime.object_store_dir.mkdir(parents=True, exist_ok=True)
    store = LocalObjectStore(runtime.object_store_dir)
    # One budget for every decode in this process: scans and the review pages' pictures.
    memory = MemoryBudget(runtime.intake_memory_bytes)
    ctx = FleetContext(
        session_factory=session_factory,
        s3=lambda: store,
        limits=runtime.limits,
        memory=memory,
        ensemble=ensemble,
        detectors=list(runtime.fleet_detectors),
        max_attempts=runtime.max_detect_attempts,
    )
    worker = EmbeddedWorker(ctx, _detectors(runtime), queue_size=runtime.embedded_queue_size)
    # Re-scans are listed by the worker's sweep, a page at most as large as its bulk queue,
    # and no more unfinished than fits in it.
    bounded = min(runtime.embedded_queue_size, runtime.rescan_max_in_flight)
    worker.add_sweeper(
        functools.partial(
            advance_rescans,
            ctx,
            store,
            worker,
            page_size=min(runtime.rescan_page_size, bounded),
            max_in_flight=bounded,
        )
    )
    # Claims nobody renews go back to the review queue (the reconciler's job in a fleet).
    worker.add_sweeper(functools.partial(review.expire_leases, session_factory))
    # No separate sender process here: callbacks go out from a thread of this one.
    sender = functools.partial(
        callbacks.run_sender,
        session_factory=session_factory,
        sender=callbacks.CallbackSender(policy),
    )
    return BuiltApi(
        context=context_of(
            dispatcher=worker,
            store=store,
            embedded=True,
            media=_review_media(runtime, session_factory, store, memory),
        ),
        worker=worker,
        threads=[sender],
        # No reconciler beside it: this process exports the database's gauges.
        collectors=[
            metrics.ReviewCollector(functools.partial(review.backlog, session_factory)),
            metrics.RescanCollector(functools.partial(rescans.pending_items, session_factory)),
        ],
    )


def _review_media(
    runtime: Runtime,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    memory: MemoryBudget,
) -> ReviewMedia:
    """The review pages' pictures, rendered from the originals in ``store`` (or the files
    a scan saw) and cached under the data folder; decodes reserve from ``memory``, the
    process's budget for decoded images (SYNTHSENTRY_INTAKE_MEMORY_MB)."""
    from workers.review_media import MediaCache, ReviewMedia

    return ReviewMedia(
        session_factory,
        store,
        runtime.limits,
        MediaCache(runtime.data_dir / "review-media", runtime.review_media_cache_mb * 1024 * 1024),
        thumbnail_side=runtime.review_thumbnail_px,
        display_side=runtime.review_display_px,
        memory=memory,
    )


def _detectors(runtime: Runtime) -> Callable[[str], Detector]:
    """Detectors built on first use, in the worker thread (a model's weights load there,
    never at import), once each."""
    built: dict[str, Detector] = {}
    lock = threading.Lock()

    def detector(name: str) -> Detector:
        with lock:
            if name not in built:
                built[name] = runtime.build_detector(runtime.catalog.specs[name])
            return built[name]

    return detector


def run(args: argparse.Namespace, settings: Settings) -> int:
    from synthsentry.cli.probes import prepare_metrics_folder

    prepare_metrics_folder(forks=False)  # before anything records a metric

    import uvicorn

    from api.app import create_app

    runtime = load_runtime(settings, fleet=True)
    session_factory = prepare_database(runtime, pool_size=10)
    runtime = with_active_ensemble(runtime, session_factory)
    built = build_api(runtime, session_factory, settings)
    app = create_app(built.context, collectors=built.collectors)
    built.start()
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_config=None,  # our JSON logging, configured by the CLI
            # h11, pinned: its cap on a request's header block applies (httptools, which
            # "auto" would pick when installed, has none of its own).
            http="h11",
            h11_max_incomplete_event_size=16 * 1024,
            timeout_keep_alive=5,  # idle keep-alive connections are closed
            limit_concurrency=runtime.api_connection_limit,
            # Below a pod's 30 s grace period: requests in flight finish, then it exits.
            timeout_graceful_shutdown=10,
        )
    finally:
        built.stop()
    return EXIT_OK
