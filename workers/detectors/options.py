"""The options each detector family accepts, as typed models.

A spec's ``options`` stay the plain mapping the operator wrote (its version hashes them
as written); a family's loader reads them through its model here, which checks types,
ranges and allowed values and refuses unknown keys, so a typo'd option is an error rather
than silently ignored. Checks that need timm (is the backbone a known model, has it a
pretrained config) stay in :mod:`workers.detectors.torch_models`.

This module imports neither torch, timm nor torchvision: the API process and the registry
can say what a spec means without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

from workers.detectors.base import DetectorSpec, DetectorUnavailable


class DetectorOptionsError(DetectorUnavailable, ValueError):
    """A spec's options are missing or invalid for its family. A ValueError (a configuration
    mistake) that is also DetectorUnavailable, so a fleet skips that detector with this
    message instead of failing every other one."""


# torchvision's InterpolationMode values (a test checks they still match).
Interpolation = Literal[
    "nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos"
]
Activation = Literal["softmax", "sigmoid"]
Autocast = Literal["bf16", "fp16"]
FastDecode = Literal["draft", "gpu"]

PositiveInt = Annotated[int, Strict(), Field(gt=0)]
IndexInt = Annotated[int, Strict(), Field(ge=0)]
FiniteFloat = Annotated[float, Strict(), AllowInfNan(False)]
NonEmptyStr = Annotated[str, Strict(), Field(min_length=1)]


def _three(value: object) -> Sequence[object]:
    """Three values (checked as numbers by the field's type after this)."""
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3:
        return value
    raise ValueError("must be three numbers (R, G, B)")


def _chw(value: Any) -> tuple[int, int, int]:
    """``N`` -> (3, N, N), ``[H, W]`` -> (3, H, W), ``[C, H, W]`` as is."""
    if _positive(value):
        return 3, value, value
    sizes = _positive_ints(value, 2, 3)
    if sizes is None:
        raise ValueError("must be N, [H, W] or [C, H, W] of positive integers")
    channels, height, width = [3, *sizes] if len(sizes) == 2 else sizes
    return channels, height, width


def _resize(value: Any) -> int | tuple[int, int]:
    """The shorter side (``N``), or exactly ``[height, width]``."""
    if _positive(value):
        return int(value)
    sizes = _positive_ints(value, 2)
    if sizes is None:
        raise ValueError("must be a positive integer or [height, width]")
    return sizes[0], sizes[1]


def _positive_ints(value: Any, *lengths: int) -> list[int] | None:
    """``value`` as a list if it is a sequence of one of ``lengths`` positive integers."""
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) in lengths:
        items = list(value)
        if all(_positive(item) for item in items):
            return items
    return None


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# (R, G, B) normalisation statistics.
Triple = Annotated[tuple[FiniteFloat, FiniteFloat, FiniteFloat], BeforeValidator(_three)]
InputSize = Annotated[tuple[int, int, int], PlainValidator(_chw)]
Resize = Annotated[int | tuple[int, int], PlainValidator(_resize)]


class FamilyOptions(BaseModel):
    """Options every family accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    decisive: Annotated[bool, Strict()] = False
    """A positive answer flags the image whatever the other detectors say."""


class TorchOptions(FamilyOptions):
    """Options of every PyTorch family. ``None`` leaves a value to the family's default
    (timm's pretrained config of the backbone, or the authors' pipeline)."""

    autocast: Autocast | None = None
    """Run the model under mixed precision (``bf16`` or ``fp16``), on a GPU or a CPU: faster
    where the hardware has the units for it, and the scores move a little (measured in
    docs/performance.md). Unset: float32, the authors' numbers."""
    fast_decode: FastDecode | None = None
    """Faster JPEG decoding that changes the pixels the model sees (so the scores move a
    little, see docs/performance.md): ``draft`` decodes at 1/2, 1/4 or 1/8 scale, never
    below what the first resize needs; ``gpu`` decodes and resizes on the model's device.
    Unset: the authors' pipeline, exactly."""
    channels_last: Annotated[bool, Strict()] | None = None
    """Feed the model channels-last tensors (same scores, another memory layout). Unset: on
    CUDA always; on the CPU for the backbones measured faster with it (MobileNetV3: 2.6x at
    batch 16; ConvNeXt and ViT gain nothing there, see docs/performance.md)."""
    frozen_graph: Annotated[bool, Strict()] | None = None
    """Run the model as a frozen TorchScript graph, traced once when it loads: the forward
    pass then runs without the Python interpreter, so the other threads of a process (a
    fleet worker's messages, a scan's intake) cannot stall it between layers, and batch
    norms fold into the convolutions. Unset: on the CPU (measured there), not on CUDA."""
    interpolation: Interpolation | None = None
    mean: Triple | None = None
    std: Triple | None = None


class TimmConfigOptions(TorchOptions):
    """Overrides of timm's pretrained data config (the rest of it comes from the tag)."""

    input_size: InputSize | None = None
    crop_pct: Annotated[FiniteFloat, Field(gt=0)] | None = None
    crop_mode: Literal["center", "squash", "border"] | None = None


