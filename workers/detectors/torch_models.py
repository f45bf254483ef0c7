"""PyTorch detector families: Sumsub "For Fake's Sake", Community Forensics and generic timm.

Only the registry's loader imports this module (it imports torch, timm and torchvision at
once); the API process never does.

Each family has a loader ``load_<family>(spec, *, device, weights_path) -> Detector``. A
loaded detector scores in two steps so a batching engine can pipeline them:
``preprocess(image) -> (C, H, W) tensor`` on the CPU, then ``forward(batch) -> outputs`` on
the device. ``detect_batch`` does both.

Preprocessing follows the weights, never a guess made here: Sumsub models use timm's
pretrained data config of their backbone tag (``resolve_data_config`` +
``create_transform``), Community Forensics models the authors' eval transform
(``Resize(440)`` -> ``CenterCrop(384)`` -> ImageNet statistics, 256/224 for the 224 model).
Spec options may override every value; a changed option is a new detector version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from PIL import Image
from timm.data.config import resolve_data_config
from timm.data.transforms_factory import create_transform
from torch import nn
from torchvision import transforms

from workers.detectors.base import (
    Detector,
    DetectorOutput,
    DetectorSpec,
    DetectorUnavailable,
    derive_version,
)
from workers.detectors.weights import (
    CheckpointFormatError,
    load_state_dict,
    select_weights_file,
    sha256_file,
    verify_sha256,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Community Forensics eval sizes (authors' dataloader): crop size -> shorter-side resize.
COMMFOR_RESIZE_FOR_CROP = {384: 440, 224: 256}

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

Activation = Literal["softmax", "sigmoid"]
Loader = Callable[..., Detector]


class DetectorOptionsError(DetectorUnavailable, ValueError):
    """A spec's options are missing or invalid for its family. A ValueError (a configuration
    mistake) that is also DetectorUnavailable, so a fleet skips that detector with this
    message instead of failing every other one."""


# --------------------------------------------------------------------------------------------
# Modules: their attribute names are the published checkpoints' key prefixes.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


Transform = Callable[[Image.Image], torch.Tensor]


def timm_data_config(backbone: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """timm's eval data config for a backbone tag (e.g.
    ``convnext_large_mlp.clip_laion2b_soup_ft_in12k_in1k_384`` -> 384, bicubic, squash, CLIP
    statistics), with any of ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``,
    ``mean``, ``std`` taken from ``options`` instead."""
    overrides: dict[str, Any] = {}
    if options.get("input_size") is not None:
        overrides["input_size"] = _input_size(options["input_size"])
    if options.get("interpolation") is not None:
        overrides["interpolation"] = _interpolation_name(options["interpolation"])
    if options.get("crop_pct") is not None:
        overrides["crop_pct"] = _positive_float(options["crop_pct"], "crop_pct")
    if options.get("crop_mode") is not None:
        mode = options["crop_mode"]
        if mode not in ("center", "squash", "border"):
            raise DetectorOptionsError(
                f"option crop_mode must be center, squash or border, not {mode!r}"
            )
        overrides["crop_mode"] = mode
    for name in ("mean", "std"):
        if options.get(name) is not None:
            overrides[name] = _triple(options[name], name)
    if not timm.is_model(backbone.split(".", 1)[0]):
        raise DetectorOptionsError(
            f"timm {timm.__version__} cannot build {backbone!r}: no such model"
        )
    pretrained = timm.get_pretrained_cfg(backbone)
    if pretrained is None and not {"input_size", "mean", "std"} <= overrides.keys():
        raise DetectorOptionsError(
            f"timm has no pretrained data config for {backbone!r}: set the options "
            "input_size, mean and std (and interpolation, crop_pct, crop_mode) explicitly"
        )
    # timm leaves resolve_data_config unannotated; it returns a plain dict.
    config: dict[str, Any] = resolve_data_config(  # type: ignore[no-untyped-call]
        args=overrides, pretrained_cfg=dataclasses.asdict(pretrained) if pretrained else None
    )
    return config


def timm_transform(config: Mapping[str, Any]) -> Transform:
    """timm's own eval transform for a data config from :func:`timm_data_config`."""
    transform: Transform = create_transform(
        input_size=config["input_size"],
        interpolation=config["interpolation"],
        mean=config["mean"],
        std=config["std"],
        crop_pct=config["crop_pct"],
        crop_mode=config["crop_mode"],
        is_training=False,
    )
    return transform


