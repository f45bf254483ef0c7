"""Choosing the flag threshold: one that bounds the false-positive rate with stated
confidence, or one that sends moderators a chosen share of the traffic.

The ensemble flags an image when ``ai_score >= threshold``. The false-positive rate of a
threshold ``t`` is ``FPR(t) = P(S >= t)`` for the score ``S`` of a fresh real image. A
threshold read off a sample of real images is itself random, so no finite sample can make
``FPR(t) <= alpha`` certain; the Neyman-Pearson umbrella rule (Tong, Feng & Li 2018,
"Neyman-Pearson classification algorithms and NP receiver operating characteristics",
Science Advances 4(2)) makes it hold with probability at least ``1 - delta`` over the draw of
the held-out real images, whatever the distribution of their scores.

The rule. Let ``s(1) <= ... <= s(n)`` be the held-out real scores, sorted, and flag an
image when its score is strictly above ``s(k)``. Write ``F`` for the distribution function
of real scores and ``q = inf{x : F(x) >= 1 - alpha}`` for its ``1 - alpha`` quantile. Then

    FPR > alpha  <=>  P(S > s(k)) > alpha  <=>  F(s(k)) < 1 - alpha  <=>  s(k) < q
                 <=>  at least k of the n real scores lie below q,

and the number of real scores below ``q`` is Binomial(n, F(q-)) with ``F(q-) <= 1 - alpha``,
so

    P(FPR > alpha) <= P(Binomial(n, 1 - alpha) >= k)
                   =  sum_{j=k}^{n} C(n, j) (1 - alpha)^j alpha^(n - j),

with equality when ``F`` is continuous. The rule takes the smallest ``k`` whose bound is at
most ``delta``: the lowest threshold, hence the most AI-generated images caught, that keeps
the guarantee. The bound falls as ``k`` grows and is smallest at ``k = n``, where it is
``(1 - alpha)^n``; so ``n`` real images suffice exactly when
``n >= ceil(log(delta) / log(1 - alpha))`` (299 at alpha = 1 %, delta = 5 %), and fewer are
refused.

Ties and ``>=``. The argument needs "strictly above ``s(k)``": flagging ``score >= s(k)``
would also flag every real image whose score equals ``s(k)``, and a detector that gives many
real images the same score (a saturated or quantised output) would then break the bound.
The returned threshold is therefore the next float64 above ``s(k)``: for float64 scores,
``score >= nextafter(s(k), inf)`` is exactly ``score > s(k)``, so the ensemble's own
comparison keeps the guarantee for any distribution, ties included. The scores must be the
very numbers compared at flag time: the ensemble's ``ai_score`` under the configuration the
threshold will be used with, on real images it was not fitted on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import binom

FloatArray = npt.NDArray[np.float64]


class TooFewRealImages(ValueError):
    """The held-out real images are too few for any order statistic to bound the
    false-positive rate at ``alpha`` with confidence ``1 - delta``."""

    def __init__(
        self, *, n_real: int, n_required: int, n_abstained: int, alpha: float, delta: float
    ) -> None:
        self.n_real = n_real
        self.n_required = n_required
        self.n_abstained = n_abstained
        self.alpha = alpha
        self.delta = delta
        abstained = f" ({n_abstained} abstentions not counted)" if n_abstained else ""
        super().__init__(
            f"{n_real} scored held-out real images{abstained} cannot bound the false-positive "
            f"rate at {alpha:g} with probability {1 - delta:g}: that needs at least "
            f"{n_required} ({self.more_needed} more)"
        )

    @property
    def more_needed(self) -> int:
        return self.n_required - self.n_real


@dataclass(frozen=True)
class NeymanPearsonThreshold:
    """A flag threshold whose false-positive rate exceeds ``alpha`` with probability at most
    ``delta`` over the draw of the held-out real images.

    ``threshold`` is what the ensemble compares with ``>=``; ``order_statistic`` is the
    ``k``-th smallest held-out real score, the value the threshold sits just above.
    ``violation_probability`` is ``P(Binomial(n_real, 1 - alpha) >= k)``, the bound achieved
    (at most ``delta``). ``empirical_fpr`` is the share of the given real images the
    threshold flags. When the order statistic is 1.0 the threshold is above 1: with scores in
    [0, 1] nothing can be flagged under this guarantee (see :attr:`flags_nothing`).
    """

    threshold: float
    order_statistic: float
    alpha: float
    delta: float
    n_real: int
    n_abstained: int
    k: int
    violation_probability: float
    empirical_fpr: float

    @property
    def flags_nothing(self) -> bool:
        return self.threshold > 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": "neyman-pearson-order-statistic",
            "threshold": self.threshold,
            "order_statistic": self.order_statistic,
            "alpha": self.alpha,
            "delta": self.delta,
            "n_real": self.n_real,
            "n_abstained": self.n_abstained,
            "k": self.k,
            "violation_probability": self.violation_probability,
            "empirical_fpr": self.empirical_fpr,
            "flags_nothing": self.flags_nothing,
        }


@dataclass(frozen=True)
class ReviewVolumeThreshold:
    """A flag threshold sized to the moderators' capacity: it flags ``flagged`` of the
    ``n_scored`` recent scores, as many as possible without exceeding ``share`` of them."""

    threshold: float
    share: float
    flagged: int
    n_scored: int
    n_abstained: int

    @property
    def flagged_share(self) -> float:
        return self.flagged / self.n_scored

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": "review-volume",
            "threshold": self.threshold,
            "share": self.share,
            "flagged": self.flagged,
            "flagged_share": self.flagged_share,
            "n_scored": self.n_scored,
            "n_abstained": self.n_abstained,
        }


def violation_probability(k: int, n: int, alpha: float) -> float:
    """``P(Binomial(n, 1 - alpha) >= k)``: the probability that the threshold just above the
    ``k``-th smallest of ``n`` real scores has a false-positive rate above ``alpha``
    (an upper bound; equal when real scores have a continuous distribution)."""
    return float(binom.sf(k - 1, n, 1.0 - alpha))


def required_real_images(alpha: float, delta: float) -> int:
    """The fewest held-out real images for which some order statistic bounds the
    false-positive rate at ``alpha`` with probability ``1 - delta``: the least ``n`` with
    ``(1 - alpha)^n <= delta``, i.e. ``ceil(log(delta) / log(1 - alpha))``."""
    _check_rates(alpha, delta)
    n = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    # The closed form can land one off where rounding meets the boundary; settle it with the
    # same computation the rule itself uses.
    while violation_probability(n, n, alpha) > delta:
        n += 1
    while n > 1 and violation_probability(n - 1, n - 1, alpha) <= delta:
        n -= 1
    return n


def neyman_pearson_threshold(
    real_scores: npt.ArrayLike, *, alpha: float, delta: float
) -> NeymanPearsonThreshold:
    """The Neyman-Pearson order-statistic threshold (see the module docstring) from the
    scores of held-out real images; NaN scores are abstentions, left out and counted.

    Raises :class:`TooFewRealImages` when fewer than :func:`required_real_images` real images
    were scored.
    """
    _check_rates(alpha, delta)
    scores, n_abstained = _scored(real_scores)
    n = int(scores.size)
    n_required = required_real_images(alpha, delta)
    if n < n_required:
        raise TooFewRealImages(
            n_real=n, n_required=n_required, n_abstained=n_abstained, alpha=alpha, delta=delta
        )
    ks = np.arange(1, n + 1)
    bounds = np.asarray(binom.sf(ks - 1, n, 1.0 - alpha), dtype=np.float64)
    # Falls with k; at k = n it is (1 - alpha)^n, which n_required makes at most delta.
    k = int(ks[np.flatnonzero(bounds <= delta)[0]])
    ordered = np.sort(scores)
    order_statistic = float(ordered[k - 1])
    threshold = math.nextafter(order_statistic, math.inf)
    return NeymanPearsonThreshold(
        threshold=threshold,
        order_statistic=order_statistic,
        alpha=alpha,
        delta=delta,
        n_real=n,
        n_abstained=n_abstained,
        k=k,
        violation_probability=float(bounds[k - 1]),
        empirical_fpr=float(np.count_nonzero(scores >= threshold)) / n,
    )


def threshold_for_review_volume(scores_all: npt.ArrayLike, share: float) -> ReviewVolumeThreshold:
    """The threshold that would have flagged about ``share`` of these recent scores (the
    upper ``share`` quantile), for sizing the review queue to the moderators' capacity.

    ``share`` is of the scored images: NaN scores (the ensemble abstained) can never be
    flagged by a threshold, so they are left out and counted. The budget is
    ``floor(share * n_scored)`` images and is never exceeded: the threshold is the lowest
    score ``t`` with at most that many scores ``>= t``. Images with equal scores are flagged
    all together or not at all, so where a tie straddles the budget the whole tie is left
    out and fewer than the budget are flagged; when even the highest score is shared by more
    images than the budget (or the budget is 0), the threshold is the next float above the
    highest score and nothing is flagged.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the review share must be within [0, 1], got {share!r}")
    scores, n_abstained = _scored(scores_all)
    n = int(scores.size)
    if n == 0:
        raise ValueError("no scored images: every score is an abstention")
    # The tolerance keeps a share such as 0.29 of 100 images at 29 despite its binary form.
    budget = math.floor(share * n + 1e-9)
    ordered = np.sort(scores)
    values = np.unique(ordered)
    at_or_above = n - np.searchsorted(ordered, values, side="left")
    within = np.flatnonzero(at_or_above <= budget)
    if within.size:
        threshold = float(values[within[0]])
        flagged = int(at_or_above[within[0]])
    else:
        threshold = math.nextafter(float(values[-1]), math.inf)
        flagged = 0
    return ReviewVolumeThreshold(
        threshold=threshold, share=share, flagged=flagged, n_scored=n, n_abstained=n_abstained
    )


def _check_rates(alpha: float, delta: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"the target false-positive rate must be within (0, 1), got {alpha!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"the violation probability must be within (0, 1), got {delta!r}")


def _scored(scores: npt.ArrayLike) -> tuple[FloatArray, int]:
    """The scores that are not abstentions (NaN), and how many were."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {array.shape}")
    abstained = np.isnan(array)
    kept = array[~abstained]
    if kept.size and not (kept.min() >= 0.0 and kept.max() <= 1.0):
        raise ValueError("scores must be probabilities within [0, 1] (NaN for an abstention)")
    return kept, int(np.count_nonzero(abstained))