class ExplicitOptions(TorchOptions):
    """A hand-written pipeline: Resize(``resize``) -> CenterCrop(``crop``) -> normalise."""

    resize: Resize | None = None
    crop: PositiveInt | None = None


class SumsubOptions(TimmConfigOptions):
    """Sumsub "For Fake's Sake": preprocessing from timm's config of ``backbone``."""

    backbone: NonEmptyStr
    ai_index: Annotated[IndexInt, Field(le=1)] = 1
    """The softmax class that means "by AI" (unconfirmed against the real weights)."""


class CommForOptions(ExplicitOptions):
    """Community Forensics: the authors' eval transform; ``crop`` defaults to the backbone's
    input size and ``resize`` to the authors' size for it (384 -> 440, 224 -> 256)."""

    backbone: NonEmptyStr


TIMM_ONLY = ("input_size", "crop_pct", "crop_mode")
EXPLICIT_ONLY = ("resize", "crop")
FIXED_OUTPUTS = {"sumsub": 2, "commfor": 1}


class TimmOptions(TimmConfigOptions, ExplicitOptions):
    """Any timm classifier: its ``head`` layout, how logits become P(AI), and either timm's
    data config (``preprocessing = "timm"``) or an explicit pipeline (``"explicit"``)."""

    architecture: NonEmptyStr
    head: Literal["timm", "sumsub", "commfor"] = "timm"
    num_classes: PositiveInt | None = None
    activation: Activation | None = None
    ai_index: IndexInt | None = None
    preprocessing: Literal["timm", "explicit"] = "timm"

    @property
    def outputs(self) -> int:
        """Logits the head returns: ``num_classes`` (default 2) for timm's own classifier."""
        return FIXED_OUTPUTS.get(self.head, self.num_classes or 2)

    @property
    def score_activation(self) -> Activation:
        return self.activation or ("softmax" if self.outputs >= 2 else "sigmoid")

    @property
    def score_index(self) -> int:
        """The logit or class of P(AI): default 1 (softmax) or 0 (sigmoid)."""
        if self.ai_index is not None:
            return self.ai_index
        return 1 if self.score_activation == "softmax" else 0

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        fixed = FIXED_OUTPUTS.get(self.head)
        if fixed is not None and self.num_classes not in (None, fixed):
            raise ValueError(f"option num_classes: head {self.head} has {fixed} outputs")
        if self.score_activation == "softmax" and self.outputs < 2:
            raise ValueError("option activation: softmax needs at least 2 outputs")
        if self.score_index >= self.outputs:
            raise ValueError(
                f"option ai_index must be an integer in [0, {self.outputs - 1}] "
                f"for {self.outputs} outputs"
            )
        ignored = EXPLICIT_ONLY if self.preprocessing == "timm" else TIMM_ONLY
        stray = sorted(name for name in ignored if getattr(self, name) is not None)
        if stray:
            raise ValueError(f"options {stray} do not apply to preprocessing {self.preprocessing}")
        unset = [name for name in ("mean", "std", "crop") if getattr(self, name) is None]
        if self.preprocessing == "explicit" and unset:
            raise ValueError(
                f"explicit preprocessing needs mean and std (and crop); unset: {unset}"
            )
        return self


class ProvenanceOptions(FamilyOptions):
    """Limits of the provenance signals; ``None`` keeps the signal's own default."""

    watermark_max_p_value: Annotated[FiniteFloat, Field(gt=0, lt=1)] | None = None
    """A watermark match counts only below this binomial tail probability."""
    watermark_max_pixels: PositiveInt | None = None
    stealth_max_pixels: PositiveInt | None = None


FAMILY_OPTIONS: dict[str, type[FamilyOptions]] = {
    "sumsub": SumsubOptions,
    "commfor": CommForOptions,
    "timm": TimmOptions,
    "provenance": ProvenanceOptions,
}
"""Family name -> the model of its options."""

Options = TypeVar("Options", bound=FamilyOptions)


def parse_options(spec: DetectorSpec, model: type[Options]) -> Options:
    """``spec.options`` read through ``model``; a :class:`DetectorOptionsError` naming the
    detector and every offending option otherwise."""
    try:
        return model.model_validate(dict(spec.options))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        unknown = sorted(str(error["loc"][0]) for error in errors if _is_unknown(error))
        problems = [_describe(error) for error in errors if not _is_unknown(error)]
        if unknown:
            problems.append(
                f"unknown {spec.family} options {unknown}; known: {sorted(model.model_fields)}"
            )
        raise DetectorOptionsError(
            f"detector {spec.name} (family {spec.family}): " + "; ".join(problems)
        ) from None


def _is_unknown(error: ErrorDetails) -> bool:
    return error["type"] == "extra_forbidden"


def _describe(error: ErrorDetails) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # a check across options names them itself
        return message
    name = error["loc"][0]
    if error["type"] == "missing" and len(error["loc"]) == 1:
        return f"needs option {name}"
    return f"option {name}: {message}, not {error['input']!r}"
