"""The Stable Diffusion invisible watermark: embedded into real corpus photos with the real
``invisible-watermark`` encoder, as the SD reference scripts and diffusers do, saved as PNG,
and read back through intake and the detector."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from workers.detectors.base import DetectorOutput
from workers.detectors.provenance import ProvenanceDetector
from workers.intake import decode
from workers.provenance.watermark import (
    KNOWN_WATERMARKS,
    binomial_tail,
    block_scores,
    decode_bits,
    match_watermarks,
)

from provenance_fixtures import (
    LIMITS,
    detect,
    diffusers_sdxl_watermark,
    items_of,
    jpeg_bytes,
    make_detector,
    png_bytes,
    sd_script_watermark,
)

imwatermark = pytest.importorskip("imwatermark", reason="invisible-watermark is not installed")

# (corpus file, crop box): SD-sized regions of real photos (the declan files' lower half is
# a caption panel, so only their upper half is used).
PHOTOS = {
    "canon-512": ("images/nomanifest_IMG_0003_canon.jpg", (256, 86, 768, 598)),
    "pexels-768": ("images/declan_real_B5.jpg", (128, 0, 896, 768)),
    "sunset-1024x682": ("images/comfy_input_sunset.png", None),
}
# A warm photo whose blue-difference (U) plane is nearly uniform in most blocks: the
# dwtDct mark lives in each block's largest U value, which moves when the marked image is
# rounded back to 8-bit pixels, so the payload does not survive on it.
LOW_CHROMA_PHOTO = ("images/unsplash_39d952d4.jpg", (448, 128, 1472, 1152))


def photo(corpus_dir: Path, name: str) -> Image.Image:
    file, box = PHOTOS.get(name, LOW_CHROMA_PHOTO)
    image = decode((corpus_dir / file).read_bytes(), LIMITS).image
    return image.crop(box) if box else image


def embed(image: Image.Image, watermark: str) -> Image.Image:
    if watermark == "StableDiffusionV1":
        return sd_script_watermark(image, b"StableDiffusionV1")
    if watermark == "SDV2":
        return sd_script_watermark(image, b"SDV2")
    return diffusers_sdxl_watermark(image)


@pytest.fixture(scope="module")
def detector() -> ProvenanceDetector:
    return make_detector()


def watermark_items(output: DetectorOutput, ai: bool) -> dict[str, Any]:
    return {item["details"]["watermark"]: item for item in items_of(output, "watermark", ai=ai)}


@pytest.mark.parametrize("watermark", ["StableDiffusionV1", "SDV2", "SDXL"])
@pytest.mark.parametrize("photo_name", sorted(PHOTOS))
def test_embedded_watermark_is_detected(
    corpus_dir: Path,
    detector: ProvenanceDetector,
    watermark: str,
    photo_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    saved = png_bytes(embed(photo(corpus_dir, photo_name), watermark))
    marked = detect(detector, saved)
    found = watermark_items(marked, ai=True)
    details = found[watermark]["details"] if watermark in found else None
    best = next(
        m for m in match_watermarks(decode(saved, LIMITS).image) if m.watermark.name == watermark
    )
    with capsys.disabled():
        print(
            f"\n{watermark:17s} in {photo_name:16s}: {best.matching_bits}/{best.total_bits} bits "
            f"(agreement {best.agreement:.3f}, p = {best.p_value:.1e}, {best.convention})"
        )
    assert details is not None, marked.evidence
    assert marked.score == 1.0
    assert details["p_value"] < 1e-6
    assert set(found) == {watermark}, "only the embedded message matches"
    if watermark == "SDXL":
        assert details["decoded_as"] == "float32 pixels (diffusers)"


@pytest.mark.parametrize("photo_name", sorted(PHOTOS))
def test_clean_originals_raise_no_watermark_flag(
    corpus_dir: Path, detector: ProvenanceDetector, photo_name: str
) -> None:
    output = detect(detector, png_bytes(photo(corpus_dir, photo_name)))
    assert output.score is None
    assert not items_of(output, "watermark", ai=True)
    for match in match_watermarks(photo(corpus_dir, photo_name)):
        assert match.p_value > 1e-3, match


def test_payload_that_does_not_survive_is_not_counted(
    corpus_dir: Path, detector: ProvenanceDetector
) -> None:
    """Where the mark is lost in the round trip to 8-bit pixels, the decoded bits look like
    chance and nothing is claimed."""
    marked = sd_script_watermark(photo(corpus_dir, "low-chroma"), b"StableDiffusionV1")
    output = detect(detector, png_bytes(marked))
    assert not items_of(output, "watermark", ai=True)
    (sd1,) = [
        m
        for m in match_watermarks(decode(png_bytes(marked), LIMITS).image)
        if m.watermark.name == "StableDiffusionV1"
    ]
    assert sd1.agreement < 0.65


def test_reencoded_mark_never_matches_another_message(
    corpus_dir: Path, detector: ProvenanceDetector
) -> None:
    """JPEG re-encoding weakens or destroys the mark; whatever survives must not be read as
    a different generator's message."""
    marked = sd_script_watermark(photo(corpus_dir, "canon-512"), b"SDV2")
    output = detect(detector, jpeg_bytes(marked, quality=75))
    assert set(watermark_items(output, ai=True)) <= {"SDV2"}
    assert set(watermark_items(output, ai=False)) <= {"SDV2"}


