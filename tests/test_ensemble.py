"""Ensemble v0: weighted mean of calibrated scores; abstentions never count as "human"."""

from __future__ import annotations

import math

import pytest

from workers.ensemble import (
    INCONCLUSIVE,
    LIKELY_AI,
    NO_INDICATION,
    Calibration,
    DetectorScore,
    EnsembleConfig,
    combine,
)


def test_weighted_mean_and_flag_at_threshold() -> None:
    scores = [DetectorScore("a", "1", 0.9), DetectorScore("b", "1", 0.3)]
    decision = combine(scores, EnsembleConfig(threshold=0.5, weights={"a": 3.0}))
    assert decision.ai_score == pytest.approx((3 * 0.9 + 0.3) / 4)
    assert decision.flagged is True
    assert decision.label == LIKELY_AI
    assert "not proof" in decision.reason
    assert "a 0.90" in decision.reason and "b 0.30" in decision.reason


def test_score_equal_to_threshold_is_flagged() -> None:
    decision = combine([DetectorScore("a", "1", 0.5)], EnsembleConfig(threshold=0.5))
    assert decision.flagged and decision.label == LIKELY_AI


def test_below_threshold_is_no_indication() -> None:
    decision = combine([DetectorScore("a", "1", 0.2)], EnsembleConfig(threshold=0.5))
    assert decision.ai_score == pytest.approx(0.2)
    assert not decision.flagged
    assert decision.label == NO_INDICATION


def test_abstention_is_left_out_not_counted_as_human() -> None:
    with_abstention = combine(
        [DetectorScore("model", "1", 0.8), DetectorScore("provenance", "1", None)],
        EnsembleConfig(threshold=0.5),
    )
    assert with_abstention.ai_score == pytest.approx(0.8)
    assert with_abstention.flagged


def test_nobody_answered_is_inconclusive_and_not_flagged() -> None:
    decision = combine(
        [DetectorScore("p", "1", None), DetectorScore("m", "1", None, error="RuntimeError: x")],
        EnsembleConfig(),
    )
    assert decision.ai_score is None
    assert decision.label == INCONCLUSIVE
    assert not decision.flagged
    assert "1 failed: m" in decision.reason


def test_failed_detector_is_named_in_reason() -> None:
    decision = combine(
        [DetectorScore("a", "1", 0.1), DetectorScore("b", "1", None, error="boom")],
        EnsembleConfig(),
    )
    assert decision.label == NO_INDICATION
    assert "b failed" in decision.reason


def test_zero_weight_excludes_a_detector() -> None:
    decision = combine(
        [DetectorScore("a", "1", 0.9), DetectorScore("b", "1", 0.1)],
        EnsembleConfig(weights={"a": 0.0}),
    )
    assert decision.ai_score == pytest.approx(0.1)


def test_calibration_is_platt_scaling_on_the_logit() -> None:
    calibration = Calibration(a=2.0, b=-1.0)
    p = 0.7
    expected = 1 / (1 + math.exp(-(2.0 * math.log(p / (1 - p)) - 1.0)))
    assert calibration.apply(p) == pytest.approx(expected)
    assert Calibration().apply(0.3) == 0.3
    decision = combine(
        [DetectorScore("a", "1", p)], EnsembleConfig(calibrations={"a": calibration})
    )
    assert decision.ai_score == pytest.approx(expected)


def test_digest_changes_with_versions_and_scores_but_not_order() -> None:
    one = combine([DetectorScore("a", "1", 0.2), DetectorScore("b", "1", 0.4)], EnsembleConfig())
    swapped = combine(
        [DetectorScore("b", "1", 0.4), DetectorScore("a", "1", 0.2)], EnsembleConfig()
    )
    new_version = combine(
        [DetectorScore("a", "2", 0.2), DetectorScore("b", "1", 0.4)], EnsembleConfig()
    )
    new_score = combine(
        [DetectorScore("a", "1", 0.3), DetectorScore("b", "1", 0.4)], EnsembleConfig()
    )
    assert one.detector_set_digest == swapped.detector_set_digest
    assert one.detector_set_digest != new_version.detector_set_digest
    assert one.detector_set_digest != new_score.detector_set_digest


def test_decisive_positive_flags_whatever_the_models_say() -> None:
    decision = combine(
        [
            DetectorScore("model", "1", 0.05),
            DetectorScore(
                "provenance", "1", 1.0, decisive=True, summary="C2PA: created by Adobe Firefly"
            ),
        ],
        EnsembleConfig(threshold=0.9),
    )
    assert decision.ai_score == pytest.approx(0.525)
    assert decision.flagged and decision.label == LIKELY_AI
    assert decision.reason.startswith("provenance: C2PA: created by Adobe Firefly")
    assert "not proof" in decision.reason


def test_decisive_detector_that_abstains_changes_nothing() -> None:
    decision = combine(
        [DetectorScore("model", "1", 0.2), DetectorScore("provenance", "1", None, decisive=True)],
        EnsembleConfig(),
    )
    assert decision.ai_score == pytest.approx(0.2)
    assert not decision.flagged and decision.label == NO_INDICATION