@dataclass(frozen=True)
class ExplicitPreprocessing:
    """Resize (shorter side to ``resize``, or to exactly ``(h, w)``) -> centre crop ->
    ToTensor -> normalise: the torchvision pipeline many authors write by hand."""

    resize: int | tuple[int, int]
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def transform(self) -> Transform:
        resize = self.resize if isinstance(self.resize, int) else list(self.resize)
        pipeline: Transform = transforms.Compose(
            [
                transforms.Resize(
                    resize, interpolation=transforms.InterpolationMode(self.interpolation)
                ),
                transforms.CenterCrop(self.crop),
                transforms.ToTensor(),
                transforms.Normalize(mean=self.mean, std=self.std),
            ]
        )
        return pipeline


def explicit_preprocessing(
    options: Mapping[str, Any], *, default_crop: int | None = None
) -> ExplicitPreprocessing:
    """Read ``resize``, ``crop``, ``mean``, ``std``, ``interpolation`` from spec options.

    With ``default_crop`` (Community Forensics), a missing ``crop`` is that size and a missing
    ``resize`` the authors' size for it (384 -> 440, 224 -> 256)."""
    crop_value = options.get("crop", default_crop)
    if crop_value is None:
        raise DetectorOptionsError("option crop is required for explicit preprocessing")
    crop = _positive_int(crop_value, "crop")
    resize_value = options.get("resize", COMMFOR_RESIZE_FOR_CROP.get(crop))
    if resize_value is None:
        raise DetectorOptionsError("option resize is required for explicit preprocessing")
    resize: int | tuple[int, int]
    if isinstance(resize_value, Sequence) and not isinstance(resize_value, str):
        if len(resize_value) != 2:
            raise DetectorOptionsError(
                f"option resize must be an int or [height, width], not {resize_value!r}"
            )
        resize = (
            _positive_int(resize_value[0], "resize"),
            _positive_int(resize_value[1], "resize"),
        )
    else:
        resize = _positive_int(resize_value, "resize")
    return ExplicitPreprocessing(
        resize=resize,
        crop=crop,
        mean=_triple(options.get("mean", IMAGENET_MEAN), "mean"),
        std=_triple(options.get("std", IMAGENET_STD), "std"),
        interpolation=_interpolation_name(options.get("interpolation", "bilinear")),
    )


# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------


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


class TorchDetector:
    """A loaded torch model with its preprocessing; satisfies :class:`Detector`."""

    def __init__(
        self,
        *,
        spec: DetectorSpec,
        module: nn.Module,
        transform: Transform,
        input_size: tuple[int, int, int],
        head: ScoreHead,
        device: torch.device,
        weights_sha256: str,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.spec = spec
        self._module = module
        self._transform = transform
        self._head = head
        self._device = device
        self._weights_sha256 = weights_sha256
        self._autocast_dtype = autocast_dtype if device.type == "cuda" else None
        self._version = derive_version(spec, weights_sha256)
        self.input_size = input_size
        """(C, H, W) of every tensor :meth:`preprocess` returns."""

    @property
    def version(self) -> str:
        return self._version

    @property
    def weights_sha256(self) -> str | None:
        return self._weights_sha256

    @property
    def device(self) -> torch.device:
        return self._device

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One image -> a float (C, H, W) tensor on the CPU. Any mode is turned into RGB the
        way the authors' pipelines do (``convert("RGB")``: alpha dropped, grey replicated)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self._transform(image)

    def forward(self, batch: torch.Tensor) -> list[DetectorOutput]:
        """A stacked (N, C, H, W) batch from :meth:`preprocess` -> one output per row."""
        if batch.shape[0] == 0:
            return []
        batch = batch.to(self._device, non_blocking=True)
        if self._device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=self._device.type,
                dtype=self._autocast_dtype,
                enabled=self._autocast_dtype is not None,
            ),
        ):
            logits = self._module(batch)
        return self._head.outputs(logits)

    def detect_batch(
        self, images: Sequence[Image.Image], raw: Sequence[bytes]
    ) -> list[DetectorOutput]:
        if not images:
            return []
        return self.forward(torch.stack([self.preprocess(image) for image in images]))


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def sumsub_module(backbone: str) -> SumsubNet:
    """The Sumsub architecture for a backbone tag, randomly initialised (weights come after)."""
    return SumsubNet(backbone)


