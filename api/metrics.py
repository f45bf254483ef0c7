"""The API's Prometheus metrics: ``GET /metrics`` (outside the OpenAPI schema), and the
middleware that counts what the door refuses and the API's own errors.

- ``/metrics`` serves this process's counters and histograms (``workers.metrics``; in the
  embedded mode the scans run here too, so theirs are included) and the gauges of
  ``collectors`` (the embedded mode's review backlog). It needs no token: keep the API's
  port for platform and dashboard traffic behind the ingress, and let Prometheus reach
  ``/metrics`` on the pod's own address only (the ingress routes ``/v1``, ``/review``,
  ``/admin``, ``/s3-events``, never ``/metrics``; a NetworkPolicy admits the monitoring
  namespace to the port).
- Every refused upload (``POST /v1/scans``, ``POST /s3-events``) counts once in
  ``synthsentry_uploads_refused_total`` with the problem's kind as the reason, wherever it
  was refused: the body limits, authentication, validation or the service. Records
  refused inside an event that was answered 200 are counted by the webhook itself.
- A request that raised, or was answered 500, counts in ``synthsentry_errors_total``
  under ``api``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from fastapi import FastAPI, Request, Response
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import PROBLEM_TYPE
from workers import metrics

PATH = "/metrics"

# The routes that take uploads, and the source they are counted under.
UPLOAD_ROUTES = {("POST", "/v1/scans"): "api", ("POST", "/s3-events"): "s3_event"}
_PROBLEM_BYTES = 64 * 1024  # more than any problem document this API writes


def install(app: FastAPI, collectors: Sequence[Collector] = ()) -> None:
    """``GET /metrics`` on ``app``, and the counting middleware (outermost: it sees the body
    limits' answers too)."""
    registry = metrics.exposition_registry(collectors)

    @app.get(PATH, include_in_schema=False)
    def prometheus_metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), media_type=content_type)

    app.add_middleware(DoorCounter)


class DoorCounter:
    """Counts refused uploads by problem kind, and the API's errors (see the module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", "/")).rstrip("/") or "/"
        source = UPLOAD_ROUTES.get((str(scope.get("method")), path))
        answer = _Answer()

        async def watching(message: Message) -> None:
            answer.see(message)
            await send(message)

        try:
            await self.app(scope, receive, watching)
        except Exception:
            metrics.error("api")
            raise
        if answer.status is not None and answer.status >= 500 and answer.status != 503:
            metrics.error("api")  # 503s are answers by design: busy, not ready, retry later
        if source is not None and answer.status is not None and 400 <= answer.status < 500:
            metrics.upload_refused(source, answer.problem_kind())


class _Answer:
    """The status of a response and, for an error, its first bytes (a problem document)."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.body = bytearray()

    def see(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        elif (
            message["type"] == "http.response.body"
            and self.status is not None
            and self.status >= 400
            and len(self.body) < _PROBLEM_BYTES
        ):
            self.body.extend(message.get("body", b"")[: _PROBLEM_BYTES - len(self.body)])

    def problem_kind(self) -> str:
        """The kind of the problem answered (``urn:synthsentry:problem:<kind>``), else the
        status (an answer that is not one of ours)."""
        try:
            kind = str(json.loads(bytes(self.body))["type"])
        except (ValueError, KeyError, TypeError):
            return str(self.status)
        return (
            kind.removeprefix(PROBLEM_TYPE) if kind.startswith(PROBLEM_TYPE) else str(self.status)
        )
