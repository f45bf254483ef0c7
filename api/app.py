"""The HTTP API: a FastAPI application over the same services as the CLI and the tasks.

    GET  /healthz            the process answers
    GET  /readyz             the database (and, with a server database, the broker) answer
    GET  /openapi.json       the schema
    GET  /metrics            Prometheus metrics (not in the schema; api.metrics)
    /v1/scans, /v1/items, /v1/images   platform hooks: submit uploads, read verdicts
    /v1/callbacks            signed callbacks: secrets, allowed hosts, deliveries
    /v1/rescans              batch re-scans (admin)
    /v1/tokens               API tokens (admin)
    POST /s3-events          S3 upload notifications (shared secret)
    /review, /admin          the review dashboard's pages (a signed-in moderator or admin)

Importing this module loads FastAPI, SQLAlchemy and the services it serves, never torch:
the API records and reads; models run in the workers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import Depends, FastAPI
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from api import (
    callbacks,
    dashboard,
    limits,
    metrics,
    problems,
    rescans,
    reviews,
    scans,
    tokens,
    webhook,
)
from api.context import ApiContext
from api.guards import storable_text
from api.problems import Problem
from db.session import ping

log = logging.getLogger(__name__)

# Every endpoint but the health checks lives in one of these. Each /v1 endpoint names the
# roles that may call it; /s3-events (api.webhook) is called by a storage server, which
# holds no API token, and takes the shared secret instead.
ROUTERS = (
    scans.router,
    callbacks.router,
    reviews.router,
    rescans.router,
    tokens.router,
    webhook.router,
)


def create_app(context: ApiContext, *, collectors: Sequence[Collector] = ()) -> FastAPI:
    """The application over ``context`` (``api.context``: the database, the dispatcher, the
    object store, the limits); ``collectors``: gauges ``/metrics`` serves beside the
    process's counters (the embedded mode's review backlog)."""
    session_factory: sessionmaker[Session] = context.session_factory
    broker_url = context.broker_url
    app = FastAPI(
        title="synthsentry",
        summary="Scores uploaded images for signs of AI generation and queues likely ones "
        "for human review. A flag is a request for review, never a finding of fact.",
        version="1",
    )
    app.state.context = context
    app.state.session_factory = session_factory
    problems.install(app)
    scans.install(app)
    limits.install(app, context, read_timeout_s=context.body_read_timeout_s)
    # After the body limits: its middleware is the outer one and counts their refusals.
    metrics.install(app, collectors)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/readyz", tags=["operations"])
    def readyz() -> dict[str, Any]:
        try:
            ping(session_factory)
        except Exception as exc:
            log.warning("not ready: database", extra={"error": str(exc)})
            raise Problem(503, "not-ready", "the database does not answer") from exc
        if broker_url is not None:
            import redis

            try:
                with redis.Redis.from_url(
                    broker_url, socket_timeout=2, socket_connect_timeout=2
                ) as client:
                    client.ping()
            except redis.RedisError as exc:
                log.warning("not ready: broker", extra={"error": str(exc)})
                raise Problem(503, "not-ready", "the broker does not answer") from exc
        return {"ok": True, "database": True, "broker": broker_url is not None}

    for router in ROUTERS:
        # The S3 event endpoint keeps a record's bad text as that record's own refusal.
        guards = [] if router is webhook.router else [Depends(storable_text)]
        app.include_router(router, dependencies=guards)
    # The moderators' and admins' pages: /review, /admin (``api.dashboard``).
    dashboard.install(app)
    return app
