"""GenImage's degradations: how a detector holds up when an image has been shrunk,
re-compressed or blurred on its way to the platform.

GenImage (Zhu et al., 2023, Table 5 "Model evaluation on degraded images") names six
conditions: LR (112), LR (64), JPEG (q=65), JPEG (q=30), Blur (sigma=3), Blur (sigma=5).
Here each is one named :class:`Condition` in :data:`CONDITIONS`, beside ``identity`` (the
image as it is), and each is defined exactly:

``downscale_112``, ``downscale_64``
    The image resized to exactly N x N pixels (aspect ratio not kept) with Pillow's
    bicubic filter. GenImage gives only the side length, a single number, as for the
    square inputs its detectors take; reading it as N x N means every image loses the same
    amount of detail whatever its shape, and the detector's own preprocessing then scales
    that small square back up, which is the low-resolution case the table measures.
    Bicubic because it is the usual choice for image downsampling; Pillow widens the
    filter's support by the scale factor when shrinking, so the result is low-pass
    filtered (antialiased) rather than a sample of every k-th pixel.
``jpeg_65``, ``jpeg_30``
    One JPEG encoding by Pillow at that quality, with Pillow's other defaults (4:2:0
    chroma subsampling, baseline, standard tables).
``blur_3``, ``blur_5``
    ``PIL.ImageFilter.GaussianBlur(radius=sigma)``. Pillow documents ``radius`` as the
    standard deviation of the Gaussian kernel (it is not a kernel half-width) and
    approximates the Gaussian with three passes of an extended box filter whose variance
    equals sigma squared; edge pixels are repeated outward.

:func:`degraded_bytes` is what a detector should be given: the pixels after the
degradation, encoded losslessly as PNG, or for the JPEG conditions the JPEG bytes
themselves (their decoded pixels are exactly :func:`apply`'s). ``identity`` hands back the
original file unchanged, so the baseline a detector is measured against is the upload as
it came, metadata and all. Every other condition carries no metadata: a platform that
re-encodes images drops it too, and a detector that reads provenance is measured on that.
"""

from __future__ import annotations

import enum
import io
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from PIL import Image, ImageFilter

from workers.intake import IntakeLimits, decode

DEFAULT_LIMITS = IntakeLimits(max_bytes=50 << 20, max_pixels=100_000_000, decode_timeout_s=60)
"""Bounds for decoding an evaluation image when the caller has none of its own."""


class Kind(enum.StrEnum):
    IDENTITY = "identity"
    DOWNSCALE = "downscale"
    JPEG = "jpeg"
    BLUR = "blur"


@dataclass(frozen=True)
class Condition:
    """One degradation. ``value`` is the side in pixels (downscale), the JPEG quality, or
    the Gaussian's standard deviation in pixels (blur); 0 for identity."""

    name: str
    kind: Kind
    value: float
    description: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "value": self.value,
            "description": self.description,
        }


CONDITIONS: Mapping[str, Condition] = MappingProxyType(
    {
        c.name: c
        for c in (
            Condition("identity", Kind.IDENTITY, 0, "the image as it is"),
            Condition("downscale_112", Kind.DOWNSCALE, 112, "resized to 112x112, bicubic"),
            Condition("downscale_64", Kind.DOWNSCALE, 64, "resized to 64x64, bicubic"),
            Condition("jpeg_65", Kind.JPEG, 65, "JPEG re-encoded at quality 65 (4:2:0)"),
            Condition("jpeg_30", Kind.JPEG, 30, "JPEG re-encoded at quality 30 (4:2:0)"),
            Condition("blur_3", Kind.BLUR, 3, "Gaussian blur, sigma 3 pixels"),
            Condition("blur_5", Kind.BLUR, 5, "Gaussian blur, sigma 5 pixels"),
        )
    }
)
"""Every condition by its stable name, in GenImage's order after ``identity``."""


def get_condition(name: str | Condition) -> Condition:
    """The condition called ``name``; a :class:`ValueError` that lists the known names
    for any other."""
    if isinstance(name, Condition):
        return name
    try:
        return CONDITIONS[name]
    except KeyError:
        known = ", ".join(CONDITIONS)
        raise ValueError(f"unknown degradation {name!r}; known: {known}") from None


def apply(condition: str | Condition, image: Image.Image) -> Image.Image:
    """The degraded image: RGB in, a new RGB image out (the input is left as it is)."""
    spec = get_condition(condition)
    if image.mode != "RGB":
        raise ValueError(f"degradations take RGB images, got mode {image.mode!r}")
    if spec.kind is Kind.IDENTITY:
        return image.copy()
    if spec.kind is Kind.DOWNSCALE:
        side = int(spec.value)
        return image.resize((side, side), Image.Resampling.BICUBIC)
    if spec.kind is Kind.JPEG:
        with Image.open(io.BytesIO(_jpeg(image, int(spec.value)))) as decoded:
            return decoded.convert("RGB")
    return image.filter(ImageFilter.GaussianBlur(radius=spec.value))


def degraded_bytes(
    condition: str | Condition, data: bytes, *, limits: IntakeLimits = DEFAULT_LIMITS
) -> bytes:
    """The file a detector should score for ``data`` under the condition: PNG of the
    degraded pixels, the JPEG itself for the JPEG conditions, ``data`` unchanged for
    ``identity``.

    The bytes are decoded as intake decodes uploads (the same refusals, EXIF orientation
    applied, the same RGB conversion), so the degradation is applied to the picture the
    detectors would have seen; bad data raises :class:`workers.intake.Rejected`.
    """
    spec = get_condition(condition)
    if spec.kind is Kind.IDENTITY:
        return data
    image = decode(data, limits).image
    if spec.kind is Kind.JPEG:
        return _jpeg(image, int(spec.value))
    out = io.BytesIO()
    apply(spec, image).save(out, format="PNG")
    return out.getvalue()


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
