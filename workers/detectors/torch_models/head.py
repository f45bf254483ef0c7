"""How a model's logits become ``P(AI)`` and the evidence stored beside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workers.detectors.base import DetectorOutput
from workers.detectors.options import Activation


@dataclass(frozen=True)
class ScoreHead:
    """How logits become ``P(AI)``: softmax over classes and take ``ai_index``, or a sigmoid
    of logit ``ai_index``. ``labels`` (Sumsub) names (AI class, other class) in evidence."""

    activation: Activation
    ai_index: int
    labels: tuple[str, str] | None = None

    def outputs(self, logits: torch.Tensor) -> list[DetectorOutput]:
        logits = logits.detach().float().cpu().reshape(logits.shape[0], -1)
        if self.activation == "softmax":
            probabilities = logits.softmax(dim=1)
        else:
            probabilities = torch.sigmoid(logits)
        scores = probabilities[:, self.ai_index]
        results: list[DetectorOutput] = []
        for row in range(logits.shape[0]):
            if not bool(torch.isfinite(logits[row]).all()):
                # Never a made-up number: an overflowed or corrupt output is an abstention.
                results.append(
                    DetectorOutput(score=None, evidence={"error": "non-finite model output"})
                )
                continue
            p_ai = float(scores[row])
            evidence: dict[str, Any] = {"p_ai": p_ai}
            if self.activation == "softmax":
                evidence["ai_index"] = self.ai_index
                if self.labels is not None and logits.shape[1] == 2:
                    evidence["label_scores"] = {
                        self.labels[0]: p_ai,
                        self.labels[1]: float(probabilities[row, 1 - self.ai_index]),
                    }
                else:
                    evidence["probabilities"] = [float(p) for p in probabilities[row]]
            else:
                evidence["logit"] = float(logits[row, self.ai_index])
            results.append(DetectorOutput(score=p_ai, evidence=evidence))
        return results
