"""Hostile inputs that a decoder handles worse than a browser: damaged ancillary PNG chunks
(skipped and scored, not refused), fields that make the decoder allocate beyond the image
(TIFF tiles and strip lists, GIF frames), and JPEGs whose scans multiply the work."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from synthsentry.runtime import Runtime
from synthsentry.settings import Settings
from workers.intake import (
    MAX_JPEG_SCANS,
    DecodedImage,
    IntakeLimits,
    Rejected,
    RejectReason,
    decode,
    drop_damaged_png_chunks,
)

from badfiles import (
    encode,
    gif_frame_bomb,
    inflation_bomb,
    jpeg_with_extra_scans,
    png_chunk,
    png_chunks,
    png_inserting,
    sample_picture,
    tiff_in_one_tile,
    tiff_listing_strips,
    tiff_tile_bomb,
    with_bad_crc,
)

DEFAULT_LIMITS = Runtime.from_settings(Settings.model_construct()).limits
REPO = Path(__file__).resolve().parents[1]


def rejection(data: bytes, limits: IntakeLimits = DEFAULT_LIMITS) -> Rejected:
    with pytest.raises(Rejected) as caught:
        decode(data, limits)
    assert caught.value.message.strip()
    return caught.value


def decoded_quietly(data: bytes, limits: IntakeLimits = DEFAULT_LIMITS) -> DecodedImage:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = decode(data, limits)
    assert [str(w.message) for w in caught] == []
    return result


# --- A. damaged ancillary PNG chunks ------------------------------------------------------

PICTURE = sample_picture((96, 64))
PNG = encode(PICTURE, "PNG")

DAMAGED_CHUNKS = {
    "tEXt-bad-crc": (with_bad_crc(png_chunk(b"tEXt", b"Comment\x00hello")), "tEXt", "CRC"),
    "private-bad-crc": (with_bad_crc(png_chunk(b"prVt", b"\x01\x02")), "prVt", "CRC"),
    "zTXt-bomb": (inflation_bomb(b"zTXt"), "zTXt", "inflating past"),
    "iTXt-bomb": (inflation_bomb(b"iTXt"), "iTXt", "inflating past"),
    "iCCP-bomb": (inflation_bomb(b"iCCP"), "iCCP", "inflating past"),
    "zTXt-unknown-method": (png_chunk(b"zTXt", b"Comment\x00\x07xx"), "zTXt", "compression"),
    "zTXt-corrupt": (png_chunk(b"zTXt", b"Comment\x00\x00not zlib"), "zTXt", "corrupt"),
    "iCCP-no-name": (png_chunk(b"iCCP", b"\x00"), "iCCP", "malformed"),
    "gAMA-short": (png_chunk(b"gAMA", b"\x00"), "gAMA", "too few bytes"),
    "cHRM-short": (png_chunk(b"cHRM", b"\x00" * 8), "cHRM", "too few bytes"),
    "sRGB-empty": (png_chunk(b"sRGB", b""), "sRGB", "too few bytes"),
    "pHYs-short": (png_chunk(b"pHYs", b"\x00" * 4), "pHYs", "too few bytes"),
    "tRNS-short-for-rgb": (png_chunk(b"tRNS", b"\x00\x01"), "tRNS", "too few bytes"),
}


@pytest.mark.parametrize("before", [b"IDAT", b"IEND"], ids=["before-pixels", "after-pixels"])
@pytest.mark.parametrize(
    ("chunk", "kind", "words"), DAMAGED_CHUNKS.values(), ids=list(DAMAGED_CHUNKS)
)
def test_damaged_ancillary_chunk_is_skipped_and_the_pixels_decoded(
    chunk: bytes, kind: str, words: str, before: bytes
) -> None:
    data = png_inserting(PNG, [chunk], before=before)
    decoded = decoded_quietly(data)
    assert decoded.image.tobytes() == PICTURE.tobytes()
    assert len(decoded.anomalies) == 1, decoded.anomalies
    (sentence,) = decoded.anomalies
    assert kind in sentence and words in sentence and sentence.endswith("was skipped")


def test_clean_png_has_no_anomalies_and_is_not_copied() -> None:
    text = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"x" * 500_000))
    data = png_inserting(PNG, [png_chunk(b"tEXt", b"Title\x00ok"), text])
    assert drop_damaged_png_chunks(data) == (data, ())
    assert drop_damaged_png_chunks(data)[0] is data
    assert decoded_quietly(data).anomalies == ()


def test_only_the_damaged_chunks_are_removed() -> None:
    good = [png_chunk(b"tEXt", b"Title\x00kept"), png_chunk(b"gAMA", b"\x00\x00\xb1\x8f")]
    bad = [with_bad_crc(png_chunk(b"tEXt", b"Title\x00dropped")), inflation_bomb(b"zTXt")]
    data = png_inserting(PNG, [good[0], bad[0], good[1], bad[1]])
    cleaned, anomalies = drop_damaged_png_chunks(data)
    assert cleaned == png_inserting(PNG, good)
    assert len(anomalies) == 2
    assert decode(data, DEFAULT_LIMITS).anomalies == anomalies


def test_anomalies_are_counted_by_kind_and_bounded() -> None:
    damaged = [with_bad_crc(png_chunk(b"tEXt", f"k{i}\x00v".encode())) for i in range(5)]
    damaged += [with_bad_crc(png_chunk(f"x{chr(97 + i)}Yz".encode(), b"")) for i in range(20)]
    decoded = decoded_quietly(png_inserting(PNG, damaged))
    assert decoded.anomalies[0] == "5 tEXt chunks with a bad CRC were skipped"
    assert len(decoded.anomalies) == 17
    assert decoded.anomalies[-1] == "5 more damaged ancillary chunks were skipped"


def test_text_past_pillows_total_is_skipped_rather_than_refused() -> None:
    # 66 chunks of 1 MiB of text each (Pillow's per-chunk cap) pass one by one, but their
    # sum is past Pillow's 64 MiB total for text, for which Pillow refuses the whole file.
    megabyte = 1024 * 1024
    squeezed = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * megabyte, 9))
    plain = png_chunk(b"tEXt", b"Comment\x00" + b"b" * megabyte)
    data = png_inserting(PNG, [squeezed] * 40 + [plain] * 26)
    with pytest.raises(ValueError, match="Too much memory used in text chunks"):
        Image.open(io.BytesIO(data)).load()
    decoded = decoded_quietly(data)
    assert decoded.image.tobytes() == PICTURE.tobytes()
    assert decoded.anomalies == (
        f"2 tEXt chunks past the file's {64 * megabyte}-byte total for text were skipped",
    )


def test_inflating_work_is_bounded_however_many_bombs() -> None:
    # Each bomb costs at most 1 MiB of inflating; after 64 MiB the rest are not inflated.
    bombs = [inflation_bomb(b"zTXt")] * 100
    cleaned, anomalies = drop_damaged_png_chunks(png_inserting(PNG, bombs))
    assert cleaned == PNG
    assert anomalies[0] == "63 zTXt chunks inflating past 1048576 bytes were skipped"
    assert anomalies[1] == (
        "37 zTXt chunks left unchecked (the file's budget for inflating them was spent) "
        "were skipped"
    )


@pytest.mark.parametrize("kind", [b"IHDR", b"PLTE"])
def test_critical_chunks_stay_strict(kind: bytes) -> None:
    png = encode(PICTURE.convert("P"), "PNG")
    chunks = png_chunks(png)
    data = b"\x89PNG\r\n\x1a\n" + b"".join(with_bad_crc(c) if c[4:8] == kind else c for c in chunks)
    assert rejection(data).reason is RejectReason.DECODE_ERROR
    assert drop_damaged_png_chunks(data) == (data, ())


def test_truncated_png_is_still_truncated() -> None:
    data = png_inserting(PNG, [with_bad_crc(png_chunk(b"tEXt", b"a\x00b"))])
    assert rejection(data[: len(data) // 2]).reason is RejectReason.TRUNCATED


def _apng() -> bytes:
    frames = [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:])


def test_damaged_animation_chunk_leaves_the_still_image() -> None:
    chunks = png_chunks(_apng())
    first_fctl = next(i for i, c in enumerate(chunks) if c[4:8] == b"fcTL")
    chunks[first_fctl] = with_bad_crc(chunks[first_fctl])
    decoded = decoded_quietly(b"\x89PNG\r\n\x1a\n" + b"".join(chunks))
    assert decoded.frames == 1
    assert decoded.image.getpixel((5, 5)) == (255, 0, 0)
    assert decoded.anomalies == (
        "an fcTL chunk with a bad CRC was skipped",
        "the animation chunks (acTL, fcTL, fdAT) were skipped because one of them is "
        "damaged; the still image was decoded",
    )


def test_animation_chunks_out_of_sequence_leave_the_still_image() -> None:
    chunks = png_chunks(_apng())
    first_fctl = next(i for i, c in enumerate(chunks) if c[4:8] == b"fcTL")
    body = bytearray(chunks[first_fctl][8:-4])
    body[0:4] = (7).to_bytes(4, "big")  # Pillow: "APNG contains frame sequence errors"
    chunks[first_fctl] = png_chunk(b"fcTL", bytes(body))
    decoded = decoded_quietly(b"\x89PNG\r\n\x1a\n" + b"".join(chunks))
    assert (decoded.frames, decoded.image.getpixel((5, 5))) == (1, (255, 0, 0))
    assert "sequence numbers" in decoded.anomalies[0]


def test_intact_animation_is_untouched() -> None:
    data = _apng()
    assert drop_damaged_png_chunks(data) == (data, ())
    assert decoded_quietly(data).frames == 3


# --- B. what the decoder allocates, bounded before it allocates -------------------------


def test_tiff_tile_over_the_pixel_limit_is_refused() -> None:
    exc = rejection(tiff_tile_bomb((16384, 16384)))
    assert exc.reason is RejectReason.TOO_MANY_PIXELS
    assert "16384x16384 tiles" in exc.message and "64x64" in exc.message


def test_tiff_tile_much_larger_than_a_small_image_is_refused() -> None:
    exc = rejection(tiff_tile_bomb((4096, 16)))
    assert exc.reason is RejectReason.DECODE_ERROR
    assert "4096x16 tiles" in exc.message


@pytest.mark.parametrize("tile", [256, 1024])
def test_ordinary_tiles_on_a_small_image_are_allowed(tile: int) -> None:
    # Tiles larger than the image are normal (a 96 x 64 picture in one 256 x 256 tile).
    decoded = decoded_quietly(tiff_in_one_tile(PICTURE, tile))
    assert decoded.image.tobytes() == PICTURE.tobytes()


def test_tiff_listing_more_strips_than_the_image_has_is_refused() -> None:
    assert decoded_quietly(tiff_listing_strips(1)).image.size == (64, 64)
    exc = rejection(tiff_listing_strips(100_000))
    assert exc.reason is RejectReason.DECODE_ERROR
    assert "room for 1 strip, but lists 100000" in exc.message


_PEAK_RSS = textwrap.dedent(
    """
    import resource, subprocess, sys
    child = "from pathlib import Path; import sys; from workers.intake import *\\n" \\
        "try:\\n" \\
        "    decode(Path(sys.argv[1]).read_bytes(), IntakeLimits(50 << 20, 10**8, 20.0))\\n" \\
        "    print('decoded')\\n" \\
        "except Rejected as exc:\\n" \\
        "    print(exc.reason.value)\\n"
    done = subprocess.run([sys.executable, "-c", child, sys.argv[1]], capture_output=True,
                          text=True, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    print(done.stdout.strip(), peak)
    """
)


def test_tiff_tile_bomb_is_refused_without_allocating_the_tile(tmp_path: Path) -> None:
    # A gross bound, not a timing: before the layout check this 151-byte file peaked at
    # ~790 MiB (libtiff allocates the 768 MiB tile). The child's own baseline is ~60 MiB.
    path = tmp_path / "tile_bomb.tif"
    path.write_bytes(tiff_tile_bomb((16384, 16384)))
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=REPO,
    )
    reason, peak_mib = result.stdout.split()
    assert reason == RejectReason.TOO_MANY_PIXELS.value
    assert int(peak_mib) < 300


def test_gif_first_frame_past_the_screen_is_refused_before_pillow_warns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 120 x 120 = 14400 px: over our limit, under twice Pillow's global, where Pillow would
    # warn through the process-wide warnings machinery while growing its canvas.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    limits = IntakeLimits(10**6, 10_000, 20.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exc = rejection(gif_frame_bomb((120, 120)), limits)
    assert exc.reason is RejectReason.TOO_MANY_PIXELS and "120x120" in exc.message
    assert [str(w.message) for w in caught] == []


# --- C. work per byte: JPEG scans --------------------------------------------------------


def test_jpeg_with_a_few_hundred_scans_still_decodes() -> None:
    decoded = decoded_quietly(jpeg_with_extra_scans((64, 48), 300))
    assert decoded.image.size == (64, 48)
    pixel = decoded.image.getpixel((5, 5))
    assert isinstance(pixel, tuple)
    assert max(abs(a - b) for a, b in zip(pixel, (90, 120, 200), strict=True)) <= 2


def test_jpeg_with_more_scans_than_any_encoder_writes_is_refused() -> None:
    # The base progressive JPEG has its own 10 scans.
    assert decoded_quietly(jpeg_with_extra_scans((64, 48), MAX_JPEG_SCANS - 10)).width == 64
    exc = rejection(jpeg_with_extra_scans((64, 48), MAX_JPEG_SCANS - 9))
    assert exc.reason is RejectReason.DECODE_ERROR
    assert f"more than {MAX_JPEG_SCANS} scans" in exc.message


def test_jpeg_scans_times_pixels_over_the_budget_is_a_timeout() -> None:
    # With a 1 s budget the allowance is 2e8 scan-pixels: 70 scans of 2048 x 2048 exceed it
    # (and would decode in a fraction of a second, so only the count can refuse them).
    data = jpeg_with_extra_scans((2048, 2048), 60)
    limits = IntakeLimits(DEFAULT_LIMITS.max_bytes, DEFAULT_LIMITS.max_pixels, 1.0)
    exc = rejection(data, limits)
    assert exc.reason is RejectReason.DECODE_TIMEOUT
    assert "70 scans of 2048x2048" in exc.message
    assert decode(data, DEFAULT_LIMITS).image.size == (2048, 2048)


def test_jpeg_scans_are_counted_in_the_first_image_only() -> None:
    # Bytes after EOI (an MPO's second image, trailing junk) are not decoded.
    first = jpeg_with_extra_scans((64, 48), 100)
    data = first + jpeg_with_extra_scans((64, 48), MAX_JPEG_SCANS)
    assert decoded_quietly(data).image.size == (64, 48)


def test_a_long_run_of_fill_bytes_is_walked_in_linear_time() -> None:
    """JPEG markers may be padded with any number of 0xFF fill bytes. Searching for the
    next marker must not start over from every byte of such a run: 4 MiB of 0xFF took
    hours that way, in one regex call no deadline could interrupt. Run in a child with a
    gross bound (linear: well under a second), so a regression fails instead of hanging."""
    code = textwrap.dedent(
        """
        from workers.intake import IntakeLimits, Rejected, decode
        limits = IntakeLimits(max_bytes=8 << 20, max_pixels=10**8, decode_timeout_s=20)
        try:
            decode(b"\\xff\\xd8" + b"\\xff" * (4 << 20) + b"\\x00", limits)
        except Rejected as exc:
            print(exc.reason.value)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in {"truncated", "decode_error"}
