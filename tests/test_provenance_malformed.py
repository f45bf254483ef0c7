"""Broken, hostile and unusual metadata: never a crash, what can be read is reported, and
what could not be read is named in ``errors``."""

from __future__ import annotations

import gzip
import io
import json
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from workers.detectors.base import DetectorOutput
from workers.detectors.provenance import ProvenanceDetector
from workers.intake import DecodedImage, decode
from workers.provenance.containers import MAX_CHUNK_TEXT_BYTES

from provenance_fixtures import (
    LIMITS,
    detect,
    embed_stealth,
    items_of,
    jpeg_bytes,
    jpeg_with_segment,
    make_detector,
    png_bytes,
    png_chunk,
    png_with_chunks,
    text_chunk,
    xmp_packet,
)

A1111 = (
    "a lighthouse at dusk\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 7, "
    "Seed: 42, Size: 512x512, Model hash: abc123, Model: dreamshaper_8, Version: v1.10.1"
)
XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
AI_SOURCE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


@pytest.fixture(scope="module")
def detector() -> ProvenanceDetector:
    return make_detector()


def run(detector: ProvenanceDetector, raw: bytes) -> DetectorOutput:
    """Detect with a stand-in decoded image, for files intake itself would reject."""
    (output,) = detector.detect_batch([Image.new("RGB", (8, 8))], [raw])
    json.dumps(output.evidence)  # always storable
    return output


def errors_mention(output: DetectorOutput, *words: str) -> bool:
    return any(all(w in error for w in words) for error in output.evidence["errors"])


# ---------------------------------------------------------------------------- PNG chunks


def test_text_chunk_without_keyword_separator_is_skipped(detector: ProvenanceDetector) -> None:
    raw = png_with_chunks(
        [png_chunk(b"tEXt", b"parameters-without-nul"), text_chunk("parameters", A1111)]
    )
    output = detect(detector, raw)
    assert errors_mention(output, "tEXt", "no valid keyword")
    (item,) = items_of(output, "generator_metadata", ai=True)
    assert item["details"]["model"] == "dreamshaper_8"
    assert item["details"]["settings"]["Seed"] == "42"


def test_text_chunk_with_bad_crc_is_read_and_noted(detector: ProvenanceDetector) -> None:
    body = b"parameters\x00" + A1111.encode()
    output = run(detector, png_with_chunks([png_chunk(b"tEXt", body, crc=0xDEADBEEF)]))
    assert errors_mention(output, "CRC")
    assert output.score == 1.0


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"parameters\x00\x01", "cut short"),  # iTXt header cut short
        (b"parameters\x00\x00\x00en", "not terminated"),  # language tag without NUL
        (b"parameters\x00\x01\x00\x00\x00" + b"not zlib at all", "parameters"),  # bad zlib
        (b"parameters\x00\x01\x07\x00\x00x", "compression method"),
    ],
)
def test_broken_itxt_chunks(detector: ProvenanceDetector, body: bytes, error: str) -> None:
    output = run(detector, png_with_chunks([png_chunk(b"iTXt", body)]))
    assert errors_mention(output, "iTXt", error), output.evidence["errors"]
    assert output.score is None


def test_itxt_compressed_parameters_are_read(detector: ProvenanceDetector) -> None:
    body = b"parameters\x00\x01\x00\x00\x00" + zlib.compress(A1111.encode())
    output = detect(detector, png_with_chunks([png_chunk(b"iTXt", body)]))
    assert output.score == 1.0
    assert items_of(output, "generator_metadata")[0]["details"]["model"] == "dreamshaper_8"


def test_chunk_running_past_the_end_keeps_what_came_before(detector: ProvenanceDetector) -> None:
    good = text_chunk("parameters", A1111)
    broken = struct.pack(">I", 10_000_000) + b"tEXt" + b"Comment\x00short"
    output = run(detector, png_with_chunks([good, broken]))
    assert errors_mention(output, "runs past the end")
    assert output.score == 1.0


def test_ztxt_zip_bomb_is_capped(detector: ProvenanceDetector) -> None:
    bomb = zlib.compress(b"\x00" * (256 * 1024 * 1024), 9)  # 256 MiB of zeros, ~250 KiB
    raw = png_with_chunks([png_chunk(b"zTXt", b"parameters\x00\x00" + bomb)])
    started = time.perf_counter()
    output = run(detector, raw)
    assert time.perf_counter() - started < 5
    assert errors_mention(output, "zTXt", "cap")
    assert len(json.dumps(output.evidence)) < 20_000
    assert output.score is None


