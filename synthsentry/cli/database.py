"""``synthsentry db``, and the database check every other command makes first."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from synthsentry.cli.common import EXIT_OK, CliError, load_runtime
from synthsentry.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from synthsentry.cli.common import Commands
    from synthsentry.runtime import Runtime


def register(commands: Commands) -> None:
    database = commands.add_parser("db", help="database maintenance")
    db_commands = database.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply all migrations (alembic upgrade head)")
    db_commands.add_parser("current", help="print the applied and the latest revision")
    database.set_defaults(handler=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from db import migrate

    runtime = load_runtime(settings)
    url = runtime.database_url
    if url.startswith("sqlite"):
        runtime.data_dir.mkdir(parents=True, exist_ok=True)
    if args.db_command == "upgrade":
        migrate.upgrade(url)
        print(f"{safe_url(url)} is at revision {migrate.current_revision(url)}")
    else:
        print(
            f"applied: {migrate.current_revision(url) or 'none'}  latest: {migrate.head_revision()}"
        )
    return EXIT_OK


def prepare_database(runtime: Runtime, *, pool_size: int = 5) -> sessionmaker[Session]:
    """A session factory for the configured database, migrated where that is safe.

    The embedded SQLite file is created and migrated on first use; a shared Postgres is
    migrated by a deploy step (``synthsentry db upgrade``), so here it is only checked.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from db import migrate

    url = runtime.database_url
    try:
        if url.startswith("sqlite"):
            runtime.data_dir.mkdir(parents=True, exist_ok=True)
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
            f"cannot use the database {safe_url(url)}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    except OSError as exc:
        raise CliError(f"cannot create the data folder {runtime.data_dir}: {exc}") from exc
    return runtime.session_factory(pool_size=pool_size)


def safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