def commfor_module(backbone: str) -> CommForNet:
    """The Community Forensics architecture for a ViT tag, randomly initialised."""
    return CommForNet(backbone)


def load_sumsub(spec: DetectorSpec, *, device: str, weights_path: Path) -> Detector:
    """Sumsub "For Fake's Sake": softmax over 2 logits, ``P(AI)`` = class ``ai_index``
    (option, default 1: unconfirmed upstream). Preprocessing: timm data config of the
    backbone tag, overridable per option."""
    backbone = _required_str(spec, "backbone")
    ai_index = _ai_index(spec, outputs=2, default=1)
    config = timm_data_config(backbone, spec.options)
    torch_device, autocast_dtype = _device_and_autocast(spec, device)
    path, digest, state = _read_weights(spec, weights_path)
    module = _build_loaded(lambda: sumsub_module(backbone), state, spec, path)
    return _ready(
        spec,
        module,
        transform=timm_transform(config),
        input_size=_chw(config["input_size"]),
        head=ScoreHead("softmax", ai_index, labels=("by AI", "by human")),
        device=torch_device,
        autocast_dtype=autocast_dtype,
        digest=digest,
    )


def load_commfor(spec: DetectorSpec, *, device: str, weights_path: Path) -> Detector:
    """Community Forensics: ``sigmoid(logit)`` = ``P(fake)``. Takes the Hub layout (a folder,
    or its ``model.safetensors`` with ``config.json`` beside it) or a training checkpoint
    ``{"model": state_dict}``. Preprocessing: Resize(shorter side) -> CenterCrop -> ImageNet
    statistics; options ``resize``/``crop`` (defaults from the backbone's input size)."""
    backbone = _required_str(spec, "backbone")
    pretrained = timm.get_pretrained_cfg(backbone)
    default_crop = int(pretrained.input_size[-1]) if pretrained is not None else None
    preprocessing = explicit_preprocessing(spec.options, default_crop=default_crop)
    torch_device, autocast_dtype = _device_and_autocast(spec, device)
    path, digest, state = _read_weights(spec, weights_path)
    _check_commfor_config(path.parent / "config.json", backbone, spec)
    module = _build_loaded(lambda: commfor_module(backbone), state, spec, path)
    return _ready(
        spec,
        module,
        transform=preprocessing.transform(),
        input_size=(3, preprocessing.crop, preprocessing.crop),
        head=ScoreHead("sigmoid", 0),
        device=torch_device,
        autocast_dtype=autocast_dtype,
        digest=digest,
    )


def load_timm(spec: DetectorSpec, *, device: str, weights_path: Path) -> Detector:
    """Any timm classifier described by options:

    - ``architecture``: timm name or tag;
    - ``head``: ``"timm"`` (timm's classifier with ``num_classes``, default 2), ``"sumsub"``
      or ``"commfor"`` (the wrappers above, keys ``model.*``/``clf.*`` or ``vit.*``);
    - ``activation``: ``"softmax"`` (default for >= 2 outputs) or ``"sigmoid"``;
    - ``ai_index``: class of ``P(AI)`` (default 1 for softmax, 0 for sigmoid);
    - ``preprocessing``: ``"timm"`` (the tag's data config, options override) or
      ``"explicit"`` (``resize``, ``crop``, ``mean``, ``std``, ``interpolation``).
    """
    architecture = _required_str(spec, "architecture")
    head_kind, outputs, head = _timm_head(spec)
    transform, input_size = _timm_family_preprocessing(spec, architecture)
    torch_device, autocast_dtype = _device_and_autocast(spec, device)
    path, digest, state = _read_weights(spec, weights_path)
    factories: dict[str, Callable[[], nn.Module]] = {
        "sumsub": lambda: sumsub_module(architecture),
        "commfor": lambda: commfor_module(architecture),
        "timm": lambda: create_timm_model(architecture, num_classes=outputs),
    }
    module = _build_loaded(factories[head_kind], state, spec, path)
    return _ready(
        spec,
        module,
        transform=transform,
        input_size=input_size,
        head=head,
        device=torch_device,
        autocast_dtype=autocast_dtype,
        digest=digest,
    )


