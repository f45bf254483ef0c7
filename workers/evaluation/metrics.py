"""How well one detector (or the ensemble) separates AI-generated images from real ones on a
labelled set, overall and per group (a generator, a degradation, a source).

Scores are probabilities of "AI-generated" in [0, 1]; labels are 1 = AI-generated, 0 = real.
A detector that abstains on an image leaves NaN in its place. An abstention is neither a
"real" nor an "AI" answer, so every metric here is computed over the *answered* images only,
and the abstentions are reported beside it, per class: a detector that abstains on the hard
half of a set must not look better than it is without a reader being able to see why.

A metric that the data cannot define (one class missing among the answered images, no
answered image at all, no threshold given) is ``None``, never an exception and never a
made-up number. Malformed input (mismatched lengths, labels other than 0/1, scores outside
[0, 1]) is a ``ValueError``.

The rates at the threshold (accuracy, FPR, TPR) carry Clopper-Pearson exact intervals: they
are binomial proportions and operators use their upper bound to promise a false-positive
rate, so the interval must not undercover at small counts. The ranking and calibration
metrics (ROC AUC, average precision, ECE) have no such closed form and carry percentile
bootstrap intervals, resampled within each class so every replicate has the same class
balance as the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, TypedDict

import numpy as np
import numpy.typing as npt
from scipy import stats

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

ECE_BINS = 15
DEFAULT_BOOTSTRAP = 1000
DEFAULT_CONFIDENCE = 0.95
FPR_TARGETS = (0.01, 0.05)

# Replicates are evaluated a block at a time as a (replicates x images) weight matrix; this
# bounds the block to about 32 MiB of float64 whatever the size of the set.
_BLOCK_CELLS = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval ``[low, high]`` at ``confidence``."""

    low: float
    high: float
    confidence: float

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int | float) and self.low <= value <= self.high

    def as_list(self) -> list[float]:
        return [self.low, self.high]


@dataclass(frozen=True)
class Metrics:
    """One detector's performance on one labelled set.

    Counts cover every image; ``n_ai`` and ``n_real`` include the abstentions, which are
    also given per class (``abstained_ai``, ``abstained_real``). Every rate and score is
    computed over the answered images only.

    - ``accuracy``, ``fpr_at_threshold``, ``tpr_at_threshold``: at ``threshold`` (a score
      at or above it is flagged); ``None`` when no threshold was given or the denominator
      is empty. Their intervals are Clopper-Pearson exact intervals.
    - ``roc_auc``: area under the ROC curve with tied scores counted as half a correct
      ordering (the trapezoid over the tie-collapsed ROC, equal to the Mann-Whitney
      statistic).
    - ``average_precision``: the step-wise sum ``sum_k (R_k - R_{k-1}) * P_k`` over the
      distinct score thresholds from the highest down, without interpolation (the
      scikit-learn definition).
    - ``tpr_at_1pct_fpr``, ``tpr_at_5pct_fpr``: the highest TPR among the ROC points whose
      FPR is at most the target. Tied scores form a single ROC point (one threshold either
      flags all of them or none), and no point is interpolated between thresholds, so the
      value is achievable by an actual threshold; the point (0, 0) is always a candidate,
      so the value is 0.0 when no threshold meets the target.
    - ``brier``: the mean squared difference between score and label.
    - ``ece``: expected calibration error over ``ECE_BINS`` equal-width bins of [0, 1]
      (bin ``i`` is ``[i/15, (i+1)/15)``, the last one closed at 1), the absolute gap
      between mean score and observed AI frequency in each bin weighted by the bin's share
      of the answered images; empty bins contribute nothing.
    - ``roc_auc_ci``, ``average_precision_ci``, ``ece_ci``: percentile bootstrap intervals,
      resampled within each class. Because ECE is biased upward on finite samples, its
      interval can lie above the point estimate for a well-calibrated detector.
    """

    n: int
    n_ai: int
    n_real: int
    abstained_ai: int
    abstained_real: int
    threshold: float | None
    accuracy: float | None
    accuracy_ci: Interval | None
    fpr_at_threshold: float | None
    fpr_at_threshold_ci: Interval | None
    tpr_at_threshold: float | None
    tpr_at_threshold_ci: Interval | None
    roc_auc: float | None
    roc_auc_ci: Interval | None
    average_precision: float | None
    average_precision_ci: Interval | None
    tpr_at_1pct_fpr: float | None
    tpr_at_5pct_fpr: float | None
    brier: float | None
    ece: float | None
    ece_ci: Interval | None
    confidence: float
    n_bootstrap: int

    @property
    def abstained(self) -> int:
        return self.abstained_ai + self.abstained_real

    @property
    def answered_ai(self) -> int:
        return self.n_ai - self.abstained_ai

    @property
    def answered_real(self) -> int:
        return self.n_real - self.abstained_real

    @property
    def answered(self) -> int:
        return self.n - self.abstained

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: undefined metrics are ``None``, intervals are ``[low, high]`` lists
        (at ``confidence``), and floats are not rounded: a report rounds when it prints, and
        a stored result keeps full precision so two runs can be compared exactly."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            out[key] = [value["low"], value["high"]] if isinstance(value, dict) else value
        out["abstained"] = self.abstained
        out["answered"] = self.answered
        return out


