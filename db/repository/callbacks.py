"""Callbacks: signing secrets, allowed hosts, endpoints, the delivery outbox and its
attempts, and the scans that asked for callbacks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from db.models import (
    ApiToken,
    CallbackAttempt,
    CallbackDelivery,
    CallbackEndpoint,
    CallbackHost,
    CallbackSecret,
    DeliveryState,
    Scan,
    Source,
)
from db.repository._sql import insert_ignore

# --- secrets ----------------------------------------------------------------------------


def add_callback_secret(
    session: Session, token_id: int, encrypted: str, *, now: datetime
) -> CallbackSecret:
    row = CallbackSecret(token_id=token_id, secret_encrypted=encrypted, created_at=now)
    session.add(row)
    session.flush()
    return row


def live_callback_secrets(
    session: Session, token_id: int, *, now: datetime, for_update: bool = False
) -> Sequence[CallbackSecret]:
    """The token's secrets that still sign at ``now``, newest first (``for_update``: locked,
    so that two rotations at once take turns)."""
    statement = (
        select(CallbackSecret)
        .where(
            CallbackSecret.token_id == token_id,
            or_(CallbackSecret.expires_at.is_(None), CallbackSecret.expires_at > now),
        )
        .order_by(CallbackSecret.created_at.desc(), CallbackSecret.id.desc())
    )
    if for_update:
        statement = statement.with_for_update()
    return session.execute(statement).scalars().all()


def all_callback_secrets(session: Session) -> Sequence[CallbackSecret]:
    """Every stored secret, expired ones too, in the order they were made (re-encrypting
    them all under a new secret key)."""
    return session.execute(select(CallbackSecret).order_by(CallbackSecret.id)).scalars().all()


# --- allowed hosts ----------------------------------------------------------------------


def callback_hosts(session: Session, token_id: int) -> list[str]:
    return list(
        session.execute(
            select(CallbackHost.host)
            .where(CallbackHost.token_id == token_id)
            .order_by(CallbackHost.host)
        ).scalars()
    )


def replace_callback_hosts(
    session: Session, token_id: int, hosts: Iterable[str], *, now: datetime
) -> None:
    session.execute(delete(CallbackHost).where(CallbackHost.token_id == token_id))
    for host in dict.fromkeys(hosts):
        session.add(CallbackHost(token_id=token_id, host=host, created_at=now))
    session.flush()


# --- the scans that asked for callbacks -------------------------------------------------


def callback_scans_of_sources(session: Session, source_ids: Sequence[int]) -> Sequence[Scan]:
    """The scans among these sources that name a callback URL and a token."""
    return (
        session.execute(
            select(Scan)
            .where(
                Scan.source_id.in_(list(source_ids)),
                Scan.callback_url.is_not(None),
                Scan.token_id.is_not(None),
            )
            .order_by(Scan.id)
        )
        .scalars()
        .all()
    )


def callback_scans_of_image(session: Session, image_id: int) -> Sequence[Scan]:
    """Every scan of this image that names a callback URL and a token."""
    return (
        session.execute(
            select(Scan)
            .join(Source, Source.id == Scan.source_id)
            .where(
                Source.image_id == image_id,
                Scan.callback_url.is_not(None),
                Scan.token_id.is_not(None),
            )
            .order_by(Scan.id)
        )
        .scalars()
        .all()
    )


# --- endpoints and deliveries -----------------------------------------------------------


def callback_endpoint(
    session: Session, token_id: int, url: str, *, now: datetime
) -> CallbackEndpoint:
    """The endpoint row of this token and URL, made on first use."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
    insert_ignore(
        session,
        CallbackEndpoint,
        {"token_id": token_id, "url": url, "url_sha256": digest, "created_at": now},
    )
    return session.execute(
        select(CallbackEndpoint).where(
            CallbackEndpoint.token_id == token_id, CallbackEndpoint.url_sha256 == digest
        )
    ).scalar_one()


@dataclass(frozen=True)
class DeliveryRecord:
    public_id: str
    token_id: int
    endpoint_id: int
    scan_id: int | None
    event_type: str
    event_key: str
    payload: dict[str, Any]
    state: DeliveryState
    now: datetime


def add_callback_delivery(session: Session, record: DeliveryRecord) -> bool:
    """Queue one event for one endpoint, once per event key; True if queued now."""
    return insert_ignore(
        session,
        CallbackDelivery,
        {
            "public_id": record.public_id,
            "token_id": record.token_id,
            "endpoint_id": record.endpoint_id,
            "scan_id": record.scan_id,
            "event_type": record.event_type,
            "event_key": record.event_key,
            "payload": record.payload,
            "state": record.state,
            "attempts": 0,
            "next_attempt_at": record.now,
            "created_at": record.now,
            "finished_at": None if record.state == DeliveryState.PENDING else record.now,
        },
    )