def _timm_head(spec: DetectorSpec) -> tuple[str, int, ScoreHead]:
    head_kind = spec.options.get("head", "timm")
    fixed_outputs = {"sumsub": 2, "commfor": 1}
    if head_kind == "timm":
        outputs = _positive_int(spec.options.get("num_classes", 2), "num_classes")
    elif head_kind in fixed_outputs:
        outputs = fixed_outputs[head_kind]
        if spec.options.get("num_classes", outputs) != outputs:
            raise DetectorOptionsError(
                f"detector {spec.name}: head {head_kind} has {outputs} outputs"
            )
    else:
        raise DetectorOptionsError(
            f"detector {spec.name}: option head must be timm, sumsub or commfor"
        )
    activation = spec.options.get("activation", "softmax" if outputs >= 2 else "sigmoid")
    if activation not in ("softmax", "sigmoid"):
        raise DetectorOptionsError(
            f"detector {spec.name}: option activation must be softmax or sigmoid"
        )
    if activation == "softmax" and outputs < 2:
        raise DetectorOptionsError(f"detector {spec.name}: softmax needs at least 2 outputs")
    ai_index = _ai_index(spec, outputs=outputs, default=1 if activation == "softmax" else 0)
    return head_kind, outputs, ScoreHead(activation, ai_index)


def _timm_family_preprocessing(
    spec: DetectorSpec, architecture: str
) -> tuple[Transform, tuple[int, int, int]]:
    mode = spec.options.get("preprocessing", "timm")
    if mode == "timm":
        config = timm_data_config(architecture, spec.options)
        return timm_transform(config), _chw(config["input_size"])
    if mode == "explicit":
        if "mean" not in spec.options or "std" not in spec.options:
            raise DetectorOptionsError(
                f"detector {spec.name}: explicit preprocessing needs mean and std"
            )
        explicit = explicit_preprocessing(spec.options)
        return explicit.transform(), (3, explicit.crop, explicit.crop)
    raise DetectorOptionsError(
        f"detector {spec.name}: option preprocessing must be timm or explicit"
    )


LOADERS: dict[str, Loader] = {"sumsub": load_sumsub, "commfor": load_commfor, "timm": load_timm}
"""Family name -> loader, for the registry."""


# --------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------


def _read_weights(
    spec: DetectorSpec, weights_path: Path
) -> tuple[Path, str, dict[str, torch.Tensor]]:
    """The weights file (a folder stands for its single weights file), its sha256 (checked
    against the spec's pin *before* anything is unpickled) and its state dict."""
    if weights_path == Path():
        raise DetectorUnavailable(
            f"detector {spec.name} has no weights: set its weights URI or pass "
            f"--detector {spec.name}=/path/to/weights"
        )
    path = select_weights_file(weights_path)
    digest = verify_sha256(path, spec.sha256) if spec.sha256 else sha256_file(path)
    return path, digest, load_state_dict(path)


def _build_loaded(
    factory: Callable[[], nn.Module],
    state: Mapping[str, torch.Tensor],
    spec: DetectorSpec,
    path: Path,
) -> nn.Module:
    """Build the architecture and load ``state`` into it, strictly.

    The module is built on the meta device and takes the checkpoint's tensors as they are
    (``assign=True``), so no time goes into a random initialisation that the weights replace
    at once (ConvNeXt-L has 200M parameters). Floating tensors are then made float32, as
    copying into a freshly built module would. Architectures with non-persistent buffers
    (computed at construction, absent from checkpoints) are built for real instead.
    """
    with torch.device("meta"):
        skeleton = factory()
    _check_fit(skeleton, state, spec, path)
    saved = set(skeleton.state_dict())
    if any(name not in saved for name, _ in skeleton.named_buffers()):
        module = factory()
        module.load_state_dict(state, strict=True)
        return module
    skeleton.load_state_dict(state, strict=True, assign=True)
    return skeleton.float()


