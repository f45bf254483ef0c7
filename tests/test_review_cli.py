"""``synthsentry review``: the labelled-example export and lease expiry, as an operator runs
them (the real command in a subprocess, on the embedded SQLite database a scan filled)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from db.models import ReviewDecision
from db.session import make_engine, make_sessionmaker
from workers import review

from provenance_fixtures import png_with_chunks, text_chunk


def _synthsentry(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    env.update(SYNTHSENTRY_DATA_DIR=str(data_dir), SYNTHSENTRY_LOG_JSON="true", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "synthsentry.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_export_gives_each_decided_case_with_its_scores_sources_and_label(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    folder = tmp_path / "uploads"
    folder.mkdir()
    # Generation settings in a PNG text chunk: the provenance detector flags both files.
    for name, seed in (("fox.png", 1), ("owl.png", 2)):
        (folder / name).write_bytes(
            png_with_chunks([text_chunk("parameters", f"a {name}\nSteps: 20, Seed: {seed}")])
        )
    scanned = _synthsentry(data_dir, "scan", str(folder), "--detector", "provenance")
    assert scanned.returncode == 0, scanned.stderr

    engine = make_engine(f"sqlite:///{data_dir / 'synthsentry.db'}")
    sessions = make_sessionmaker(engine)
    policy = review.ReviewPolicy(active_ensemble="none")
    moderator = review.Reviewer("token:mod1")
    claim = review.claim_next(sessions, moderator, policy)
    assert claim is not None
    review.decide(
        sessions,
        claim.case_id,
        ReviewDecision.AI_GENERATED,
        None,
        reviewer=moderator,
        policy=policy,
    )
    engine.dispose()

    as_csv = _synthsentry(data_dir, "review", "export", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    assert "1 labelled example(s)" in as_csv.stderr
    (row,) = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert row["sha256"] == claim.sha256 and row["label"] == "ai_generated"
    assert row["decided_by"] == "token:mod1"
    (detector,) = json.loads(row["detectors"])
    assert detector["name"] == "provenance" and detector["version"]
    (place,) = json.loads(row["sources"])
    assert place.startswith(str(folder)) and place.endswith(".png")

    output = tmp_path / "examples.jsonl"
    as_jsonl = _synthsentry(
        data_dir, "review", "export", "--format", "jsonl", "--output", str(output)
    )
    assert as_jsonl.returncode == 0, as_jsonl.stderr
    (example,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert example["sha256"] == claim.sha256 and example["detectors"] == [detector]

    expired = _synthsentry(data_dir, "review", "expire")
    assert expired.returncode == 0 and expired.stdout.strip() == "0 claim(s) expired"
