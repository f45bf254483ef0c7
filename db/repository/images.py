"""Images: one row per distinct content, addressed by the sha256 of its bytes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Image, utcnow
from db.repository._sql import insert_ignore


@dataclass(frozen=True)
class ImageFacts:
    sha256: str
    size_bytes: int
    format: str | None = None
    mime: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    mode: str | None = None
    anomalies: tuple[str, ...] = ()


def get_or_create_image(session: Session, facts: ImageFacts) -> Image:
    insert_ignore(
        session,
        Image,
        {
            "sha256": facts.sha256,
            "size_bytes": facts.size_bytes,
            "format": facts.format,
            "mime": facts.mime,
            "width": facts.width,
            "height": facts.height,
            "frames": facts.frames,
            "mode": facts.mode,
            "anomalies": list(facts.anomalies) if facts.anomalies else sa.null(),
            "first_seen_at": utcnow(),
        },
    )
    return session.execute(select(Image).where(Image.sha256 == facts.sha256)).scalar_one()


def image_by_sha256(session: Session, sha256: str) -> Image | None:
    return session.execute(select(Image).where(Image.sha256 == sha256)).scalar_one_or_none()


def get_image(session: Session, image_id: int) -> Image | None:
    return session.get(Image, image_id)


def lock_images(session: Session, image_ids: Iterable[int]) -> None:
    """Lock several image rows (see ``lock_image``), in ascending id order, so that two
    transactions locking overlapping sets cannot deadlock on each other."""
    for image_id in sorted(set(image_ids)):
        lock_image(session, image_id)


def lock_image(session: Session, image_id: int) -> Image:
    """The image row, locked until the transaction ends: whoever holds it is the only one
    deciding this image's verdict. Take it before writing rows that reference the image.

    ``FOR NO KEY UPDATE`` rather than ``FOR UPDATE``: inserting a detection or a source that
    points at the image takes a KEY SHARE lock on it (the foreign key check), which
    ``FOR UPDATE`` would wait on, so two workers that each stored a detection could deadlock
    waiting for each other. SQLite serialises writers anyway; the clause is a no-op there.
    """
    statement = select(Image).where(Image.id == image_id).with_for_update(key_share=True)
    return session.execute(statement).scalar_one()
