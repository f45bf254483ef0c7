"""API tokens: issue one (shown once), check a presented one, revoke, list.

A token reads ``sst_<public id>_<secret>``. The public id (12 random hex digits: no ``_``,
and no leading ``-`` that a command line would read as an option) finds its row; the
secret (32 random bytes, URL-safe base64) is checked against the stored sha256 in constant
time. Only the hash is stored; a lost token is revoked and a new one issued. The prefix
lets secret scanners recognise a leaked token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from db import repository
from db.models import ApiToken, TokenRole
from workers import callbacks

PREFIX = "sst"
_HEX_ID = re.compile(r"[0-9a-f]{1,32}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{1,128}")
_PUBLIC_ID_BYTES = 6  # 12 hex digits
_SECRET_BYTES = 32
_MAX_NAME = 255


class TokenError(ValueError):
    """A request about tokens that cannot be met (an unknown token, a bad name)."""


@dataclass(frozen=True)
class IssuedToken:
    """A new token: ``token`` is the credential, shown once and never stored. A platform
    token comes with its callback signing secret, shown once too (stored encrypted, to
    sign), and the hosts its callbacks may go to."""

    token: str
    public_id: str
    name: str
    role: TokenRole
    callback_secret: str | None = None
    callback_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenInfo:
    """What can be shown of a token after it was issued (never the secret)."""

    public_id: str
    name: str
    role: TokenRole
    created_by: str
    created_at: str
    revoked_at: str | None

    @classmethod
    def of(cls, row: ApiToken) -> TokenInfo:
        return cls(
            public_id=row.public_id,
            name=row.name,
            role=row.role,
            created_by=row.created_by,
            created_at=row.created_at.isoformat(),
            revoked_at=row.revoked_at.isoformat() if row.revoked_at is not None else None,
        )


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def issue_token(
    session: Session,
    *,
    role: TokenRole,
    name: str,
    actor: str,
    secret_box: callbacks.SecretBox | None = None,
    callback_hosts: Sequence[str] = (),
) -> IssuedToken:
    """Make a token for ``name`` (a person or a platform) with ``role``; audited. A platform
    token gets a callback signing secret when ``secret_box`` is given (without one, the
    platform makes it later: ``POST /v1/callbacks/secret``), and ``callback_hosts`` as its
    callbacks' allow-list."""
    name = name.strip()
    if not name or len(name) > _MAX_NAME or not name.isprintable():
        raise TokenError(f"a token name is 1-{_MAX_NAME} printable characters")
    if callback_hosts and role != TokenRole.PLATFORM:
        raise TokenError("callback hosts are for platform tokens")
    try:
        hosts = callbacks.normalize_hosts(callback_hosts)
    except callbacks.CallbackRefused as exc:
        raise TokenError(str(exc)) from exc
    public_id = secrets.token_hex(_PUBLIC_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    row = repository.add_token(
        session,
        repository.TokenRecord(
            public_id=public_id, name=name, role=role, secret_sha256=_digest(secret)
        ),
        actor=actor,
    )
    callback_secret = None
    if role == TokenRole.PLATFORM:
        if secret_box is not None:
            callback_secret = callbacks.create_secret(session, row.id, secret_box)
        if hosts:
            callbacks.replace_hosts(session, row, hosts, actor=actor)
    return IssuedToken(
        f"{PREFIX}_{public_id}_{secret}", public_id, name, role, callback_secret, tuple(hosts)
    )


def authenticate(session: Session, presented: str) -> ApiToken | None:
    """The live token row this credential belongs to, or None (malformed, unknown, wrong
    secret or revoked: the caller answers 401 alike for all of them)."""
    prefix, _, rest = presented.partition("_")
    public_id, _, secret = rest.partition("_")
    if prefix != PREFIX or not _HEX_ID.fullmatch(public_id) or not _SECRET.fullmatch(secret):
        return None  # never looked up: a stray NUL or any odd character is not a token
    row = repository.token_by_public_id(session, public_id)
    # Compared even when there is no row, so timing does not tell a known id from another.
    expected = row.secret_sha256 if row is not None else "0" * 64
    matches = hmac.compare_digest(_digest(secret), expected)
    if row is None or not matches or row.revoked_at is not None:
        return None
    return row


def revoke(session: Session, public_id: str, *, actor: str) -> bool:
    """Revoke a token by its public id; False if it was revoked already; audited."""
    row = repository.token_by_public_id(session, public_id)
    if row is None:
        raise TokenError(f"no token {public_id!r}")
    return repository.revoke_token(session, row, actor=actor)


def list_tokens(session: Session) -> Sequence[TokenInfo]:
    return [TokenInfo.of(row) for row in repository.list_tokens(session)]
