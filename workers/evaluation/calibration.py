"""Calibrating each detector's score, and learning how to combine the detectors, from
labelled images.

A detector's score is a probability only in name until it is checked against labels: most
are over- or under-confident. Three calibrators map a score to a probability fitted on
(score, label) pairs, abstentions (NaN) left out and counted:

    platt         ``sigmoid(a * logit(p) + b)``: the two numbers the ensemble's
                  :class:`~workers.ensemble.Calibration` stores and applies
    temperature   ``sigmoid(a * logit(p))``: one number, which keeps 0.5 where it is; the
                  same ``Calibration`` with ``b = 0``
    isotonic      a monotone step-wise map with no shape assumed: needs many examples

Logits are taken after clamping to ``[EPS, 1 - EPS]``, exactly as the ensemble does, so a
calibration fitted here means the same thing when the ensemble applies it.

:func:`fit_combination` learns the ensemble's combination itself: a logistic regression on
each detector's calibrated logit, with one indicator column per detector for "abstained",
so an abstention is a fact the model weighs, never a score of "real".

:func:`split_held_out` and :func:`before_after` measure a calibration where it was not
fitted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from workers.ensemble import LOGIT_EPS, Calibration

FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]

CalibrationKind = Literal["platt", "temperature", "isotonic"]

# The ensemble clamps a probability to [EPS, 1 - EPS] before taking its logit.
EPS = LOGIT_EPS
# Platt and temperature scaling fit one or two numbers; from fewer examples of a class than
# this they describe the sample more than the detector.
PARAMETRIC_MIN_PER_CLASS = 10
# Isotonic regression fits a step function with as many steps as the data allows and
# overfits small sets; scikit-learn's guidance is that it matches or beats Platt scaling
# only from about a thousand calibration examples, taken here as 500 of each class, since
# the rarer class limits how finely the steps can be placed.
ISOTONIC_MIN_PER_CLASS = 500
ECE_BINS = 15
_LOG_LOSS_EPS = float(np.finfo(np.float64).eps)


class TooFewExamples(ValueError):
    """A calibrator was asked to fit on fewer labelled, scored examples of a class than it
    needs."""

    def __init__(self, kind: str, counts: FitCounts, required_per_class: int) -> None:
        self.kind = kind
        self.counts = counts
        self.required_per_class = required_per_class
        abstained = f" ({counts.n_abstained} abstentions not counted)" if counts.n_abstained else ""
        advice = (
            "; Platt scaling, which fits two numbers, needs far fewer"
            if kind == "isotonic" and min(counts.n_real, counts.n_ai) >= PARAMETRIC_MIN_PER_CLASS
            else ""
        )
        what = "the combination" if kind == "combination" else f"{kind} calibration"
        super().__init__(
            f"{what} needs at least {required_per_class} scored examples of each "
            f"class; got {counts.n_real} real and {counts.n_ai} AI-generated{abstained}{advice}"
        )


@dataclass(frozen=True)
class FitCounts:
    """What a calibration or combination was fitted on."""

    n_real: int
    n_ai: int
    n_abstained: int

    def as_dict(self) -> dict[str, int]:
        return {"n_real": self.n_real, "n_ai": self.n_ai, "n_abstained": self.n_abstained}


class Calibrator(Protocol):
    """A fitted map from a detector's score to a calibrated probability; NaN (abstained)
    stays NaN."""

    @property
    def kind(self) -> CalibrationKind: ...

    def apply(self, scores: npt.ArrayLike) -> FloatArray: ...

    def as_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class PlattCalibrator:
    """``p' = sigmoid(a * logit(p) + b)``, the ensemble's :class:`Calibration`."""

    a: float
    b: float
    fitted_on: FitCounts

    @property
    def kind(self) -> CalibrationKind:
        return "platt"

    def apply(self, scores: npt.ArrayLike) -> FloatArray:
        return _sigmoid(self.a * logit(scores) + self.b)

    def to_calibration(self) -> Calibration:
        return Calibration(a=self.a, b=self.b)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "platt", "a": self.a, "b": self.b, "fitted_on": self.fitted_on.as_dict()}


@dataclass(frozen=True)
class TemperatureCalibrator:
    """``p' = sigmoid(a * logit(p))``: temperature scaling with temperature ``1 / a``.
    It changes confidence, never the ranking nor which side of 0.5 a score is on."""

    a: float
    fitted_on: FitCounts

    @property
    def kind(self) -> CalibrationKind:
        return "temperature"

    @property
    def temperature(self) -> float:
        return 1.0 / self.a

    def apply(self, scores: npt.ArrayLike) -> FloatArray:
        return _sigmoid(self.a * logit(scores))

    def to_calibration(self) -> Calibration:
        return Calibration(a=self.a, b=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "temperature",
            "a": self.a,
            "b": 0.0,
            "temperature": self.temperature,
            "fitted_on": self.fitted_on.as_dict(),
        }


@dataclass(frozen=True)
class IsotonicCalibrator:
    """A non-decreasing map given by its breakpoints, linear between them and constant
    beyond them (what scikit-learn's ``IsotonicRegression(out_of_bounds="clip")`` predicts).
    Kept as plain numbers so it can be stored and applied without scikit-learn."""

    x_thresholds: tuple[float, ...]
    y_thresholds: tuple[float, ...]
    fitted_on: FitCounts

    @property
    def kind(self) -> CalibrationKind:
        return "isotonic"

    def apply(self, scores: npt.ArrayLike) -> FloatArray:
        array = _probabilities(scores)
        out = np.full(array.shape, np.nan)
        answered = ~np.isnan(array)
        out[answered] = np.interp(array[answered], self.x_thresholds, self.y_thresholds)
        return out

    def to_calibration(self) -> Calibration:
        """The same map as the ensemble stores and applies it."""
        return Calibration(x=self.x_thresholds, y=self.y_thresholds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "isotonic",
            "x_thresholds": list(self.x_thresholds),
            "y_thresholds": list(self.y_thresholds),
            "fitted_on": self.fitted_on.as_dict(),
        }


def logit(scores: npt.ArrayLike) -> FloatArray:
    """``log(p / (1 - p))`` after clamping to ``[EPS, 1 - EPS]`` as the ensemble does; NaN
    stays NaN."""
    p = np.clip(_probabilities(scores), EPS, 1.0 - EPS)
    return np.log(p / (1.0 - p))


def fit_platt(scores: npt.ArrayLike, labels: npt.ArrayLike) -> PlattCalibrator:
    """Platt scaling: a logistic regression of the label on ``logit(score)``.

    The targets are Platt's (1999) smoothed ones, ``(N+ + 1) / (N+ + 2)`` for an
    AI-generated image and ``1 / (N- + 2)`` for a real one, given to scikit-learn's
    unpenalised logistic regression as weights on the two outcomes: a detector that
    separates the classes perfectly then gets a finite, sample-size-aware slope instead of
    an infinite one, and no penalty pulls the slope towards 0.
    """
    x, y, counts = _labelled(scores, labels)
    _require(counts, "platt", PARAMETRIC_MIN_PER_CLASS)
    z = logit(x)
    targets = _platt_targets(y, counts)
    model = LogisticRegression(C=np.inf, solver="lbfgs", tol=1e-10, max_iter=1000)
    model.fit(
        np.concatenate([z, z])[:, None],
        np.concatenate([np.ones(z.size, dtype=np.int64), np.zeros(z.size, dtype=np.int64)]),
        sample_weight=np.concatenate([targets, 1.0 - targets]),
    )
    return PlattCalibrator(
        a=float(model.coef_[0, 0]), b=float(model.intercept_[0]), fitted_on=counts
    )


def fit_temperature(scores: npt.ArrayLike, labels: npt.ArrayLike) -> TemperatureCalibrator:
    """Temperature scaling: the ``a > 0`` minimising the log loss of
    ``sigmoid(a * logit(score))`` against Platt's smoothed targets (see :func:`fit_platt`).
    The loss is convex in ``a``, hence unimodal in ``log a``, which a bounded scalar search
    over ``1e-4 <= a <= 1e4`` (temperatures from 1e-4 to 1e4) finds."""
    x, y, counts = _labelled(scores, labels)
    _require(counts, "temperature", PARAMETRIC_MIN_PER_CLASS)
    z = logit(x)
    targets = _platt_targets(y, counts)

    def loss(log_a: float) -> float:
        margin = math.exp(log_a) * z
        # t * log(1 + e^-m) + (1 - t) * log(1 + e^m), computed stably.
        return float(
            np.mean(targets * np.logaddexp(0.0, -margin) + (1 - targets) * np.logaddexp(0, margin))
        )

    result = minimize_scalar(
        loss, bounds=(math.log(1e-4), math.log(1e4)), method="bounded", options={"xatol": 1e-10}
    )
    if not result.success:
        raise ValueError(f"temperature scaling did not converge: {result.message}")
    return TemperatureCalibrator(a=math.exp(float(result.x)), fitted_on=counts)


def fit_isotonic(scores: npt.ArrayLike, labels: npt.ArrayLike) -> IsotonicCalibrator:
    """Isotonic calibration (scikit-learn's ``IsotonicRegression``, non-decreasing, within
    [0, 1]); refused with :class:`TooFewExamples` below ``ISOTONIC_MIN_PER_CLASS`` scored
    examples of each class."""
    x, y, counts = _labelled(scores, labels)
    _require(counts, "isotonic", ISOTONIC_MIN_PER_CLASS)
    model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    model.fit(x, y.astype(np.float64))
    return IsotonicCalibrator(
        x_thresholds=tuple(float(v) for v in model.X_thresholds_),
        y_thresholds=tuple(float(v) for v in model.y_thresholds_),
        fitted_on=counts,
    )


def fit_calibrator(
    kind: CalibrationKind, scores: npt.ArrayLike, labels: npt.ArrayLike
) -> Calibrator:
    """The calibrator of this kind fitted on these scores and labels."""
    if kind == "platt":
        return fit_platt(scores, labels)
    if kind == "temperature":
        return fit_temperature(scores, labels)
    if kind == "isotonic":
        return fit_isotonic(scores, labels)
    raise ValueError(f"unknown calibration kind {kind!r}")


@dataclass(frozen=True)
class Combination:
    """The ensemble's combination learnt from labels::

        ai_score = sigmoid(intercept + sum_j (weights[j] * logit_j
                                              + abstention_weights[j] * abstained_j))

    where ``logit_j`` is detector ``j``'s calibrated logit, or 0 when it abstained, and
    ``abstained_j`` is 1 when it abstained, else 0. An image on which every detector
    abstained gets no score (NaN), as in the ensemble: there is no evidence to weigh."""

    detectors: tuple[str, ...]
    weights: tuple[float, ...]
    abstention_weights: tuple[float, ...]
    intercept: float
    calibrators: tuple[Calibrator | None, ...]
    regularization: float
    fitted_on: FitCounts

    def features(self, score_matrix: npt.ArrayLike) -> FloatArray:
        """The regression's inputs: the calibrated logits, then the abstention indicators."""
        return _combination_features(_score_matrix(score_matrix, self.detectors), self.calibrators)

    def apply(self, score_matrix: npt.ArrayLike) -> FloatArray:
        """The combined probability per row (image) of ``score_matrix`` (one column per
        detector, in :attr:`detectors` order, NaN where it abstained)."""
        matrix = _score_matrix(score_matrix, self.detectors)
        features = _combination_features(matrix, self.calibrators)
        coefficients = np.array([*self.weights, *self.abstention_weights])
        out = _sigmoid(features @ coefficients + self.intercept)
        out[np.isnan(matrix).all(axis=1)] = np.nan
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "logistic",
            "intercept": self.intercept,
            "regularization": self.regularization,
            "detectors": [
                {
                    "name": name,
                    "weight": weight,
                    "abstention_weight": abstention_weight,
                    "calibration": None if calibrator is None else calibrator.as_dict(),
                }
                for name, weight, abstention_weight, calibrator in zip(
                    self.detectors,
                    self.weights,
                    self.abstention_weights,
                    self.calibrators,
                    strict=True,
                )
            ],
            "fitted_on": self.fitted_on.as_dict(),
        }


