"""The ensemble: a weighted mean (or a fitted logistic combination) of calibrated scores;
abstentions never count as "human"; stored definitions read back to the same version."""

from __future__ import annotations

import json
import math

import pytest

from db.models import VerdictLabel
from workers.detectors.registry import BUILTIN_SPECS
from workers.ensemble import (
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
    assert decision.label == VerdictLabel.LIKELY_AI
    assert "not proof" in decision.reason
    assert "a 0.90" in decision.reason and "b 0.30" in decision.reason


def test_score_equal_to_threshold_is_flagged() -> None:
    decision = combine([DetectorScore("a", "1", 0.5)], EnsembleConfig(threshold=0.5))
    assert decision.flagged and decision.label == VerdictLabel.LIKELY_AI


def test_below_threshold_is_no_indication() -> None:
    decision = combine([DetectorScore("a", "1", 0.2)], EnsembleConfig(threshold=0.5))
    assert decision.ai_score == pytest.approx(0.2)
    assert not decision.flagged
    assert decision.label == VerdictLabel.NO_INDICATION


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
    assert decision.label == VerdictLabel.INCONCLUSIVE
    assert not decision.flagged
    assert "1 failed: m" in decision.reason


def test_failed_detector_is_named_in_reason() -> None:
    decision = combine(
        [DetectorScore("a", "1", 0.1), DetectorScore("b", "1", None, error="boom")],
        EnsembleConfig(),
    )
    assert decision.label == VerdictLabel.NO_INDICATION
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
            DetectorScore("provenance", "1", 1.0, summary="C2PA: created by Adobe Firefly"),
        ],
        EnsembleConfig(threshold=0.9, decisive=frozenset({"provenance"})),
    )
    assert decision.ai_score == pytest.approx(0.525)
    assert decision.flagged and decision.label == VerdictLabel.LIKELY_AI
    assert decision.reason.startswith("provenance: C2PA: created by Adobe Firefly")
    assert "not proof" in decision.reason


def test_decisive_detector_that_abstains_changes_nothing() -> None:
    decision = combine(
        [DetectorScore("model", "1", 0.2), DetectorScore("provenance", "1", None)],
        EnsembleConfig(decisive=frozenset({"provenance"})),
    )
    assert decision.ai_score == pytest.approx(0.2)
    assert not decision.flagged and decision.label == VerdictLabel.NO_INDICATION


def test_a_positive_answer_of_a_detector_that_is_not_decisive_is_only_averaged() -> None:
    decision = combine(
        [DetectorScore("model", "1", 0.05), DetectorScore("provenance", "1", 1.0)],
        EnsembleConfig(threshold=0.9),
    )
    assert not decision.flagged and decision.ai_score == pytest.approx(0.525)


def test_decisive_rules_come_from_the_detector_specs() -> None:
    specs = [BUILTIN_SPECS["provenance"], BUILTIN_SPECS["sumsub-mj5"]]
    config = EnsembleConfig.for_detectors(specs, threshold=0.5)
    assert config.decisive == frozenset({"provenance"})
    assert EnsembleConfig.for_detectors(specs[1:], threshold=0.5).decisive == frozenset()


@pytest.mark.parametrize(
    "changed",
    [
        EnsembleConfig(threshold=0.6),
        EnsembleConfig(weights={"a": 2.0}),
        EnsembleConfig(calibrations={"a": Calibration(a=1.5, b=0.0)}),
        EnsembleConfig(decisive=frozenset({"a"})),
        EnsembleConfig(decisive=frozenset({"a"}), decisive_min_score=0.9),
    ],
    ids=["threshold", "weights", "calibration", "decisive", "decisive-score"],
)
def test_everything_that_decides_a_verdict_is_in_the_config_digest(
    changed: EnsembleConfig,
) -> None:
    base = EnsembleConfig()
    assert changed.digest != base.digest
    assert changed.version != base.version
    assert changed.version.startswith("weighted-mean@")


def test_configs_that_decide_alike_share_their_digest() -> None:
    """Defaults written out (weight 1, identity calibration) mean what leaving them out
    means: the same verdicts, so the same version."""
    explicit = EnsembleConfig(weights={"a": 1.0}, calibrations={"a": Calibration()})
    assert explicit.digest == EnsembleConfig().digest
    assert EnsembleConfig(threshold=0.5).definition() == EnsembleConfig().definition()


def test_an_ensemble_config_refuses_impossible_values() -> None:
    with pytest.raises(ValueError, match="threshold"):
        EnsembleConfig(threshold=1.5)
    with pytest.raises(ValueError, match="weights must be finite and >= 0: a"):
        EnsembleConfig(weights={"a": -1.0})
    with pytest.raises(ValueError, match="weights must be finite and >= 0: a"):
        EnsembleConfig(weights={"a": math.inf})
    with pytest.raises(ValueError, match="calibration must be finite"):
        EnsembleConfig(calibrations={"a": Calibration(a=math.nan)})
    with pytest.raises(ValueError, match="logistic rule"):
        EnsembleConfig(intercept=0.5)
    with pytest.raises(ValueError, match="unknown ensemble rule"):
        EnsembleConfig(rule="median")  # type: ignore[arg-type]


def test_weights_of_detectors_outside_the_ensemble_make_no_new_version() -> None:
    specs = [BUILTIN_SPECS["provenance"], BUILTIN_SPECS["sumsub-mj5"]]
    plain = EnsembleConfig.for_detectors(specs, threshold=0.5)
    unrelated = EnsembleConfig.for_detectors(
        specs,
        threshold=0.5,
        weights={"sumsub-v2": 3.0},
        calibrations={"sumsub-v2": Calibration(a=2.0)},
    )
    assert unrelated.version == plain.version
    member = EnsembleConfig.for_detectors(specs, threshold=0.5, weights={"sumsub-mj5": 3.0})
    assert member.version != plain.version


