"""Dashboard sign-ins: a moderator's or an admin's API token exchanged for a session.

The review pages are used from a browser, which should not keep a long-lived API token
around: the token is pasted once, and the browser keeps a session credential instead,
``<public id>.<secret>``, in an HttpOnly cookie. The public id finds the row; the secret
(32 random bytes) is checked against the stored sha256 in constant time, as a token's is.
A session ends when it runs out, at sign-out, or when its token is revoked: every request
reads the session together with its token, so revoking a token ends its sessions at once.

The session's secret also keys its CSRF token (an HMAC of a fixed label): nothing to
store, different for every session, and unknowable to a page that cannot read the cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from db import repository
from db.models import TokenRole, as_utc, utcnow
from workers import tokens

# The roles that may sign in: platforms use the API, never the pages.
DASHBOARD_ROLES = frozenset({TokenRole.MODERATOR, TokenRole.ADMIN})
_PUBLIC_ID_BYTES = 16  # 32 hex digits, the column's width
_SECRET_BYTES = 32
_CSRF_LABEL = b"synthsentry dashboard csrf v1"
# Ended sessions are kept this long (a sign-out shows in the rows for a while), then deleted.
_KEEP_ENDED = timedelta(days=7)


@dataclass(frozen=True)
class NewSession:
    """A sign-in just made: ``credential`` is the cookie's value, shown to the browser once."""

    credential: str
    expires_at: datetime


@dataclass(frozen=True)
class DashboardUser:
    """Who is signed in: their token's public id, name and role, their page settings, and
    the CSRF token of this session."""

    session_id: str
    token_id: int
    token_public_id: str
    name: str
    role: TokenRole
    blur_images: bool
    csrf_token: str
    expires_at: datetime

    @property
    def actor(self) -> str:
        """As the audit trail and the review service name the token's holder."""
        return f"token:{self.token_public_id}"

    @property
    def is_admin(self) -> bool:
        return self.role == TokenRole.ADMIN


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def csrf_token_of(secret: str) -> str:
    return hmac.new(secret.encode("ascii"), _CSRF_LABEL, hashlib.sha256).hexdigest()


def sign_in(
    session: Session, presented: str, *, lifetime: timedelta, now: datetime | None = None
) -> NewSession | None:
    """A session for the holder of ``presented``, or None when it is not a live token of
    a role that may sign in (the caller answers alike for every reason)."""
    now = now or utcnow()
    token = tokens.authenticate(session, presented.strip())
    if token is None or token.role not in DASHBOARD_ROLES:
        return None
    repository.delete_stale_dashboard_sessions(session, before=now - _KEEP_ENDED)
    public_id = secrets.token_hex(_PUBLIC_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    expires_at = now + lifetime
    repository.add_dashboard_session(
        session,
        repository.DashboardSessionRecord(
            public_id=public_id,
            secret_sha256=_digest(secret),
            token_id=token.id,
            expires_at=expires_at,
        ),
    )
    return NewSession(credential=f"{public_id}.{secret}", expires_at=expires_at)


_CREDENTIAL = re.compile(r"([0-9a-f]{32})\.([A-Za-z0-9_-]{16,128})")


def _parts(credential: str) -> tuple[str, str] | None:
    """The public id and secret of a well-formed credential; anything else (a stray NUL,
    odd characters) is never looked up."""
    match = _CREDENTIAL.fullmatch(credential)
    return (match[1], match[2]) if match else None


def resume(
    session: Session, credential: str, *, now: datetime | None = None
) -> DashboardUser | None:
    """The signed-in user of a session credential, or None: malformed, unknown, wrong
    secret, run out, signed out, or its token revoked (or no longer of a dashboard role)."""
    now = now or utcnow()
    parts = _parts(credential)
    if parts is None:
        return None
    public_id, secret = parts
    found = repository.dashboard_session_by_public_id(session, public_id)
    # Compared even when there is no row, so timing does not tell a known id from another.
    expected = found[0].secret_sha256 if found is not None else "0" * 64
    matches = hmac.compare_digest(_digest(secret), expected)
    if found is None or not matches:
        return None
    row, token = found
    if (
        row.revoked_at is not None
        or as_utc(row.expires_at) <= now
        or token.revoked_at is not None
        or token.role not in DASHBOARD_ROLES
    ):
        return None
    return DashboardUser(
        session_id=row.public_id,
        token_id=token.id,
        token_public_id=token.public_id,
        name=token.name,
        role=token.role,
        blur_images=token.blur_images,
        csrf_token=csrf_token_of(secret),
        expires_at=as_utc(row.expires_at),
    )


def sign_out(session: Session, credential: str, *, now: datetime | None = None) -> bool:
    """End the session of ``credential`` (only with its right secret); False if there was
    no such live session."""
    if resume(session, credential, now=now) is None:
        return False
    parts = _parts(credential)
    assert parts is not None
    return repository.end_dashboard_session(session, parts[0], now=now or utcnow())


def set_blur_default(session: Session, user: DashboardUser, blur: bool) -> None:
    """The signed-in moderator's own default: images blurred until revealed, or not."""
    repository.set_blur_images(session, user.token_id, blur)