def fit_combination(
    score_matrix: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    detectors: Sequence[str] | None = None,
    calibrators: Mapping[str, Calibrator] | None = None,
    regularization: float = 1.0,
) -> Combination:
    """A logistic regression of the label on each detector's calibrated logit and an
    abstention indicator per detector (see :class:`Combination`).

    ``score_matrix`` has one row per image and one column per detector (named by
    ``detectors``, in order; by column number when not given), NaN where the detector
    abstained; ``calibrators`` maps a detector name to the calibration applied to its column
    first (none: the raw score). Rows on which every detector abstained carry no evidence
    and are left out (counted in ``fitted_on.n_abstained``).

    ``regularization`` is scikit-learn's ``C`` for an L2 penalty: it keeps the weights
    finite when a detector always or never abstains (its indicator is then constant, and
    inseparable from the intercept) or when the classes separate perfectly; on a few
    thousand images its pull on the weights is small.
    """
    matrix = np.asarray(score_matrix, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"the score matrix must be two-dimensional, got shape {matrix.shape}")
    names = (
        tuple(detectors) if detectors is not None else tuple(str(j) for j in range(matrix.shape[1]))
    )
    matrix = _score_matrix(matrix, names)
    y = _labels(labels, matrix.shape[0])
    unknown = sorted(set(calibrators or {}) - set(names))
    if unknown:
        raise ValueError(f"calibrations for detectors not in the matrix: {', '.join(unknown)}")
    chosen = tuple((calibrators or {}).get(name) for name in names)
    evidence = ~np.isnan(matrix).all(axis=1)
    counts = FitCounts(
        n_real=int(np.count_nonzero(y[evidence] == 0)),
        n_ai=int(np.count_nonzero(y[evidence] == 1)),
        n_abstained=int(np.count_nonzero(~evidence)),
    )
    _require(counts, "combination", PARAMETRIC_MIN_PER_CLASS)
    features = _combination_features(matrix[evidence], chosen)
    model = LogisticRegression(C=regularization, solver="lbfgs", tol=1e-10, max_iter=1000)
    model.fit(features, y[evidence])
    coefficients = model.coef_[0]
    d = len(names)
    return Combination(
        detectors=names,
        weights=tuple(float(w) for w in coefficients[:d]),
        abstention_weights=tuple(float(w) for w in coefficients[d:]),
        intercept=float(model.intercept_[0]),
        calibrators=chosen,
        regularization=regularization,
        fitted_on=counts,
    )


