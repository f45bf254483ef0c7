"""Detector metrics: checked against scikit-learn and scipy, against direct definitions, and
for the handling of abstentions, single-class sets and groups."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    roc_auc_score,
    roc_curve,
)

from workers.evaluation.metrics import (
    Interval,
    _ranking,
    clopper_pearson,
    compute_metrics,
    metrics_by_group,
    reliability_bins,
    roc_points,
)


def labelled(
    n: int, seed: int, *, decimals: int | None = None, shift: float = 0.15
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """A detector whose scores lean towards the label; ``decimals`` rounds them so that
    many images share a score."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.clip(rng.normal(0.5 + shift * (2 * labels - 1), 0.2), 0.0, 1.0)
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, labels


def direct_ece(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]) -> float:
    edges = np.linspace(0.0, 1.0, 16)
    total = 0.0
    for i in range(15):
        upper_ok = scores <= edges[i + 1] if i == 14 else scores < edges[i + 1]
        members = (scores >= edges[i]) & upper_ok
        if members.any():
            gap = abs(labels[members].mean() - scores[members].mean())
            total += members.sum() / scores.size * gap
    return total


def sklearn_tpr_at(scores: npt.ArrayLike, labels: npt.ArrayLike, target: float) -> float:
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= target].max())


CASES = [
    pytest.param(dict(n=800, seed=1), id="continuous"),
    pytest.param(dict(n=800, seed=2, decimals=1), id="ties-1dp"),
    pytest.param(dict(n=500, seed=3, decimals=2, shift=0.3), id="ties-2dp"),
    pytest.param(dict(n=60, seed=4, decimals=0), id="only-0-and-1"),
]


@pytest.mark.parametrize("case", CASES)
def test_matches_scikit_learn(case: dict[str, int]) -> None:
    scores, labels = labelled(**case)
    m = compute_metrics(scores, labels, threshold=0.5, n_bootstrap=0)

    assert m.roc_auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m.average_precision == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert m.brier == pytest.approx(brier_score_loss(labels, scores), abs=1e-12)
    flagged = (scores >= 0.5).astype(int)
    assert m.accuracy == pytest.approx(accuracy_score(labels, flagged), abs=1e-12)
    assert m.tpr_at_1pct_fpr == pytest.approx(sklearn_tpr_at(scores, labels, 0.01), abs=1e-12)
    assert m.tpr_at_5pct_fpr == pytest.approx(sklearn_tpr_at(scores, labels, 0.05), abs=1e-12)
    assert m.fpr_at_threshold == pytest.approx(flagged[labels == 0].mean(), abs=1e-12)
    assert m.tpr_at_threshold == pytest.approx(flagged[labels == 1].mean(), abs=1e-12)
    assert m.ece == pytest.approx(direct_ece(scores, labels), abs=1e-12)
    assert (m.n, m.n_ai, m.n_real) == (labels.size, labels.sum(), (labels == 0).sum())


@pytest.mark.parametrize("case", CASES)
def test_roc_points_match_scikit_learn(case: dict[str, int]) -> None:
    scores, labels = labelled(**case)
    ours = roc_points(scores, labels)
    assert ours is not None
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(ours.fpr, fpr, atol=1e-12)
    np.testing.assert_allclose(ours.tpr, tpr, atol=1e-12)
    np.testing.assert_array_equal(ours.thresholds, thresholds)


def test_tpr_at_fpr_never_splits_a_tie() -> None:
    # Ten real images: one at 0.9, the rest low. Ten AI images: five tied with that real
    # image, five below. Flagging the tie costs 10 % FPR, so at 5 % only the (0, 0) point
    # qualifies; a curve interpolated inside the tie would claim TPR 0.25.
    scores = np.array([0.9] + [0.1] * 9 + [0.9] * 5 + [0.5] * 5)
    labels = np.array([0] * 10 + [1] * 10)
    m = compute_metrics(scores, labels, n_bootstrap=0)
    assert m.tpr_at_5pct_fpr == 0.0
    assert m.tpr_at_5pct_fpr == sklearn_tpr_at(scores, labels, 0.05)


