"""What every repository module shares: dialect-aware inserts (one row or a group of rows
in one statement) and counting."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Base

DialectInsert = Callable[[Any], postgresql.Insert | sqlite.Insert]


def dialect_insert(session: Session) -> DialectInsert:
    """The INSERT construct of the session's database, which knows ``ON CONFLICT``."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"unsupported database dialect {dialect!r}")


def insert_ignore(session: Session, model: type[Base], values: Mapping[str, Any]) -> bool:
    """Insert a row unless a unique constraint already holds one; True if inserted."""
    statement = dialect_insert(session)(model).values(**values).on_conflict_do_nothing()
    result = session.execute(statement)
    return bool(cast(CursorResult[Any], result).rowcount)


def insert_ignore_rows(
    session: Session,
    model: type[Base],
    rows: Sequence[Mapping[str, Any]],
    *,
    returning: Sequence[Any] = (),
) -> list[tuple[Any, ...]]:
    """Insert several rows (every row names the same columns), skipping those a unique
    constraint already holds; the ``returning`` columns of the rows it inserted. A
    table-level statement, compiled once and sent as one multi-row INSERT (SQLAlchemy's
    "insertmanyvalues"): no ORM objects are made. Callers pass the rows in the order of
    their unique key, so that two transactions inserting overlapping groups take the key's
    locks in the same order and cannot deadlock."""
    if not rows:
        return []
    table = cast(Table, model.__table__)
    statement = dialect_insert(session)(table).on_conflict_do_nothing()
    if not returning:
        session.execute(statement, list(rows))
        return []
    return [tuple(row) for row in session.execute(statement.returning(*returning), list(rows))]


def count_rows(session: Session, model: type[Base]) -> int:
    return int(session.execute(select(func.count()).select_from(model)).scalar_one())
