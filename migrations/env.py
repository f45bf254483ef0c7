"""Alembic environment: online migrations only, with timeouts and a lock on Postgres."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from db.models import Base
from db.session import make_engine

config = context.config

# Arbitrary but fixed: two deploy jobs migrating at once wait for each other.
MIGRATION_LOCK_ID = 0x5E57_0001


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from synthsentry.settings import get_settings

    return get_settings().resolved_database_url


def run_migrations_online() -> None:
    engine = make_engine(_url())
    with engine.connect() as connection:
        is_postgres = connection.dialect.name == "postgresql"
        is_sqlite = connection.dialect.name == "sqlite"
        if is_sqlite:
            # SQLite alters a table by copying it into a new one and dropping the old, which
            # enforced foreign keys would refuse while other tables point at it. The pragma
            # only takes effect outside a transaction; the keys are checked after.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        if is_postgres:
            connection.execute(text("SET lock_timeout = '5s'"))
            connection.execute(text("SET statement_timeout = '60s'"))
            connection.execute(text(f"SELECT pg_advisory_lock({MIGRATION_LOCK_ID})"))
            connection.commit()
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        try:
            with context.begin_transaction():
                context.run_migrations()
                if is_sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration broke foreign keys: {broken[:5]}")
        finally:
            if is_sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            if is_postgres:
                connection.execute(text(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_ID})"))
                connection.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
