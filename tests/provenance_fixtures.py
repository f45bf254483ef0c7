"""Helpers for the provenance tests: the shared corpus, decoding as intake does, building
PNG/JPEG metadata by hand, and embedding the Stable Diffusion watermarks the way the
reference scripts and diffusers do (with the real ``invisible-watermark`` encoder)."""

from __future__ import annotations

import csv
import io
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from workers.detectors.base import DetectorOutput, DetectorSpec
from workers.detectors.provenance import ProvenanceDetector, load_provenance
from workers.intake import IntakeLimits, decode

SHARED = Path(__file__).resolve().parents[2] / "shared"
C2PA_TEST_CERTS = SHARED / "c2pa-test-certs"
LIMITS = IntakeLimits(max_bytes=50 * 1024 * 1024, max_pixels=100_000_000, decode_timeout_s=20)
SPEC = DetectorSpec(
    name="provenance",
    family="provenance",
    version="1",
    options={"decisive": True, "watermark_max_p_value": 1e-6},
)
SDXL_WATERMARK_BITS = [
    int(bit) for bit in bin(0b101100111110110010010000011110111011000110011110)[2:]
]


def corpus_rows(corpus_dir: Path) -> list[dict[str, str]]:
    with (corpus_dir / "MANIFEST.tsv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def make_detector(**options: object) -> ProvenanceDetector:
    spec = DetectorSpec(
        name=SPEC.name,
        family=SPEC.family,
        version=SPEC.version,
        options={**SPEC.options, **options},
    )
    return load_provenance(spec, device="cpu", weights_path=Path())


def detect(detector: ProvenanceDetector, raw: bytes) -> DetectorOutput:
    """Decode as the scanner does (RGB, alpha dropped), then detect with the raw bytes."""
    (output,) = detector.detect_batch([decode(raw, LIMITS).image], [raw])
    return output


def items_of(
    output: DetectorOutput, kind: str, *, ai: bool | None = None
) -> list[dict[str, object]]:
    return [
        item
        for item in output.evidence["items"]
        if item["kind"] == kind and (ai is None or item["ai"] is ai)
    ]


# ---------------------------------------------------------------------------- PNG and JPEG


def png_chunk(kind: bytes, data: bytes, *, crc: int | None = None) -> bytes:
    checksum = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", checksum)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def png_with_chunks(chunks: Sequence[bytes], image: Image.Image | None = None) -> bytes:
    """A valid PNG with ``chunks`` (already framed) inserted right after IHDR."""
    base = png_bytes(image or Image.new("RGB", (8, 8), (120, 80, 40)))
    ihdr_end = 8 + 8 + 13 + 4
    return base[:ihdr_end] + b"".join(chunks) + base[ihdr_end:]


def text_chunk(keyword: str, text: str) -> bytes:
    return png_chunk(b"tEXt", keyword.encode("latin-1") + b"\x00" + text.encode("latin-1"))


def jpeg_bytes(image: Image.Image, *, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_with_segment(jpeg: bytes, marker: int, body: bytes) -> bytes:
    """``jpeg`` with one more segment right after SOI."""
    return jpeg[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def xmp_packet(inner: str) -> bytes:
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        + inner
        + "</rdf:RDF></x:xmpmeta>"
    ).encode()


# ------------------------------------------------------------------------ hidden payloads


def embed_stealth(
    image: Image.Image, payload: bytes, magic: str, *, declared_bits: int | None = None
) -> Image.Image:
    """Write ``magic`` + 32-bit bit length + payload into LSBs, column by column, as the
    stealth-pnginfo extension does (alpha LSBs for ``stealth_png*``, R/G/B LSBs for
    ``stealth_rgb*``). ``declared_bits`` overrides the length written in the header."""
    length = len(payload) * 8 if declared_bits is None else declared_bits
    data = magic.encode() + struct.pack(">I", length) + payload
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    pixels = np.array(image.convert("RGBA" if magic.startswith("stealth_png") else "RGB"))
    columns = pixels.transpose(1, 0, 2).copy()
    if magic.startswith("stealth_png"):
        flat = columns[:, :, 3].reshape(-1)
    else:
        flat = columns[:, :, :3].reshape(-1)
    if bits.size > flat.size:
        raise ValueError("image too small for the payload")
    flat[: bits.size] = (flat[: bits.size] & 0xFE) | bits
    if magic.startswith("stealth_png"):
        columns[:, :, 3] = flat.reshape(columns.shape[:2])
    else:
        columns[:, :, :3] = flat.reshape((*columns.shape[:2], 3))
    return Image.fromarray(columns.transpose(1, 0, 2))


def sd_script_watermark(image: Image.Image, message: bytes) -> Image.Image:
    """Stable Diffusion 1.x/2.x ``scripts/txt2img.py``: ``put_watermark`` on uint8 BGR."""
    import cv2
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", message)
    bgr = cv2.cvtColor(np.array(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    return Image.fromarray(encoder.encode(bgr, "dwtDct")[:, :, ::-1])


def diffusers_sdxl_watermark(image: Image.Image) -> Image.Image:
    """diffusers ``StableDiffusionXLWatermarker.apply_watermark``: float32 BGR in 0..255,
    encode, back to RGB, then the pipeline's clamp and ``round`` to uint8."""
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", SDXL_WATERMARK_BITS)
    bgr = np.asarray(image.convert("RGB")).astype(np.float32)[:, :, ::-1]
    rgb = encoder.encode(bgr, "dwtDct")[:, :, ::-1]
    normalised = np.clip(2 * (rgb / 255 - 0.5), -1.0, 1.0)
    return Image.fromarray(np.round((normalised / 2 + 0.5) * 255).astype(np.uint8))


# ----------------------------------------------------------------------------------- C2PA


def sign_c2pa(image_bytes: bytes, mime: str, manifest: dict[str, object]) -> bytes:
    """Sign ``image_bytes`` with the public C2PA test chain (signed-but-untrusted)."""
    import json

    import c2pa

    certs = (C2PA_TEST_CERTS / "es256_certs.pem").read_bytes()
    key = (C2PA_TEST_CERTS / "es256_private.key").read_bytes()
    signer = c2pa.Signer.from_info(
        c2pa.C2paSignerInfo(alg=b"es256", sign_cert=certs, private_key=key, ta_url=None)
    )
    destination = io.BytesIO()
    with c2pa.Builder(json.dumps(manifest)) as builder:
        builder.sign(signer, mime, io.BytesIO(image_bytes), destination)
    return destination.getvalue()
