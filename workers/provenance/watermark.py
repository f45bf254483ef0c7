"""The Stable Diffusion invisible watermark (``invisible-watermark``'s ``dwtDct`` method).

The reference scripts embed ``StableDiffusionV1`` (136 bits; SD 2.x: ``SDV2``, 32 bits)
and diffusers' SDXL pipelines a fixed 48-bit message. Decoding a natural image gives bits
that agree with a message about half the time, so a match is a statistical test: the
binomial tail P[X >= k] for k agreeing bits out of n, X ~ Bin(n, 1/2), counted only below a
strict threshold.

The decoder is ``imwatermark``'s ``EmbedMaxDct.decode`` computed once per image for all
messages and vectorised with numpy (the library loops over 4x4 blocks in Python and imports
torch): the U channel of OpenCV's YUV conversion, the Haar approximation band (computed as
pywt does, rows then columns), and per block the largest magnitude among the 15 values
after the first, modulo 36. Tests check bit-for-bit agreement with the library.

Two pixel conventions are decoded, because the embedders differ: the SD reference scripts
hand the library uint8 pixels (OpenCV's U is offset by 128), diffusers hands it float32
pixels in 0..255 (OpenCV's float U is offset by 0.5, so U is often negative, and the
library marks |U| blocks). A diffusers SDXL mark read back the uint8 way comes out partly
inverted (wherever blue is below luma); read the float32 way it is clean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

from workers.provenance.findings import Finding, Kind, Report

# imwatermark's dwtDct defaults: scales [0, 36, 36] (only channel 1, U, is used by its
# loop over range(2)), 4x4 blocks.
SCALE = 36.0
BLOCK = 4
# pywt's Haar filter coefficient, sqrt(1/2), in the precision it computes in.
HAAR: dict[str, np.floating[Any]] = {
    "uint8": np.float64(0.7071067811865476),
    "float32": np.float32(0.7071067811865476),
}
# imwatermark refuses images with fewer pixels than this.
MIN_PIXELS = 256 * 256
# A weaker match than the threshold is still reported (as not counted) below this.
WEAK_P_VALUE = 1e-3

SDXL_MESSAGE = 0b101100111110110010010000011110111011000110011110

Convention = Literal["uint8", "float32"]
CONVENTION_NAMES: dict[Convention, str] = {
    "uint8": "uint8 pixels (reference scripts)",
    "float32": "float32 pixels (diffusers)",
}


def _bits_of_bytes(data: bytes) -> tuple[int, ...]:
    return tuple(int(b) for b in np.unpackbits(np.frombuffer(data, dtype=np.uint8)))


@dataclass(frozen=True)
class Watermark:
    name: str
    description: str
    bits: tuple[int, ...]
    conventions: tuple[Convention, ...]
    min_width: int = 0  # the embedder skips narrower images


KNOWN_WATERMARKS: tuple[Watermark, ...] = (
    Watermark(
        "StableDiffusionV1",
        "Stable Diffusion 1.x reference scripts",
        _bits_of_bytes(b"StableDiffusionV1"),
        ("uint8",),
    ),
    Watermark(
        "SDV2", "Stable Diffusion 2.x reference scripts", _bits_of_bytes(b"SDV2"), ("uint8",)
    ),
    Watermark(
        "SDXL",
        "diffusers Stable Diffusion XL pipelines",
        tuple(int(b) for b in bin(SDXL_MESSAGE)[2:]),
        ("float32", "uint8"),
        min_width=256,
    ),
)


@dataclass(frozen=True)
class WatermarkMatch:
    watermark: Watermark
    convention: Convention
    matching_bits: int
    total_bits: int
    p_value: float

    @property
    def agreement(self) -> float:
        return self.matching_bits / self.total_bits

    def details(self, threshold: float) -> dict[str, Any]:
        return {
            "watermark": self.watermark.name,
            "embedded_by": self.watermark.description,
            "method": "imwatermark dwtDct",
            "decoded_as": CONVENTION_NAMES[self.convention],
            "bit_agreement": round(self.agreement, 4),
            "matching_bits": self.matching_bits,
            "total_bits": self.total_bits,
            "p_value": float(f"{self.p_value:.3g}"),
            "p_value_threshold": threshold,
        }


def binomial_tail(k: int, n: int) -> float:
    """P[X >= k] for X ~ Binomial(n, 1/2), exactly."""
    if k <= 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / (1 << n)


def block_scores(
    rgb: npt.NDArray[np.uint8], convention: Convention = "uint8"
) -> npt.NDArray[np.float64]:
    """Per 4x4 block of the Haar approximation of U, in imwatermark's order: 1.0 where the
    block reads as bit 1. ``convention`` is the pixel type the embedder used."""
    import cv2

    rows, cols = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    x: npt.NDArray[np.floating[Any]]
    if convention == "uint8":
        u8 = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YUV)[:rows, :cols, 1]
        x, k = u8.astype(np.float64), HAAR["uint8"]
    else:
        yuv = cv2.cvtColor(rgb.astype(np.float32), cv2.COLOR_RGB2YUV)
        x = np.asarray(yuv[:rows, :cols, 1], dtype=np.float32)
        k = HAAR["float32"]
    vertical = x[0::2] * k + x[1::2] * k
    approx = vertical[:, 0::2] * k + vertical[:, 1::2] * k
    block_rows, block_cols = approx.shape[0] // BLOCK, approx.shape[1] // BLOCK
    blocks = (
        approx[: block_rows * BLOCK, : block_cols * BLOCK]
        .reshape(block_rows, BLOCK, block_cols, BLOCK)
        .swapaxes(1, 2)
        .reshape(block_rows * block_cols, BLOCK * BLOCK)
    )
    # imwatermark takes the value at argmax(|v|) over positions 1..15 and then its
    # magnitude: that is the largest magnitude.
    strongest = np.abs(blocks[:, 1:]).max(axis=1)
    scores: npt.NDArray[np.float64] = (np.mod(strongest, SCALE) > 0.5 * SCALE).astype(np.float64)
    return scores


def decode_bits(scores: npt.NDArray[np.float64], length: int) -> npt.NDArray[np.bool_]:
    """imwatermark's decision: block i votes for bit ``i % length``; a bit is 1 when the
    mean vote times 255 exceeds 127."""
    index = np.arange(len(scores)) % length
    sums = np.bincount(index, weights=scores, minlength=length)
    counts = np.bincount(index, minlength=length)
    return np.asarray(sums / counts * 255 > 127)


def match_watermarks(image: Image.Image) -> list[WatermarkMatch]:
    """The best match of every known watermark that ``image`` is large enough to carry
    (best over the pixel conventions its embedders use)."""
    width, height = image.size
    rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    scores: dict[Convention, npt.NDArray[np.float64]] = {}
    best: list[WatermarkMatch] = []
    for watermark in KNOWN_WATERMARKS:
        n = len(watermark.bits)
        if width < watermark.min_width or width * height < MIN_PIXELS:
            continue
        expected = np.asarray(watermark.bits, dtype=bool)
        candidates: list[WatermarkMatch] = []
        for convention in watermark.conventions:
            if convention not in scores:
                scores[convention] = block_scores(rgb, convention)
            if len(scores[convention]) < 4 * n:  # fewer than 4 votes per bit
                continue
            k = int(np.count_nonzero(decode_bits(scores[convention], n) == expected))
            candidates.append(WatermarkMatch(watermark, convention, k, n, binomial_tail(k, n)))
        if candidates:
            best.append(min(candidates, key=lambda m: m.p_value))
    return best


# The IJG standard luminance quantisation table (quality 50), in zig-zag order as Pillow
# reports it; a file's table scaled against it gives its encoder's quality setting.
_IJG_LUMA = (
    16, 11, 12, 14, 12, 10, 16, 14, 13, 14, 18, 17, 16, 19, 24, 40, 26, 24, 22, 22, 24, 49,
    35, 37, 29, 40, 58, 51, 61, 60, 57, 51, 56, 55, 64, 72, 92, 78, 64, 68, 87, 69, 55, 56,
    80, 109, 81, 87, 95, 98, 103, 104, 103, 62, 77, 113, 121, 112, 100, 120, 92, 101, 103, 99,
)  # fmt: skip

# Measured on corpus photos: the DWT-DCT marks survive JPEG at quality 100 and are gone at
# 95. Re-encoded JPEGs are most uploads, so skipping them keeps the watermark check (the
# costliest signal) to the files that can still carry a mark.
MIN_JPEG_QUALITY = 97


def jpeg_quality(raw: bytes) -> int | None:
    """The IJG quality a JPEG was saved at, estimated from its luminance table; None for
    other formats or when no table can be read.

    Reads the DQT segment itself rather than opening the file with Pillow, whose JPEG
    reader parses EXIF and reports corrupt EXIF through process-wide warnings."""
    luma = _luminance_table(raw)
    if luma is None:
        return None
    scale = sum(luma) / sum(_IJG_LUMA) * 100  # IJG: scale = 5000/q below 50, 200 - 2q above
    quality = 5000 / scale if scale > 100 else (200 - scale) / 2
    return int(max(1, min(100, round(quality))))


def _luminance_table(raw: bytes) -> list[int] | None:
    if not raw.startswith(b"\xff\xd8"):
        return None
    position = 2
    while position + 4 <= len(raw):
        if raw[position] != 0xFF:
            return None
        marker = raw[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no table came first
            return None
        length = int.from_bytes(raw[position + 2 : position + 4], "big")
        if marker == 0xDB:
            table = position + 4
            end = min(position + 2 + length, len(raw))
            while table < end:
                precision, table_id = raw[table] >> 4, raw[table] & 0x0F
                size = 128 if precision else 64
                values = raw[table + 1 : table + 1 + size]
                if len(values) < size:
                    return None
                if table_id == 0:
                    if precision:
                        return [int.from_bytes(values[i : i + 2], "big") for i in range(0, 128, 2)]
                    return list(values)
                table += 1 + size
        position += 2 + length
    return None


def check_watermarks(
    image: Image.Image,
    report: Report,
    *,
    max_p_value: float,
    max_pixels: int,
    raw: bytes = b"",
) -> list[WatermarkMatch]:
    """Test ``image`` for every known watermark; adds a finding for a match below
    ``max_p_value`` (and a non-AI note for a weaker one below ``WEAK_P_VALUE``)."""
    quality = jpeg_quality(raw) if raw else None
    if quality is not None and quality < MIN_JPEG_QUALITY:
        report.check(
            "watermark", f"skipped: JPEG saved at quality ~{quality}, which erases the marks"
        )
        return []
    width, height = image.size
    if width * height < MIN_PIXELS:
        report.check("watermark", "skipped: under 256x256 pixels, too small to carry one")
        return []
    if width * height > max_pixels:
        report.check("watermark", f"skipped: over the {max_pixels}-pixel cap")
        return []
    matches = match_watermarks(image)
    if not matches:
        report.check("watermark", "skipped: too few blocks for any message")
        return []
    for match in matches:
        name = match.watermark.name
        if match.p_value < max_p_value:
            report.add(
                Finding(
                    Kind.WATERMARK,
                    True,
                    f"Invisible watermark of the {match.watermark.description} ({name}) "
                    f"decoded: {match.matching_bits}/{match.total_bits} bits agree "
                    f"(p = {match.p_value:.1e} against chance)",
                    match.details(max_p_value),
                    rank=30,
                )
            )
        elif match.p_value < WEAK_P_VALUE:
            report.add(
                Finding(
                    Kind.WATERMARK,
                    False,
                    f"Weak partial agreement with the {name} invisible watermark "
                    f"({match.matching_bits}/{match.total_bits} bits, p = {match.p_value:.1e}): "
                    f"above the {max_p_value:g} threshold, not counted",
                    match.details(max_p_value),
                )
            )
    best = min(matches, key=lambda m: m.p_value)
    report.check(
        "watermark",
        f"best match {best.watermark.name} {best.matching_bits}/{best.total_bits} bits "
        f"(p = {best.p_value:.2g})",
    )
    return matches
