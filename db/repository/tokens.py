"""API tokens: the rows behind the credentials of the HTTP API."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import ApiToken, TokenRole, utcnow
from db.repository.audit import append_audit


@dataclass(frozen=True)
class TokenRecord:
    public_id: str
    name: str
    role: TokenRole
    secret_sha256: str


def add_token(session: Session, record: TokenRecord, *, actor: str) -> ApiToken:
    token = ApiToken(
        public_id=record.public_id,
        name=record.name,
        role=record.role,
        secret_sha256=record.secret_sha256,
        created_by=actor,
        created_at=utcnow(),
    )
    session.add(token)
    session.flush()
    append_audit(
        session,
        actor=actor,
        action="token.created",
        subject_type="api_token",
        subject_id=token.id,
        details={"public_id": token.public_id, "name": token.name, "role": token.role.value},
    )
    return token


def token_by_public_id(session: Session, public_id: str) -> ApiToken | None:
    return session.execute(
        select(ApiToken).where(ApiToken.public_id == public_id)
    ).scalar_one_or_none()


def list_tokens(session: Session) -> Sequence[ApiToken]:
    return session.execute(select(ApiToken).order_by(ApiToken.id)).scalars().all()


def revoke_token(session: Session, token: ApiToken, *, actor: str) -> bool:
    """Revoke the token; False when it was revoked before (nothing changes)."""
    if token.revoked_at is not None:
        return False
    token.revoked_at = utcnow()
    session.flush()
    append_audit(
        session,
        actor=actor,
        action="token.revoked",
        subject_type="api_token",
        subject_id=token.id,
        details={"public_id": token.public_id, "name": token.name, "role": token.role.value},
    )
    return True
