"""Scans a platform or an operator asked the API for, and the idempotency keys of their
requests."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import IdempotencyKey, Image, Scan, Source


def add_scan(session: Session, scan: Scan) -> Scan:
    session.add(scan)
    session.flush()
    return scan


def scan_by_public_id(session: Session, public_id: str) -> Scan | None:
    return session.scalar(select(Scan).where(Scan.public_id == public_id))


def scans_by_public_ids(session: Session, public_ids: Sequence[str]) -> list[Scan]:
    """The scans named, in the order named (unknown ids left out)."""
    found = {
        scan.public_id: scan
        for scan in session.scalars(select(Scan).where(Scan.public_id.in_(public_ids)))
    }
    return [found[public_id] for public_id in public_ids if public_id in found]


def scans_of_object(
    session: Session, bucket: str, key: str, *, token_id: int | None, limit: int
) -> Sequence[Scan]:
    """The newest scans of ``s3://bucket/key`` first; only ``token_id``'s when given."""
    query = (
        select(Scan)
        .join(Source, Source.id == Scan.source_id)
        .where(Source.bucket == bucket, Source.object_key == key)
    )
    if token_id is not None:
        query = query.where(Scan.token_id == token_id)
    return session.scalars(query.order_by(Scan.id.desc()).limit(limit)).all()


def scans_of_image(
    session: Session, sha256: str, *, token_id: int | None, limit: int
) -> Sequence[Scan]:
    """The newest scans whose bytes were ``sha256``; only ``token_id``'s when given."""
    query = (
        select(Scan)
        .join(Source, Source.id == Scan.source_id)
        .join(Image, Image.id == Source.image_id)
        .where(Image.sha256 == sha256)
    )
    if token_id is not None:
        query = query.where(Scan.token_id == token_id)
    return session.scalars(query.order_by(Scan.id.desc()).limit(limit)).all()


def scans_by_external_id(
    session: Session, external_id: str, *, token_id: int | None, limit: int
) -> Sequence[Scan]:
    query = select(Scan).where(Scan.external_id == external_id)
    if token_id is not None:
        query = query.where(Scan.token_id == token_id)
    return session.scalars(query.order_by(Scan.id.desc()).limit(limit)).all()


def idempotency_key(session: Session, token_id: int, key: str) -> IdempotencyKey | None:
    return session.scalar(
        select(IdempotencyKey).where(IdempotencyKey.token_id == token_id, IdempotencyKey.key == key)
    )


def add_idempotency_key(session: Session, record: IdempotencyKey) -> None:
    """Stored with the scans it made, in their transaction; a concurrent request with the
    same key fails this insert on the unique constraint and is answered with the first."""
    session.add(record)
    session.flush()
