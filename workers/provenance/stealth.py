""" "Stealth pnginfo": generation settings hidden in the least significant bits of pixels.

The AUTOMATIC1111 / NovelAI extension writes a 15-byte magic, a 32-bit big-endian payload
length in bits, then the payload, reading pixels column by column (x outer, y inner):

- ``stealth_pnginfo`` / ``stealth_pngcomp``: one bit per pixel, the alpha channel's LSB;
- ``stealth_rgbinfo`` / ``stealth_rgbcomp``: three bits per pixel, the R, G, B LSBs.

``...comp`` payloads are gzip. Only 8-bit RGB/RGBA PNGs carry it (the extension writes
nothing else, and re-encoding destroys it). The detector receives RGB images with alpha
dropped, so RGBA files are decoded again here from the raw bytes, under a pixel cap.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from workers.intake import drop_damaged_png_chunks
from workers.provenance.containers import MAX_CHUNK_TEXT_BYTES, ContainerMetadata, inflate
from workers.provenance.findings import Finding, Kind, Report, clip, error_text
from workers.provenance.generator_metadata import describe_generation_text

MAGIC_LENGTH = 15
ALPHA_MAGICS = {b"stealth_pnginfo": False, b"stealth_pngcomp": True}
RGB_MAGICS = {b"stealth_rgbinfo": False, b"stealth_rgbcomp": True}
_HEADER_BITS = (MAGIC_LENGTH + 4) * 8


@dataclass(frozen=True)
class StealthPayload:
    channel: str  # "alpha" or "rgb"
    magic: str
    compressed: bool
    text: str
    truncated: bool
    problem: str | None = None  # why the payload could not be fully read


def read_stealth(
    image: Image.Image,
    raw: bytes,
    meta: ContainerMetadata,
    report: Report,
    *,
    max_pixels: int,
    orientation: int | None = None,
) -> StealthPayload | None:
    """The stealth payload of an 8-bit RGB(A) PNG, or None. Adds a finding when found.

    ``image`` is the decoded RGB image, used as is when it holds the stored pixels
    (an RGB PNG without EXIF rotation); ``orientation`` is the file's EXIF orientation."""
    header = meta.png_header
    if meta.format != "PNG" or header is None or header.bit_depth != 8:
        report.check("stealth_payload", "not applicable (only 8-bit RGB/RGBA PNG carry it)")
        return None
    if header.color_type not in (2, 6):
        report.check("stealth_payload", "not applicable (PNG is not RGB/RGBA)")
        return None
    if header.width * header.height > max_pixels:
        report.check("stealth_payload", f"skipped: over the {max_pixels}-pixel cap")
        return None
    try:
        pixels = _stored_pixels(image, raw, meta, orientation)
        payload = _extract(pixels)
    except Exception as exc:
        report.error(f"stealth payload could not be read: {error_text(exc)}")
        report.check("stealth_payload", "error")
        return None
    if payload is None:
        report.check("stealth_payload", "none found")
        return None
    report.check("stealth_payload", f"found ({payload.magic})")
    if payload.problem:
        report.error(f"stealth payload {payload.magic}: {payload.problem}")
    where = "alpha channel's" if payload.channel == "alpha" else "red, green and blue"
    info = describe_generation_text(payload.text, f"hidden {payload.channel} LSB payload")
    details = {
        "magic": payload.magic,
        "channel": payload.channel,
        "compressed": payload.compressed,
        "truncated": payload.truncated,
        "generator": info.generator if info else None,
        "model": info.model if info else None,
        "text": clip(payload.text, 2000),
    }
    if info is not None:
        details.update({k: v for k, v in info.details().items() if k not in details})
        summary = (
            f"Generation settings hidden in the {where} least significant bits "
            f"({payload.magic}): {info.generator}"
            + (f", model {clip(info.model, 120)}" if info.model else "")
        )
    else:
        summary = (
            f"A {payload.magic} payload is hidden in the {where} least significant bits "
            "(the stealth-pnginfo format of image generators)"
        )
    report.add(Finding(Kind.STEALTH_PAYLOAD, True, summary, details, rank=25))
    return payload


def _stored_pixels(
    image: Image.Image, raw: bytes, meta: ContainerMetadata, orientation: int | None
) -> npt.NDArray[np.uint8]:
    """Pixels in stored order. The decoded RGB image is used when it is exactly the stored
    RGB (no alpha, no EXIF rotation); otherwise the PNG is decoded again."""
    header = meta.png_header
    assert header is not None
    if (
        header.color_type == 2
        and orientation in (None, 1)
        and image.mode == "RGB"
        and image.size == (header.width, header.height)
    ):
        return np.asarray(image)
    # Without the damaged ancillary chunks that intake also stepped over to decode it.
    repaired, _ = drop_damaged_png_chunks(raw)
    with Image.open(io.BytesIO(repaired), formats=["PNG"]) as source:
        if source.size != (header.width, header.height):
            raise ValueError("PNG header and decoder disagree on the size")
        source.load()
        return np.asarray(source.convert("RGBA" if header.has_alpha else "RGB"))


def _extract(pixels: npt.NDArray[np.uint8]) -> StealthPayload | None:
    # Column-major order: transpose to (width, height, channels) and flatten.
    columns = pixels.transpose(1, 0, 2)
    streams: list[tuple[str, npt.NDArray[np.uint8], dict[bytes, bool]]] = []
    if pixels.shape[2] == 4:
        streams.append(("alpha", columns[:, :, 3].reshape(-1) & np.uint8(1), ALPHA_MAGICS))
    streams.append(("rgb", columns[:, :, :3].reshape(-1) & np.uint8(1), RGB_MAGICS))
    for channel, bits, magics in streams:
        if bits.size < _HEADER_BITS:
            continue
        magic = np.packbits(bits[: MAGIC_LENGTH * 8]).tobytes()
        if magic not in magics:
            continue
        length_bits = int.from_bytes(np.packbits(bits[MAGIC_LENGTH * 8 : _HEADER_BITS]).tobytes())
        available = bits.size - _HEADER_BITS
        wanted = min(length_bits, available, MAX_CHUNK_TEXT_BYTES * 8)
        data = np.packbits(bits[_HEADER_BITS : _HEADER_BITS + wanted]).tobytes()[: wanted // 8]
        truncated = wanted < length_bits
        compressed = magics[magic]
        problems = [f"declares {length_bits} bits, {wanted} read"] if truncated else []
        if compressed:
            try:
                data, capped, complete = inflate(data, wbits=31)
            except zlib.error as exc:
                data = b""
                problems.append(f"gzip payload does not decompress ({exc})")
            else:
                truncated = truncated or capped or not complete
        return StealthPayload(
            channel,
            magic.decode("ascii"),
            compressed,
            data.decode("utf-8", errors="replace"),
            truncated,
            "; ".join(problems) or None,
        )
    return None