def split_held_out(
    labels: npt.ArrayLike, *, held_out_share: float = 0.3, seed: int
) -> tuple[IndexArray, IndexArray]:
    """Indices ``(fit, held_out)`` of a split stratified on the label (scikit-learn's
    ``train_test_split``), so both parts keep the labelled set's share of AI-generated
    images; the same seed gives the same split."""
    y = _labels(labels, None)
    fit, held_out = train_test_split(
        np.arange(y.size), test_size=held_out_share, stratify=y, random_state=seed
    )
    return np.sort(fit).astype(np.intp), np.sort(held_out).astype(np.intp)


@dataclass(frozen=True)
class CalibrationMetrics:
    """How well scores behave as probabilities: log loss and Brier score (both proper
    scoring rules), and the expected calibration error over ``ECE_BINS`` equal-width bins."""

    log_loss: float
    brier: float
    ece: float

    def as_dict(self) -> dict[str, float]:
        return {"log_loss": self.log_loss, "brier": self.brier, "ece": self.ece}


@dataclass(frozen=True)
class BeforeAfter:
    """A calibration judged on held-out images: the same images scored before and after."""

    before: CalibrationMetrics
    after: CalibrationMetrics
    counts: FitCounts

    def as_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.as_dict(),
            "after": self.after.as_dict(),
            "ece_bins": ECE_BINS,
            "held_out": self.counts.as_dict(),
        }