def test_many_compressed_chunks_share_one_budget(detector: ProvenanceDetector) -> None:
    blob = zlib.compress(b"x" * (MAX_CHUNK_TEXT_BYTES + 1), 9)
    chunks = [png_chunk(b"zTXt", f"k{i}".encode() + b"\x00\x00" + blob) for i in range(8)]
    output = run(detector, png_with_chunks([*chunks, text_chunk("parameters", A1111)]))
    assert errors_mention(output, "budget for inflated text is used up")
    assert output.score == 1.0  # the uncompressed chunk after them is still read


def test_not_a_png_at_all(detector: ProvenanceDetector) -> None:
    for raw in (b"", b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00", b"garbage" * 100):
        output = run(detector, raw)
        assert output.score is None


# -------------------------------------------------------------------------------------- XMP


def test_malformed_xmp_is_searched_as_text(detector: ProvenanceDetector) -> None:
    broken = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description '
        b'Iptc4xmpExt:DigitalSourceType="' + AI_SOURCE.encode() + b'"> <unclosed>'
    )
    raw = jpeg_with_segment(jpeg_bytes(Image.new("RGB", (32, 32))), 0xE1, XMP_PREFIX + broken)
    output = detect(detector, raw)
    assert errors_mention(output, "XMP", "not well-formed")
    (item,) = items_of(output, "iptc", ai=True)
    assert "does not parse" in item["summary"]


def test_xmp_with_entities_is_not_expanded(detector: ProvenanceDetector) -> None:
    laughs = "".join(
        f'<!ENTITY l{i} "{"&l" + str(i - 1) + ";" * 10 if i else "lol"}">' for i in range(10)
    )
    packet = (
        f'<?xml version="1.0"?><!DOCTYPE x [{laughs}]>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><d>&l9;</d></x:xmpmeta>'
    ).encode()
    raw = jpeg_with_segment(jpeg_bytes(Image.new("RGB", (32, 32))), 0xE1, XMP_PREFIX + packet)
    started = time.perf_counter()
    output = detect(detector, raw)
    assert time.perf_counter() - started < 2
    assert errors_mention(output, "DTD")
    assert output.score is None


@pytest.mark.parametrize(
    "inner",
    [
        # attribute form
        '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        f'Iptc4xmpExt:DigitalSourceType="{AI_SOURCE}"/>',
        # element form
        '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/">'
        f"<Iptc4xmpExt:DigitalSourceType>{AI_SOURCE}</Iptc4xmpExt:DigitalSourceType>"
        "</rdf:Description>",
        # rdf:resource form
        '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/">'
        f'<Iptc4xmpExt:DigitalSourceType rdf:resource="{AI_SOURCE}"/></rdf:Description>',
    ],
)
def test_iptc_digital_source_type_forms_in_png_itxt(
    detector: ProvenanceDetector, inner: str
) -> None:
    body = b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp_packet(inner)
    output = detect(detector, png_with_chunks([png_chunk(b"iTXt", body)]))
    (item,) = items_of(output, "iptc", ai=True)
    assert item["details"]["source_type"] == "trainedAlgorithmicMedia"


def test_iptc_digital_capture_in_webp_is_a_claim_not_a_flag(detector: ProvenanceDetector) -> None:
    inner = (
        '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        'Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/'
        'digitalCapture"/>'
    )
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(buffer, "WEBP", xmp=xmp_packet(inner))
    output = detect(detector, buffer.getvalue())
    (item,) = items_of(output, "iptc")
    assert item["ai"] is False and "digitalCapture" in item["summary"]
    assert output.score is None


# ------------------------------------------------------------------------------------- C2PA


def app11_span(raw: bytes) -> tuple[int, int]:
    position = 2
    while raw[position + 1] != 0xEB:
        position += 2 + int.from_bytes(raw[position + 2 : position + 4], "big")
    return position + 4, position + 2 + int.from_bytes(raw[position + 2 : position + 4], "big")


def flipped(raw: bytes, at: int, count: int = 16) -> bytes:
    data = bytearray(raw)
    for i in range(at, at + count):
        data[i] ^= 0xFF
    return bytes(data)


