"""What platforms and operators do with callbacks, the same for the HTTP API and the CLI:
check a callback URL, make and rotate signing secrets (and re-encrypt them all under a new
secret key), keep a token's allowed hosts, read deliveries and their attempts, ask for a
delivery again."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from db import repository
from db.models import ApiToken, CallbackDelivery, DeliveryState, TokenRole, as_utc, utcnow
from workers.callbacks.guard import CallbackRefused, check_url, normalize_host
from workers.callbacks.policy import ROTATION_OVERLAP
from workers.callbacks.secrets import SecretBox, SecretUnreadable, new_signing_secret

MAX_HOSTS = 100


class CallbackNotFound(LookupError):
    """No such token or delivery (or not one the caller may see)."""


class CallbacksUnavailable(RuntimeError):
    """No secret key is configured: secrets can be neither made nor read."""


def check_callback_url(session: Session, token_id: int, url: str, *, allow_private: bool) -> str:
    """``url`` when callbacks of this token may go there (raises :class:`CallbackRefused`
    saying why not): https (http only with ``allow_private``), no user info, at most 2048
    characters, its host on the token's allow-list, and the token able to sign (it has a
    secret). Where the host resolves to is checked again at every connection."""
    check_url(url, repository.callback_hosts(session, token_id), allow_private=allow_private)
    if not repository.live_callback_secrets(session, token_id, now=utcnow()):
        raise CallbackRefused(
            "this token has no callback signing secret yet (POST /v1/callbacks/secret makes one)"
        )
    return url


# --- secrets ----------------------------------------------------------------------------


def create_secret(
    session: Session, token_id: int, box: SecretBox, *, now: datetime | None = None
) -> str:
    """A new signing secret for the token (stored encrypted); the caller shows it once."""
    secret = new_signing_secret()
    repository.add_callback_secret(session, token_id, box.encrypt(secret), now=now or utcnow())
    return secret


@dataclass(frozen=True)
class RotatedSecret:
    """The new secret (shown once) and until when the previous one still signs."""

    secret: str
    previous_expires_at: datetime | None


def rotate_secret(
    session: Session,
    token: ApiToken,
    box: SecretBox | None,
    *,
    actor: str,
    now: datetime | None = None,
) -> RotatedSecret:
    """Make the token a new signing secret. The newest previous one keeps signing beside
    it for 24 hours (receivers switch without losing a callback); any older one stops now,
    so a delivery carries at most two signatures. Audited (never the secret)."""
    if box is None:
        raise CallbacksUnavailable("callback signing is not configured on this server")
    now = now or utcnow()
    repository.lock_token(session, token.id)
    previous = repository.live_callback_secrets(session, token.id, now=now, for_update=True)
    expires_at = None
    for index, row in enumerate(previous):
        if index == 0:
            expires_at = now + ROTATION_OVERLAP
            if row.expires_at is not None and as_utc(row.expires_at) < expires_at:
                expires_at = as_utc(row.expires_at)
            row.expires_at = expires_at
        else:
            row.expires_at = now
    secret = create_secret(session, token.id, box, now=now)
    repository.append_audit(
        session,
        actor=actor,
        action="callback_secret.rotated",
        subject_type="api_token",
        subject_id=token.id,
        details={
            "public_id": token.public_id,
            "previous_expires_at": expires_at.isoformat() if expires_at else None,
        },
        at=now,
    )
    return RotatedSecret(secret=secret, previous_expires_at=expires_at)


def signing_secrets(session: Session, token_id: int, box: SecretBox, *, now: datetime) -> list[str]:
    """The secrets a delivery of this token is signed with at ``now``, newest first."""
    rows = repository.live_callback_secrets(session, token_id, now=now)
    return [box.decrypt(row.secret_encrypted) for row in rows]


@dataclass(frozen=True)
class KeyRotation:
    """What re-encrypting the stored secrets under the current secret key did.
    ``left_unreadable``: secrets nothing reads again (expired, or of a revoked token) that
    no key decrypts, left as they are."""

    reencrypted: int
    already_current: int
    left_unreadable: int


def reencrypt_secrets(
    session: Session, box: SecretBox, *, actor: str, now: datetime | None = None
) -> KeyRotation:
    """Re-encrypt every stored signing secret under the box's current key, so that the
    previous keys can be dropped. All or nothing: a secret still in use that no key
    decrypts raises :class:`SecretUnreadable` naming its token, and the caller's
    transaction, rolled back, has rewritten nothing. Audited per token (never a secret).

    Rows are not locked: a rotation of a token's secret running meanwhile changes only
    their expiry, and a secret made meanwhile is already under the current key (when the
    process that made it has it)."""
    now = now or utcnow()
    rewritten: dict[int, int] = {}
    in_use: set[str] = set()
    current = left = 0
    for row in repository.all_callback_secrets(session):
        try:
            rotated = box.rotate(row.secret_encrypted)
        except SecretUnreadable:
            token = repository.get_token(session, row.token_id)
            assert token is not None  # the foreign key keeps a secret's token
            expired = row.expires_at is not None and as_utc(row.expires_at) <= now
            if expired or token.revoked_at is not None:
                left += 1
            else:
                in_use.add(token.public_id)
            continue
        if rotated is None:
            current += 1
        else:
            row.secret_encrypted = rotated
            rewritten[row.token_id] = rewritten.get(row.token_id, 0) + 1
    if in_use:
        raise SecretUnreadable(
            f"callback signing secrets of token(s) {', '.join(sorted(in_use))} cannot be "
            "decrypted with the secret key or any previous one; nothing was re-encrypted. Add "
            "the key they were encrypted with to the previous keys and run this again."
        )
    session.flush()
    for token_id, count in rewritten.items():
        token = repository.get_token(session, token_id)
        assert token is not None
        repository.append_audit(
            session,
            actor=actor,
            action="callback_secrets.reencrypted",
            subject_type="api_token",
            subject_id=token_id,
            details={"public_id": token.public_id, "secrets": count},
            at=now,
        )
    return KeyRotation(
        reencrypted=sum(rewritten.values()), already_current=current, left_unreadable=left
    )


# --- allowed hosts ----------------------------------------------------------------------


def find_token(session: Session, public_id: str) -> ApiToken:
    token = repository.token_by_public_id(session, public_id)
    if token is None:
        raise CallbackNotFound(f"no token {public_id!r}")
    return token


def normalize_hosts(hosts: Iterable[str]) -> list[str]:
    """The hosts as the allow-list keeps them (sorted, once each); raises
    :class:`CallbackRefused` for one that is not a host name."""
    normalized = sorted({normalize_host(host) for host in hosts})
    if len(normalized) > MAX_HOSTS:
        raise CallbackRefused(f"a token may allow at most {MAX_HOSTS} callback hosts")
    return normalized


def list_hosts(session: Session, public_id: str) -> list[str]:
    return repository.callback_hosts(session, find_token(session, public_id).id)


def replace_hosts(
    session: Session, token: ApiToken, hosts: Iterable[str], *, actor: str
) -> list[str]:
    """Make ``hosts`` the token's allow-list (platform tokens only); audited. Scans already
    submitted are checked against the new list before each send."""
    if token.role != TokenRole.PLATFORM:
        raise CallbackRefused("callback hosts are for platform tokens")
    normalized = normalize_hosts(hosts)
    before = repository.callback_hosts(session, token.id)
    now = utcnow()
    repository.replace_callback_hosts(session, token.id, normalized, now=now)
    repository.append_audit(
        session,
        actor=actor,
        action="callback_hosts.replaced",
        subject_type="api_token",
        subject_id=token.id,
        details={"public_id": token.public_id, "before": before, "after": normalized},
        at=now,
    )
    return normalized


# --- deliveries -------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptInfo:
    at: str
    status_code: int | None
    error: str | None
    duration_ms: float | None


@dataclass(frozen=True)
class DeliveryInfo:
    """What a platform (or an operator) sees of a delivery; never its payload's secrets
    (there are none) nor its signature."""

    id: str
    token: str
    event_type: str
    scan_id: str | None
    url: str
    state: DeliveryState
    attempts: int
    created_at: str
    next_attempt_at: str | None  # pending only
    finished_at: str | None
    last_status: int | None
    last_error: str | None
    endpoint_disabled: bool

    @classmethod
    def of(cls, view: repository.DeliveryView) -> DeliveryInfo:
        row = view.delivery
        pending = row.state == DeliveryState.PENDING
        return cls(
            id=row.public_id,
            token=view.token_public_id,
            event_type=row.event_type,
            scan_id=view.scan_public_id,
            url=view.url,
            state=row.state,
            attempts=row.attempts,
            created_at=_iso(row.created_at),
            next_attempt_at=_iso(row.next_attempt_at) if pending else None,
            finished_at=_iso(row.finished_at) if row.finished_at is not None else None,
            last_status=row.last_status,
            last_error=row.last_error,
            endpoint_disabled=view.endpoint_disabled,
        )


@dataclass(frozen=True)
class DeliveryDetail:
    delivery: DeliveryInfo
    attempts: list[AttemptInfo]


def list_deliveries(
    session: Session,
    *,
    token_id: int | None,
    state: DeliveryState | None = None,
    limit: int = 100,
) -> list[DeliveryInfo]:
    """Deliveries newest first: one token's (None: everyone's), in one state (None: any)."""
    views = repository.list_deliveries(session, token_id=token_id, state=state, limit=limit)
    return [DeliveryInfo.of(view) for view in views]


def delivery_detail(session: Session, public_id: str, *, token_id: int | None) -> DeliveryDetail:
    """The delivery and its attempts; ``token_id``: the caller may see only that token's
    (another's is answered as unknown, so ids cannot be probed)."""
    view = repository.delivery_view(session, public_id, token_id=token_id)
    if view is None:
        raise CallbackNotFound(f"no delivery {public_id!r}")
    attempts = [
        AttemptInfo(
            at=_iso(a.at), status_code=a.status_code, error=a.error, duration_ms=a.duration_ms
        )
        for a in repository.callback_attempts(session, view.delivery.id)
    ]
    return DeliveryDetail(DeliveryInfo.of(view), attempts)


def redeliver(
    session: Session,
    public_id: str,
    *,
    token_id: int | None,
    actor: str,
    now: datetime | None = None,
) -> DeliveryInfo:
    """Send the delivery again as soon as a sender is free: one more attempt, or more while
    it is still inside its retry window. A delivery of a disabled endpoint re-enables the
    endpoint (the platform says it is back); other deliveries that stopped with it stay
    stopped until asked for. A pending delivery is left as it is (it is on its way).
    Audited."""
    now = now or utcnow()
    view = repository.delivery_view(session, public_id, token_id=token_id)
    if view is None:
        raise CallbackNotFound(f"no delivery {public_id!r}")
    delivery = repository.lock_delivery(session, view.delivery.id)
    assert delivery is not None
    if delivery.state == DeliveryState.PENDING:
        return DeliveryInfo.of(view)
    enabled = _enable_endpoint(session, delivery, actor=actor, now=now)
    previous = delivery.state
    delivery.state = DeliveryState.PENDING
    delivery.next_attempt_at = now
    delivery.finished_at = None
    session.flush()
    repository.append_audit(
        session,
        actor=actor,
        action="callback_delivery.redelivered",
        subject_type="callback_delivery",
        subject_id=delivery.id,
        details={
            "public_id": delivery.public_id,
            "previous_state": previous.value,
            "endpoint_enabled": enabled,
        },
        at=now,
    )
    refreshed = repository.delivery_view(session, public_id, token_id=token_id)
    assert refreshed is not None
    return DeliveryInfo.of(refreshed)


def _enable_endpoint(
    session: Session, delivery: CallbackDelivery, *, actor: str, now: datetime
) -> bool:
    endpoint = repository.get_callback_endpoint(session, delivery.endpoint_id)
    assert endpoint is not None
    if endpoint.disabled_at is None:
        return False
    reason = endpoint.disabled_reason
    endpoint.disabled_at = None
    endpoint.disabled_reason = None
    session.flush()
    repository.append_audit(
        session,
        actor=actor,
        action="callback_endpoint.enabled",
        subject_type="callback_endpoint",
        subject_id=endpoint.id,
        details={"token_id": endpoint.token_id, "disabled_reason": reason},
        at=now,
    )
    return True


def _iso(moment: datetime) -> str:
    return as_utc(moment).isoformat()
