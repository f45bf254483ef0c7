"""PyTorch detector families: Sumsub "For Fake's Sake", Community Forensics and generic timm.

Only the registry's loader imports this package (it imports torch, timm and torchvision at
once); the API process never does. What the families accept is typed in
:mod:`workers.detectors.options`, which needs none of them.

- ``modules``: the families' torch modules, in the published checkpoints' key layout;
- ``preprocessing``: timm's data config + transform, and explicit pipelines;
- ``head``: logits -> ``P(AI)`` and evidence;
- ``runtime``: :class:`TorchDetector` (``preprocess`` on the CPU, ``forward`` on the device)
  and device / autocast resolution;
- ``loading``: the one loading sequence (weights read and hash-checked, built on the meta
  device, fit-checked, loaded strictly);
- ``families``: what each family supplies to it, and ``LOADERS``.
"""

from workers.detectors.options import DetectorOptionsError
from workers.detectors.torch_models.families import (
    LOADERS,
    load_commfor,
    load_sumsub,
    load_timm,
)
from workers.detectors.torch_models.head import ScoreHead
from workers.detectors.torch_models.modules import (
    CommForNet,
    SumsubNet,
    commfor_module,
    create_timm_model,
    sumsub_module,
)
from workers.detectors.torch_models.preprocessing import (
    ExplicitPreprocessing,
    timm_data_config,
    timm_transform,
)
from workers.detectors.torch_models.runtime import TorchDetector

__all__ = [
    "LOADERS",
    "CommForNet",
    "DetectorOptionsError",
    "ExplicitPreprocessing",
    "ScoreHead",
    "SumsubNet",
    "TorchDetector",
    "commfor_module",
    "create_timm_model",
    "load_commfor",
    "load_sumsub",
    "load_timm",
    "sumsub_module",
    "timm_data_config",
    "timm_transform",
]