def test_corrupted_c2pa_manifest_is_reported_not_trusted(
    corpus_dir: Path, detector: ProvenanceDetector
) -> None:
    raw = (corpus_dir / "images/c2pa_4-firefly.jpg").read_bytes()
    start, end = app11_span(raw)
    # Inside an assertion's CBOR: the manifest no longer loads.
    damaged = detect(detector, flipped(raw, start + (end - start) // 50))
    (item,) = items_of(damaged, "c2pa", ai=False)
    assert item["details"]["validity"] == "invalid"
    assert "assertion.cbor.invalid" in item["details"]["validation_failures"]
    assert errors_mention(damaged, "C2PA")
    assert damaged.score is None
    # Inside the claim: the declaration is still readable, but the signature fails.
    tampered = detect(detector, flipped(raw, start + (end - start) // 10))
    (claim,) = items_of(tampered, "c2pa", ai=True)
    assert claim["details"]["validity"] == "invalid"
    assert "claimSignature.mismatch" in claim["details"]["validation_failures"]
    assert "does NOT validate" in tampered.evidence["summary"]


def test_truncated_c2pa_segment(corpus_dir: Path, detector: ProvenanceDetector) -> None:
    raw = (corpus_dir / "images/c2pa_4-firefly.jpg").read_bytes()
    start, end = app11_span(raw)
    output = run(detector, raw[: (start + end) // 2])
    assert errors_mention(output, "JPEG", "runs past the end")
    assert output.score is None


def test_c2pa_jumbf_noise(detector: ProvenanceDetector) -> None:
    noise = b"JP\x00\x01\x00\x00\x00\x01" + b"\x00\x00\x00\x20jumb" + bytes(range(256)) * 4
    raw = jpeg_with_segment(jpeg_bytes(Image.new("RGB", (32, 32))), 0xEB, noise)
    output = detect(detector, raw)
    assert output.score is None
    assert output.evidence["errors"]  # the SDK's complaint, or the empty store, is named


# ----------------------------------------------------------------------- EXIF and stealth


def test_a1111_text_in_jpeg_and_webp_exif_user_comment(detector: ProvenanceDetector) -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + A1111.encode("utf-16-be")
    for fmt in ("JPEG", "WEBP"):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buffer, fmt, exif=exif.tobytes())
        output = detect(detector, buffer.getvalue())
        (item,) = items_of(output, "generator_metadata", ai=True)
        assert "EXIF UserComment" in item["details"]["source"], fmt
        assert item["details"]["model"] == "dreamshaper_8"
        assert item["details"]["prompt"] == "a lighthouse at dusk"


def test_broken_exif_is_noted(detector: ProvenanceDetector) -> None:
    raw = jpeg_with_segment(
        jpeg_bytes(Image.new("RGB", (32, 32))), 0xE1, b"Exif\x00\x00MM\x00*junk"
    )
    output = run(detector, raw)
    assert errors_mention(output, "EXIF")


@pytest.mark.parametrize(
    ("magic", "compress"),
    [("stealth_pnginfo", False), ("stealth_rgbcomp", True), ("stealth_rgbinfo", False)],
)
def test_stealth_variants(detector: ProvenanceDetector, magic: str, compress: bool) -> None:
    payload = gzip.compress(A1111.encode()) if compress else A1111.encode()
    image = embed_stealth(Image.new("RGB", (96, 96), (30, 60, 90)), payload, magic)
    output = detect(detector, png_bytes(image))
    (item,) = items_of(output, "stealth_payload", ai=True)
    assert item["details"]["magic"] == magic
    assert item["details"]["channel"] == ("alpha" if magic.startswith("stealth_png") else "rgb")
    assert item["details"]["model"] == "dreamshaper_8"


def test_stealth_payload_with_lying_length_and_bad_gzip(detector: ProvenanceDetector) -> None:
    image = embed_stealth(
        Image.new("RGBA", (64, 64)), b"\x1f\x8bnot gzip", "stealth_pngcomp", declared_bits=2**31
    )
    started = time.perf_counter()
    output = detect(detector, png_bytes(image))
    assert time.perf_counter() - started < 2
    # The magic is unmistakable, so it is reported; the damage is named.
    (item,) = items_of(output, "stealth_payload", ai=True)
    assert item["details"]["truncated"] is True
    assert errors_mention(output, "stealth_pngcomp", "declares 2147483648 bits")
    assert errors_mention(output, "stealth_pngcomp", "does not decompress")


def test_one_failing_signal_does_not_cost_the_others(
    detector: ProvenanceDetector, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.provenance.inspector as inspector

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(inspector, "generator_findings", broken)
    inner = (
        '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        f'Iptc4xmpExt:DigitalSourceType="{AI_SOURCE}"/>'
    )
    body = b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp_packet(inner)
    raw = png_with_chunks([text_chunk("parameters", A1111), png_chunk(b"iTXt", body)])
    output = detect(detector, raw)
    assert errors_mention(output, "generator metadata check failed", "parser bug")
    assert items_of(output, "iptc", ai=True)
    assert output.score == 1.0


def test_hostile_text_is_parsed_in_linear_time(detector: ProvenanceDetector) -> None:
    """Inputs that make naive regular expressions backtrack for minutes."""
    spaces = " " * 1_000_000
    chunks = [
        text_chunk("parameters", "x\nSteps: 1, " + spaces),
        text_chunk("Dream", '"p" ' + "-s-s" * 100_000),
        png_chunk(
            b"iTXt",
            b"XML:com.adobe.xmp\x00\x00\x00\x00\x00<x:xmpmeta DigitalSourceType"
            + spaces.encode()
            + b"<broken",
        ),
    ]
    started = time.perf_counter()
    output = run(detector, png_with_chunks(chunks))
    assert time.perf_counter() - started < 3
    assert output.score == 1.0  # the settings line still has the A1111 shape


# ------------------------------------------- damaged chunks around the generation settings

CORPUS_COMFY_PNG = Path(__file__).resolve().parents[2] / "shared/corpus/images/comfy_sdxl_turbo.png"
COMFY_PROMPT = json.dumps(
    {
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "sd_xl_turbo_1.0_fp16.safetensors"},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox in the snow"}},
    }
)


def _bad_crc(chunk: bytes) -> bytes:
    return chunk[:-4] + struct.pack(">I", zlib.crc32(chunk[4:-4]) ^ 0xFFFFFFFF)


def _inflation_bomb(kind: bytes, header: bytes) -> bytes:
    return png_chunk(kind, header + zlib.compress(b"\x00" * (2 * 1024 * 1024), 9))


def _with_damage(png: bytes) -> bytes:
    """``png`` with damaged and oversized ancillary chunks on both sides of its own: a
    zTXt and an iCCP chunk that inflate past 1 MiB before its text, and, after it (where
    a later chunk of the same keyword would win), ``prompt`` and ``workflow`` chunks of
    junk with bad CRCs."""
    assert png[12:16] == b"IHDR"
    ihdr_end = 8 + 8 + 13 + 4
    before = [
        _inflation_bomb(b"zTXt", b"Comment\x00\x00"),
        _inflation_bomb(b"iCCP", b"ICC Profile\x00\x00"),
    ]
    after = [_bad_crc(text_chunk("prompt", "junk")), _bad_crc(text_chunk("workflow", "{}"))]
    first_idat = png.index(b"IDAT") - 4
    return (
        png[:ihdr_end]
        + b"".join(before)
        + png[ihdr_end:first_idat]
        + b"".join(after)
        + (png[first_idat:])
    )


def _scan(detector: ProvenanceDetector, raw: bytes) -> tuple[DecodedImage, DetectorOutput]:
    """Intake then the detector, as the scanner runs them."""
    decoded = decode(raw, LIMITS)
    (output,) = detector.detect_batch([decoded.image], [raw])
    json.dumps(output.evidence)
    return decoded, output


def test_damaged_chunks_do_not_hide_comfyui_settings_in_a_real_file(
    detector: ProvenanceDetector,
) -> None:
    if not CORPUS_COMFY_PNG.is_file():
        pytest.skip(f"the shared corpus's ComfyUI PNG is not at {CORPUS_COMFY_PNG}")
    original = CORPUS_COMFY_PNG.read_bytes()
    intact, intact_output = _scan(detector, original)
    decoded, output = _scan(detector, _with_damage(original))
    assert intact.anomalies == () and len(decoded.anomalies) == 3, decoded.anomalies
    assert decoded.image.tobytes() == intact.image.tobytes()
    assert output.score == 1.0
    assert items_of(output, "generator_metadata", ai=True) == items_of(
        intact_output, "generator_metadata", ai=True
    )
    details = items_of(output, "generator_metadata", ai=True)[0]["details"]
    assert isinstance(details, dict) and details["generator"] == "ComfyUI"


def test_damaged_chunks_do_not_hide_comfyui_settings(detector: ProvenanceDetector) -> None:
    png = png_with_chunks([text_chunk("prompt", COMFY_PROMPT)], Image.new("RGB", (64, 48)))
    decoded, output = _scan(detector, _with_damage(png))
    assert decoded.image.size == (64, 48)
    assert any("prompt" not in a and "tEXt" in a and "CRC" in a for a in decoded.anomalies)
    assert output.score == 1.0
    (item,) = items_of(output, "generator_metadata", ai=True)
    details = item["details"]
    assert isinstance(details, dict)
    assert details["generator"] == "ComfyUI"
    assert details["model"] == "sd_xl_turbo_1.0_fp16.safetensors"
    assert details["prompt"] == "a fox in the snow"
    assert errors_mention(output, "CRC")


def test_stealth_payload_is_read_despite_a_damaged_chunk(detector: ProvenanceDetector) -> None:
    # The alpha channel is read by decoding the PNG again, which must step over the same
    # damaged chunk that intake stepped over.
    image = embed_stealth(
        Image.new("RGBA", (96, 96), (30, 60, 90, 255)), A1111.encode(), "stealth_pnginfo"
    )
    raw = png_with_chunks([_bad_crc(text_chunk("Comment", "x"))], image)
    decoded, output = _scan(detector, raw)
    assert decoded.anomalies == ("a tEXt chunk with a bad CRC was skipped",)
    assert not errors_mention(output, "stealth payload check failed")
    assert items_of(output, "stealth_payload", ai=True)
