"""Stored ensemble configurations: saved, listed, activated by an operator (audited), and
decided with by the scan and the fleet only when they combine the detectors that run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import AuditEvent, Verdict
from db.session import make_engine, make_sessionmaker
from workers import ensembles
from workers.ensemble import Calibration, EnsembleConfig

from conftest import DatabaseFactory, emptied_sessions
from provenance_fixtures import png_with_chunks, text_chunk

FITTED = EnsembleConfig(
    rule="logistic",
    threshold=0.9,
    weights={"provenance": 2.0},
    calibrations={"provenance": Calibration(0.5, -0.1)},
    intercept=-1.0,
    abstention_weights={"provenance": -0.5},
    decisive=frozenset({"provenance"}),
)


@pytest.fixture(scope="module")
def ensembles_database(committing_database: DatabaseFactory) -> str:
    return committing_database("ensembles")


@pytest.fixture
def sessions(ensembles_database: str) -> Iterator[sessionmaker[Session]]:
    yield from emptied_sessions(ensembles_database)


def test_a_saved_configuration_is_activated_only_for_its_detectors_and_audited(
    sessions: sessionmaker[Session],
) -> None:
    saved = ensembles.save(
        sessions,
        FITTED,
        detectors=["provenance"],
        provenance={"source": "calibrate", "fitted_on": {"real": 300, "ai": 250}},
    )
    assert not saved.active and saved.detectors == ("provenance",)
    assert saved.config.definition() == FITTED.definition()
    assert ensembles.active(sessions) is None, "saving activates nothing"
    with pytest.raises(ensembles.EnsembleRefused) as differs:
        ensembles.activate(
            sessions, saved.version, actor="cli:ops", running_detectors=["provenance", "mj5"]
        )
    assert differs.value.status == 409 and differs.value.kind == "detectors-differ"
    with pytest.raises(ensembles.EnsembleRefused) as unknown:
        ensembles.activate(sessions, "logistic@0", actor="cli:ops", running_detectors=["x"])
    assert unknown.value.status == 404

    first = ensembles.activate(
        sessions, saved.version, actor="cli:ops", running_detectors=["provenance"]
    )
    assert first.active and first.activated_at is not None
    other = ensembles.save(
        sessions, EnsembleConfig(threshold=0.7), detectors=["provenance"], provenance={}
    )
    ensembles.activate(sessions, other.version, actor="cli:ops", running_detectors=["provenance"])
    active = ensembles.active(sessions)
    assert active is not None and active.version == other.version
    assert [s.active for s in ensembles.configurations(sessions)] == [True, False]
    with sessions() as session:
        events = session.execute(
            select(AuditEvent).where(AuditEvent.action == "ensemble.activated")
        ).scalars()
        trail = [(e.actor, e.details["version"], e.details["previous"]) for e in events]
    assert trail == [
        ("cli:ops", saved.version, None),
        ("cli:ops", other.version, saved.version),
    ]
    # Saving the same configuration again keeps the provenance it was saved with.
    again = ensembles.save(sessions, FITTED, detectors=["provenance"], provenance={"x": 1})
    assert again.provenance["source"] == "calibrate"


def _cli(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    environment.update(SYNTHSENTRY_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", **env)
    return subprocess.run(
        [sys.executable, "-m", "synthsentry.cli", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )


def test_the_scan_and_the_fleet_decide_with_the_activated_configuration(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    flagged = tmp_path / "in" / "settings.png"
    flagged.parent.mkdir()
    flagged.write_bytes(png_with_chunks([text_chunk("parameters", "a fox\nSteps: 20, Seed: 1")]))
    assert _cli(data_dir, "db", "upgrade").returncode == 0
    engine = make_engine(f"sqlite:///{data_dir / 'synthsentry.db'}")
    saved = ensembles.save(
        make_sessionmaker(engine), FITTED, detectors=["provenance"], provenance={}
    )
    engine.dispose()

    activated = _cli(data_dir, "ensemble", "activate", saved.version)
    assert activated.returncode == 0, activated.stderr
    listed = _cli(data_dir, "ensemble", "list", "--json")
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["version"] == saved.version and row["active"] is True

    scanned = _cli(data_dir, "scan", str(flagged.parent), "--json")
    assert scanned.returncode == 0, scanned.stderr
    (outcome,) = [json.loads(line) for line in scanned.stdout.splitlines()]
    assert outcome["ensemble_version"] == saved.version
    engine = make_engine(f"sqlite:///{data_dir / 'synthsentry.db'}")
    with Session(engine) as session:
        versions = set(session.execute(select(Verdict.ensemble_version)).scalars())
    engine.dispose()
    assert versions == {saved.version}

    # A fleet that runs other detectors refuses to start with it.
    refused = _cli(
        data_dir,
        "status",
        "s3://media/a.png",
        SYNTHSENTRY_FLEET_DETECTORS='["provenance", "sumsub-mj5"]',
    )
    assert refused.returncode == 2 and saved.version in refused.stderr
    assert "activate a configuration for these detectors" in refused.stderr

    # Back to the settings' configuration, as a stored and activated one.
    back = _cli(data_dir, "ensemble", "activate", "--from-settings")
    assert back.returncode == 0, back.stderr
    shown = _cli(data_dir, "ensemble", "list", "--json")
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [r["active"] for r in rows] == [True, False]
    assert rows[0]["provenance"]["source"] == "settings"


def test_legacy_records_are_listed_never_activated_and_the_newest_activation_wins(
    sessions: sessionmaker[Session],
) -> None:
    from datetime import timedelta

    from db import repository
    from db.models import EnsembleActivation, utcnow
    from db.session import transaction

    with transaction(sessions) as session:
        legacy = repository.register_ensemble(
            session,
            repository.EnsembleRecord(
                "v0-weighted-mean", "0" * 64, {"rule": "weighted-mean", "legacy_version": "v0"}
            ),
        )
        legacy.provenance = {"detectors": ["provenance"]}
    (listed,) = ensembles.configurations(sessions)
    assert listed.config is None and listed.version == "v0-weighted-mean"
    with pytest.raises(ensembles.EnsembleRefused, match="legacy"):
        ensembles.activate(
            sessions, "v0-weighted-mean", actor="cli:ops", running_detectors=["provenance"]
        )
    first = ensembles.save(sessions, FITTED, detectors=["provenance"], provenance={})
    second = ensembles.save(
        sessions, EnsembleConfig(threshold=0.6), detectors=["provenance"], provenance={}
    )
    ensembles.activate(sessions, first.version, actor="a", running_detectors=["provenance"])
    ensembles.activate(sessions, second.version, actor="b", running_detectors=["provenance"])
    with transaction(sessions) as session:  # an earlier clock wrote the newest activation
        newest = session.execute(
            select(EnsembleActivation).order_by(EnsembleActivation.id.desc()).limit(1)
        ).scalar_one()
        newest.activated_at = utcnow() - timedelta(hours=1)
    active = ensembles.active(sessions)
    assert active is not None and active.version == second.version
