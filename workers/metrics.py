"""Prometheus metrics: every counter and histogram the processes export, the collectors
that compute gauges when they are scraped, and the registry a process exposes.

The names are a contract with the dashboards and alert rules (``synthsentry_*``); labels
are low cardinality by design: a detector, a queue, an outcome, a reason, never an image,
a key, a token or a URL. This module imports only ``prometheus_client`` and the standard
library, so the API process exports its metrics without torch, Pillow or a database driver.

Counters and histograms are module-level objects that the domain code moves where the
thing happens (``workers.scoring``: detections, verdicts, intake rejections;
``workers.review``: decisions, lease expiries; ...). Gauges are never set per request:
each is a collector that reads its value when it is scraped, through a reader handed to it
(the broker's queues, the database's review backlog), and keeps the answer a few seconds,
so several scrapers (two Prometheus replicas, KEDA) cost one read.

A worker pool that forks (Celery prefork) runs in prometheus_client's multiprocess mode:
with ``PROMETHEUS_MULTIPROC_DIR`` set before this module is imported, each process writes
its values to files there, and :func:`exposition_registry` exposes their sum.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client import disable_created_metrics as _disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# prometheus_client's own switch for multiprocess mode (read by the library when it is
# imported); looked at here only to expose what the processes wrote.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

# A ``*_created`` series beside every counter and histogram doubles what is stored for no
# query anyone writes (multiprocess mode never exposes them either).
_disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

# --- label values --------------------------------------------------------------------------

UPLOAD_SOURCES = ("api", "s3_event", "sqs", "cli", "rescan")
DETECTION_OUTCOMES = ("scored", "failed")
VERDICT_OUTCOMES = ("flagged", "not_flagged", "not_scored")
CALLBACK_OUTCOMES = ("delivered", "failed", "gave_up", "refused")
RESCAN_OUTCOMES = ("done", "failed")
RESEND_KINDS = ("intake", "detect")
COMPONENTS = ("api", "intake", "detect", "callbacks", "reconcile", "ingest", "rescan")
QUEUE_STATES = ("ready", "unacked")

# --- counters ------------------------------------------------------------------------------

UPLOADS_RECEIVED = Counter(
    "synthsentry_uploads_received",
    "Uploads taken in at the door (a duplicate event or an idempotent replay included: "
    "deduplication comes after), by where they came from.",
    ["source"],
)
UPLOADS_REFUSED = Counter(
    "synthsentry_uploads_refused",
    "Uploads refused at the door, nothing recorded: a whole request refused counts once, "
    "with its problem kind as the reason; a record refused inside an accepted event counts "
    "once.",
    ["source", "reason"],
)
INTAKE_REJECTIONS = Counter(
    "synthsentry_intake_rejections",
    "Uploads read and refused by intake (the rejection reason), in the scan and the fleet.",
    ["reason"],
)
DETECTIONS = Counter(
    "synthsentry_detections",
    "Detector answers stored: scored, or failed (with the error stored instead of a score).",
    ["detector", "outcome"],
)
VERDICTS = Counter(
    "synthsentry_verdicts",
    "Verdicts stored (a new one: the same configuration over the same detections is stored "
    "once): flagged for review, not flagged, or not scored (the upload was refused).",
    ["outcome"],
)
REVIEW_LEASE_EXPIRIES = Counter(
    "synthsentry_review_lease_expiries",
    "Claims on review cases that ran out without being renewed; the case went back to its queue.",
)
REVIEW_DECISIONS = Counter(
    "synthsentry_review_decisions",
    "Moderators' decisions stored, by label (unsure escalates to the admins).",
    ["label"],
)
CALLBACK_DELIVERIES = Counter(
    "synthsentry_callback_deliveries",
    "Callback attempts by outcome: delivered (2xx); failed (retried later); gave_up (the "
    "retry window passed, or the endpoint answered 410 Gone); refused (never sent: the "
    "address guard or a revoked token).",
    ["outcome"],
)
RESCAN_ITEMS = Counter(
    "synthsentry_rescan_items",
    "Items of batch re-scans as they finish: done (scored, or rejected with its verdict), "
    "or failed.",
    ["outcome"],
)
RECONCILER_RESENDS = Counter(
    "synthsentry_reconciler_resends",
    "Messages the reconciler sent again for uploads left pending (lost by a broker or a "
    "killed worker).",
    ["kind"],
)
ERRORS = Counter(
    "synthsentry_errors",
    "Errors by component: exceptions that ended a request, a task run, a loop's round or a "
    "step (each also logged).",
    ["component"],
)

# --- histograms ----------------------------------------------------------------------------

BATCH_SIZE = Histogram(
    "synthsentry_batch_size",
    "Images in each batch a detector's model ran.",
    ["detector"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
MODEL_LATENCY = Histogram(
    "synthsentry_model_latency_seconds",
    "Seconds one batch took in the model (from launching it to its answers being read).",
    ["detector", "device"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
QUEUE_WAIT = Histogram(
    "synthsentry_queue_wait_seconds",
    "Seconds from a message's publication to its task starting (the sender's clock against "
    "the worker's), by queue.",
    ["queue"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0),
)


def initialise(counter: Counter, values: Iterable[str]) -> None:
    """Make a counter's series exist at zero for each of its known label values, so that a
    rate over them is 0 rather than missing before the first event."""
    for value in values:
        counter.labels(value)


for _counter, _values in (
    (UPLOADS_RECEIVED, UPLOAD_SOURCES),
    (VERDICTS, VERDICT_OUTCOMES),
    (CALLBACK_DELIVERIES, CALLBACK_OUTCOMES),
    (RESCAN_ITEMS, RESCAN_OUTCOMES),
    (RECONCILER_RESENDS, RESEND_KINDS),
    (ERRORS, COMPONENTS),
):
    initialise(_counter, _values)


# --- helpers the domain code calls -----------------------------------------------------------


def upload_received(source: str, count: int = 1) -> None:
    if count:
        UPLOADS_RECEIVED.labels(source).inc(count)


def upload_refused(source: str, reason: str, count: int = 1) -> None:
    if count:
        UPLOADS_REFUSED.labels(source, reason).inc(count)


def error(component: str) -> None:
    ERRORS.labels(component).inc()


def observe_batch(detector: str, device: str, size: int, seconds: float) -> None:
    """One batch a detector's model ran: its size, and the seconds it took."""
    BATCH_SIZE.labels(detector).observe(size)
    MODEL_LATENCY.labels(detector, device).observe(seconds)


