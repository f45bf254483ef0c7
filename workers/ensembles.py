"""Stored ensemble configurations: saved (by ``synthsentry calibrate``), listed, shown, and
activated by an operator, never silently.

Without an activation the fleet and the scan decide with the configuration the settings
describe (threshold, weights, calibrations). An activation makes a stored configuration the
one they decide with instead; each activation is a row and an audit event, and the newest
wins. A configuration combines a fixed set of detectors (recorded in its provenance), and
is activated only for a fleet that runs exactly those: a process whose detectors differ
refuses to start rather than decide with a configuration fitted for other detectors.
Processes read the active configuration when they start: activating one takes effect as
the fleet's processes restart (each verdict names the version it was made under, so a
rolling restart mixes nothing up). Verdicts made under a new configuration are new verdicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import Ensemble, as_utc
from db.session import transaction
from workers.ensemble import EnsembleConfig
from workers.refusals import Refused

AUDIT_SUBJECT = "ensemble"


class EnsembleRefused(Refused):
    """A request about stored configurations that cannot be met (``workers.refusals``)."""


@dataclass(frozen=True)
class StoredEnsemble:
    version: str
    # None: a definition this release cannot read back to its digest (the legacy records
    # of verdicts stored before configurations were): listed, never activated.
    config: EnsembleConfig | None
    detectors: tuple[str, ...]  # the detectors it combines (empty: not recorded)
    provenance: dict[str, Any]
    created_at: str
    activated_at: str | None  # its latest activation
    active: bool
    verdicts: int  # made under it so far

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "active": self.active,
            "activated_at": self.activated_at,
            "created_at": self.created_at,
            "verdicts": self.verdicts,
            "detectors": list(self.detectors),
            "definition": self.config.definition() if self.config is not None else None,
            "provenance": self.provenance,
        }


def save(
    session_factory: sessionmaker[Session],
    config: EnsembleConfig,
    *,
    detectors: Iterable[str],
    provenance: dict[str, Any],
) -> StoredEnsemble:
    """Store ``config`` (not active) with where it came from; returns it as stored. Saving
    the same configuration again keeps the provenance it was first saved with."""
    names = sorted(set(detectors))
    if not names:
        raise EnsembleRefused(422, "no-detectors", "a configuration combines at least one detector")
    record = repository.EnsembleRecord(config.version, config.digest, config.definition())
    with transaction(session_factory) as session:
        repository.store_configuration(session, record, {**provenance, "detectors": names})
    return show(session_factory, config.version)


def configurations(session_factory: sessionmaker[Session]) -> list[StoredEnsemble]:
    """Every stored configuration, newest first."""
    with session_factory() as session:
        active = repository.active_configuration(session)
        active_id = active[0].id if active is not None else None
        return [
            _stored(row, activated_at, verdicts, active=row.id == active_id)
            for row, activated_at, verdicts in repository.list_configurations(session)
        ]


def show(session_factory: sessionmaker[Session], version: str) -> StoredEnsemble:
    for stored in configurations(session_factory):
        if stored.version == version:
            return stored
    raise EnsembleRefused(404, "not-found", f"no stored ensemble configuration {version!r}")


def active(session_factory: sessionmaker[Session]) -> StoredEnsemble | None:
    """The activated configuration, or None: the settings' configuration decides. Read on
    its own (every process start asks), with no count of the verdicts made under it."""
    with session_factory() as session:
        found = repository.active_configuration(session)
        if found is None:
            return None
        row, activation = found
        stored = _stored(row, activation.activated_at, -1, active=True)
    if stored.config is None:
        raise EnsembleRefused(
            409, "unreadable", f"the active configuration {stored.version} cannot be read"
        )
    return stored


def activate(
    session_factory: sessionmaker[Session],
    version: str,
    *,
    actor: str,
    running_detectors: Sequence[str],
) -> StoredEnsemble:
    """Make ``version`` the active configuration; audited. Refused (409) unless it combines
    exactly ``running_detectors``, the detectors the fleet runs (the caller's settings)."""
    with transaction(session_factory) as session:
        row = repository.configuration_by_version(session, version)
        if row is None:
            raise EnsembleRefused(404, "not-found", f"no stored ensemble configuration {version!r}")
        if _config_of(row) is None:
            raise EnsembleRefused(
                409, "unreadable", f"{version} is a legacy record, not a configuration"
            )
        recorded = tuple((row.provenance or {}).get("detectors", ()))
        if not recorded:
            raise EnsembleRefused(
                409,
                "no-detector-set",
                f"{version} records no detector set (it was stored under a verdict, not "
                "saved): save it with its detectors first",
            )
        if set(recorded) != set(running_detectors):
            raise EnsembleRefused(
                409,
                "detectors-differ",
                f"{version} combines {', '.join(sorted(recorded))}; the fleet runs "
                f"{', '.join(sorted(running_detectors)) or 'no detector'} "
                "(SYNTHSENTRY_FLEET_DETECTORS)",
            )
        previous = repository.active_configuration(session)
        repository.add_activation(session, row.id, actor=actor)
        repository.append_audit(
            session,
            actor=actor,
            action="ensemble.activated",
            subject_type=AUDIT_SUBJECT,
            subject_id=row.id,
            details={
                "version": version,
                "previous": previous[0].version if previous is not None else None,
            },
        )
    return show(session_factory, version)


def _stored(
    row: Ensemble, activated_at: datetime | None, verdicts: int, *, active: bool
) -> StoredEnsemble:
    provenance = dict(row.provenance or {})
    return StoredEnsemble(
        version=row.version,
        config=_config_of(row),
        detectors=tuple(provenance.get("detectors", ())),
        provenance=provenance,
        created_at=_iso(row.created_at),
        activated_at=_iso(activated_at) if activated_at is not None else None,
        active=active,
        verdicts=verdicts,
    )


def _config_of(row: Ensemble) -> EnsembleConfig | None:
    """The configuration a stored row describes, or None when this release cannot read it
    back to its digest (it would decide under another version than the one stored)."""
    try:
        config = EnsembleConfig.from_definition(row.definition)
    except (KeyError, TypeError, ValueError):
        return None
    return config if config.digest == row.digest else None


def _iso(moment: datetime) -> str:
    return as_utc(moment).isoformat()