def test_threshold_flags_scores_equal_to_it() -> None:
    scores = np.array([0.2, 0.5, 0.5, 0.8])
    labels = np.array([0, 0, 1, 1])
    m = compute_metrics(scores, labels, threshold=0.5, n_bootstrap=0)
    assert m.fpr_at_threshold == 0.5
    assert m.tpr_at_threshold == 1.0
    assert m.accuracy == 0.75


def test_ece_at_bin_edges_matches_the_direct_loop() -> None:
    edges = np.linspace(0.0, 1.0, 16)
    rng = np.random.default_rng(7)
    scores = np.concatenate([edges, edges, rng.random(200)])
    labels = rng.integers(0, 2, scores.size)
    m = compute_metrics(scores, labels, n_bootstrap=0)
    assert m.ece == pytest.approx(direct_ece(scores, labels), abs=1e-12)


def test_reliability_bins_are_the_terms_of_the_ece() -> None:
    scores, labels = labelled(600, 11)
    bins = reliability_bins(scores, labels)
    assert len(bins) == 15
    assert sum(b.count for b in bins) == scores.size
    assert bins[0].lower == 0.0
    assert bins[-1].upper == 1.0
    ece = 0.0
    for b in bins:
        inside = (scores >= b.lower) & (
            (scores <= b.upper) if b.upper == 1.0 else (scores < b.upper)
        )
        assert b.count == inside.sum()
        if b.count == 0:
            assert b.mean_predicted is None
            assert b.observed_frequency is None
            continue
        assert b.mean_predicted is not None
        assert b.observed_frequency is not None
        assert b.mean_predicted == pytest.approx(scores[inside].mean())
        assert b.observed_frequency == pytest.approx(labels[inside].mean())
        ece += b.count / scores.size * abs(b.mean_predicted - b.observed_frequency)
    m = compute_metrics(scores, labels, n_bootstrap=0)
    assert m.ece == pytest.approx(ece, abs=1e-12)
    assert any(b.count == 0 for b in reliability_bins([0.05, 0.95], [0, 1]))


def test_clopper_pearson_known_values() -> None:
    none = clopper_pearson(0, 10)
    assert none.low == 0.0
    assert none.high == pytest.approx(0.3085, abs=5e-5)
    every = clopper_pearson(10, 10)
    assert every.low == pytest.approx(0.6915, abs=5e-5)
    assert every.high == 1.0


@pytest.mark.parametrize(
    ("k", "n", "confidence"),
    [(0, 10, 0.95), (3, 10, 0.95), (10, 10, 0.95), (7, 250, 0.95), (40, 97, 0.9), (1, 2, 0.99)],
)
def test_clopper_pearson_matches_scipy_binomtest(k: int, n: int, confidence: float) -> None:
    ours = clopper_pearson(k, n, confidence)
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    assert ours.low == pytest.approx(ref.low, abs=1e-10)
    assert ours.high == pytest.approx(ref.high, abs=1e-10)


def test_clopper_pearson_covers_at_least_nominally() -> None:
    # Exact coverage at a true FPR of 1 % over 300 real images: the probability, under the
    # binomial, that the interval drawn contains the truth.
    n, p = 300, 0.01
    covered = sum(
        stats.binom.pmf(k, n, p) for k in range(n + 1) if p in clopper_pearson(k, n, 0.95)
    )
    assert covered >= 0.95