# --- stored configurations, the logistic rule, isotonic calibration ---------------------


def test_the_versions_of_existing_configurations_never_change() -> None:
    """Verdicts carry these versions: a new feature must leave old definitions alone."""
    assert EnsembleConfig().version == "weighted-mean@066c9f0d6f5577e5"
    config = EnsembleConfig(
        threshold=0.7,
        weights={"a": 2.0, "b": 1.0},
        calibrations={"a": Calibration(1.5, -0.2)},
        decisive=frozenset({"provenance"}),
        review_unscored=frozenset({"truncated"}),
    )
    assert config.digest == "aeba556b025d8f4d147a78b301d1f5667be684fd10a0a0e7e9d9053c8ad420fe"


def _s(name: str, score: float | None) -> DetectorScore:
    return DetectorScore(name, "1", score)


def _logistic() -> EnsembleConfig:
    return EnsembleConfig(
        rule="logistic",
        threshold=0.6,
        weights={"mj5": 1.2, "cf": -0.3},
        calibrations={
            "mj5": Calibration(0.8, 0.1),
            "cf": Calibration(x=(0.0, 0.5, 1.0), y=(0.1, 0.4, 0.9)),
        },
        intercept=-0.4,
        abstention_weights={"cf": 0.7},
    )


@pytest.mark.parametrize("config", [EnsembleConfig(threshold=0.3), _logistic()])
def test_a_stored_definition_reads_back_to_the_same_configuration(config: EnsembleConfig) -> None:
    again = EnsembleConfig.from_definition(config.definition())
    assert again.definition() == config.definition() and again.version == config.version
    edited = {**config.definition(), "weights": {"mj5": 1.0, "x": 1.0}}
    if config.rule == "weighted-mean":  # 1.0 is the default there: not canonical
        with pytest.raises(ValueError, match="canonical"):
            EnsembleConfig.from_definition(edited)
    with pytest.raises(ValueError, match="unknown ensemble rule"):
        EnsembleConfig.from_definition({**config.definition(), "rule": "vote"})


def test_the_logistic_rule_is_the_fitted_formula() -> None:
    config = _logistic()
    both = combine([_s("mj5", 0.9), _s("cf", 0.25)], config)
    p_mj5 = 1 / (1 + math.exp(-(0.8 * math.log(0.9 / 0.1) + 0.1)))
    p_cf = 0.1 + (0.4 - 0.1) * (0.25 - 0.0) / 0.5
    z = -0.4 + 1.2 * math.log(p_mj5 / (1 - p_mj5)) - 0.3 * math.log(p_cf / (1 - p_cf))
    assert both.ai_score == pytest.approx(1 / (1 + math.exp(-z)))
    # cf abstains: its abstention weight is added, its logit is not.
    silent = combine([_s("mj5", 0.9), _s("cf", None)], config)
    z_silent = -0.4 + 0.7 + 1.2 * math.log(p_mj5 / (1 - p_mj5))
    assert silent.ai_score == pytest.approx(1 / (1 + math.exp(-z_silent)))
    assert silent.flagged == (silent.ai_score >= 0.6)
    nobody = combine([_s("mj5", None), _s("cf", None)], config)
    assert nobody.label == VerdictLabel.INCONCLUSIVE and nobody.ai_score is None


def test_an_isotonic_calibration_interpolates_and_stays_flat_beyond_its_ends() -> None:
    iso = Calibration(x=(0.2, 0.6, 0.8), y=(0.1, 0.3, 0.9))
    assert iso.kind == "isotonic" and not iso.is_identity
    assert iso.apply(0.0) == 0.1 and iso.apply(1.0) == 0.9
    assert iso.apply(0.4) == pytest.approx(0.2) and iso.apply(0.7) == pytest.approx(0.6)
    assert Calibration.from_definition(iso.definition()) == iso
    with pytest.raises(ValueError, match="must not decrease"):
        Calibration(x=(0.2, 0.1), y=(0.1, 0.2))
    with pytest.raises(ValueError, match="at least two"):
        Calibration(x=(0.2,), y=(0.1,))


def test_under_a_fitted_logistic_rule_a_decisive_finding_flags_whatever_its_weight() -> None:
    """A check that never answered on the fit split gets a weight of 0: it must still flag,
    and a row where only it answered is not 'no detector produced a score'."""
    config = EnsembleConfig(
        rule="logistic",
        threshold=0.9,
        weights={"mj5": 1.5, "provenance": 0.0},
        intercept=-2.0,
        decisive=frozenset({"provenance"}),
    )
    claim = combine([_s("mj5", 0.01), _s("provenance", 1.0)], config)
    assert claim.flagged and claim.label == VerdictLabel.LIKELY_AI
    alone = combine([DetectorScore("mj5", "1", None, error="boom"), _s("provenance", 1.0)], config)
    assert alone.ai_score == pytest.approx(1 / (1 + math.exp(2.0))) and alone.flagged


def test_a_definition_writes_no_negative_zero_and_refuses_a_legacy_record() -> None:
    config = EnsembleConfig(rule="logistic", weights={"a": 1.0}, intercept=-0.0)
    assert '"intercept":0.0' in json.dumps(config.definition(), separators=(",", ":"))
    assert config.version == EnsembleConfig(rule="logistic", weights={"a": 1.0}).version
    with pytest.raises(ValueError, match="legacy"):
        EnsembleConfig.from_definition({"rule": "weighted-mean", "legacy_version": "v0"})