class RocPoints(NamedTuple):
    """The ROC curve at every distinct score, from the highest threshold down. The first
    point is (0, 0) at threshold ``inf`` (nothing flagged)."""

    fpr: FloatArray
    tpr: FloatArray
    thresholds: FloatArray


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram: scores in ``[lower, upper)`` (the last bin closed
    at 1). ``mean_predicted`` and ``observed_frequency`` are ``None`` for an empty bin."""

    lower: float
    upper: float
    count: int
    mean_predicted: float | None
    observed_frequency: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_metrics(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    threshold: float | None = None,
    *,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Metrics:
    """Every metric of :class:`Metrics` for one set of scores, with intervals at
    ``confidence``. ``n_bootstrap=0`` skips the bootstrap (its intervals are ``None``); the
    bootstrap draws from ``numpy.random.default_rng(seed)``, so a result is reproducible."""
    s, y = _validated(scores, labels)
    if threshold is not None and math.isnan(threshold):
        raise ValueError("threshold is NaN")
    if n_bootstrap < 0:
        raise ValueError("n_bootstrap must be >= 0")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")

    abstain = np.isnan(s)
    n_ai = int(np.count_nonzero(y == 1))
    n_real = int(y.size - n_ai)
    abstained_ai = int(np.count_nonzero(abstain & (y == 1)))
    abstained_real = int(np.count_nonzero(abstain & (y == 0)))
    s_ans = s[~abstain]
    y_ans = y[~abstain]
    pos = int(np.count_nonzero(y_ans == 1))
    neg = int(y_ans.size - pos)

    at_threshold = _threshold_rates(s_ans, y_ans, threshold, confidence)

    brier = ece = None
    if y_ans.size:
        brier = float(np.mean((s_ans - y_ans) ** 2))
        ece = float(_ece(s_ans, y_ans, np.ones((1, y_ans.size)))[0])

    auc = ap = tpr_1 = tpr_5 = None
    order = np.argsort(-s_ans, kind="stable")
    s_sorted, y_sorted = s_ans[order], y_ans[order]
    if pos and neg:
        roc = _roc(s_sorted, y_sorted)
        auc = float(np.trapezoid(roc.tpr, roc.fpr))
        ap = float(_ranking(s_sorted, y_sorted, np.ones((1, y_sorted.size)))[1][0])
        tpr_1 = tpr_at_fpr(roc, FPR_TARGETS[0])
        tpr_5 = tpr_at_fpr(roc, FPR_TARGETS[1])

    auc_ci, ap_ci, ece_ci = _bootstrap(s_sorted, y_sorted, n_bootstrap, confidence, seed)
    return Metrics(
        n=int(y.size),
        n_ai=n_ai,
        n_real=n_real,
        abstained_ai=abstained_ai,
        abstained_real=abstained_real,
        threshold=None if threshold is None else float(threshold),
        **at_threshold,
        roc_auc=auc,
        roc_auc_ci=auc_ci,
        average_precision=ap,
        average_precision_ci=ap_ci,
        tpr_at_1pct_fpr=tpr_1,
        tpr_at_5pct_fpr=tpr_5,
        brier=brier,
        ece=ece,
        ece_ci=ece_ci,
        confidence=confidence,
        n_bootstrap=n_bootstrap,
    )


def metrics_by_group(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    groups: Sequence[str] | npt.NDArray[Any],
    threshold: float | None = None,
    *,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Metrics]:
    """:func:`compute_metrics` for each group, keyed by group name in sorted order.

    There is no "all" entry (a group could be called that); call :func:`compute_metrics` on
    the whole set for the overall figures. Every group bootstraps from the same ``seed``, so
    a group's intervals do not change when other groups are added or removed.
    """
    s, y = _validated(scores, labels)
    g = np.asarray(groups).astype(str)
    if g.shape != s.shape:
        raise ValueError(f"groups has shape {g.shape}, scores {s.shape}")
    return {
        str(name): compute_metrics(
            s[g == name],
            y[g == name],
            threshold,
            n_bootstrap=n_bootstrap,
            confidence=confidence,
            seed=seed,
        )
        for name in np.unique(g)
    }


def roc_points(scores: npt.ArrayLike, labels: npt.ArrayLike) -> RocPoints | None:
    """The ROC curve of the answered images at every distinct score (no point dropped), or
    ``None`` when one class is missing among them."""
    s, y = _validated(scores, labels)
    answered = ~np.isnan(s)
    s, y = s[answered], y[answered]
    if not (np.any(y == 1) and np.any(y == 0)):
        return None
    order = np.argsort(-s, kind="stable")
    return _roc(s[order], y[order])


def tpr_at_fpr(roc: RocPoints, target: float) -> float:
    """The highest TPR among the ROC points whose FPR is at most ``target``: what an actual
    threshold achieves, with no interpolation between thresholds."""
    return float(np.max(roc.tpr[roc.fpr <= target]))


def reliability_bins(
    scores: npt.ArrayLike, labels: npt.ArrayLike, bins: int = ECE_BINS
) -> list[ReliabilityBin]:
    """Equal-width bins of [0, 1] over the answered images, with the mean score, the
    observed AI frequency and the count in each: the data of a reliability diagram, and the
    terms of the ECE."""
    if bins < 1:
        raise ValueError("bins must be >= 1")
    s, y = _validated(scores, labels)
    answered = ~np.isnan(s)
    s, y = s[answered], y[answered]
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = _bin_index(s, edges)
    count = np.bincount(index, minlength=bins)
    sum_p = np.bincount(index, weights=s, minlength=bins)
    sum_y = np.bincount(index, weights=y.astype(np.float64), minlength=bins)
    return [
        ReliabilityBin(
            lower=float(edges[i]),
            upper=float(edges[i + 1]),
            count=int(count[i]),
            mean_predicted=float(sum_p[i] / count[i]) if count[i] else None,
            observed_frequency=float(sum_y[i] / count[i]) if count[i] else None,
        )
        for i in range(bins)
    ]


def clopper_pearson(
    successes: int, trials: int, confidence: float = DEFAULT_CONFIDENCE
) -> Interval:
    """The Clopper-Pearson exact interval for a binomial proportion: the beta quantiles
    that guarantee at least ``confidence`` coverage at every true proportion."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes}/{trials}")
    alpha = 1.0 - confidence
    low = (
        0.0
        if successes == 0
        else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
    )
    high = (
        1.0
        if successes == trials
        else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    )
    return Interval(low=low, high=high, confidence=confidence)