def _check_fit(
    module: nn.Module, state: Mapping[str, torch.Tensor], spec: DetectorSpec, path: Path
) -> None:
    """A clear error naming the first missing / unexpected / mis-shaped keys, rather than
    torch's multi-line one."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} vs {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_first_few(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_first_few(unexpected)})")
        if wrong_shape:
            problems.append(
                f"{len(wrong_shape)} shape mismatches, checkpoint vs model "
                f"({_first_few(wrong_shape)})"
            )
        architecture = spec.options.get("backbone") or spec.options.get("architecture")
        raise CheckpointFormatError(
            f"weights {path} do not fit detector {spec.name} (family {spec.family}, "
            f"architecture {architecture}): " + "; ".join(problems)
        )


def _check_commfor_config(config_path: Path, backbone: str, spec: DetectorSpec) -> None:
    """The Hub layout's ``config.json`` holds the authors' constructor arguments
    (model_size, input_size, patch_size): refuse a backbone option that contradicts them."""
    if not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text())
        expected = (
            f"vit_{config['model_size']}_patch{int(config['patch_size'])}_"
            f"{int(config['input_size'])}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning(
            "unreadable Community Forensics config.json ignored",
            extra={"detector": spec.name, "path": str(config_path)},
        )
        return
    if backbone.split(".", 1)[0] != expected:
        raise CheckpointFormatError(
            f"weights {config_path.parent} are a {expected} model (config.json), but detector "
            f"{spec.name} has backbone {backbone}: set options.backbone to {expected}"
            ".augreg_in21k_ft_in1k"
        )


def _ready(
    spec: DetectorSpec,
    module: nn.Module,
    *,
    transform: Transform,
    input_size: tuple[int, int, int],
    head: ScoreHead,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    digest: str,
) -> TorchDetector:
    module.eval()
    module.to(device)
    if device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    logger.info(
        "detector loaded",
        extra={"detector": spec.name, "device": str(device), "weights_sha256": digest},
    )
    return TorchDetector(
        spec=spec,
        module=module,
        transform=transform,
        input_size=input_size,
        head=head,
        device=device,
        weights_sha256=digest,
        autocast_dtype=autocast_dtype,
    )


def _device_and_autocast(
    spec: DetectorSpec, device: str
) -> tuple[torch.device, torch.dtype | None]:
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be cpu, cuda or cuda:N, not {device!r}") from exc
    if torch_device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, not {device!r}")
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise DetectorUnavailable(
                f"detector {spec.name} is set to run on {device}, but this torch build or "
                "machine has no CUDA device: use device cpu or run on a GPU node"
            )
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise DetectorUnavailable(
                f"detector {spec.name} is set to run on {device}, but only "
                f"{torch.cuda.device_count()} CUDA devices are visible"
            )
    autocast = spec.options.get("autocast")
    if autocast is None:
        return torch_device, None
    if autocast not in _AUTOCAST_DTYPES:
        raise DetectorOptionsError(
            f"detector {spec.name}: option autocast must be bf16, fp16 or unset"
        )
    # Autocast is a CUDA speed-up; on the CPU scores stay float32.
    return torch_device, _AUTOCAST_DTYPES[autocast]


def _required_str(spec: DetectorSpec, name: str) -> str:
    value = spec.options.get(name)
    if not isinstance(value, str) or not value:
        raise DetectorOptionsError(
            f"detector {spec.name} (family {spec.family}) needs option {name}"
        )
    return value


def _ai_index(spec: DetectorSpec, *, outputs: int, default: int) -> int:
    value = spec.options.get("ai_index", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < outputs:
        raise DetectorOptionsError(
            f"detector {spec.name}: option ai_index must be an integer in [0, {outputs - 1}]"
        )
    return value


def _first_few(items: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(items[:count])
    return shown + (", ..." if len(items) > count else "")


def _chw(input_size: Sequence[int]) -> tuple[int, int, int]:
    channels, height, width = (int(value) for value in input_size)
    return channels, height, width


def _input_size(value: Any) -> tuple[int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (3, _positive_int(value, "input_size"), _positive_int(value, "input_size"))
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) in (2, 3):
        sizes = [_positive_int(item, "input_size") for item in value]
        return (3, sizes[-2], sizes[-1]) if len(sizes) == 2 else (sizes[0], sizes[1], sizes[2])
    raise DetectorOptionsError(f"option input_size must be N, [H, W] or [C, H, W], not {value!r}")


def _interpolation_name(value: Any) -> str:
    names = {mode.value for mode in transforms.InterpolationMode}
    if not isinstance(value, str) or value not in names:
        raise DetectorOptionsError(
            f"option interpolation must be one of {sorted(names)}, not {value!r}"
        )
    return value


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3:
        first, second, third = (float(item) for item in value)
        return first, second, third
    raise DetectorOptionsError(f"option {name} must be three numbers (R, G, B), not {value!r}")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DetectorOptionsError(f"option {name} must be a positive integer, not {value!r}")
    return value


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise DetectorOptionsError(f"option {name} must be a positive number, not {value!r}")
    if not math.isfinite(value):
        raise DetectorOptionsError(f"option {name} must be finite, not {value!r}")
    return float(value)