def claim_due_deliveries(
    session: Session, *, now: datetime, limit: int, lease_until: datetime
) -> Sequence[CallbackDelivery]:
    """Pending deliveries due at ``now``, oldest due first, leased to the caller until
    ``lease_until``: their next attempt moves there, so once the caller commits no other
    sender takes them, and if it dies they come back then. SKIP LOCKED on Postgres: senders
    running side by side never wait for each other's rows."""
    rows = (
        session.execute(
            select(CallbackDelivery)
            .where(
                CallbackDelivery.state == DeliveryState.PENDING,
                CallbackDelivery.next_attempt_at <= now,
            )
            .order_by(CallbackDelivery.next_attempt_at, CallbackDelivery.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )
    for row in rows:
        row.next_attempt_at = lease_until
    session.flush()
    return rows


def lock_delivery(session: Session, delivery_id: int) -> CallbackDelivery | None:
    return session.execute(
        select(CallbackDelivery).where(CallbackDelivery.id == delivery_id).with_for_update()
    ).scalar_one_or_none()


def get_callback_endpoint(session: Session, endpoint_id: int) -> CallbackEndpoint | None:
    return session.get(CallbackEndpoint, endpoint_id)


def get_token(session: Session, token_id: int) -> ApiToken | None:
    return session.get(ApiToken, token_id)


def lock_token(session: Session, token_id: int) -> ApiToken | None:
    """The token row, locked: changes to its callback secrets take turns behind it."""
    return session.execute(
        select(ApiToken).where(ApiToken.id == token_id).with_for_update()
    ).scalar_one_or_none()


def add_callback_attempt(
    session: Session,
    delivery_id: int,
    *,
    at: datetime,
    status_code: int | None,
    error: str | None,
    duration_ms: float,
) -> None:
    session.add(
        CallbackAttempt(
            delivery_id=delivery_id,
            at=at,
            status_code=status_code,
            error=error,
            duration_ms=duration_ms,
        )
    )
    session.flush()


def disable_callback_endpoint(
    session: Session, endpoint_id: int, *, reason: str, now: datetime
) -> int:
    """Disable the endpoint and stop its pending deliveries; returns how many stopped."""
    session.execute(
        update(CallbackEndpoint)
        .where(CallbackEndpoint.id == endpoint_id)
        .values(disabled_at=now, disabled_reason=reason)
    )
    result = session.execute(
        update(CallbackDelivery)
        .where(
            CallbackDelivery.endpoint_id == endpoint_id,
            CallbackDelivery.state == DeliveryState.PENDING,
        )
        .values(state=DeliveryState.DISABLED, finished_at=now, last_error=reason)
        .execution_options(synchronize_session="fetch")
    )
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class DeliveryView:
    """A delivery with what a reader sees beside it: its URL, its token's and its scan's
    public ids."""

    delivery: CallbackDelivery
    url: str
    endpoint_disabled: bool
    token_public_id: str
    scan_public_id: str | None


def _views(session: Session, where: Sequence[Any], limit: int) -> list[DeliveryView]:
    rows = session.execute(
        select(
            CallbackDelivery,
            CallbackEndpoint.url,
            CallbackEndpoint.disabled_at,
            ApiToken.public_id,
            Scan.public_id,
        )
        .join(CallbackEndpoint, CallbackEndpoint.id == CallbackDelivery.endpoint_id)
        .join(ApiToken, ApiToken.id == CallbackDelivery.token_id)
        .outerjoin(Scan, Scan.id == CallbackDelivery.scan_id)
        .where(*where)
        .order_by(CallbackDelivery.id.desc())
        .limit(limit)
    ).all()
    return [
        DeliveryView(
            delivery=delivery,
            url=url,
            endpoint_disabled=disabled_at is not None,
            token_public_id=token,
            scan_public_id=scan,
        )
        for delivery, url, disabled_at, token, scan in rows
    ]


def list_deliveries(
    session: Session, *, token_id: int | None, state: DeliveryState | None, limit: int
) -> list[DeliveryView]:
    """Deliveries, newest first: of one token (None: all), in one state (None: any)."""
    where: list[Any] = []
    if token_id is not None:
        where.append(CallbackDelivery.token_id == token_id)
    if state is not None:
        where.append(CallbackDelivery.state == state)
    return _views(session, where, limit)


def delivery_view(session: Session, public_id: str, *, token_id: int | None) -> DeliveryView | None:
    """The delivery with this public id; with ``token_id``, only if it is that token's."""
    where: list[Any] = [CallbackDelivery.public_id == public_id]
    if token_id is not None:
        where.append(CallbackDelivery.token_id == token_id)
    found = _views(session, where, 1)
    return found[0] if found else None


def callback_attempts(session: Session, delivery_id: int) -> Sequence[CallbackAttempt]:
    return (
        session.execute(
            select(CallbackAttempt)
            .where(CallbackAttempt.delivery_id == delivery_id)
            .order_by(CallbackAttempt.id)
        )
        .scalars()
        .all()
    )