def test_rates_carry_exact_intervals() -> None:
    scores, labels = labelled(300, 5)
    m = compute_metrics(scores, labels, threshold=0.6, n_bootstrap=0)
    real_flagged = int(((scores >= 0.6) & (labels == 0)).sum())
    assert m.fpr_at_threshold_ci == clopper_pearson(real_flagged, int((labels == 0).sum()))
    assert m.accuracy_ci is not None
    assert m.tpr_at_threshold_ci is not None
    for value, interval in [
        (m.accuracy, m.accuracy_ci),
        (m.fpr_at_threshold, m.fpr_at_threshold_ci),
        (m.tpr_at_threshold, m.tpr_at_threshold_ci),
    ]:
        assert value in interval


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_n() -> None:
    # shift=0.3 with sd 0.2 is a confident, miscalibrated detector: its ECE is far from 0,
    # where the estimator's upward bias would push the interval off the estimate.
    small = compute_metrics(*labelled(200, 21, shift=0.3), seed=1)
    large = compute_metrics(*labelled(5000, 21, shift=0.3), seed=1)
    for m in (small, large):
        assert m.roc_auc in m.roc_auc_ci  # type: ignore[operator]
        assert m.average_precision in m.average_precision_ci  # type: ignore[operator]
        assert m.ece in m.ece_ci  # type: ignore[operator]
    for name in ("roc_auc_ci", "average_precision_ci", "ece_ci"):
        wide: Interval = getattr(small, name)
        narrow: Interval = getattr(large, name)
        assert narrow.high - narrow.low < 0.5 * (wide.high - wide.low), name


def test_bootstrap_is_seeded() -> None:
    scores, labels = labelled(300, 8)
    first = compute_metrics(scores, labels, seed=3)
    assert compute_metrics(scores, labels, seed=3) == first
    assert compute_metrics(scores, labels, seed=4).roc_auc_ci != first.roc_auc_ci
    assert compute_metrics(scores, labels, n_bootstrap=0).roc_auc_ci is None


def test_weighted_ranking_equals_the_resample_it_stands_for() -> None:
    # The bootstrap scores a resample as multiplicities over the original images; that must
    # equal scoring the resample with its images repeated.
    scores, labels = labelled(150, 9, decimals=2)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    rng = np.random.default_rng(0)
    weights = np.stack([np.bincount(rng.integers(0, s.size, s.size), minlength=s.size)])
    weights[0, 0] = 0
    auc, ap = _ranking(s, y, weights.astype(np.float64))
    rep_s, rep_y = np.repeat(s, weights[0]), np.repeat(y, weights[0])
    assert auc[0] == pytest.approx(roc_auc_score(rep_y, rep_s), abs=1e-12)
    assert ap[0] == pytest.approx(average_precision_score(rep_y, rep_s), abs=1e-12)


def test_abstentions_are_counted_and_never_scored_as_real() -> None:
    scores, labels = labelled(400, 13)
    abstain = np.zeros(scores.size, dtype=bool)
    # The detector abstains on a third of the AI images and a tenth of the real ones.
    abstain[np.flatnonzero(labels == 1)[::3]] = True
    abstain[np.flatnonzero(labels == 0)[::10]] = True
    with_nan = np.where(abstain, np.nan, scores)

    m = compute_metrics(with_nan, labels, threshold=0.5, seed=2)
    answered = ~abstain
    assert m.abstained_ai == int((abstain & (labels == 1)).sum())
    assert m.abstained_real == int((abstain & (labels == 0)).sum())
    assert m.abstained == abstain.sum()
    assert m.answered == answered.sum()
    assert (m.n, m.n_ai, m.n_real) == (400, labels.sum(), (labels == 0).sum())

    expected = compute_metrics(scores[answered], labels[answered], threshold=0.5, seed=2)
    for name in (
        "roc_auc",
        "average_precision",
        "brier",
        "ece",
        "accuracy",
        "fpr_at_threshold",
        "tpr_at_threshold",
        "tpr_at_5pct_fpr",
        "roc_auc_ci",
        "ece_ci",
    ):
        assert getattr(m, name) == getattr(expected, name), name

    # Reading an abstention as a confident "real" would make these AI images misses.
    as_zero = np.where(abstain, 0.0, scores)
    assert m.roc_auc is not None
    assert abs(m.roc_auc - roc_auc_score(labels, as_zero)) > 0.05
    assert m.tpr_at_threshold is not None
    assert m.tpr_at_threshold > ((as_zero >= 0.5) & (labels == 1)).sum() / labels.sum()

    roc = roc_points(with_nan, labels)
    assert roc is not None
    assert np.all(np.isfinite(roc.thresholds[1:]))
    assert sum(b.count for b in reliability_bins(with_nan, labels)) == answered.sum()


