"""Detections: one detector's answer for one image at one detector version."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Detection, utcnow
from db.repository._sql import insert_ignore


@dataclass(frozen=True)
class DetectionRecord:
    detector_name: str
    detector_version: str
    weights_sha256: str | None
    score: float | None
    evidence: dict[str, Any]
    latency_ms: float | None
    error: str | None = None


def reusable_detections(
    session: Session, image_id: int, versions: Mapping[str, str]
) -> dict[str, Detection]:
    """Stored detections of this image by exactly these detector versions, by name.

    A stored failure is not reusable: the caller runs that detector again.
    """
    found = detections_by_version(session, image_id, versions)
    return {name: row for name, row in found.items() if row.error is None}


def detections_by_version(
    session: Session, image_id: int, versions: Mapping[str, str]
) -> dict[str, Detection]:
    """Stored detections of this image by exactly these detector versions (failures too)."""
    if not versions:
        return {}
    rows = session.execute(
        select(Detection).where(
            Detection.image_id == image_id,
            Detection.detector_name.in_(list(versions)),
        )
    ).scalars()
    return {
        row.detector_name: row
        for row in rows
        if versions[row.detector_name] == row.detector_version
    }


def save_detection(session: Session, image_id: int, record: DetectionRecord) -> Detection:
    """Store one detector's result once. A stored failure is replaced by a later answer;
    a stored answer is never overwritten (the first result for a version is the record)."""
    values = {
        "image_id": image_id,
        "detector_name": record.detector_name,
        "detector_version": record.detector_version,
        "weights_sha256": record.weights_sha256,
        "score": record.score,
        "evidence": record.evidence,
        "latency_ms": record.latency_ms,
        "error": record.error,
        "created_at": utcnow(),
    }
    inserted = insert_ignore(session, Detection, values)
    row = session.execute(
        select(Detection).where(
            Detection.image_id == image_id,
            Detection.detector_name == record.detector_name,
            Detection.detector_version == record.detector_version,
        )
    ).scalar_one()
    if not inserted and row.error is not None and record.error is None:
        for key in ("weights_sha256", "score", "evidence", "latency_ms", "error", "created_at"):
            setattr(row, key, values[key])
        session.flush()
    return row


def latest_detections(
    session: Session, image_id: int, names: Iterable[str]
) -> dict[str, Detection]:
    """The newest detection of this image by each named detector."""
    rows = session.execute(
        select(Detection)
        .where(Detection.image_id == image_id, Detection.detector_name.in_(list(names)))
        .order_by(Detection.created_at, Detection.id)
    ).scalars()
    return {row.detector_name: row for row in rows}


def detections_for_image(session: Session, image_id: int) -> Sequence[Detection]:
    return (
        session.execute(
            select(Detection)
            .where(Detection.image_id == image_id)
            .order_by(Detection.detector_name)
        )
        .scalars()
        .all()
    )


def current_versions(session: Session, names: Iterable[str]) -> dict[str, str]:
    """The version each detector wrote most recently, anywhere: what a worker serves now."""
    newest = (
        select(Detection.detector_name, func.max(Detection.id).label("id"))
        .where(Detection.detector_name.in_(list(names)), Detection.error.is_(None))
        .group_by(Detection.detector_name)
        .subquery()
    )
    rows = session.execute(
        select(Detection.detector_name, Detection.detector_version).join(
            newest, Detection.id == newest.c.id
        )
    )
    return {name: version for name, version in rows}
