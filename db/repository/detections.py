"""Detections: one detector's answer for one image at one detector version."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Detection, utcnow
from db.repository._sql import insert_ignore_rows


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
    return reusable_detections_of(session, [image_id], versions)[image_id]


def reusable_detections_of(
    session: Session, image_ids: Iterable[int], versions: Mapping[str, str]
) -> dict[int, dict[str, Detection]]:
    """``reusable_detections`` of several images in one query, by image id."""
    found: dict[int, dict[str, Detection]] = {image_id: {} for image_id in image_ids}
    if not found or not versions:
        return found
    rows = session.execute(
        select(Detection).where(
            Detection.image_id.in_(sorted(found)),
            Detection.detector_name.in_(list(versions)),
            Detection.error.is_(None),
        )
    ).scalars()
    for row in rows:
        if versions[row.detector_name] == row.detector_version:
            found[row.image_id][row.detector_name] = row
    return found


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
    (row,) = save_detections(session, [(image_id, record)])
    return row


def save_detections(
    session: Session, entries: Sequence[tuple[int, DetectionRecord]]
) -> list[Detection]:
    """``save_detection`` for several (image id, result) pairs: one INSERT and one SELECT
    for the group. Returns the stored rows in the order of ``entries``."""
    if not entries:
        return []
    now = utcnow()
    values = [_detection_values(image_id, record, now) for image_id, record in entries]
    insert_ignore_rows(session, Detection, sorted(values, key=_key))
    rows = session.execute(
        select(Detection).where(
            Detection.image_id.in_(sorted({image_id for image_id, _ in entries})),
            Detection.detector_name.in_(sorted({r.detector_name for _, r in entries})),
        )
    ).scalars()
    stored = {(r.image_id, r.detector_name, r.detector_version): r for r in rows}
    found = []
    replaced = False
    for value in values:
        row = stored[_key(value)]
        if row.error is not None and value["error"] is None:  # an answer after a failure
            for key in ("weights_sha256", "score", "evidence", "latency_ms", "error", "created_at"):
                setattr(row, key, value[key])
            replaced = True
        found.append(row)
    if replaced:
        session.flush()
    return found


def _detection_values(image_id: int, record: DetectionRecord, now: datetime) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "detector_name": record.detector_name,
        "detector_version": record.detector_version,
        "weights_sha256": record.weights_sha256,
        "score": record.score,
        "evidence": record.evidence,
        "latency_ms": record.latency_ms,
        "error": record.error,
        "created_at": now,
    }


def _key(values: Mapping[str, Any]) -> tuple[int, str, str]:
    return values["image_id"], values["detector_name"], values["detector_version"]


def latest_detections(
    session: Session, image_id: int, names: Iterable[str]
) -> dict[str, Detection]:
    """The newest detection of this image by each named detector."""
    return latest_detections_of(session, [image_id], names)[image_id]


def latest_detections_of(
    session: Session, image_ids: Iterable[int], names: Iterable[str]
) -> dict[int, dict[str, Detection]]:
    """``latest_detections`` of several images in one query, by image id."""
    found: dict[int, dict[str, Detection]] = {image_id: {} for image_id in image_ids}
    if not found:
        return found
    rows = session.execute(
        select(Detection)
        .where(Detection.image_id.in_(sorted(found)), Detection.detector_name.in_(list(names)))
        .order_by(Detection.created_at, Detection.id)
    ).scalars()
    for row in rows:  # oldest first: the newest of each detector is the one left
        found[row.image_id][row.detector_name] = row
    return found


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
