"""The Neyman-Pearson threshold keeps its false-positive guarantee, checked against the
true false-positive rate of known score distributions; the review-volume threshold flags
the share asked for and never more."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest
from scipy.stats import beta as beta_distribution
from scipy.stats import binom

from workers.ensemble import DetectorScore, EnsembleConfig, combine
from workers.evaluation.threshold import (
    TooFewRealImages,
    neyman_pearson_threshold,
    required_real_images,
    threshold_for_review_volume,
    violation_probability,
)

DRAWS = 2000


def _three_sigma(p: float, draws: int = DRAWS) -> float:
    return 3 * math.sqrt(p * (1 - p) / draws)


def test_299_real_images_bound_a_1_percent_rate_with_95_percent_confidence() -> None:
    assert required_real_images(0.01, 0.05) == 299
    # The definition: the fewest n with (1 - alpha)^n <= delta.
    assert 0.99**299 <= 0.05 < 0.99**298


def test_one_image_short_is_refused_and_says_how_many_more() -> None:
    scores = np.linspace(0.0, 0.5, 298)
    with pytest.raises(TooFewRealImages) as refused:
        neyman_pearson_threshold(np.append(scores, [np.nan] * 5), alpha=0.01, delta=0.05)
    assert refused.value.n_required == 299
    assert refused.value.n_real == 298
    assert refused.value.n_abstained == 5
    assert refused.value.more_needed == 1
    assert "299" in str(refused.value) and "1 more" in str(refused.value)

    # At exactly the minimum only the largest real score will do.
    result = neyman_pearson_threshold(np.linspace(0.0, 0.5, 299), alpha=0.01, delta=0.05)
    assert result.k == 299
    assert result.order_statistic == 0.5
    assert result.violation_probability == pytest.approx(0.99**299)


@pytest.mark.parametrize(("alpha", "delta"), [(0.05, 0.1), (0.01, 0.05), (0.2, 0.01), (0.001, 0.5)])
def test_required_count_is_the_first_feasible_one(alpha: float, delta: float) -> None:
    n = required_real_images(alpha, delta)
    assert (1 - alpha) ** n <= delta < (1 - alpha) ** (n - 1)


def test_k_is_the_smallest_order_statistic_within_delta() -> None:
    rng = np.random.default_rng(11)
    scores = rng.beta(2, 5, size=500)
    result = neyman_pearson_threshold(scores, alpha=0.05, delta=0.1)
    n, k = 500, result.k
    assert binom.sf(k - 1, n, 0.95) <= 0.1 < binom.sf(k - 2, n, 0.95)
    assert result.violation_probability == pytest.approx(binom.sf(k - 1, n, 0.95))
    assert result.violation_probability == pytest.approx(violation_probability(k, n, 0.05))
    # The direct sum from the definition.
    direct = sum(math.comb(n, j) * 0.95**j * 0.05 ** (n - j) for j in range(k, n + 1))
    assert result.violation_probability == pytest.approx(direct, rel=1e-9)


def test_threshold_sits_just_above_an_actual_real_score() -> None:
    rng = np.random.default_rng(3)
    scores = rng.beta(2, 5, size=400)
    result = neyman_pearson_threshold(scores, alpha=0.05, delta=0.1)
    assert result.order_statistic in set(scores.tolist())
    assert result.order_statistic == np.sort(scores)[result.k - 1]
    assert result.threshold == math.nextafter(result.order_statistic, math.inf)
    # Under ">=", exactly the real scores above the k-th smallest are flagged.
    flagged = np.count_nonzero(scores >= result.threshold)
    assert flagged == 400 - result.k
    assert result.empirical_fpr == flagged / 400
    assert result.n_real == 400 and result.n_abstained == 0
    assert json.loads(json.dumps(result.as_dict(), allow_nan=False))["k"] == result.k


def test_the_ensemble_flags_exactly_the_scores_above_the_order_statistic() -> None:
    rng = np.random.default_rng(5)
    scores = rng.beta(2, 5, size=300)
    result = neyman_pearson_threshold(scores, alpha=0.05, delta=0.1)
    config = EnsembleConfig(threshold=result.threshold)
    for score in (result.order_statistic, result.threshold, *scores[:50].tolist()):
        decision = combine([DetectorScore("d", "1", score)], config)
        assert decision.flagged == (score > result.order_statistic)


def test_abstentions_are_left_out_and_counted() -> None:
    rng = np.random.default_rng(8)
    scores = rng.beta(2, 5, size=300)
    with_gaps = np.concatenate([scores, np.full(40, np.nan)])
    rng.shuffle(with_gaps)
    without = neyman_pearson_threshold(scores, alpha=0.05, delta=0.1)
    with_abstentions = neyman_pearson_threshold(with_gaps, alpha=0.05, delta=0.1)
    assert with_abstentions == replace(without, n_abstained=40)


def _np_thresholds(samples: npt.NDArray[np.float64], alpha: float, delta: float) -> list[float]:
    return [neyman_pearson_threshold(row, alpha=alpha, delta=delta).threshold for row in samples]


def test_guarantee_holds_by_simulation_and_a_naive_quantile_breaks_it() -> None:
    alpha, delta, n = 0.05, 0.1, 200
    rng = np.random.default_rng(20180202)
    samples = rng.beta(2, 5, size=(DRAWS, n))
    thresholds = np.array(_np_thresholds(samples, alpha, delta))
    # Real scores are continuous, so P(S >= t) is the survival function at t.
    true_fpr = beta_distribution.sf(thresholds, 2, 5)
    violated = float(np.mean(true_fpr > alpha))
    assert violated <= delta + _three_sigma(delta)
    # With a continuous distribution the bound is attained: the rule is not merely loose.
    bound = neyman_pearson_threshold(samples[0], alpha=alpha, delta=delta).violation_probability
    assert abs(violated - bound) <= _three_sigma(bound)

    naive = np.quantile(samples, 1 - alpha, axis=1)
    naive_violated = float(np.mean(beta_distribution.sf(naive, 2, 5) > alpha))
    assert naive_violated > 0.3 > delta + _three_sigma(delta)


def _atom_sample(rng: np.random.Generator, size: tuple[int, int]) -> npt.NDArray[np.float64]:
    """Half the real images at 0.2, 47 % at exactly 0.7 (the 95 % quantile sits on that
    tie), the rest uniform on (0.7, 1)."""
    u = rng.random(size)
    tail = rng.uniform(0.7, 1.0, size)
    return np.where(u < 0.5, 0.2, np.where(u < 0.97, 0.7, tail))


def _atom_fpr(t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """P(S >= t) for the distribution of :func:`_atom_sample`."""
    return np.asarray(
        0.5 * (t <= 0.2) + 0.47 * (t <= 0.7) + 0.03 * np.clip((1.0 - t) / 0.3, 0.0, 1.0),
        dtype=np.float64,
    )


def test_ties_do_not_break_the_guarantee_under_greater_or_equal() -> None:
    alpha, delta, n = 0.05, 0.1, 200
    rng = np.random.default_rng(7)
    samples = _atom_sample(rng, (DRAWS, n))
    results = [neyman_pearson_threshold(row, alpha=alpha, delta=delta) for row in samples]
    thresholds = np.array([r.threshold for r in results])
    order_statistics = np.array([r.order_statistic for r in results])
    assert np.mean(order_statistics == 0.7) > 0.2  # the tie is hit often
    assert np.mean(_atom_fpr(thresholds) > alpha) <= delta + _three_sigma(delta)
    # Flagging ">=" the order statistic itself would flag the whole tie at 0.7.
    assert np.mean(_atom_fpr(order_statistics) > alpha) > 0.2


def test_all_identical_real_scores_flag_no_real_image() -> None:
    result = neyman_pearson_threshold(np.full(500, 0.4), alpha=0.05, delta=0.1)
    assert result.order_statistic == 0.4
    assert result.threshold > 0.4
    assert result.empirical_fpr == 0.0
    assert not result.flags_nothing
    saturated = neyman_pearson_threshold(np.full(500, 1.0), alpha=0.05, delta=0.1)
    assert saturated.flags_nothing and saturated.empirical_fpr == 0.0


@pytest.mark.parametrize(
    ("alpha", "delta", "scores"),
    [(0.0, 0.1, [0.5] * 100), (0.05, 1.0, [0.5] * 100), (0.05, 0.1, [0.5, 1.5] * 50)],
)
def test_bad_arguments_are_refused(alpha: float, delta: float, scores: list[float]) -> None:
    with pytest.raises(ValueError, match="within"):
        neyman_pearson_threshold(scores, alpha=alpha, delta=delta)


def test_review_volume_flags_the_share_asked_for() -> None:
    rng = np.random.default_rng(2)
    scores = rng.random(1000)
    result = threshold_for_review_volume(scores, 0.02)
    assert result.flagged == 20 == np.count_nonzero(scores >= result.threshold)
    assert result.threshold in set(scores.tolist())
    assert result.flagged_share == 0.02
    assert threshold_for_review_volume(scores, 0.29).flagged == 290
    assert threshold_for_review_volume(scores, 1.0).threshold == scores.min()
    nothing = threshold_for_review_volume(scores, 0.0)
    assert nothing.flagged == 0 == np.count_nonzero(scores >= nothing.threshold)


def test_review_volume_ties_are_flagged_together_and_never_over_budget() -> None:
    scores = np.array([0.1] * 90 + [0.8] * 6 + [0.9] * 3 + [0.95] + [np.nan] * 10)
    result = threshold_for_review_volume(scores, 0.05)  # a budget of 5 of the 100 scored
    assert (result.n_scored, result.n_abstained) == (100, 10)
    # The six at 0.8 would exceed the budget: only the four above them are flagged.
    assert result.threshold == 0.9
    assert result.flagged == 4 == np.count_nonzero(scores >= result.threshold)
    assert threshold_for_review_volume(scores, 0.10).flagged == 10
    top_tie = threshold_for_review_volume(np.array([0.9] * 10 + [0.1] * 90), 0.05)
    assert top_tie.flagged == 0 and top_tie.threshold > 0.9


def test_review_volume_refuses_only_abstentions() -> None:
    with pytest.raises(ValueError, match="abstention"):
        threshold_for_review_volume([np.nan, np.nan], 0.1)