def before_after(before: npt.ArrayLike, after: npt.ArrayLike, labels: npt.ArrayLike) -> BeforeAfter:
    """Log loss, Brier score and ECE of ``before`` and ``after`` (scores of the same
    held-out images, e.g. a detector's raw scores and ``calibrator.apply`` of them). An
    image abstained on in either is left out of both, so both are measured on the same
    images, and counted."""
    raw = _probabilities(before)
    calibrated = _probabilities(after)
    if raw.shape != calibrated.shape:
        raise ValueError(f"before and after differ in shape: {raw.shape} and {calibrated.shape}")
    y = _labels(labels, raw.size)
    answered = ~(np.isnan(raw) | np.isnan(calibrated))
    kept = y[answered]
    counts = FitCounts(
        n_real=int(np.count_nonzero(kept == 0)),
        n_ai=int(np.count_nonzero(kept == 1)),
        n_abstained=int(np.count_nonzero(~answered)),
    )
    if kept.size == 0:
        raise ValueError("no held-out image was scored both before and after")
    return BeforeAfter(
        before=_metrics(raw[answered], kept),
        after=_metrics(calibrated[answered], kept),
        counts=counts,
    )


def _metrics(p: FloatArray, y: npt.NDArray[np.int64]) -> CalibrationMetrics:
    clipped = np.clip(p, _LOG_LOSS_EPS, 1.0 - _LOG_LOSS_EPS)
    log_loss = -np.mean(np.where(y == 1, np.log(clipped), np.log1p(-clipped)))
    return CalibrationMetrics(
        log_loss=float(log_loss), brier=float(np.mean((p - y) ** 2)), ece=_ece(p, y)
    )


