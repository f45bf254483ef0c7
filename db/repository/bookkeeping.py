"""The fleet's bookkeeping: delivery attempts per detector task, and dead letters."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import DeadLetter, DetectionAttempt, utcnow
from db.repository._sql import insert_ignore


def count_attempt(session: Session, image_id: int, detector_name: str) -> int:
    """Add one to the deliveries of this detector task and return the new count."""
    insert_ignore(
        session,
        DetectionAttempt,
        {
            "image_id": image_id,
            "detector_name": detector_name,
            "attempts": 0,
            "updated_at": utcnow(),
        },
    )
    session.execute(
        update(DetectionAttempt)
        .where(
            DetectionAttempt.image_id == image_id, DetectionAttempt.detector_name == detector_name
        )
        .values(attempts=DetectionAttempt.attempts + 1, updated_at=utcnow())
    )
    return attempts_so_far(session, image_id, detector_name)


def attempts_so_far(session: Session, image_id: int, detector_name: str) -> int:
    """Deliveries of this detector task counted so far (0 for a first delivery)."""
    found = session.execute(
        select(DetectionAttempt.attempts).where(
            DetectionAttempt.image_id == image_id,
            DetectionAttempt.detector_name == detector_name,
        )
    ).scalar_one_or_none()
    return int(found or 0)


def record_dead_letter(session: Session, channel: str, reason: str, body: str) -> None:
    session.add(
        DeadLetter(channel=channel, reason=reason, body=body[:100_000], received_at=utcnow())
    )
    session.flush()
