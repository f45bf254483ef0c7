"""Engines and sessions. The database URL comes from settings; nothing else here reads it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Foreign keys are off by default in SQLite; WAL lets a reader (status, dashboard) run
    # while a scan writes; busy_timeout waits for a lock instead of failing at once.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str, *, echo: bool = False, pool_size: int = 5) -> Engine:
    """``pool_size``: connections kept open; a process with many threads (a batching
    worker) wants one per thread, with as many again allowed in a burst."""
    if url.startswith("sqlite"):
        engine = create_engine(url, echo=echo)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url, echo=echo, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any exception."""
    with factory() as session, session.begin():
        yield session


def ping(factory: sessionmaker[Session]) -> None:
    """Raise unless the database answers a trivial query (readiness checks)."""
    with factory() as session:
        session.execute(text("SELECT 1"))
