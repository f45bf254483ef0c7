"""What every repository module shares: dialect-aware insert-or-ignore and counting."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from sqlalchemy import CursorResult, Insert, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Base


def _insert(session: Session, model: type[Base]) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise NotImplementedError(f"unsupported database dialect {dialect!r}")


def insert_ignore(session: Session, model: type[Base], values: Mapping[str, Any]) -> bool:
    """Insert a row unless a unique constraint already holds one; True if inserted."""
    statement: Insert = _insert(session, model).values(**values).on_conflict_do_nothing()
    result = session.execute(statement)
    return bool(cast(CursorResult[Any], result).rowcount)


def count_rows(session: Session, model: type[Base]) -> int:
    return int(session.execute(select(func.count()).select_from(model)).scalar_one())