def _validated(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[FloatArray, IntArray]:
    s = np.asarray(scores, dtype=np.float64)
    raw = np.asarray(labels)
    if s.ndim != 1 or raw.shape != s.shape:
        raise ValueError(
            f"scores and labels must be 1-D of equal length, got {s.shape} and {raw.shape}"
        )
    if raw.size and not np.all((raw == 0) | (raw == 1)):
        raise ValueError("labels must be 0 (real) or 1 (AI-generated)")
    answered = s[~np.isnan(s)]
    if answered.size and not (np.all(answered >= 0.0) and np.all(answered <= 1.0)):
        raise ValueError("scores must be probabilities in [0, 1] (NaN for an abstention)")
    return s, raw.astype(np.int64)


def _rate(k: int, n: int, confidence: float) -> tuple[float | None, Interval | None]:
    if n == 0:
        return None, None
    return k / n, clopper_pearson(k, n, confidence)


class _ThresholdRates(TypedDict):
    accuracy: float | None
    accuracy_ci: Interval | None
    fpr_at_threshold: float | None
    fpr_at_threshold_ci: Interval | None
    tpr_at_threshold: float | None
    tpr_at_threshold_ci: Interval | None


def _threshold_rates(
    s: FloatArray, y: IntArray, threshold: float | None, confidence: float
) -> _ThresholdRates:
    """Accuracy, FPR and TPR of the answered images at ``threshold``, with exact
    intervals; all ``None`` without a threshold, each ``None`` when its denominator is 0."""
    if threshold is None:
        return _ThresholdRates(
            accuracy=None,
            accuracy_ci=None,
            fpr_at_threshold=None,
            fpr_at_threshold_ci=None,
            tpr_at_threshold=None,
            tpr_at_threshold_ci=None,
        )
    flagged = s >= threshold
    is_ai = y == 1
    accuracy, accuracy_ci = _rate(int(np.count_nonzero(flagged == is_ai)), y.size, confidence)
    fpr, fpr_ci = _rate(
        int(np.count_nonzero(flagged & ~is_ai)), int(np.count_nonzero(~is_ai)), confidence
    )
    tpr, tpr_ci = _rate(
        int(np.count_nonzero(flagged & is_ai)), int(np.count_nonzero(is_ai)), confidence
    )
    return _ThresholdRates(
        accuracy=accuracy,
        accuracy_ci=accuracy_ci,
        fpr_at_threshold=fpr,
        fpr_at_threshold_ci=fpr_ci,
        tpr_at_threshold=tpr,
        tpr_at_threshold_ci=tpr_ci,
    )


def _bootstrap(
    s_sorted: FloatArray, y_sorted: IntArray, replicates: int, confidence: float, seed: int
) -> tuple[Interval | None, Interval | None, Interval | None]:
    """Percentile intervals of ROC AUC, average precision and ECE over class-stratified
    resamples; AUC and AP are ``None`` when a class is missing, all three without data or
    replicates."""
    if replicates == 0 or y_sorted.size == 0:
        return None, None, None
    both_classes = bool(np.any(y_sorted == 1) and np.any(y_sorted == 0))
    rng = np.random.default_rng(seed)
    auc_reps: list[FloatArray] = []
    ap_reps: list[FloatArray] = []
    ece_reps: list[FloatArray] = []
    for weights in _stratified_weights(y_sorted, replicates, rng):
        ece_reps.append(_ece(s_sorted, y_sorted, weights))
        if both_classes:
            block_auc, block_ap = _ranking(s_sorted, y_sorted, weights)
            auc_reps.append(block_auc)
            ap_reps.append(block_ap)
    ece_ci = _percentile(np.concatenate(ece_reps), confidence)
    if not both_classes:
        return None, None, ece_ci
    auc_ci = _percentile(np.concatenate(auc_reps), confidence)
    ap_ci = _percentile(np.concatenate(ap_reps), confidence)
    return auc_ci, ap_ci, ece_ci


def _roc(s_sorted: FloatArray, y_sorted: IntArray) -> RocPoints:
    """ROC over scores sorted from highest to lowest, one point per distinct score."""
    last = _group_ends(s_sorted)
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    pos, neg = tp[-1], fp[-1]
    zero = np.zeros(1)
    return RocPoints(
        fpr=np.concatenate([zero, fp / neg]),
        tpr=np.concatenate([zero, tp / pos]),
        thresholds=np.concatenate([[np.inf], s_sorted[last]]),
    )


def _group_ends(s_sorted: FloatArray) -> npt.NDArray[np.intp]:
    """Index of the last element of each run of equal scores."""
    return np.flatnonzero(np.append(np.diff(s_sorted) != 0, True))


def _ranking(
    s_sorted: FloatArray, y_sorted: IntArray, weights: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """ROC AUC and average precision for each row of ``weights`` (image multiplicities, as
    a bootstrap resample gives them) over scores sorted from highest to lowest.

    The thresholds are those of the unweighted data: a threshold whose images all have
    weight zero repeats the previous ROC point and adds nothing to either sum, so the
    result equals the metric of the resample with its images repeated.
    """
    last = _group_ends(s_sorted)
    weights_ai = weights * y_sorted
    tp = np.cumsum(weights_ai, axis=1)
    fp = np.cumsum(weights - weights_ai, axis=1)
    if last.size < s_sorted.size:
        tp, fp = tp[:, last], fp[:, last]
    pos, neg = tp[:, -1], fp[:, -1]
    d_tp = np.diff(tp, axis=1, prepend=0.0)
    d_fp = np.diff(fp, axis=1, prepend=0.0)
    # The trapezoid: each step in FPR times the mean of the TPR before and after it.
    auc = (_row_dot(d_fp, tp) - 0.5 * _row_dot(d_fp, d_tp)) / (pos * neg)
    # Where nothing is flagged yet, no AI image is either (d_tp = 0): the floor only
    # keeps the division defined.
    flagged = np.maximum(tp + fp, np.finfo(np.float64).tiny)
    ap = _row_dot(d_tp, tp / flagged) / pos
    return auc, ap


def _row_dot(a: FloatArray, b: FloatArray) -> FloatArray:
    out: FloatArray = np.einsum("ij,ij->i", a, b)
    return out


def _bin_index(s: FloatArray, edges: FloatArray) -> npt.NDArray[np.intp]:
    """Bin ``i`` holds ``edges[i] <= s < edges[i + 1]``; a score of exactly 1 goes to the
    last bin."""
    return np.minimum(np.searchsorted(edges, s, side="right") - 1, edges.size - 2)


def _ece(s: FloatArray, y: IntArray, weights: FloatArray, bins: int = ECE_BINS) -> FloatArray:
    """ECE for each row of ``weights``. With ``n_b`` images in bin ``b`` out of ``N``,
    ``sum_b (n_b / N) * |mean(y_b) - mean(s_b)|`` equals ``sum_b |sum_b(y - s)| / N``,
    which needs only the per-bin sums of the residual."""
    index = _bin_index(s, np.linspace(0.0, 1.0, bins + 1))
    residual = np.zeros((s.size, bins))
    residual[np.arange(s.size), index] = y - s
    per_bin = weights @ residual
    total: FloatArray = np.abs(per_bin).sum(axis=1) / weights.sum(axis=1)
    return total


def _stratified_weights(
    y: IntArray, replicates: int, rng: np.random.Generator
) -> Iterator[FloatArray]:
    """Bootstrap resamples as multiplicity matrices (one row per replicate), each class
    drawn with replacement to its own size, in blocks of at most ``_BLOCK_CELLS`` cells."""
    n = y.size
    per_block = max(1, _BLOCK_CELLS // max(n, 1))
    classes = [np.flatnonzero(y == label) for label in (0, 1)]
    done = 0
    while done < replicates:
        rows = min(per_block, replicates - done)
        weights = np.empty((rows, n))
        for members in classes:
            size = members.size
            if size == 0:
                continue
            # Offsetting each row's draws lets one bincount count all rows at once.
            draws = rng.integers(0, size, size=(rows, size))
            draws += size * np.arange(rows)[:, None]
            counts = np.bincount(draws.ravel(), minlength=rows * size)
            weights[:, members] = counts.reshape(rows, size)
        yield weights
        done += rows


def _percentile(replicates: FloatArray, confidence: float) -> Interval:
    alpha = 1.0 - confidence
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return Interval(low=float(low), high=float(high), confidence=confidence)
