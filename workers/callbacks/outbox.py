"""The outbox: an event owed to a platform is a row, written in the transaction that makes
the event happen (the verdict's, the rejection's, the moderator's decision's). A crash
before that commit leaves neither the event nor its callback; after it, the sender finds
the row however long it was away.

    scan.completed   a scan's outcome is final: its verdict is stored, or the upload was
                     refused (once per scan)
    review.decided   a moderator decided the review case of the scan's image

The payload is ``{"type", "timestamp", "data": {"scan": <GET /v1/scans/{id}>, ...}}``, as
it stood when the event happened.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from db import repository
from db.models import DeliveryState, Scan, utcnow
from workers.submissions import scan_document

log = logging.getLogger(__name__)

SCAN_COMPLETED = "scan.completed"
REVIEW_DECIDED = "review.decided"
DELIVERY_ID_PREFIX = "msg_"


def new_delivery_id() -> str:
    """The ``webhook-id`` of a delivery: the same on every attempt, so a receiver that got
    it twice can tell."""
    return DELIVERY_ID_PREFIX + secrets.token_hex(12)


def enqueue_scan_completed(
    session: Session, source_ids: Sequence[int], *, active_ensemble: str
) -> int:
    """Queue ``scan.completed`` for the scans among these sources (whose outcome was made
    final in ``session``'s transaction) that asked for a callback; returns how many."""
    if not source_ids:
        return 0
    queued = 0
    now = utcnow()
    for scan in repository.callback_scans_of_sources(session, source_ids):
        data = {"scan": _scan_document(session, scan, active_ensemble)}
        key = f"{SCAN_COMPLETED}:{scan.public_id}"
        queued += _queue(
            session, scan, event_type=SCAN_COMPLETED, event_key=key, data=data, now=now
        )
    return queued


def enqueue_review_decided(
    session: Session,
    image_id: int,
    *,
    decision: str,
    decided_at: datetime,
    actor: str,
    active_ensemble: str,
) -> int:
    """Queue ``review.decided`` for every scan of this image that asked for a callback, in
    the transaction that stores the decision (``decided_at``: as the case records it);
    returns how many. Each stored decision is an event of its own. The platform is told
    what was decided and when, nothing more: the moderator's name and note stay with us
    (the same image may be scanned by several platforms, and a note is written for
    colleagues, not for them).
    The payload's ``data`` is ``{"scan": <scan document>, "review": {"decision",
    "decided_at"}}``."""
    now = utcnow()
    queued = 0
    for scan in repository.callback_scans_of_image(session, image_id):
        data = {
            "scan": _scan_document(session, scan, active_ensemble),
            "review": {"decision": decision, "decided_at": decided_at.isoformat()},
        }
        key = f"{REVIEW_DECIDED}:{scan.public_id}:{secrets.token_hex(8)}"
        queued += _queue(
            session, scan, event_type=REVIEW_DECIDED, event_key=key, data=data, now=now
        )
    if queued:
        log.info(
            "review decision queued for callbacks",
            extra={"image_id": image_id, "actor": actor, "deliveries": queued},
        )
    return queued


def _queue(
    session: Session,
    scan: Scan,
    *,
    event_type: str,
    event_key: str,
    data: dict[str, Any],
    now: datetime,
) -> int:
    assert scan.callback_url is not None and scan.token_id is not None
    endpoint = repository.callback_endpoint(session, scan.token_id, scan.callback_url, now=now)
    # An endpoint that answered 410 Gone gets nothing more; the event is still recorded
    # (disabled), so the platform sees it and can ask for it once it is back.
    state = DeliveryState.DISABLED if endpoint.disabled_at is not None else DeliveryState.PENDING
    payload = {"type": event_type, "timestamp": now.isoformat(), "data": data}
    created = repository.add_callback_delivery(
        session,
        repository.DeliveryRecord(
            public_id=new_delivery_id(),
            token_id=scan.token_id,
            endpoint_id=endpoint.id,
            scan_id=scan.id,
            event_type=event_type,
            event_key=event_key,
            payload=payload,
            state=state,
            now=now,
        ),
    )
    return int(created)


def _scan_document(session: Session, scan: Scan, active_ensemble: str) -> dict[str, Any]:
    return scan_document(session, scan, active_ensemble=active_ensemble)
