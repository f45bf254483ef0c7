"""Ensemble v0: combine detector scores into one ``ai_score`` and decide whether a human
should look.

The published detectors describe their output as "an indication, not proof", so the
ensemble never says an image *is* AI-generated: it says whether the evidence is strong
enough to put the image in front of a moderator, and why.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENSEMBLE_VERSION = "v0-weighted-mean"

LIKELY_AI = "likely_ai"
NO_INDICATION = "no_indication"
INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Calibration:
    """Platt scaling on the logit: ``p' = sigmoid(a * logit(p) + b)``. Identity by default;
    fitted per detector on a labelled set when one is available."""

    a: float = 1.0
    b: float = 0.0

    def apply(self, p: float) -> float:
        if self.a == 1.0 and self.b == 0.0:
            return p
        eps = 1e-7
        q = min(max(p, eps), 1.0 - eps)
        z = self.a * math.log(q / (1.0 - q)) + self.b
        return 1.0 / (1.0 + math.exp(-z))


@dataclass(frozen=True)
class EnsembleConfig:
    threshold: float = 0.5
    weights: Mapping[str, float] = field(default_factory=dict)
    calibrations: Mapping[str, Calibration] = field(default_factory=dict)
    version: str = ENSEMBLE_VERSION

    def weight(self, detector: str) -> float:
        return self.weights.get(detector, 1.0)


@dataclass(frozen=True)
class DetectorScore:
    """What the ensemble needs of one stored detection."""

    name: str
    version: str
    score: float | None
    error: str | None = None
    # A decisive detector's positive answer (score >= 0.5) flags the image whatever the
    # other detectors say: a signed "made by AI" manifest outweighs any pixel statistics.
    decisive: bool = False
    summary: str | None = None  # what a decisive detector found, for the flag reason


@dataclass(frozen=True)
class VerdictDecision:
    ai_score: float | None
    label: str
    flagged: bool
    reason: str
    detector_set: dict[str, Any]
    detector_set_digest: str


def combine(scores: Sequence[DetectorScore], config: EnsembleConfig) -> VerdictDecision:
    """Weighted mean of calibrated probabilities over the detectors that answered.

    Abstentions (score None) and failures are left out of the mean, never counted as
    "human": a provenance check that finds nothing says nothing about the pixels.
    """
    answered = [s for s in scores if s.score is not None and config.weight(s.name) > 0]
    failed = [s for s in scores if s.error is not None]
    detector_set = {
        "detectors": [
            {"name": s.name, "version": s.version, "score": s.score, "failed": s.error is not None}
            for s in sorted(scores, key=lambda s: s.name)
        ],
        "threshold": config.threshold,
    }
    digest = hashlib.sha256(json.dumps(detector_set, sort_keys=True).encode()).hexdigest()

    if not answered:
        why = "no detector produced a score"
        if failed:
            why += f" ({len(failed)} failed: {', '.join(s.name for s in failed)})"
        return VerdictDecision(None, INCONCLUSIVE, False, why, detector_set, digest)

    decisive = [s for s in answered if s.decisive and (s.score or 0.0) >= 0.5]
    total_weight = sum(config.weight(s.name) for s in answered)
    calibrated = {
        s.name: config.calibrations.get(s.name, Calibration()).apply(s.score or 0.0)
        for s in answered
    }
    ai_score = sum(config.weight(name) * p for name, p in calibrated.items()) / total_weight
    parts = ", ".join(f"{name} {p:.2f}" for name, p in sorted(calibrated.items()))
    flagged = ai_score >= config.threshold or bool(decisive)
    if decisive:
        label = LIKELY_AI
        found = "; ".join(f"{s.name}: {s.summary or 'AI signal found'}" for s in decisive)
        reason = (
            f"{found} (ai_score {ai_score:.2f}; {parts}): an indication for human review, not proof"
        )
    elif flagged:
        label = LIKELY_AI
        reason = (
            f"ai_score {ai_score:.2f} is at or above the review threshold "
            f"{config.threshold:.2f} ({parts}): an indication for human review, not proof"
        )
    else:
        label = NO_INDICATION
        reason = (
            f"ai_score {ai_score:.2f} is below the review threshold "
            f"{config.threshold:.2f} ({parts})"
        )
    if failed:
        reason += f"; not counted: {', '.join(s.name for s in failed)} failed"
    return VerdictDecision(ai_score, label, flagged, reason, detector_set, digest)
