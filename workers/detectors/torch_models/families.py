"""The three torch families. Each says what differs from the others (its module, its
preprocessing, its score head, its extra checks) as a plan from its typed options; the
loading sequence itself is :func:`~workers.detectors.torch_models.loading.load_torch_detector`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
from torch import nn

from workers.detectors.base import DetectorSpec, Loader
from workers.detectors.options import CommForOptions, SumsubOptions, TimmOptions
from workers.detectors.torch_models.head import ScoreHead
from workers.detectors.torch_models.loading import (
    FamilyBuild,
    check_commfor_config,
    load_torch_detector,
)
from workers.detectors.torch_models.modules import (
    commfor_module,
    create_timm_model,
    sumsub_module,
)
from workers.detectors.torch_models.preprocessing import (
    explicit_preprocessing,
    timm_preprocessing,
)
from workers.detectors.torch_models.runtime import TorchDetector


def load_sumsub(spec: DetectorSpec, *, device: str, weights_path: Path) -> TorchDetector:
    """Sumsub "For Fake's Sake": softmax over 2 logits, ``P(AI)`` = class ``ai_index``
    (option, default 1: unconfirmed upstream). Preprocessing: timm data config of the
    backbone tag, overridable per option."""
    return load_torch_detector(
        spec, SumsubOptions, _sumsub, device=device, weights_path=weights_path
    )


def load_commfor(spec: DetectorSpec, *, device: str, weights_path: Path) -> TorchDetector:
    """Community Forensics: ``sigmoid(logit)`` = ``P(fake)``. Takes the Hub layout (a folder,
    or its ``model.safetensors`` with ``config.json`` beside it) or a training checkpoint
    ``{"model": state_dict}``. Preprocessing: Resize(shorter side) -> CenterCrop -> ImageNet
    statistics; options ``resize``/``crop`` (defaults from the backbone's input size)."""
    return load_torch_detector(
        spec, CommForOptions, _commfor, device=device, weights_path=weights_path
    )


def load_timm(spec: DetectorSpec, *, device: str, weights_path: Path) -> TorchDetector:
    """Any timm classifier described by :class:`~workers.detectors.options.TimmOptions`:
    timm's own classifier or the Sumsub / Community Forensics layouts, softmax or sigmoid,
    timm's data config or an explicit pipeline."""
    return load_torch_detector(spec, TimmOptions, _timm, device=device, weights_path=weights_path)


def _sumsub(options: SumsubOptions) -> FamilyBuild:
    return FamilyBuild(
        architecture=options.backbone,
        factory=partial(sumsub_module, options.backbone),
        preprocessing=timm_preprocessing(options.backbone, options),
        head=ScoreHead("softmax", options.ai_index, labels=("by AI", "by human")),
    )


def _commfor(options: CommForOptions) -> FamilyBuild:
    pretrained = timm.get_pretrained_cfg(options.backbone)
    default_crop = int(pretrained.input_size[-1]) if pretrained is not None else None
    preprocessing = explicit_preprocessing(options, default_crop=default_crop)
    return FamilyBuild(
        architecture=options.backbone,
        factory=partial(commfor_module, options.backbone),
        preprocessing=preprocessing.preprocessing(),
        head=ScoreHead("sigmoid", 0),
        check_weights=partial(check_commfor_config, backbone=options.backbone),
    )


def _timm(options: TimmOptions) -> FamilyBuild:
    architecture = options.architecture
    if options.preprocessing == "timm":
        preprocessing = timm_preprocessing(architecture, options)
    else:
        preprocessing = explicit_preprocessing(options).preprocessing()
    factories: dict[str, Callable[[], nn.Module]] = {
        "sumsub": partial(sumsub_module, architecture),
        "commfor": partial(commfor_module, architecture),
        "timm": partial(create_timm_model, architecture, num_classes=options.outputs),
    }
    return FamilyBuild(
        architecture=architecture,
        factory=factories[options.head],
        preprocessing=preprocessing,
        head=ScoreHead(options.score_activation, options.score_index),
    )


LOADERS: dict[str, Loader] = {"sumsub": load_sumsub, "commfor": load_commfor, "timm": load_timm}
"""Family name -> loader, for the registry."""
