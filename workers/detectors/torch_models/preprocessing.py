"""Preprocessing follows the weights, never a guess made here: timm's pretrained data config
of a backbone tag (``resolve_data_config`` + ``create_transform``), or the pipeline an
author wrote by hand (:class:`ExplicitPreprocessing`). Spec options may override every
value; a changed option is a new detector version."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
from PIL import Image
from timm.data.config import resolve_data_config
from timm.data.transforms_factory import create_transform
from torchvision import transforms

from workers.detectors.options import DetectorOptionsError, ExplicitOptions, TimmConfigOptions

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Community Forensics eval sizes (authors' dataloader): crop size -> shorter-side resize.
COMMFOR_RESIZE_FOR_CROP = {384: 440, 224: 256}

Transform = Callable[[Image.Image], torch.Tensor]
CHW = tuple[int, int, int]
RGB = tuple[float, float, float]

# What a resize on tensors (torchvision's, over torch.nn.functional.interpolate with
# antialias) reproduces of Pillow's resize: the two filters Pillow and torch share.
TENSOR_INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Geometry:
    """What a detector's transform does to the pixels, as numbers: Resize -> CenterCrop ->
    ToTensor -> Normalize. Fast decoding reads it to know how small a JPEG may be decoded
    and to redo the same steps with tensor operations on the model's device."""

    resize: int | tuple[int, int]
    """The shorter side, or exactly (height, width)."""
    crop: tuple[int, int] | None
    """The centre crop (height, width); None when the transform does something else after
    its resize (timm's ``border`` mode pads, a keep-ratio resize to a non-square size)."""
    interpolation: str
    mean: RGB
    std: RGB

    @property
    def least_side(self) -> int:
        """A decoded image whose sides are both at least this is only ever shrunk by the
        resize, whatever its aspect and orientation."""
        return self.resize if isinstance(self.resize, int) else max(self.resize)

    def tensor_mismatch(self) -> str | None:
        """Why tensor operations cannot redo this transform; None when they can."""
        if self.crop is None:
            return "its resize is not followed by a plain centre crop"
        if self.interpolation not in TENSOR_INTERPOLATIONS:
            return f"it resizes with {self.interpolation}, not bilinear or bicubic"
        return None


@dataclass(frozen=True)
class Preprocessing:
    """A detector's transform, the (C, H, W) it produces and its :class:`Geometry`."""

    transform: Transform
    input_size: CHW
    geometry: Geometry


_TIMM_OVERRIDES = {"input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std"}


def timm_data_config(backbone: str, options: TimmConfigOptions) -> dict[str, Any]:
    """timm's eval data config for a backbone tag (e.g.
    ``convnext_large_mlp.clip_laion2b_soup_ft_in12k_in1k_384`` -> 384, bicubic, squash, CLIP
    statistics), with any of ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``,
    ``mean``, ``std`` that ``options`` sets taken from there instead."""
    overrides = options.model_dump(include=_TIMM_OVERRIDES, exclude_none=True)
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


def timm_geometry(config: Mapping[str, Any]) -> Geometry:
    """The numbers of timm's eval transform for a data config, worked out as
    ``transforms_imagenet_eval`` does: the resize is the crop divided by ``crop_pct``
    (rounded down); ``squash`` resizes to exactly that, ``center`` resizes the shorter side
    to it, ``border`` fits the longer side and pads."""
    height, width = (int(value) for value in config["input_size"][-2:])
    crop_pct = config["crop_pct"] or timm.data.DEFAULT_CROP_PCT
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    mode = config["crop_mode"]
    resize: int | tuple[int, int] = scaled
    crop: tuple[int, int] | None = (height, width)
    if mode == "border" or (mode != "squash" and scaled[0] != scaled[1]):
        resize, crop = max(scaled), None
    elif mode != "squash":
        resize = scaled[0]
    return Geometry(
        resize=resize,
        crop=crop,
        interpolation=str(config["interpolation"]),
        mean=_rgb(config["mean"]),
        std=_rgb(config["std"]),
    )


def _rgb(values: Any) -> RGB:
    red, green, blue = (float(value) for value in values)
    return red, green, blue


def timm_preprocessing(backbone: str, options: TimmConfigOptions) -> Preprocessing:
    """The transform of :func:`timm_data_config`, the (C, H, W) it produces and its
    geometry."""
    config = timm_data_config(backbone, options)
    channels, height, width = (int(value) for value in config["input_size"])
    return Preprocessing(timm_transform(config), (channels, height, width), timm_geometry(config))


@dataclass(frozen=True)
class ExplicitPreprocessing:
    """Resize (shorter side to ``resize``, or to exactly ``(h, w)``) -> centre crop ->
    ToTensor -> normalise: the torchvision pipeline many authors write by hand."""

    resize: int | tuple[int, int]
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def input_size(self) -> CHW:
        return 3, self.crop, self.crop

    @property
    def geometry(self) -> Geometry:
        return Geometry(
            resize=self.resize,
            crop=(self.crop, self.crop),
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
        )

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.transform(), self.input_size, self.geometry)

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
    options: ExplicitOptions, *, default_crop: int | None = None
) -> ExplicitPreprocessing:
    """``resize``, ``crop``, ``mean``, ``std``, ``interpolation`` from the options.

    With ``default_crop`` (Community Forensics), a missing ``crop`` is that size and a missing
    ``resize`` the authors' size for it (384 -> 440, 224 -> 256)."""
    crop = options.crop or default_crop
    if crop is None:
        raise DetectorOptionsError("option crop is required for explicit preprocessing")
    resize = options.resize or COMMFOR_RESIZE_FOR_CROP.get(crop)
    if resize is None:
        raise DetectorOptionsError("option resize is required for explicit preprocessing")
    return ExplicitPreprocessing(
        resize=resize,
        crop=crop,
        mean=options.mean or IMAGENET_MEAN,
        std=options.std or IMAGENET_STD,
        interpolation=options.interpolation or "bilinear",
    )
