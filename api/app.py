"""The HTTP API: a FastAPI application over the same services as the CLI and the tasks.

    GET  /healthz            the process answers
    GET  /readyz             the database (and, with a server database, the broker) answer
    GET  /openapi.json       the schema
    /v1/tokens               API tokens (admin)

Importing this module loads FastAPI, SQLAlchemy and the services it serves, never torch:
the API records and reads; models run in the workers.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api import problems, tokens
from api.problems import Problem

log = logging.getLogger(__name__)

# Every /v1 endpoint lives in one of these; each names the roles that may call it.
ROUTERS = (tokens.router,)


def create_app(session_factory: sessionmaker[Session], *, broker_url: str | None = None) -> FastAPI:
    """The application; ``broker_url``: a broker ``/readyz`` must reach too (the fleet's;
    None in the embedded mode, which has none)."""
    app = FastAPI(
        title="synthsentry",
        summary="Scores uploaded images for signs of AI generation and queues likely ones "
        "for human review. A flag is a request for review, never a finding of fact.",
        version="1",
    )
    app.state.session_factory = session_factory
    problems.install(app)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/readyz", tags=["operations"])
    def readyz() -> dict[str, Any]:
        try:
            with session_factory() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            log.warning("not ready: database", extra={"error": str(exc)})
            raise Problem(503, "not-ready", "the database does not answer") from exc
        if broker_url is not None:
            import redis

            try:
                with redis.Redis.from_url(broker_url, socket_timeout=2) as client:
                    client.ping()
            except redis.RedisError as exc:
                log.warning("not ready: broker", extra={"error": str(exc)})
                raise Problem(503, "not-ready", "the broker does not answer") from exc
        return {"ok": True, "database": True, "broker": broker_url is not None}

    for router in ROUTERS:
        app.include_router(router)
    return app
