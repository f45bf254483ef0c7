"""The append-only audit trail (the database refuses UPDATE and DELETE on it)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session

from db.models import AuditEvent, utcnow


def append_audit(
    session: Session,
    *,
    actor: str,
    action: str,
    subject_type: str,
    subject_id: int,
    details: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> AuditEvent:
    event = AuditEvent(
        at=at or utcnow(),
        actor=actor,
        action=action,
        subject_type=subject_type,
        subject_id=subject_id,
        details=details or {},
    )
    session.add(event)
    session.flush()
    return event


def append_audits(session: Session, events: Sequence[dict[str, Any]]) -> None:
    """Append several events in one statement (each a dict of :func:`append_audit`'s
    keywords; ``at`` defaults to now)."""
    if not events:
        return
    now = utcnow()
    rows = [{"at": now, "details": {}, **event} for event in events]
    table = AuditEvent.__table__
    assert isinstance(table, Table)
    session.execute(insert(table), rows)


def audit_trail(
    session: Session, subject_type: str, subject_ids: Iterable[int]
) -> Sequence[AuditEvent]:
    return (
        session.execute(
            select(AuditEvent)
            .where(
                AuditEvent.subject_type == subject_type,
                AuditEvent.subject_id.in_(list(subject_ids)),
            )
            .order_by(AuditEvent.id)
        )
        .scalars()
        .all()
    )
