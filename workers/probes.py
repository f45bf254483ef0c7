"""The HTTP endpoints of a long-running process that is not the API (a worker, the SQS
ingest, the reconciler, the callback sender): ``/metrics`` for Prometheus, ``/livez`` and
``/readyz`` for its supervisor (Kubernetes probes).

- ``/livez`` answers 200 while the process's main loop keeps turning (:class:`LoopProbe`),
  and while a task runs in that loop's own thread within its time limit: a long batch
  never fails it. It fails (503) only for a loop that should turn and has not for too
  long, which a restart cures.
- ``/readyz`` answers 200 when the process can take work (its own checks: detectors
  loaded, broker reachable, the last round of its loop succeeded), else 503 with the
  checks that failed. A worker pulls its work, so nothing is routed by it; it tells an
  operator (and ``synthsentry_worker_ready``) whether the process is any use.

Served by the standard library's threaded WSGI server (as prometheus_client's own
``start_http_server``), on its own threads: a busy process still answers its probes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)


class LoopProbe:
    """Whether a process's main loop is alive: it ``beat()``s every turn.

    Alive while it beat in the last ``stale_after_s`` seconds; also before its first beat
    (starting up), while ``paused()`` (the loop is deliberately not turning: a worker
    reconnecting to its broker, which a restart would not make faster), and while a task
    runs in the loop's own thread (``busy()``: a solo pool) for at most ``busy_limit_s``.
    """

    def __init__(
        self,
        *,
        stale_after_s: float,
        busy_limit_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.busy_limit_s = busy_limit_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_beat: float | None = None
        self._paused = False
        self._busy_since: dict[int, float] = {}

    def beat(self) -> None:
        with self._lock:
            self._last_beat = self._clock()
            self._paused = False

    def pause(self) -> None:
        """The loop stopped turning on purpose (it beats again when it resumes)."""
        with self._lock:
            self._paused = True

    @contextmanager
    def busy(self) -> Iterator[None]:
        """A task runs in the loop's thread: the loop does not turn meanwhile."""
        key = threading.get_ident()
        with self._lock:
            self._busy_since[key] = self._clock()
        try:
            yield
        finally:
            with self._lock:
                self._busy_since.pop(key, None)

    def started_task(self) -> None:
        """``busy()`` for callers that see a task's start and its end apart (signals)."""
        with self._lock:
            self._busy_since[threading.get_ident()] = self._clock()

    def finished_task(self) -> None:
        with self._lock:
            self._busy_since.pop(threading.get_ident(), None)

    def alive(self) -> bool:
        with self._lock:
            now = self._clock()
            if self._last_beat is None or self._paused:
                return True
            if now - self._last_beat <= self.stale_after_s:
                return True
            limit = self.busy_limit_s
            return limit is not None and any(
                now - since <= limit for since in self._busy_since.values()
            )

    def silent_for(self) -> float | None:
        with self._lock:
            return None if self._last_beat is None else self._clock() - self._last_beat


@dataclass
class Readiness:
    """Named checks (``name -> callable``): ready when every one answers True. A check that
    raises counts as not ready. Checks may be added once the process knows them."""

    checks: dict[str, Callable[[], bool]] = field(default_factory=dict)

    def add(self, name: str, check: Callable[[], bool]) -> None:
        self.checks[name] = check

    def results(self) -> dict[str, bool]:
        answers: dict[str, bool] = {}
        for name, check in list(self.checks.items()):
            try:
                answers[name] = bool(check())
            except Exception:
                log.warning("a readiness check failed", extra={"check": name}, exc_info=True)
                answers[name] = False
        return answers

    def ready(self) -> bool:
        return all(self.results().values())


class Flag:
    """A yes/no a process sets from its loop (the last round reached its dependencies),
    read by a readiness check."""

    def __init__(self, value: bool = False) -> None:
        self._value = value

    def set(self, value: bool = True) -> None:
        self._value = value

    def __call__(self) -> bool:
        return self._value


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape (a probe every few seconds would drown the logs)."""

    def log_message(self, format: str, *args: Any) -> None:
        return None


def _json(
    start_response: StartResponse, status: str, payload: Mapping[str, Any]
) -> Iterable[bytes]:
    body = json.dumps(payload).encode()
    start_response(
        status,
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]


class ProbeServer:
    """``/metrics`` (``registry``), ``/livez`` (``live``) and ``/readyz`` (``readiness``) on
    ``host:port``, served from daemon threads until :meth:`close`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        live: Callable[[], bool],
        readiness: Readiness,
        host: str = "0.0.0.0",  # noqa: S104 - scraped from outside the pod
        port: int,
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._live = live
        self.readiness = readiness
        # Bound here, so a port that is taken fails the caller at once.
        self._server = make_server(
            host, port, self._app, server_class=ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="probes", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> ProbeServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _json(start_response, "405 Method Not Allowed", {"error": "GET only"})
        if path == "/metrics":
            return self._metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/livez":
            alive = self._live()
            return _json(
                start_response, "200 OK" if alive else "503 Service Unavailable", {"ok": alive}
            )
        if path == "/readyz":
            checks = self.readiness.results()
            ready = all(checks.values())
            status = "200 OK" if ready else "503 Service Unavailable"
            return _json(start_response, status, {"ok": ready, "checks": checks})
        return _json(start_response, "404 Not Found", {"error": "no such endpoint"})
