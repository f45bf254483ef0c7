"""The fleet's bookkeeping: delivery attempts per detector task, and dead letters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import DeadLetter, DetectionAttempt, utcnow
from db.repository._sql import dialect_insert


def count_attempt(session: Session, image_id: int, detector_name: str, message_id: str) -> int:
    """Add one to the deliveries of this message of a detector task; returns its count.
    One statement (an upsert that returns the new count)."""
    message = (image_id, message_id)
    return count_attempts(session, detector_name, [message])[message]


def count_attempts(
    session: Session, detector_name: str, messages: Sequence[tuple[int, str]]
) -> dict[tuple[int, str], int]:
    """``count_attempt`` for several messages (image id, message id) of one detector's
    tasks, in one statement; each message's count. Rows are written in key order, so two
    transactions counting overlapping sets cannot deadlock on each other."""
    keys = sorted(set(messages))
    if not keys:
        return {}
    now = utcnow()
    insert = dialect_insert(session)(DetectionAttempt).values(
        [
            {
                "image_id": image_id,
                "detector_name": detector_name,
                "message_id": message_id,
                "attempts": 1,
                "updated_at": now,
            }
            for image_id, message_id in keys
        ]
    )
    counted = insert.on_conflict_do_update(
        index_elements=["image_id", "detector_name", "message_id"],
        set_={"attempts": DetectionAttempt.attempts + 1, "updated_at": now},
    ).returning(DetectionAttempt.image_id, DetectionAttempt.message_id, DetectionAttempt.attempts)
    return {
        (image_id, message_id): attempts
        for image_id, message_id, attempts in session.execute(counted)
    }


def attempts_so_far_of(
    session: Session, image_ids: Iterable[int], detector_name: str
) -> dict[int, int]:
    """Deliveries counted so far of any message of this detector's task for each image
    (0: none yet), in one query, by image id."""
    found = dict.fromkeys(image_ids, 0)
    if found:
        rows = session.execute(
            select(DetectionAttempt.image_id, func.sum(DetectionAttempt.attempts))
            .where(
                DetectionAttempt.image_id.in_(sorted(found)),
                DetectionAttempt.detector_name == detector_name,
            )
            .group_by(DetectionAttempt.image_id)
        )
        found.update({image_id: int(total) for image_id, total in rows})
    return found


def record_dead_letter(session: Session, channel: str, reason: str, body: str) -> None:
    session.add(
        DeadLetter(channel=channel, reason=reason, body=body[:100_000], received_at=utcnow())
    )
    session.flush()