@pytest.mark.parametrize("convention", ["uint8", "float32"])
def test_decoder_matches_imwatermark_bit_for_bit(corpus_dir: Path, convention: str) -> None:
    """The vectorised decoder gives exactly the bits of imwatermark's own decoder, for every
    message length, on clean and marked images, in both pixel conventions."""
    from imwatermark import WatermarkDecoder

    images = [photo(corpus_dir, "canon-512"), embed(photo(corpus_dir, "canon-512"), "SDXL")]
    images.append(decode((corpus_dir / "images/nomanifest_mars.webp").read_bytes(), LIMITS).image)
    for image in images:
        rgb = np.asarray(image)
        source = rgb if convention == "uint8" else rgb.astype(np.float32)
        bgr = np.ascontiguousarray(source[:, :, ::-1])
        scores = block_scores(rgb, convention)
        for watermark in KNOWN_WATERMARKS:
            n = len(watermark.bits)
            reference = np.asarray(WatermarkDecoder("bits", n).decode(bgr, "dwtDct"), dtype=bool)
            assert np.array_equal(decode_bits(scores, n), reference), (image.size, n)


def test_small_images_are_skipped(detector: ProvenanceDetector) -> None:
    output = detect(detector, png_bytes(Image.new("RGB", (200, 200), (90, 120, 200))))
    assert output.evidence["checked"]["watermark"].startswith("skipped")


def test_binomial_tail() -> None:
    assert binomial_tail(0, 10) == 1.0
    assert binomial_tail(32, 32) == 2.0**-32
    assert binomial_tail(31, 32) == pytest.approx(33 / 2**32)
    # P[X >= 68] for Bin(136, 1/2) is a half plus half the mass at 68.
    assert binomial_tail(68, 136) == pytest.approx(0.5 + 0.5 * math.comb(136, 68) / 2**136)
    # What the 1e-6 threshold asks for: 96/136 bits (70.6 %), 41/48, 30/32.
    assert binomial_tail(96, 136) < 1e-6 < binomial_tail(95, 136)
    assert binomial_tail(41, 48) < 1e-6 < binomial_tail(40, 48)
    assert binomial_tail(30, 32) < 1e-6 < binomial_tail(29, 32)


def test_lossy_jpeg_is_not_searched_for_a_mark_but_a_near_lossless_one_is(
    corpus_dir: Path, detector: ProvenanceDetector
) -> None:
    """Re-encoding at ordinary JPEG qualities erases the marks, so the costly decode is
    skipped there (and says so); a JPEG saved at quality 100 still carries one and is read."""
    marked = sd_script_watermark(photo(corpus_dir, "canon-512"), b"StableDiffusionV1")
    kept = detect(detector, jpeg_bytes(marked, quality=100))
    assert "StableDiffusionV1" in watermark_items(kept, ai=True)
    lossy = detect(detector, jpeg_bytes(marked, quality=90))
    assert watermark_items(lossy, ai=True) == {}
    assert "JPEG saved at quality ~90" in lossy.evidence["checked"]["watermark"]


@pytest.mark.parametrize("quality", [20, 50, 75, 90, 95, 97])
@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_quality_is_read_from_the_quantisation_table(quality: int, progressive: bool) -> None:
    import io

    from workers.provenance.watermark import jpeg_quality

    buffer = io.BytesIO()
    Image.effect_mandelbrot((64, 64), (-2, -1.2, 0.8, 1.2), 32).convert("RGB").save(
        buffer, "JPEG", quality=quality, progressive=progressive
    )
    data = buffer.getvalue()
    assert jpeg_quality(data) == quality
    assert jpeg_quality(data[:40]) is None  # cut inside the table: no guess
    assert jpeg_quality(b"\x89PNG\r\n\x1a\n") is None
