"""Calibrators undo known distortions on held-out images, agree with the ensemble's own
calibration, and the learnt combination weighs evidence and abstentions sensibly."""

from __future__ import annotations

import json
import math

import numpy as np
import numpy.typing as npt
import pytest
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import brier_score_loss, log_loss

from workers.ensemble import Calibration, EnsembleConfig
from workers.evaluation.calibration import (
    ECE_BINS,
    ISOTONIC_MIN_PER_CLASS,
    TooFewExamples,
    before_after,
    fit_calibrator,
    fit_combination,
    fit_isotonic,
    fit_platt,
    fit_temperature,
    split_held_out,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _labelled_truth(seed: int, n: int = 10_000) -> tuple[FloatArray, FloatArray, IntArray]:
    """True logits, true probabilities and labels drawn from them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    p = expit(z)
    return z, p, (rng.random(n) < p).astype(np.int64)


def _direct_ece(p: FloatArray, y: IntArray) -> float:
    """The definition, bin by bin: 15 equal-width bins, the last one closed at 1."""
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    total = 0.0
    for i in range(ECE_BINS):
        upper = p <= edges[i + 1] if i == ECE_BINS - 1 else p < edges[i + 1]
        inside = (p >= edges[i]) & upper
        if inside.any():
            total += inside.sum() / p.size * abs(y[inside].mean() - p[inside].mean())
    return total


def _platt_standard_errors(scores: FloatArray, a: float, b: float) -> tuple[float, float]:
    """The asymptotic standard errors of a logistic regression's slope and intercept on
    ``logit(scores)`` when ``(a, b)`` is the truth."""
    x = np.log(scores / (1 - scores))
    p = expit(a * x + b)
    w = p * (1 - p)
    information = np.array([[np.sum(w * x * x), np.sum(w * x)], [np.sum(w * x), np.sum(w)]])
    a_variance, b_variance = np.diag(np.linalg.inv(information))
    return math.sqrt(a_variance), math.sqrt(b_variance)


def test_platt_undoes_a_known_distortion_on_held_out_images() -> None:
    z, p, y = _labelled_truth(1)
    reported = expit(3.0 * z + 1.0)  # over-confident and biased towards "AI-generated"
    fit, held_out = split_held_out(y, seed=4)
    platt = fit_platt(reported[fit], y[fit])
    # The inverse of q = sigmoid(3 logit(p) + 1) is p = sigmoid(logit(q) / 3 - 1 / 3),
    # recovered within four standard errors (from the Fisher information at the truth).
    a_error, b_error = _platt_standard_errors(reported[fit], 1 / 3, -1 / 3)
    assert a_error < 0.01 and b_error < 0.04
    assert platt.a == pytest.approx(1 / 3, abs=4 * a_error)
    assert platt.b == pytest.approx(-1 / 3, abs=4 * b_error)

    report = before_after(reported[held_out], platt.apply(reported[held_out]), y[held_out])
    oracle = before_after(p[held_out], p[held_out], y[held_out]).after
    assert report.before.ece > 0.12
    assert report.after.ece < report.before.ece / 3
    assert report.after.ece < oracle.ece + 0.02
    assert report.after.log_loss < report.before.log_loss - 0.1
    assert report.after.log_loss == pytest.approx(oracle.log_loss, abs=0.01)
    assert report.after.brier < report.before.brier
    assert report.counts.n_real + report.counts.n_ai == held_out.size


def test_temperature_undoes_an_over_confident_detector() -> None:
    z, _, y = _labelled_truth(2)
    reported = expit(3.0 * z)
    fit, held_out = split_held_out(y, seed=5)
    temperature = fit_temperature(reported[fit], y[fit])
    assert temperature.a == pytest.approx(1 / 3, abs=0.03)
    assert temperature.temperature == pytest.approx(3.0, rel=0.1)

    calibrated = temperature.apply(reported[held_out])
    report = before_after(reported[held_out], calibrated, y[held_out])
    assert report.after.ece < report.before.ece / 3
    assert report.after.log_loss < report.before.log_loss - 0.1
    # It changes confidence, never the ranking or the side of 0.5.
    order = np.argsort(reported[held_out], kind="stable")
    assert np.all(np.diff(calibrated[order]) >= 0)
    assert np.array_equal(calibrated > 0.5, reported[held_out] > 0.5)


def test_platt_and_temperature_become_the_ensemble_calibration() -> None:
    z, _, y = _labelled_truth(3, n=2000)
    reported = expit(2.0 * z - 0.5)
    probes = np.array([0.0, 1e-9, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0])
    for calibrator in (fit_platt(reported, y), fit_temperature(reported, y)):
        stored = calibrator.to_calibration()
        assert isinstance(stored, Calibration)
        assert not stored.is_identity
        expected = [stored.apply(float(q)) for q in probes]
        assert calibrator.apply(probes) == pytest.approx(expected, rel=1e-12, abs=1e-15)
        config = EnsembleConfig(threshold=0.5, calibrations={"d": stored})
        entry = config.definition()["calibrations"]["d"]
        document = json.loads(json.dumps(calibrator.as_dict(), allow_nan=False))
        assert (entry["a"], entry["b"]) == (document["a"], document["b"])
        assert document["fitted_on"] == {
            "n_real": int((y == 0).sum()),
            "n_ai": int(y.sum()),
            "n_abstained": 0,
        }


def test_abstentions_are_left_out_of_fitting_and_counted() -> None:
    z, _, y = _labelled_truth(6, n=3000)
    reported = expit(2.0 * z)
    with_gaps = reported.copy()
    with_gaps[::7] = np.nan
    kept = ~np.isnan(with_gaps)
    for kind in ("platt", "temperature"):
        gapped = fit_calibrator(kind, with_gaps, y)
        assert gapped.as_dict() | {"fitted_on": None} == (
            fit_calibrator(kind, reported[kept], y[kept]).as_dict() | {"fitted_on": None}
        )
        assert gapped.as_dict()["fitted_on"]["n_abstained"] == int((~kept).sum())
        applied = gapped.apply(with_gaps)
        assert np.array_equal(np.isnan(applied), ~kept)


def test_a_perfectly_separating_detector_gets_a_finite_slope() -> None:
    scores = np.concatenate([np.full(40, 0.1), np.full(40, 0.9)])
    labels = np.concatenate([np.zeros(40, dtype=np.int64), np.ones(40, dtype=np.int64)])
    platt = fit_platt(scores, labels)
    assert math.isfinite(platt.a) and platt.a > 0
    # Platt's smoothed targets: the fitted probabilities are 1/42 and 41/42.
    assert platt.apply(np.array([0.1, 0.9])) == pytest.approx([1 / 42, 41 / 42], abs=1e-6)


def test_parametric_calibrators_refuse_a_missing_class() -> None:
    with pytest.raises(TooFewExamples, match="0 AI-generated") as refused:
        fit_platt(np.linspace(0, 1, 50), np.zeros(50, dtype=np.int64))
    assert refused.value.required_per_class == 10


def test_isotonic_refuses_small_sets_with_a_clear_message() -> None:
    z, _, y = _labelled_truth(7, n=200)
    scores = expit(z)
    scores[:5] = np.nan
    with pytest.raises(TooFewExamples) as refused:
        fit_isotonic(scores, y)
    message = str(refused.value)
    assert f"at least {ISOTONIC_MIN_PER_CLASS} scored examples of each class" in message
    assert "5 abstentions not counted" in message
    assert "Platt" in message


def test_isotonic_matches_scikit_learn_and_is_monotone() -> None:
    z, _, y = _labelled_truth(8, n=4000)
    reported = expit(3.0 * z + 1.0)
    fit, held_out = split_held_out(y, seed=1)
    isotonic = fit_isotonic(reported[fit], y[fit])
    reference = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
    reference.fit(reported[fit], y[fit])
    probes = np.concatenate([reported[held_out], [0.0, 1.0, np.nan]])
    applied = isotonic.apply(probes)
    assert applied[:-1] == pytest.approx(reference.predict(probes[:-1]), abs=1e-12)
    assert math.isnan(applied[-1])
    ordered = isotonic.apply(np.linspace(0, 1, 1001))
    assert np.all(np.diff(ordered) >= 0)
    report = before_after(reported[held_out], applied[: held_out.size], y[held_out])
    assert report.after.ece < report.before.ece / 2
    json.dumps(isotonic.as_dict(), allow_nan=False)
    stored = isotonic.to_calibration()  # as an ensemble configuration applies it
    assert [stored.apply(float(p)) for p in probes[:-1]] == pytest.approx(
        list(applied[:-1]), abs=1e-12
    )


def test_report_metrics_agree_with_scikit_learn_and_the_definition() -> None:
    rng = np.random.default_rng(9)
    p = rng.random(3000)
    p[:3] = [0.0, 1.0, 14 / 15]
    y = (rng.random(3000) < p**2).astype(np.int64)
    raw = p.copy()
    raw[10:20] = np.nan
    report = before_after(raw, p, y)
    kept = ~np.isnan(raw)
    assert report.counts.n_abstained == 10
    assert report.after.log_loss == pytest.approx(log_loss(y[kept], p[kept]), rel=1e-12)
    assert report.after.brier == pytest.approx(brier_score_loss(y[kept], p[kept]), rel=1e-12)
    assert report.after.ece == pytest.approx(_direct_ece(p[kept], y[kept]), rel=1e-12)
    assert report.before == report.after
    assert report.after.ece > 0.05  # p^2 is not p: the check can fail


def test_held_out_split_is_stratified_and_seeded() -> None:
    y = np.array([1] * 300 + [0] * 700, dtype=np.int64)
    fit, held_out = split_held_out(y, held_out_share=0.2, seed=12)
    assert held_out.size == 200 and fit.size == 800
    assert np.intersect1d(fit, held_out).size == 0
    assert np.array_equal(np.union1d(fit, held_out), np.arange(1000))
    assert y[held_out].sum() == 60
    again = split_held_out(y, held_out_share=0.2, seed=12)
    assert np.array_equal(again[1], held_out)
    assert not np.array_equal(split_held_out(y, held_out_share=0.2, seed=13)[1], held_out)


def _two_detectors(seed: int, n: int = 6000) -> tuple[FloatArray, IntArray]:
    """An informative detector that abstains more on AI-generated images, and pure noise
    that abstains at random."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int64)
    informative = expit(rng.normal(np.where(y == 1, 1.5, -1.5), 1.0))
    informative[rng.random(n) < np.where(y == 1, 0.4, 0.1)] = np.nan
    noise = rng.random(n)
    noise[rng.random(n) < 0.3] = np.nan
    return np.column_stack([informative, noise]), y


def test_combination_ignores_noise_and_weighs_abstentions() -> None:
    matrix, y = _two_detectors(10)
    combination = fit_combination(matrix, y, detectors=["pixels", "noise"])
    w_pixels, w_noise = combination.weights
    assert w_pixels > 1.0
    assert abs(w_noise) < 0.05 * w_pixels
    # "pixels" abstains four times as often on AI-generated images: learnt as evidence.
    assert combination.abstention_weights[0] > 0.5
    assert abs(combination.abstention_weights[1]) < 0.2
    assert all(math.isfinite(v) for v in (*combination.weights, *combination.abstention_weights))

    both_abstained = np.asarray(np.isnan(matrix).all(axis=1), dtype=np.bool_)
    assert both_abstained.any()
    assert combination.fitted_on.n_abstained == int(both_abstained.sum())
    combined = combination.apply(matrix)
    assert np.array_equal(np.isnan(combined), both_abstained)
    fit, held_out = split_held_out(y, seed=0)
    refit = fit_combination(matrix[fit], y[fit], detectors=["pixels", "noise"])
    answered = held_out[~both_abstained[held_out]]
    report = before_after(
        np.full(answered.size, y[fit].mean()), refit.apply(matrix[answered]), y[answered]
    )
    assert report.after.log_loss < report.before.log_loss - 0.2

    document = json.loads(json.dumps(combination.as_dict(), allow_nan=False))
    assert [d["name"] for d in document["detectors"]] == ["pixels", "noise"]
    assert fit_combination(matrix, y, detectors=["pixels", "noise"]) == combination


def test_combination_uses_the_calibrated_logits() -> None:
    matrix, y = _two_detectors(11, n=3000)
    column = matrix[:, 0]
    answered = ~np.isnan(column)
    platt = fit_platt(column[answered], y[answered])
    combination = fit_combination(
        matrix, y, detectors=["pixels", "noise"], calibrators={"pixels": platt}
    )
    features = combination.features(matrix)
    calibrated = platt.apply(column[answered])
    assert features[answered, 0] == pytest.approx(np.log(calibrated / (1 - calibrated)))
    assert np.all(features[~answered, 0] == 0.0)
    assert np.array_equal(features[:, 2], (~answered).astype(np.float64))
    # A Platt calibration is linear in the logit: the product of slopes is unchanged.
    raw = fit_combination(matrix, y, detectors=["pixels", "noise"])
    assert combination.weights[0] * platt.a == pytest.approx(raw.weights[0], rel=0.05)
    assert combination.as_dict()["detectors"][0]["calibration"]["kind"] == "platt"
    with pytest.raises(ValueError, match="not in the matrix"):
        fit_combination(matrix, y, detectors=["a", "b"], calibrators={"pixels": platt})
