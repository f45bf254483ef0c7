"""``synthsentry calibrate``: a fitted configuration whose threshold keeps its promise on
fresh data, refused when the set is too small, stored for an operator to activate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit

from db.models import ReviewDecision
from workers.ensemble import EnsembleConfig
from workers.evaluation.calibrate import (
    CalibrationRefused,
    Request,
    calibrate,
    ensemble_scores,
)
from workers.evaluation.metrics import compute_metrics
from workers.evaluation.run import Scored
from workers.review import LabelledExample
from workers.review_export import write_examples

MODEL, PROVENANCE = "sumsub-mj5", "provenance"
BASE = EnsembleConfig(threshold=0.5, decisive=frozenset({PROVENANCE}))


def population(n: int, seed: int) -> Scored:
    """A miscalibrated model (reported = sigmoid(3 logit(p) + 1)) and a provenance check that
    finds a signed claim on a third of the AI images and abstains on everything else."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.5).astype(np.int64)
    z = rng.normal(loc=np.where(labels == 1, 1.0, -1.0), scale=1.2)
    reported = expit(3.0 * z + 1.0)
    provenance = np.where((labels == 1) & (rng.random(n) < 0.33), 1.0, np.nan)
    return Scored(
        labels=labels,
        scores={MODEL: reported, PROVENANCE: provenance},
        versions={MODEL: "1", PROVENANCE: "1"},
        recorded=True,
    )


def test_the_threshold_keeps_its_promise_on_fresh_real_images() -> None:
    fitted = calibrate(
        population(4000, seed=1), base=BASE, request=Request(alpha=0.05, delta=0.1, seed=3)
    )
    config = fitted.config
    guarantee = fitted.provenance["guarantee"]
    assert guarantee["kind"] == "neyman_pearson" and 0 < config.threshold < 1
    assert config.rule == "logistic" and config.decisive == BASE.decisive
    assert EnsembleConfig.from_definition(config.definition()).version == config.version
    # Fresh data from the same population: the score flags at most alpha of real images.
    fresh = population(20000, seed=99)
    names = list(fresh.scores)
    matrix = np.column_stack([fresh.scores[name] for name in names])
    scores = ensemble_scores(config, names, matrix)
    real = fresh.labels == 0
    assert np.mean(scores[real] >= config.threshold) <= 0.05 + 0.005
    # Calibration: the held-out ensemble is better calibrated than the one in force.
    held = fitted.provenance["held_out"]["ensemble"]
    assert held["after"]["ece"] < held["before"]["ece"] / 2
    assert held["after"]["log_loss"] < held["before"]["log_loss"]
    after_auc = compute_metrics(scores, fresh.labels, config.threshold, n_bootstrap=0).roc_auc
    assert after_auc is not None and after_auc > 0.8
    # The provenance check never answers on a real image: it stays uncalibrated.
    assert PROVENANCE in fitted.provenance["calibrations_skipped"]
    json.dumps(fitted.provenance, allow_nan=False)


def test_too_few_real_images_are_refused_with_how_many_more() -> None:
    with pytest.raises(CalibrationRefused, match=r"needs 299 \(\d+ more"):
        calibrate(population(400, seed=2), base=BASE, request=Request(alpha=0.01, delta=0.05))


def test_a_review_share_instead_of_a_guarantee() -> None:
    fitted = calibrate(
        population(2000, seed=4),
        base=BASE,
        request=Request(alpha=None, review_share=0.1, combine="weighted-mean"),
    )
    guarantee = fitted.provenance["guarantee"]
    assert guarantee["kind"] == "review_share" and guarantee["flagged_share"] <= 0.1
    assert fitted.config.rule == "weighted-mean"


def _export(path: Path, scored: Scored) -> None:
    examples = []
    for i, label in enumerate(scored.labels):
        detectors = [
            {"name": name, "version": "1", "score": None if np.isnan(s[i]) else float(s[i])}
            for name, s in scored.scores.items()
        ]
        examples.append(
            LabelledExample(
                sha256=f"{i:064x}",
                label=ReviewDecision.AI_GENERATED if label else ReviewDecision.NOT_AI_GENERATED,
                decided_at="2026-11-30T06:00:00+00:00",
                decided_by="token:mod",
                ensemble_version=BASE.version,
                ai_score=None,
                detectors=detectors,
                sources=[f"s3://media/{i}.jpg"],
            )
        )
    with path.open("w", encoding="utf-8") as out:
        write_examples(examples, "jsonl", out)


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    env.update(
        SYNTHSENTRY_DATA_DIR=str(data_dir),
        SYNTHSENTRY_FLEET_DETECTORS=json.dumps([PROVENANCE, MODEL]),
        HF_HUB_OFFLINE="1",
    )
    return subprocess.run(
        [sys.executable, "-m", "synthsentry.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_moderators_decisions_tune_the_fleet_from_the_command_line(tmp_path: Path) -> None:
    """A review export (decisions with the scores shown) is fitted on, the result is
    stored inactive, and an operator activates it."""
    export = tmp_path / "decisions.jsonl"
    _export(export, population(1500, seed=5))
    done = _cli(tmp_path / "data", "calibrate", str(export), "--alpha", "0.05", "--delta", "0.1")
    assert done.returncode == 0, done.stderr
    version = done.stdout.split()[1]
    assert "(not active)" in done.stdout and "with probability at least 0.9" in done.stdout
    listed = _cli(tmp_path / "data", "ensemble", "show", version, "--json")
    stored = json.loads(listed.stdout)
    assert stored["active"] is False and stored["provenance"]["source"] == "calibrate"
    assert stored["provenance"]["dataset"]["layout"] == "review_export"
    activated = _cli(tmp_path / "data", "ensemble", "activate", version)
    assert activated.returncode == 0, activated.stderr

    small = tmp_path / "few.jsonl"
    _export(small, population(200, seed=6))
    refused = _cli(tmp_path / "data", "calibrate", str(small))
    assert refused.returncode == 2 and "more real images" in refused.stderr


def test_what_cannot_be_fitted_is_refused_with_why_not_a_traceback() -> None:
    only_provenance = population(1000, seed=7)
    provenance_only = Scored(
        labels=only_provenance.labels,
        scores={PROVENANCE: only_provenance.scores[PROVENANCE]},
        versions={PROVENANCE: "1"},
        recorded=False,
    )
    # The check never answers on a real image: nothing tells a real image's evidence apart.
    with pytest.raises(CalibrationRefused, match="combination cannot be fitted"):
        calibrate(provenance_only, base=BASE, request=Request(alpha=0.05, delta=0.1))
    # Half the held-out scores tie at the top: no threshold within [0, 1] flags a third.
    with pytest.raises(CalibrationRefused, match="tie at the top"):
        calibrate(
            provenance_only,
            base=BASE,
            request=Request(alpha=None, review_share=0.3, combine="weighted-mean"),
        )
    one_real = Scored(
        labels=np.array([1] * 50 + [0]),
        scores={MODEL: np.linspace(0, 1, 51)},
        versions={MODEL: "1"},
        recorded=False,
    )
    with pytest.raises(CalibrationRefused, match="cannot be split"):
        calibrate(one_real, base=BASE, request=Request(alpha=0.05))
