"""Stored ensemble configurations and their activations (the newest is the active one)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Ensemble, EnsembleActivation, Verdict, utcnow
from db.repository.verdicts import EnsembleRecord, register_ensemble


def store_configuration(
    session: Session, record: EnsembleRecord, provenance: dict[str, Any]
) -> Ensemble:
    """The configuration's row, written if new, with ``provenance`` where it had none (a
    configuration first seen under a verdict learns where it came from; one that has a
    provenance keeps it)."""
    row = register_ensemble(session, record)
    if row.provenance is None:
        row.provenance = provenance
        session.flush()
    return row


def configuration_by_version(session: Session, version: str) -> Ensemble | None:
    return session.execute(select(Ensemble).where(Ensemble.version == version)).scalar_one_or_none()


def list_configurations(
    session: Session,
) -> Sequence[tuple[Ensemble, datetime | None, int]]:
    """Every stored configuration, newest first, with its latest activation time (None:
    never active) and how many verdicts were made under it."""
    activated = (
        select(
            EnsembleActivation.ensemble_id, func.max(EnsembleActivation.activated_at).label("at")
        )
        .group_by(EnsembleActivation.ensemble_id)
        .subquery()
    )
    verdicts = (
        select(Verdict.ensemble_id, func.count().label("n"))
        .group_by(Verdict.ensemble_id)
        .subquery()
    )
    rows = session.execute(
        select(Ensemble, activated.c.at, func.coalesce(verdicts.c.n, 0))
        .outerjoin(activated, activated.c.ensemble_id == Ensemble.id)
        .outerjoin(verdicts, verdicts.c.ensemble_id == Ensemble.id)
        .order_by(Ensemble.created_at.desc(), Ensemble.id.desc())
    ).all()
    return [(ensemble, at, int(n)) for ensemble, at, n in rows]


def add_activation(session: Session, ensemble_id: int, *, actor: str) -> EnsembleActivation:
    row = EnsembleActivation(ensemble_id=ensemble_id, actor=actor, activated_at=utcnow())
    session.add(row)
    session.flush()
    return row


def active_configuration(session: Session) -> tuple[Ensemble, EnsembleActivation] | None:
    """The configuration of the newest activation, or None when none was ever activated."""
    row = session.execute(
        select(Ensemble, EnsembleActivation)
        .join(EnsembleActivation, EnsembleActivation.ensemble_id == Ensemble.id)
        # By id, the order the database wrote them in: a caller's clock may be behind.
        .order_by(EnsembleActivation.id.desc())
        .limit(1)
    ).first()
    return (row[0], row[1]) if row is not None else None
