"""Dashboard sessions: the rows behind the review pages' sign-in cookie, and the moderator's
own page settings kept on their token.

A session row holds the sha256 of its secret, never the secret. It is found by its public
id together with its token, so one lookup tells whether the sign-in is still good: the
session neither ended nor revoked, and its token not revoked either.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from db.models import ApiToken, DashboardSession, utcnow


@dataclass(frozen=True)
class DashboardSessionRecord:
    public_id: str
    secret_sha256: str
    token_id: int
    expires_at: datetime


def add_dashboard_session(session: Session, record: DashboardSessionRecord) -> DashboardSession:
    row = DashboardSession(
        public_id=record.public_id,
        secret_sha256=record.secret_sha256,
        token_id=record.token_id,
        created_at=utcnow(),
        expires_at=record.expires_at,
    )
    session.add(row)
    session.flush()
    return row


def dashboard_session_by_public_id(
    session: Session, public_id: str
) -> tuple[DashboardSession, ApiToken] | None:
    """The session row and its token, whatever their state (the caller checks both)."""
    row = session.execute(
        select(DashboardSession, ApiToken)
        .join(ApiToken, ApiToken.id == DashboardSession.token_id)
        .where(DashboardSession.public_id == public_id)
    ).first()
    return None if row is None else (row[0], row[1])


def end_dashboard_session(session: Session, public_id: str, *, now: datetime) -> bool:
    """Mark the session revoked; False when there is none or it was revoked already."""
    result = session.execute(
        update(DashboardSession)
        .where(DashboardSession.public_id == public_id, DashboardSession.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


def delete_stale_dashboard_sessions(session: Session, *, before: datetime) -> int:
    """Forget sessions that ended (ran out or were revoked) before ``before``: they can
    never be used again, and a sign-in per shift would otherwise pile them up."""
    result = session.execute(
        delete(DashboardSession)
        .where(
            or_(
                DashboardSession.expires_at < before,
                DashboardSession.revoked_at < before,
            )
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0))


def set_blur_images(session: Session, token_id: int, blur: bool) -> None:
    session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id)
        .values(blur_images=blur)
        .execution_options(synchronize_session=False)
    )
