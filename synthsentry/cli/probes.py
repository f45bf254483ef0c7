"""Metrics and probes of the long-running commands (``worker``, ``ingest sqs``,
``reconcile``, ``callbacks deliver``, ``serve``): ``--metrics-port``, prometheus_client's
multiprocess folder, and the server of ``/metrics``, ``/livez`` and ``/readyz``.

Nothing here imports prometheus_client at module level: its multiprocess mode is decided
when it is first imported, which must come after :func:`prepare_metrics_folder`."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from synthsentry.cli.common import EXIT_USAGE, CliError
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from workers.probes import ProbeServer, Readiness

log = logging.getLogger(__name__)

# --- metrics and probes of the long-running processes ----------------------------------------

# prometheus_client's switch for its multiprocess mode, read by the library when imported.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def add_metrics_port(parser: argparse.ArgumentParser, *, also: str = "") -> None:
    """``--metrics-port`` for a command that runs until stopped."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve /metrics, /livez and /readyz on this port (default SYNTHSENTRY_METRICS_PORT, "
        f"9100; 0: no server){also}",
    )


def prepare_metrics_folder(*, forks: bool) -> None:
    """Set up prometheus_client's multiprocess mode before anything records a metric.

    With ``PROMETHEUS_MULTIPROC_DIR`` set (the deployment's own folder, one per pod), the
    value files earlier runs left there are removed, as the library asks. Without it, a
    process whose pool forks (Celery prefork: the tasks run in children, whose counters
    the parent's ``/metrics`` would never see) gets a private folder, removed when it
    exits; its children inherit the variable. A process that does not fork keeps its
    metrics in memory."""
    folder = os.environ.get(MULTIPROCESS_DIR_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        from workers.metrics import clear_stale_files

        removed = clear_stale_files(folder)
        log.info("metrics in multiprocess mode", extra={"folder": folder, "stale_files": removed})
        return
    if not forks:
        return
    if "prometheus_client" in sys.modules:
        # Too late to switch (a wrapper recorded metrics before the command ran).
        log.warning(
            "the pool's processes record metrics this process cannot export: set "
            f"{MULTIPROCESS_DIR_ENV} to an empty folder"
        )
        return
    try:
        folder = tempfile.mkdtemp(prefix="synthsentry-metrics-")
    except OSError as exc:  # no writable temporary folder: the pool's metrics are lost
        log.warning(
            f"no folder for the pool's metrics; set {MULTIPROCESS_DIR_ENV}",
            extra={"error": str(exc)},
        )
        return
    os.environ[MULTIPROCESS_DIR_ENV] = folder
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not a child that happens to run exit handlers
            shutil.rmtree(folder, ignore_errors=True)

    atexit.register(remove)


def serve_probes(
    settings: Settings,
    port: int | None,
    *,
    live: Callable[[], bool],
    readiness: Readiness,
    collectors: Sequence[Collector] = (),
) -> ProbeServer | None:
    """Start this process's ``/metrics``, ``/livez`` and ``/readyz`` (``workers.probes``) on
    ``port`` (None: ``SYNTHSENTRY_METRICS_PORT``; 0: none), with ``collectors`` and
    ``synthsentry_worker_ready`` beside the counters. A port named by the operator that
    cannot be bound is an error; the default one taken (several processes started by hand
    on one machine) is a warning, and the process runs without the server."""
    from workers import metrics
    from workers.probes import ProbeServer

    chosen = settings.metrics_port if port is None else port
    if chosen == 0:
        return None
    if not 0 < chosen < 65536:
        raise CliError("--metrics-port must be a port (1-65535), or 0 for no server", EXIT_USAGE)
    registry = metrics.exposition_registry([*collectors, metrics.ReadyCollector(readiness.ready)])
    try:
        server = ProbeServer(
            registry, live=live, readiness=readiness, host=settings.metrics_host, port=chosen
        )
    except OSError as exc:
        if port is not None or "metrics_port" in settings.model_fields_set:
            raise CliError(f"cannot serve metrics on port {chosen}: {exc}") from exc
        log.warning(
            "metrics server not started: the default port is taken (set "
            "SYNTHSENTRY_METRICS_PORT or --metrics-port; 0 for none)",
            extra={"port": chosen, "error": str(exc)},
        )
        return None
    server.start()
    log.info(
        "metrics server listening",
        extra={"port": server.port, "multiprocess": metrics.multiprocess_dir() is not None},
    )
    return server
