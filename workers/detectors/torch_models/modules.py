"""The families' torch modules. Attribute names are the published checkpoints' key
prefixes, so a state dict loads into them as saved."""

from __future__ import annotations

import timm
import torch
from torch import nn

from workers.detectors.options import DetectorOptionsError


class SumsubNet(nn.Module):
    """Sumsub's module: ``model`` (timm backbone without classifier, pooled features) and
    ``clf`` = Linear(F, 128) -> ReLU -> Linear(128, 2); keys ``model.*``, ``clf.0.*``,
    ``clf.2.*``."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        self.model = create_timm_model(backbone, num_classes=0)
        self.clf = nn.Sequential(
            nn.Linear(pooled_features(self.model), 128), nn.ReLU(), nn.Linear(128, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.model(x)
        logits: torch.Tensor = self.clf(features)
        return logits


class CommForNet(nn.Module):
    """Community Forensics' ``ViTClassifier``: a timm ViT under ``vit`` whose ``head`` is
    Linear(width, 1); keys ``vit.*`` including ``vit.head.weight``."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        self.vit = create_timm_model(backbone, num_classes=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.vit(x)
        return logits


def sumsub_module(backbone: str) -> SumsubNet:
    """The Sumsub architecture for a backbone tag, randomly initialised (weights come after)."""
    return SumsubNet(backbone)


def commfor_module(backbone: str) -> CommForNet:
    """The Community Forensics architecture for a ViT tag, randomly initialised."""
    return CommForNet(backbone)


def create_timm_model(name: str, *, num_classes: int) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=...)``; an unknown name or tag
    is a :class:`DetectorOptionsError` rather than timm's RuntimeError."""
    try:
        model: nn.Module = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as exc:
        if str(exc).startswith(("Unknown model", "Invalid pretrained tag")):
            raise DetectorOptionsError(
                f"timm {timm.__version__} cannot build {name!r}: {exc}"
            ) from exc
        raise
    return model


def pooled_features(model: nn.Module) -> int:
    """Width of what a timm model built with ``num_classes=0`` returns.

    timm >= 1.0 reports it as ``head_hidden_size``; ``num_features`` is the width *before*
    the head's own projection, which differs for MobileNetV3 (960 vs 1280) and would not fit
    the published Sumsub checkpoints."""
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not isinstance(width, int):
        raise ValueError(f"cannot tell the pooled feature width of {type(model).__name__}")
    return width
