"""Images: one row per distinct content, addressed by the sha256 of its bytes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Image, utcnow
from db.repository._sql import insert_ignore, insert_ignore_rows


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


def _image_values(facts: ImageFacts, now: datetime) -> dict[str, Any]:
    return {
        "sha256": facts.sha256,
        "size_bytes": facts.size_bytes,
        "format": facts.format,
        "mime": facts.mime,
        "width": facts.width,
        "height": facts.height,
        "frames": facts.frames,
        "mode": facts.mode,
        "anomalies": list(facts.anomalies) if facts.anomalies else sa.null(),
        "first_seen_at": now,
    }


def get_or_create_image(session: Session, facts: ImageFacts) -> Image:
    insert_ignore(session, Image, _image_values(facts, utcnow()))
    return session.execute(select(Image).where(Image.sha256 == facts.sha256)).scalar_one()


def get_or_create_images(session: Session, facts: Sequence[ImageFacts]) -> dict[str, int]:
    """The ids of several contents by sha256, rows created for the new ones: one INSERT and
    one SELECT for the group (the first facts given for a sha256 are the ones stored)."""
    unique: dict[str, ImageFacts] = {}
    for one in facts:
        unique.setdefault(one.sha256, one)
    if not unique:
        return {}
    now = utcnow()
    insert_ignore_rows(session, Image, [_image_values(unique[sha], now) for sha in sorted(unique)])
    rows = session.execute(select(Image.id, Image.sha256).where(Image.sha256.in_(list(unique))))
    return {sha256: image_id for image_id, sha256 in rows}


def image_by_sha256(session: Session, sha256: str) -> Image | None:
    return session.execute(select(Image).where(Image.sha256 == sha256)).scalar_one_or_none()


def get_image(session: Session, image_id: int) -> Image | None:
    return session.get(Image, image_id)


def sha256_of_images(session: Session, image_ids: Iterable[int]) -> dict[int, str]:
    """The content hash of each of these images that exists, by id."""
    ids = sorted(set(image_ids))
    if not ids:
        return {}
    rows = session.execute(select(Image.id, Image.sha256).where(Image.id.in_(ids)))
    return {image_id: sha256 for image_id, sha256 in rows}


def lock_images(session: Session, image_ids: Iterable[int]) -> None:
    """Lock several image rows (see ``lock_image``) in one statement, in ascending id order
    (the rows are locked as the sorted result is read), so that two transactions locking
    overlapping sets cannot deadlock on each other."""
    ids = sorted(set(image_ids))
    if ids:
        session.execute(
            select(Image.id)
            .where(Image.id.in_(ids))
            .order_by(Image.id)
            .with_for_update(key_share=True)
        ).all()


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