def _ece(p: FloatArray, y: npt.NDArray[np.int64], bins: int = ECE_BINS) -> float:
    """``sum_b (n_b / n) * |mean label in b - mean score in b|`` over equal-width bins of
    [0, 1], the last one closed."""
    index = np.minimum((p * bins).astype(np.intp), bins - 1)
    gap = np.bincount(index, weights=y.astype(np.float64), minlength=bins) - np.bincount(
        index, weights=p, minlength=bins
    )
    return float(np.abs(gap).sum() / p.size)


def _combination_features(
    matrix: FloatArray, calibrators: tuple[Calibrator | None, ...]
) -> FloatArray:
    abstained = np.isnan(matrix)
    logits = np.empty_like(matrix)
    for j, calibrator in enumerate(calibrators):
        column = matrix[:, j] if calibrator is None else calibrator.apply(matrix[:, j])
        logits[:, j] = logit(column)
    logits[abstained] = 0.0
    return np.hstack([logits, abstained.astype(np.float64)])


def _score_matrix(score_matrix: npt.ArrayLike, detectors: tuple[str, ...]) -> FloatArray:
    matrix = np.asarray(score_matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(detectors):
        raise ValueError(
            f"the score matrix must have one column per detector ({len(detectors)}), "
            f"got shape {matrix.shape}"
        )
    _check_range(matrix)
    return matrix


def _platt_targets(y: npt.NDArray[np.int64], counts: FitCounts) -> FloatArray:
    return np.where(y == 1, (counts.n_ai + 1) / (counts.n_ai + 2), 1.0 / (counts.n_real + 2))


def _labelled(
    scores: npt.ArrayLike, labels: npt.ArrayLike
) -> tuple[FloatArray, npt.NDArray[np.int64], FitCounts]:
    """The scored examples (abstentions left out) and what they hold."""
    x = _probabilities(scores)
    y = _labels(labels, x.size)
    answered = ~np.isnan(x)
    kept = y[answered]
    counts = FitCounts(
        n_real=int(np.count_nonzero(kept == 0)),
        n_ai=int(np.count_nonzero(kept == 1)),
        n_abstained=int(np.count_nonzero(~answered)),
    )
    return x[answered], kept, counts


def _require(counts: FitCounts, kind: str, per_class: int) -> None:
    if min(counts.n_real, counts.n_ai) < per_class:
        raise TooFewExamples(kind, counts, per_class)


def _probabilities(scores: npt.ArrayLike) -> FloatArray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {array.shape}")
    _check_range(array)
    return array


def _check_range(array: FloatArray) -> None:
    answered = array[~np.isnan(array)]
    if answered.size and not (answered.min() >= 0.0 and answered.max() <= 1.0):
        raise ValueError("scores must be probabilities within [0, 1] (NaN for an abstention)")


def _labels(labels: npt.ArrayLike, size: int | None) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim != 1 or (size is not None and y.size != size):
        raise ValueError(f"labels must be one per score ({size}), got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 1 (AI-generated) or 0 (real)")
    return y.astype(np.int64)


def _sigmoid(z: FloatArray) -> FloatArray:
    return np.asarray(expit(z), dtype=np.float64)
