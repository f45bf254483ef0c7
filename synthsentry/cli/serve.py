"""``synthsentry serve``: the HTTP API (``api.app``) under uvicorn."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from synthsentry.cli.common import EXIT_OK, load_runtime
from synthsentry.cli.database import prepare_database
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from synthsentry.cli.common import Commands


def register(commands: Commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the HTTP API (OpenAPI at /openapi.json)",
        description="Serve the HTTP API with uvicorn: /healthz, /readyz, /openapi.json and "
        "the /v1 endpoints, each answering only to tokens of its roles "
        "(`synthsentry tokens create`).",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from api.app import create_app

    runtime = load_runtime(settings)
    session_factory = prepare_database(runtime)
    # With a server database the API is part of a fleet, and ready only with its broker.
    embedded = runtime.database_url.startswith("sqlite")
    app = create_app(session_factory, broker_url=None if embedded else settings.broker_url)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_config=None,  # our JSON logging, configured by the CLI
        timeout_keep_alive=5,
        limit_concurrency=200,
    )
    return EXIT_OK