def observe_queue_wait(queue: str, seconds: float) -> None:
    # The sender's clock may run ahead of the worker's: a negative wait is no wait.
    QUEUE_WAIT.labels(queue).observe(max(0.0, seconds))


class MetricsBatches:
    """A batch observer (``workers.engine.BatchObserver``) that records every batch in the
    batch-size and model-latency histograms and logs it as ``LogBatches`` does (the
    ``batch ran`` line, with its size)."""

    def __init__(self, *, device: str = "cpu") -> None:
        self.device = device  # when the batcher does not say

    def batch_ran(
        self, batcher: str, size: int, seconds: float, *, detector: str = "", device: str = ""
    ) -> None:
        # A batcher that does not name its detector is named after it ("batcher-<name>").
        name = detector or batcher.removeprefix("batcher-")
        observe_batch(name, device or self.device, size, seconds)
        log.info(
            "batch ran",
            extra={
                "batcher": batcher,
                "detector": name,
                "batch_size": size,
                "ms": round(seconds * 1000, 1),
            },
        )


# --- gauges: collectors read at scrape time ---------------------------------------------------

T = TypeVar("T")


class Cached(Generic[T]):
    """``read`` called at most once every ``ttl_s`` seconds; the last answer in between. A
    read that fails is logged, counted under ``component`` and answers None until the next
    read is due (a broker that is away is not asked again at every scrape); a collector
    then serves its families without samples."""

    def __init__(
        self,
        read: Callable[[], T],
        *,
        ttl_s: float = 5.0,
        component: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self.ttl_s = ttl_s
        self.component = component
        self._clock = clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._read_at: float | None = None

    def get(self) -> T | None:
        with self._lock:
            now = self._clock()
            if self._read_at is None or now - self._read_at >= self.ttl_s:
                self._read_at = now
                try:
                    self._value = self._read()
                except Exception as exc:
                    self._value = None
                    error(self.component)
                    log.warning(
                        "a metric could not be read",
                        extra={"component": self.component, "error": f"{type(exc).__name__}"},
                    )
            return self._value


@dataclass(frozen=True)
class QueueDepth:
    """One broker queue at one read: messages waiting (every priority of it), messages
    reserved by a worker and not acknowledged yet, and the workers consuming it."""

    queue: str
    ready: int
    unacked: int
    consumers: int


class QueueCollector:
    """``synthsentry_queue_messages{queue,state}`` and ``synthsentry_queue_consumers{queue}``
    from ``read`` (``tasks.submit.read_depths`` on the broker)."""

    def __init__(self, read: Callable[[], Sequence[QueueDepth]], *, ttl_s: float = 5.0) -> None:
        self._depths = Cached(read, ttl_s=ttl_s, component="reconcile")

    def describe(self) -> list[Metric]:
        return list(self._families([]))

    def collect(self) -> list[Metric]:
        # Unread (the broker away): the families without samples, never made-up values.
        return list(self._families(self._depths.get() or []))

    @staticmethod
    def _families(depths: Sequence[QueueDepth]) -> Iterator[Metric]:
        messages = GaugeMetricFamily(
            "synthsentry_queue_messages",
            "Messages in a broker queue: ready (waiting, every priority sub-list summed) or "
            "unacked (reserved by a worker, not acknowledged yet).",
            labels=["queue", "state"],
        )
        consumers = GaugeMetricFamily(
            "synthsentry_queue_consumers",
            "Workers consuming a queue (a heartbeat in the last 30 s); 0: nobody drains it.",
            labels=["queue"],
        )
        for depth in depths:
            messages.add_metric([depth.queue, "ready"], depth.ready)
            messages.add_metric([depth.queue, "unacked"], depth.unacked)
            consumers.add_metric([depth.queue], depth.consumers)
        yield messages
        yield consumers


@dataclass(frozen=True)
class ReviewBacklog:
    """The review cases nobody has finished, by state, and how long the oldest open one has
    waited (None: no open case)."""

    cases: Mapping[str, int]
    oldest_open_age_s: float | None


class ReviewCollector:
    """``synthsentry_review_cases{state}`` and the oldest open case's age, from ``read``
    (``workers.review.backlog`` on the database)."""

    def __init__(self, read: Callable[[], ReviewBacklog], *, ttl_s: float = 15.0) -> None:
        self._backlog = Cached(read, ttl_s=ttl_s, component="reconcile")

    def describe(self) -> list[Metric]:
        return list(self._families(None))

    def collect(self) -> list[Metric]:
        return list(self._families(self._backlog.get()))

    @staticmethod
    def _families(backlog: ReviewBacklog | None) -> Iterator[Metric]:
        cases = GaugeMetricFamily(
            "synthsentry_review_cases",
            "Review cases not finished yet, by state (open, claimed, escalated).",
            labels=["state"],
        )
        oldest = GaugeMetricFamily(
            "synthsentry_review_oldest_open_case_age_seconds",
            "Seconds the oldest open review case has waited for a moderator (0: none open).",
        )
        if backlog is not None:
            for state, count in sorted(backlog.cases.items()):
                cases.add_metric([state], count)
            oldest.add_metric([], backlog.oldest_open_age_s or 0.0)
        yield cases
        yield oldest


class RescanCollector:
    """``synthsentry_rescan_items_pending`` from ``read`` (``workers.rescans.pending_items``)."""

    def __init__(self, read: Callable[[], int], *, ttl_s: float = 15.0) -> None:
        self._pending = Cached(read, ttl_s=ttl_s, component="rescan")

    def describe(self) -> list[Metric]:
        return [self._family(None)]

    def collect(self) -> list[Metric]:
        return [self._family(self._pending.get())]

    @staticmethod
    def _family(pending: int | None) -> Metric:
        family = GaugeMetricFamily(
            "synthsentry_rescan_items_pending",
            "Items of batch re-scans recorded and not finished yet (queued or being scored).",
        )
        if pending is not None:
            family.add_metric([], pending)
        return family


class ReadyCollector:
    """``synthsentry_worker_ready``: 1 while this process can take work (``ready``)."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready

    def describe(self) -> list[Metric]:
        return [self._family(None)]

    def collect(self) -> list[Metric]:
        return [self._family(self._ready())]

    @staticmethod
    def _family(ready: bool | None) -> Metric:
        family = GaugeMetricFamily(
            "synthsentry_worker_ready",
            "1 when this process can take work (its detectors loaded, its broker reachable).",
        )
        if ready is not None:
            family.add_metric([], 1.0 if ready else 0.0)
        return family


# --- what a process exposes ------------------------------------------------------------------


class _ProcessMetrics:
    """This process's counters and histograms (the default registry) as one collector."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def multiprocess_dir() -> str | None:
    """The folder the processes of a forking pool write their values to, when
    prometheus_client runs in multiprocess mode."""
    return os.environ.get(MULTIPROCESS_DIR_ENV) or None


def exposition_registry(collectors: Sequence[Collector] = ()) -> CollectorRegistry:
    """What a ``/metrics`` endpoint serves: the counters and histograms of this process (in
    multiprocess mode: summed over every process that wrote to the folder, the pool's
    children included) and ``collectors``, this process's gauges."""
    registry = CollectorRegistry()
    folder = multiprocess_dir()
    if folder is not None:
        MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ProcessMetrics())
    for collector in collectors:
        registry.register(collector)
    return registry


def clear_stale_files(folder: str, *, keep_pid: int | None = None) -> int:
    """Remove the value files that processes no longer running left in a multiprocess
    folder (prometheus_client asks for it to be emptied before a process tree starts: a
    restarted container finds its predecessor's there). This process's own files, which it
    may have opened already, and those of live processes sharing the folder are kept.
    Returns how many were removed."""
    own = os.getpid() if keep_pid is None else keep_pid
    removed = 0
    for path in Path(folder).glob("*.db"):
        pid = path.stem.rpartition("_")[2]
        if not pid.isdigit() or int(pid) == own or _running(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's process
    return True