def test_nothing_answered_leaves_every_metric_undefined() -> None:
    m = compute_metrics(np.full(6, np.nan), np.array([0, 0, 0, 1, 1, 1]), threshold=0.5)
    assert (m.abstained_ai, m.abstained_real, m.answered) == (3, 3, 0)
    for name in (
        "accuracy",
        "fpr_at_threshold",
        "tpr_at_threshold",
        "roc_auc",
        "average_precision",
        "tpr_at_1pct_fpr",
        "brier",
        "ece",
        "accuracy_ci",
        "roc_auc_ci",
        "ece_ci",
    ):
        assert getattr(m, name) is None, name


def test_single_class_leaves_ranking_metrics_undefined() -> None:
    scores = np.array([0.9, 0.7, 0.4, 0.95, np.nan])
    labels = np.ones(5, dtype=int)
    m = compute_metrics(scores, labels, threshold=0.5)
    assert m.roc_auc is None
    assert m.average_precision is None
    assert m.roc_auc_ci is None
    assert m.average_precision_ci is None
    assert m.tpr_at_1pct_fpr is None
    assert m.fpr_at_threshold is None
    assert m.fpr_at_threshold_ci is None
    assert m.tpr_at_threshold == 0.75
    assert m.brier == pytest.approx(np.mean((scores[:4] - 1.0) ** 2))
    assert m.ece is not None
    assert m.ece_ci is not None
    assert roc_points(scores, labels) is None
    empty = compute_metrics(np.array([]), np.array([], dtype=int), threshold=0.5)
    assert (empty.n, empty.roc_auc, empty.accuracy) == (0, None, None)


def test_groups_are_split_correctly() -> None:
    scores, labels = labelled(600, 17)
    rng = np.random.default_rng(1017)
    groups = rng.choice(np.array(["midjourney", "sdv1.4", "adm"]), scores.size)
    # A generator subset with only AI images: its ranking metrics cannot be defined.
    groups[:40] = "glide"
    labels[:40] = 1

    by_group = metrics_by_group(scores, labels, groups, threshold=0.5, n_bootstrap=200, seed=5)
    assert list(by_group) == ["adm", "glide", "midjourney", "sdv1.4"]
    assert sum(m.n for m in by_group.values()) == scores.size
    for name, m in by_group.items():
        members = groups == name
        assert m == compute_metrics(
            scores[members], labels[members], threshold=0.5, n_bootstrap=200, seed=5
        )
        assert m.n_ai == labels[members].sum()
    assert by_group["glide"].roc_auc is None
    assert by_group["adm"].roc_auc == pytest.approx(
        roc_auc_score(labels[groups == "adm"], scores[groups == "adm"])
    )
    assert metrics_by_group(scores, labels, list(groups), n_bootstrap=0).keys() == by_group.keys()


def test_as_dict_is_json_ready() -> None:
    scores, labels = labelled(200, 19)
    scores[:5] = np.nan
    m = compute_metrics(scores, labels, threshold=0.5, n_bootstrap=100)
    data = json.loads(json.dumps(m.as_dict(), allow_nan=False))
    assert data["roc_auc"] == m.roc_auc
    assert m.roc_auc_ci is not None
    assert data["roc_auc_ci"] == [m.roc_auc_ci.low, m.roc_auc_ci.high]
    assert data["abstained"] == 5
    assert data["answered"] == 195
    assert data["confidence"] == 0.95

    single = compute_metrics([0.2, 0.3], [0, 0], n_bootstrap=0).as_dict()
    json.dumps(single, allow_nan=False)
    assert single["roc_auc"] is None
    assert single["roc_auc_ci"] is None
    assert single["accuracy"] is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.roc_auc = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("scores", "labels"),
    [
        ([0.1, 0.2], [0, 2]),
        ([0.1, 1.5], [0, 1]),
        ([0.1, -0.1], [0, 1]),
        ([0.1, np.inf], [0, 1]),
        ([0.1, 0.2, 0.3], [0, 1]),
    ],
)
def test_malformed_input_is_rejected(scores: list[float], labels: list[int]) -> None:
    with pytest.raises(ValueError):
        compute_metrics(scores, labels)
