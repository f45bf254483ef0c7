"""The ensemble: combine detector scores into one ``ai_score`` and decide whether a human
should look.

The published detectors describe their output as "an indication, not proof", so the
ensemble never says an image *is* AI-generated: it says whether the evidence is strong
enough to put the image in front of a moderator, and why.

Everything that decides a verdict is one :class:`EnsembleConfig`: the combination rule,
the weights, the calibrations, the threshold and the decisive rules. Its canonical
definition has a digest, and its version names that digest, so a verdict stored under one
configuration is never mistaken for a verdict under another.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from db.models import VerdictLabel
from workers.detectors.base import DetectorSpec

Rule = Literal["weighted-mean", "logistic"]
# The weighted mean of calibrated probabilities over the detectors that answered.
WEIGHTED_MEAN: Rule = "weighted-mean"
# A fitted logistic combination: sigmoid(intercept + sum of weight x logit(calibrated p)
# over the detectors that answered + sum of abstention weights over those that did not).
LOGISTIC: Rule = "logistic"
RULES: tuple[Rule, ...] = (WEIGHTED_MEAN, LOGISTIC)

# A decisive detector's answer at or above this flags the image on its own.
DECISIVE_MIN_SCORE = 0.5
DEFAULT_WEIGHT = 1.0
# What a detector without a fitted weight contributes to a logistic combination: nothing.
LOGISTIC_DEFAULT_WEIGHT = 0.0
# Probabilities are clamped this far from 0 and 1 before a logit.
LOGIT_EPS = 1e-7


def logit(p: float) -> float:
    q = min(max(p, LOGIT_EPS), 1.0 - LOGIT_EPS)
    return math.log(q / (1.0 - q))


def sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True)
class Calibration:
    """Platt scaling on the logit, ``p' = sigmoid(a * logit(p) + b)``, or, when ``x`` and
    ``y`` are given, an isotonic map: piecewise-linear through the points (x, y), flat
    beyond the ends. Identity by default; fitted per detector on a labelled set
    (``synthsentry calibrate``)."""

    a: float = 1.0
    b: float = 0.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y) or (self.x and len(self.x) < 2):
            raise ValueError("an isotonic calibration needs at least two (x, y) points")
        if any(b < a for a, b in itertools.pairwise(self.x)) or any(
            b < a for a, b in itertools.pairwise(self.y)
        ):
            raise ValueError("an isotonic calibration's points must not decrease")
        values = (self.a, self.b, *self.x, *self.y)
        if not all(math.isfinite(v) for v in values):
            raise ValueError("a calibration must be finite")
        if any(not 0.0 <= v <= 1.0 for v in (*self.x, *self.y)):
            raise ValueError("an isotonic calibration maps [0, 1] to [0, 1]")

    @property
    def kind(self) -> str:
        return "isotonic" if self.x else "platt"

    @property
    def is_identity(self) -> bool:
        return not self.x and self.a == 1.0 and self.b == 0.0

    def apply(self, p: float) -> float:
        if self.is_identity:
            return p
        if self.x:
            return _interpolate(p, self.x, self.y)
        return sigmoid(self.a * logit(p) + self.b)

    def definition(self) -> dict[str, Any]:
        if self.x:
            return {"kind": "isotonic", "x": [_f(v) for v in self.x], "y": [_f(v) for v in self.y]}
        return {"kind": "platt", "a": _f(self.a), "b": _f(self.b)}

    @classmethod
    def from_definition(cls, document: Mapping[str, Any]) -> Calibration:
        kind = document.get("kind")
        if kind == "platt":
            return cls(a=float(document["a"]), b=float(document["b"]))
        if kind == "isotonic":
            return cls(
                x=tuple(float(v) for v in document["x"]),
                y=tuple(float(v) for v in document["y"]),
            )
        raise ValueError(f"unknown calibration kind {kind!r}")


def _f(value: float) -> float:
    """A float as a definition holds it: -0.0 is written 0.0 (JSONB keeps no negative zero,
    and a definition must read back to the digest it was stored under)."""
    return float(value) + 0.0


def _interpolate(p: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    if p <= xs[0]:
        return ys[0]
    if p >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, p)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 if x1 == x0 else y0 + (y1 - y0) * (p - x0) / (x1 - x0)


@dataclass(frozen=True)
class EnsembleConfig:
    """Everything that decides a verdict from the detectors' scores.

    ``decisive`` names the detectors whose positive answer (at least ``decisive_min_score``)
    flags an image whatever the others say; build it from the detector specs with
    :meth:`for_detectors`, never by hand in a pipeline. ``review_unscored``: the rejection
    reasons whose "not scored" verdicts are flagged for review.
    """

    threshold: float = 0.5
    weights: Mapping[str, float] = field(default_factory=dict)
    calibrations: Mapping[str, Calibration] = field(default_factory=dict)
    decisive: frozenset[str] = frozenset()
    decisive_min_score: float = DECISIVE_MIN_SCORE
    rule: Rule = WEIGHTED_MEAN
    # Rejection reasons (RejectReason values) whose uploads a moderator should see although
    # no detector scored them: a recognised image format the decoder refused is how an
    # upload could opt out of moderation.
    review_unscored: frozenset[str] = frozenset()
    # The logistic rule only: the constant term, and what each detector's abstaining adds.
    intercept: float = 0.0
    abstention_weights: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown ensemble rule {self.rule!r} (known: {', '.join(RULES)})")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"the threshold must be within [0, 1], got {self.threshold!r}")
        if self.rule == WEIGHTED_MEAN:
            bad = sorted(name for name, w in self.weights.items() if not 0.0 <= w < math.inf)
            if bad:
                raise ValueError(f"ensemble weights must be finite and >= 0: {', '.join(bad)}")
            if self.intercept != 0.0 or self.abstention_weights:
                raise ValueError("an intercept and abstention weights belong to the logistic rule")
        values = [*self.weights.values(), *self.abstention_weights.values(), self.intercept]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("ensemble weights and the intercept must be finite")

    @classmethod
    def for_detectors(
        cls,
        specs: Iterable[DetectorSpec],
        *,
        threshold: float,
        weights: Mapping[str, float] | None = None,
        calibrations: Mapping[str, Calibration] | None = None,
        review_unscored: Iterable[str] = (),
    ) -> EnsembleConfig:
        """The configuration for an ensemble of these detector specs: which of them are
        decisive comes from each spec (``DetectorSpec.decisive``) and nowhere else. Weights
        and calibrations of detectors outside the ensemble are left out: they decide
        nothing here, so they must not make a new version."""
        members = list(specs)
        names = {spec.name for spec in members}
        return cls(
            threshold=threshold,
            weights={name: w for name, w in (weights or {}).items() if name in names},
            calibrations={n: c for n, c in (calibrations or {}).items() if n in names},
            decisive=frozenset(spec.name for spec in members if spec.decisive),
            review_unscored=frozenset(review_unscored),
        )

    @property
    def default_weight(self) -> float:
        return LOGISTIC_DEFAULT_WEIGHT if self.rule == LOGISTIC else DEFAULT_WEIGHT

    def weight(self, detector: str) -> float:
        return self.weights.get(detector, self.default_weight)

    def definition(self) -> dict[str, Any]:
        """The canonical, JSON-ready definition: equal definitions decide alike. Default
        weights and identity calibrations are left out, since they are what an absent entry
        means; so is an empty ``review_unscored``, and the logistic rule's terms under the
        weighted mean (configurations from before them keep their digest)."""
        default = self.default_weight
        definition: dict[str, Any] = {
            "rule": self.rule,
            "threshold": _f(self.threshold),
            "default_weight": default,
            "weights": {name: _f(w) for name, w in sorted(self.weights.items()) if w != default},
            "calibrations": {
                name: c.definition()
                for name, c in sorted(self.calibrations.items())
                if not c.is_identity
            },
            "decisive": sorted(self.decisive),
            "decisive_min_score": _f(self.decisive_min_score),
        }
        if self.review_unscored:
            definition["review_unscored"] = sorted(self.review_unscored)
        if self.rule == LOGISTIC:
            definition["intercept"] = _f(self.intercept)
            definition["abstention_weights"] = {
                name: _f(w) for name, w in sorted(self.abstention_weights.items()) if w != 0.0
            }
        return definition

    @classmethod
    def from_definition(cls, definition: Mapping[str, Any]) -> EnsembleConfig:
        """The configuration a stored definition describes (``ensembles.definition``);
        refused unless it reads back to the same definition, so its digest, and the version
        of every verdict made under it, are the ones stored."""
        rule = definition.get("rule")
        if rule not in RULES:
            raise ValueError(f"unknown ensemble rule {rule!r} (known: {', '.join(RULES)})")
        if "threshold" not in definition:
            raise ValueError("the definition names no threshold (a legacy record)")
        config = cls(
            rule=rule,
            threshold=float(definition["threshold"]),
            weights={k: float(v) for k, v in definition.get("weights", {}).items()},
            calibrations={
                k: Calibration.from_definition(v)
                for k, v in definition.get("calibrations", {}).items()
            },
            decisive=frozenset(definition.get("decisive", ())),
            decisive_min_score=float(definition.get("decisive_min_score", DECISIVE_MIN_SCORE)),
            review_unscored=frozenset(definition.get("review_unscored", ())),
            intercept=float(definition.get("intercept", 0.0)),
            abstention_weights={
                k: float(v) for k, v in definition.get("abstention_weights", {}).items()
            },
        )
        if config.definition() != dict(definition):
            raise ValueError("the definition does not read back to itself (not canonical)")
        return config

    @cached_property
    def digest(self) -> str:
        """sha256 of the canonical definition."""
        return _digest(self.definition())

    @property
    def version(self) -> str:
        """``<rule>@<first 16 hex digits of the digest>``: stored with every verdict."""
        return f"{self.rule}@{self.digest[:16]}"


@dataclass(frozen=True)
class DetectorScore:
    """What the ensemble needs of one stored detection."""

    name: str
    version: str
    score: float | None
    error: str | None = None
    summary: str | None = None  # what a decisive detector found, for the flag reason


@dataclass(frozen=True)
class VerdictDecision:
    ai_score: float | None
    label: VerdictLabel
    flagged: bool
    reason: str
    # The detector versions and scores combined, and their digest: with the ensemble
    # version, the identity of a verdict.
    detector_set: dict[str, Any]
    detector_set_digest: str


def detector_set(scores: Sequence[DetectorScore]) -> dict[str, Any]:
    return {
        "detectors": [
            {"name": s.name, "version": s.version, "score": s.score, "failed": s.error is not None}
            for s in sorted(scores, key=lambda s: s.name)
        ]
    }


def combine(scores: Sequence[DetectorScore], config: EnsembleConfig) -> VerdictDecision:
    """The configuration's rule over calibrated probabilities: their weighted mean over
    the detectors that answered, or the fitted logistic combination (``LOGISTIC``).

    Abstentions (score None) and failures are left out of the mean, never counted as
    "human": a provenance check that finds nothing says nothing about the pixels. The
    logistic rule adds what it learnt an abstention tells (its abstention weight), which
    is a fitted fact about the data, not an assumption that silence means "real".
    """
    logistic = config.rule == LOGISTIC
    # Under the weighted mean a weight of 0 leaves a detector out; under the logistic rule
    # every detector with a score answers (a weight of 0 adds nothing to the sum), so an
    # image is inconclusive only when none answered, as the fitted regression treats it.
    answered = [s for s in scores if s.score is not None and _counts(config, s.name)]
    failed = [s for s in scores if s.error is not None]
    combined = detector_set(scores)
    digest = _digest(combined)

    if not answered:
        why = "no detector produced a score"
        if failed:
            why += f" ({len(failed)} failed: {', '.join(s.name for s in failed)})"
        return VerdictDecision(None, VerdictLabel.INCONCLUSIVE, False, why, combined, digest)

    # A decisive finding flags whatever its weight under a fitted logistic rule: a check
    # that never answered on the fit split gets a weight of 0, and must still flag.
    decisive = [
        s
        for s in answered
        if s.name in config.decisive and (s.score or 0.0) >= config.decisive_min_score
    ]
    calibrated = {
        s.name: config.calibrations.get(s.name, Calibration()).apply(s.score or 0.0)
        for s in answered
    }
    if logistic:
        silent = sum(config.abstention_weights.get(s.name, 0.0) for s in scores if s.score is None)
        z = config.intercept + silent
        z += sum(config.weight(name) * logit(p) for name, p in calibrated.items())
        ai_score = sigmoid(z)
    else:
        total_weight = sum(config.weight(s.name) for s in answered)
        ai_score = sum(config.weight(name) * p for name, p in calibrated.items()) / total_weight
    parts = ", ".join(f"{name} {p:.2f}" for name, p in sorted(calibrated.items()))
    flagged = ai_score >= config.threshold or bool(decisive)
    if decisive:
        found = "; ".join(f"{s.name}: {s.summary or 'AI signal found'}" for s in decisive)
        reason = (
            f"{found} (ai_score {ai_score:.2f}; {parts}): an indication for human review, not proof"
        )
    elif flagged:
        reason = (
            f"ai_score {ai_score:.2f} is at or above the review threshold "
            f"{config.threshold:.2f} ({parts}): an indication for human review, not proof"
        )
    else:
        reason = (
            f"ai_score {ai_score:.2f} is below the review threshold "
            f"{config.threshold:.2f} ({parts})"
        )
    if failed:
        reason += f"; not counted: {', '.join(s.name for s in failed)} failed"
    label = VerdictLabel.LIKELY_AI if flagged else VerdictLabel.NO_INDICATION
    return VerdictDecision(ai_score, label, flagged, reason, combined, digest)


def _counts(config: EnsembleConfig, detector: str) -> bool:
    return config.rule == LOGISTIC or config.weight(detector) > 0


def not_scored(reason: str, message: str, config: EnsembleConfig) -> VerdictDecision:
    """The verdict on an upload refused before any detector saw it (``reason``, a
    RejectReason value, and ``message``, the sentence saying why): no score and no
    indication either way, flagged only when the configuration sends this reason to
    review."""
    flagged = reason in config.review_unscored
    combined: dict[str, Any] = {"detectors": [], "not_scored": reason}
    why = f"not scored ({reason}): {message}"
    if flagged:
        why += (
            "; a file refused for this reason goes to human review, since no detector could "
            "look at it"
        )
    return VerdictDecision(None, VerdictLabel.NOT_SCORED, flagged, why, combined, _digest(combined))


def _digest(document: Mapping[str, Any]) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
