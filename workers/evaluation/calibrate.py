"""``synthsentry calibrate``: fit the ensemble on labelled scores and choose its flag
threshold with a stated false-positive guarantee; the result is a new configuration that
an operator activates (``workers.ensembles``), never the active one by itself.

The labelled set is split once, stratified and seeded: the fit split fits each detector's
calibration (Platt, temperature or isotonic) and the combination (a logistic regression on
the calibrated logits with abstention indicators, or the weighted mean of the calibrated
probabilities); the held-out split measures before and after, and its real images choose
the threshold by the Neyman-Pearson order-statistic rule (``workers.evaluation.threshold``):
with probability at least 1 - delta the share of real images flagged by the score is at
most alpha. The rule needs enough held-out real images; short of them the calibration is
refused with how many more are needed. A target review volume is the alternative.

The guarantee covers the ensemble's score. A decisive detector (a signed provenance claim)
flags on its own whatever the score; its own precision is what ``synthsentry eval``
reports, and the held-out false-positive rate of the complete flag is reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from workers.ensemble import (
    LOGISTIC,
    WEIGHTED_MEAN,
    Calibration,
    DetectorScore,
    EnsembleConfig,
    combine,
)
from workers.evaluation.calibration import (
    CalibrationKind,
    Calibrator,
    TooFewExamples,
    before_after,
    fit_calibrator,
    fit_combination,
    split_held_out,
)
from workers.evaluation.metrics import compute_metrics
from workers.evaluation.run import Scored
from workers.evaluation.threshold import (
    TooFewRealImages,
    neyman_pearson_threshold,
    threshold_for_review_volume,
)

FloatArray = npt.NDArray[np.float64]
Combine = Literal["logistic", "weighted-mean"]


# What the guarantee is about. Review cases open only for images a configuration flagged:
# fitted on moderators' decisions, the real images are the ones sent to review, and the
# bound is on the share of those a new threshold still flags, not of all real uploads.
SCOPE_FILES = "real images drawn like the labelled set's"
SCOPE_RECORDED = (
    "real images like those the earlier configuration sent to review (a review export holds "
    "only flagged images): not all real uploads; add a random sample of decided uploads for "
    "a guarantee over all of them"
)
# The held-out rates at the chosen threshold come from the images that chose it.
HELD_OUT_NOTE = "rates at the threshold are on the held-out images that chose it (optimistic)"


class CalibrationRefused(ValueError):
    """A calibration that cannot be made as asked, with what would make it possible."""


@dataclass(frozen=True)
class Request:
    method: CalibrationKind = "platt"
    combine: Combine = "logistic"
    alpha: float | None = 0.01  # target false-positive rate (None: review_share instead)
    delta: float = 0.05  # the guarantee holds with probability 1 - delta
    review_share: float | None = None  # flag about this share of the set instead
    held_out: float = 0.3
    seed: int = 0


@dataclass(frozen=True)
class Calibrated:
    config: EnsembleConfig
    detectors: tuple[str, ...]
    provenance: dict[str, Any]  # stored with the configuration; also what is printed


def calibrate(scored: Scored, *, base: EnsembleConfig, request: Request) -> Calibrated:
    """A new configuration fitted on ``scored`` (see the module's docstring). ``base``: the
    configuration in force, whose decisive rules and rejection reasons are kept and which
    the held-out report compares against."""
    if (request.alpha is None) == (request.review_share is None):
        raise CalibrationRefused("ask for a false-positive rate (alpha) or a review share")
    names = tuple(scored.scores)
    if not names:
        raise CalibrationRefused("the set has no detector scores to fit")
    matrix = np.column_stack([scored.scores[name] for name in names])
    labels = scored.labels
    try:
        fit, held = split_held_out(labels, held_out_share=request.held_out, seed=request.seed)
    except ValueError as exc:  # a class too small to be split
        raise CalibrationRefused(
            f"the set cannot be split into a fit and a held-out part with both classes "
            f"({int(np.count_nonzero(labels == 1))} AI, {int(np.count_nonzero(labels == 0))} "
            f"real): {exc}"
        ) from exc

    calibrators: dict[str, Calibrator] = {}
    skipped: dict[str, str] = {}
    for j, name in enumerate(names):
        try:
            calibrators[name] = fit_calibrator(request.method, matrix[fit, j], labels[fit])
        except TooFewExamples as exc:
            skipped[name] = str(exc)  # left as it is: its raw score
    calibrations = {name: _as_calibration(c) for name, c in calibrators.items()}
    if request.combine == LOGISTIC:
        try:
            combination = fit_combination(
                matrix[fit], labels[fit], detectors=names, calibrators=calibrators
            )
        except TooFewExamples as exc:
            raise CalibrationRefused(f"the combination cannot be fitted: {exc}") from exc
        config = replace(
            base,
            rule=LOGISTIC,
            weights=dict(zip(names, combination.weights, strict=True)),
            abstention_weights=dict(zip(names, combination.abstention_weights, strict=True)),
            intercept=combination.intercept,
            calibrations=calibrations,
            threshold=0.0,
        )
    else:
        config = replace(
            base,
            rule=WEIGHTED_MEAN,
            intercept=0.0,
            abstention_weights={},
            calibrations=calibrations,
            threshold=0.0,
        )

    after = ensemble_scores(config, names, matrix[held])
    before = ensemble_scores(replace(base, threshold=0.0), names, matrix[held])
    held_labels = labels[held]
    guarantee = _threshold(after, held_labels, request)
    threshold = float(guarantee["threshold"])
    config = replace(config, threshold=threshold)
    flags = _complete_flags(config, names, matrix[held])
    real = held_labels == 0
    provenance: dict[str, Any] = {
        "source": "calibrate",
        "scope": SCOPE_RECORDED if scored.recorded else SCOPE_FILES,
        "method": request.method,
        "combine": request.combine,
        "recorded_scores": scored.recorded,
        "detector_versions": dict(scored.versions),
        "split": {
            "seed": request.seed,
            "held_out_share": request.held_out,
            "fit": _counts(labels[fit]),
            "held_out": _counts(held_labels),
        },
        "calibrations_skipped": skipped,
        "guarantee": guarantee,
        "held_out": {
            "base_version": base.version,
            "ensemble": _compare(before, after, held_labels, base.threshold, threshold),
            "detectors": {
                name: _detector_report(matrix[held, j], calibrators.get(name), held_labels)
                for j, name in enumerate(names)
            },
            "note": HELD_OUT_NOTE,
            # The flag as the fleet will raise it: the score, or a decisive detector.
            "flag_fpr_on_real": float(np.mean(flags[real])) if real.any() else None,
        },
    }
    return Calibrated(config=config, detectors=names, provenance=provenance)


def ensemble_scores(config: EnsembleConfig, names: Sequence[str], matrix: FloatArray) -> FloatArray:
    """The ai_score the ensemble gives each row (NaN: no detector answered), computed by
    the fleet's own ``combine``, so the threshold is chosen on the scores it will see."""
    out = np.full(matrix.shape[0], np.nan)
    for i, row in enumerate(matrix):
        decision = combine(_detector_scores(names, row), config)
        if decision.ai_score is not None:
            out[i] = decision.ai_score
    return out


def _detector_report(
    scores: FloatArray, calibrator: Calibrator | None, labels: npt.NDArray[np.int64]
) -> dict[str, Any] | None:
    """One detector's held-out calibration before and after; None when it answered on no
    held-out image (nothing to compare)."""
    after = calibrator.apply(scores) if calibrator is not None else scores
    try:
        return before_after(scores, after, labels).as_dict()
    except ValueError:
        return None


def _complete_flags(
    config: EnsembleConfig, names: Sequence[str], matrix: FloatArray
) -> npt.NDArray[np.bool_]:
    return np.array([combine(_detector_scores(names, row), config).flagged for row in matrix])


def _detector_scores(names: Sequence[str], row: FloatArray) -> list[DetectorScore]:
    return [
        DetectorScore(name, "fitted", None if math.isnan(score) else float(score))
        for name, score in zip(names, row, strict=True)
    ]


def _as_calibration(calibrator: Calibrator) -> Calibration:
    convert = getattr(calibrator, "to_calibration", None)
    if convert is None:
        raise CalibrationRefused(f"a {calibrator.kind} calibration cannot be stored")
    calibration: Calibration = convert()
    return calibration


def _threshold(
    scores: FloatArray, labels: npt.NDArray[np.int64], request: Request
) -> dict[str, Any]:
    if request.review_share is not None:
        volume = threshold_for_review_volume(scores, request.review_share)
        if volume.threshold > 1.0:
            raise CalibrationRefused(
                f"the top {request.review_share:g} of the held-out scores tie at the top: no "
                "threshold within [0, 1] flags that share; ask for a larger share"
            )
        return {"kind": "review_share", **volume.as_dict()}
    assert request.alpha is not None
    try:
        chosen = neyman_pearson_threshold(
            scores[labels == 0], alpha=request.alpha, delta=request.delta
        )
    except TooFewRealImages as exc:
        share = request.held_out
        raise CalibrationRefused(
            f"the held-out split has {exc.n_real} scored real images; a false-positive rate "
            f"of at most {request.alpha:g} with confidence {1 - request.delta:g} needs "
            f"{exc.n_required} ({exc.more_needed} more, about {math.ceil(exc.more_needed / share)} "
            f"more real images in the set at a held-out share of {share:g}), or ask for a "
            "review share instead"
        ) from exc
    if chosen.flags_nothing or chosen.threshold > 1.0:
        raise CalibrationRefused(
            "every held-out real image scores at the top: no threshold within [0, 1] bounds "
            "the false-positive rate"
        )
    return {"kind": "neyman_pearson", **chosen.as_dict()}


def _counts(labels: npt.NDArray[np.int64]) -> dict[str, int]:
    return {"ai": int(np.count_nonzero(labels == 1)), "real": int(np.count_nonzero(labels == 0))}


def _compare(
    before: FloatArray,
    after: FloatArray,
    labels: npt.NDArray[np.int64],
    before_threshold: float,
    after_threshold: float,
) -> dict[str, Any]:
    """The ensemble's score on the held-out split under the configuration in force and the
    fitted one: calibration (log loss, Brier, ECE), ranking (AUC) and the rates at each one's
    own threshold."""
    report = before_after(before, after, labels).as_dict()
    for side, scores, threshold in (
        ("before", before, before_threshold),
        ("after", after, after_threshold),
    ):
        metrics = compute_metrics(scores, labels, threshold, n_bootstrap=0)
        report[side] = {
            **report[side],
            "threshold": threshold,
            "roc_auc": metrics.roc_auc,
            "fpr_at_threshold": metrics.fpr_at_threshold,
            "tpr_at_threshold": metrics.tpr_at_threshold,
        }
    return report
