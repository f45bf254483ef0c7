"""Intake against real files: every rejection reason, every pixel mode, the shared corpus."""

from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from synthsentry.runtime import Runtime
from synthsentry.settings import Settings
from workers.intake import (
    SNIFF_BYTES,
    DecodedImage,
    IntakeLimits,
    Rejected,
    RejectReason,
    decode,
    read_local,
    sniff,
)

from badfiles import (
    BAD_FILES,
    SPARSE_SIZE,
    encode,
    make_fifo,
    make_unreadable,
    make_vanished,
    sample_picture,
    write_bad_files,
    write_good_misnamed,
)

# The field defaults (50 MiB, 100 Mpx, 20 s), whatever SYNTHSENTRY_* says in this shell.
DEFAULT_LIMITS = Runtime.from_settings(Settings.model_construct()).limits
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
SIZE = (64, 48)


def take_in(path: Path, limits: IntakeLimits = DEFAULT_LIMITS) -> DecodedImage:
    return decode(read_local(path, limits), limits)


def rejection(action: Callable[[], object]) -> Rejected:
    with pytest.raises(Rejected) as caught:
        action()
    exc = caught.value
    assert str(exc) == exc.message and exc.message.strip(), "a moderator needs a sentence"
    return exc


@pytest.mark.parametrize("field", ["max_bytes", "max_pixels", "decode_timeout_s"])
def test_limits_must_be_positive(field: str) -> None:
    values: dict[str, float] = {"max_bytes": 1, "max_pixels": 1, "decode_timeout_s": 1.0}
    values[field] = 0
    with pytest.raises(ValueError, match="positive"):
        IntakeLimits(**values)  # type: ignore[arg-type]


def test_rejected_survives_pickling() -> None:
    original = Rejected(RejectReason.TRUNCATED, "The PNG file ends early.")
    copy = pickle.loads(pickle.dumps(original))
    assert (copy.reason, copy.message, str(copy)) == (
        original.reason,
        original.message,
        str(original),
    )


# --- bad files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad")
    assert write_bad_files(folder) == BAD_FILES
    return folder


@pytest.mark.parametrize(("name", "reason"), BAD_FILES.items(), ids=list(BAD_FILES))
def test_bad_file_is_rejected_with_its_reason(
    bad_folder: Path, name: str, reason: RejectReason
) -> None:
    assert rejection(lambda: take_in(bad_folder / name)).reason is reason


def test_bad_files_are_small_on_disk(bad_folder: Path) -> None:
    sparse = (bad_folder / "huge_sparse.jpg").stat()
    assert sparse.st_size == SPARSE_SIZE
    assert sparse.st_blocks * 512 < 1024 * 1024, "the 3 GiB file must be sparse"
    bomb = bad_folder / "pixel_bomb_50000x50000.png"
    assert bomb.stat().st_size < 4096


@pytest.mark.parametrize(
    ("name", "format_named"),
    [("document.pdf", "PDF"), ("drawing.svg", "SVG"), ("favicon.ico", "ICO")],
)
def test_unsupported_format_message_names_the_format(
    bad_folder: Path, name: str, format_named: str
) -> None:
    assert format_named in rejection(lambda: take_in(bad_folder / name)).message


def test_directory_and_fifo_are_unreadable_even_for_root(tmp_path: Path) -> None:
    # Root reads chmod-000 files, so permissions prove nothing here; a directory cannot be
    # read by anyone, and a FIFO without a writer would block a naive open() forever.
    for path in (make_unreadable(tmp_path), make_fifo(tmp_path)):
        assert rejection(lambda p=path: read_local(p, DEFAULT_LIMITS)).reason is (
            RejectReason.UNREADABLE
        )


def test_file_deleted_before_read_is_missing(tmp_path: Path) -> None:
    path = make_vanished(tmp_path)
    exc = rejection(lambda: read_local(path, DEFAULT_LIMITS))
    assert exc.reason is RejectReason.MISSING
    assert str(path) in exc.message


def test_every_reason_is_produced_by_a_real_file() -> None:
    # DECODE_TIMEOUT, UNREADABLE and MISSING depend on the limits or are not files: they
    # have their own tests above and below.
    covered_elsewhere = {
        RejectReason.DECODE_TIMEOUT,
        RejectReason.UNREADABLE,
        RejectReason.MISSING,
    }
    assert set(BAD_FILES.values()) | covered_elsewhere == set(RejectReason)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP", "TIFF", "GIF"])
def test_decode_timeout(image_format: str) -> None:
    # A 1 ns budget is over before Pillow's first read() of the header (one Python call
    # takes far longer than that), so the deadline reader trips deterministically: no
    # sleep, no large image, no timing luck. WebP reads the whole file in that first read.
    data = encode(sample_picture(), image_format)
    limits = IntakeLimits(DEFAULT_LIMITS.max_bytes, DEFAULT_LIMITS.max_pixels, 1e-9)
    assert rejection(lambda: decode(data, limits)).reason is RejectReason.DECODE_TIMEOUT
    assert decode(data, DEFAULT_LIMITS).image.size == sample_picture().size


def test_decode_timeout_works_in_a_worker_thread() -> None:
    # signal.alarm only works in the main thread; the deadline reader must not need it.
    data = encode(sample_picture(), "PNG")
    limits = IntakeLimits(DEFAULT_LIMITS.max_bytes, DEFAULT_LIMITS.max_pixels, 1e-9)

    def outcome(limits: IntakeLimits) -> str:
        try:
            return decode(data, limits).format
        except Rejected as exc:
            return exc.reason

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(outcome, [limits, DEFAULT_LIMITS] * 4))
    assert results == [RejectReason.DECODE_TIMEOUT, "PNG"] * 4


def test_decode_checks_byte_and_pixel_limits_at_the_boundary() -> None:
    data = encode(Image.new("RGB", SIZE, (1, 2, 3)), "PNG")
    pixels = SIZE[0] * SIZE[1]
    exact = IntakeLimits(len(data), pixels, 20.0)
    assert decode(data, exact).image.size == SIZE
    fewer_bytes = IntakeLimits(len(data) - 1, pixels, 20.0)
    assert rejection(lambda: decode(data, fewer_bytes)).reason is RejectReason.TOO_LARGE
    fewer_pixels = IntakeLimits(len(data), pixels - 1, 20.0)
    assert rejection(lambda: decode(data, fewer_pixels)).reason is RejectReason.TOO_MANY_PIXELS


def test_empty_bytes_are_empty() -> None:
    assert rejection(lambda: decode(b"", DEFAULT_LIMITS)).reason is RejectReason.EMPTY


def test_truncated_webp_and_tiff_are_truncated() -> None:
    # Pillow's messages say "could not create decoder object" / "Missing dimensions" here;
    # the files' own structure (RIFF size, first IFD offset) shows the bytes are missing.
    for image_format in ("WEBP", "TIFF"):
        data = encode(sample_picture(), image_format)
        exc = rejection(lambda d=data: decode(d[: len(d) // 2], DEFAULT_LIMITS))
        assert exc.reason is RejectReason.TRUNCATED, (image_format, exc.message)


def test_missing_png_iend_is_accepted_when_the_pixels_are_complete() -> None:
    data = encode(sample_picture(), "PNG")
    assert decode(data[:-12], DEFAULT_LIMITS).image.size == sample_picture().size


# --- Pillow's own pixel limit ---------------------------------------------------------


def _decode_recording_warnings(
    data: bytes, limits: IntakeLimits
) -> tuple[DecodedImage | Rejected, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outcome: DecodedImage | Rejected = decode(data, limits)
        except Rejected as exc:
            outcome = exc
    return outcome, [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.mark.parametrize("image_format", ["TIFF", "GIF", "PNG", "WEBP"])
def test_pillow_global_limit_below_ours_neither_warns_nor_refuses(
    monkeypatch: pytest.MonkeyPatch, image_format: str
) -> None:
    # TIFF checks Pillow's global again in load(); with it at 1000 px a 3072 px image is
    # past twice the global, which would be a DecompressionBombError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(Image.new("RGB", SIZE, (9, 99, 199)), image_format)
    outcome, emitted = _decode_recording_warnings(data, IntakeLimits(10**6, 10_000, 20.0))
    assert isinstance(outcome, DecodedImage) and outcome.image.size == SIZE
    assert emitted == []
    assert Image.MAX_IMAGE_PIXELS == 10_000  # raised to our limit, never lowered


def test_image_over_our_limit_is_refused_without_pillow_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3072 px lies between Pillow's global (2000) and twice it: Image.open() would warn
    # through the process-wide warnings machinery before we could refuse.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    data = encode(Image.new("RGB", SIZE), "PNG")
    outcome, emitted = _decode_recording_warnings(data, IntakeLimits(10**6, 2000, 20.0))
    assert isinstance(outcome, Rejected) and outcome.reason is RejectReason.TOO_MANY_PIXELS
    assert emitted == []


def test_pillow_global_limit_is_never_lowered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**9)
    decode(encode(Image.new("RGB", SIZE), "PNG"), IntakeLimits(10**6, 10_000, 20.0))
    assert Image.MAX_IMAGE_PIXELS == 10**9


# --- read_local -----------------------------------------------------------------------


def _count_reads(monkeypatch: pytest.MonkeyPatch, target: Path) -> list[int]:
    """Sizes of the chunks os.read returns for ``target`` while the test runs."""
    real_read = os.read
    target_stat = os.stat(target)
    returned: list[int] = []

    def counting_read(fd: int, size: int) -> bytes:
        chunk = real_read(fd, size)
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) == (target_stat.st_dev, target_stat.st_ino):
            returned.append(len(chunk))
        return chunk

    monkeypatch.setattr(os, "read", counting_read)
    return returned


def test_read_local_checks_size_before_reading(
    monkeypatch: pytest.MonkeyPatch, bad_folder: Path
) -> None:
    path = bad_folder / "huge_sparse.jpg"
    returned = _count_reads(monkeypatch, path)
    exc = rejection(lambda: read_local(path, DEFAULT_LIMITS))
    assert exc.reason is RejectReason.TOO_LARGE
    assert returned == []
    # The counter does see reads of a file that passes the size check.
    small = bad_folder / "truncated.png"
    small_returned = _count_reads(monkeypatch, small)
    data = read_local(small, DEFAULT_LIMITS)
    assert sum(small_returned) == len(data) == small.stat().st_size


def test_read_local_never_reads_past_the_limit_when_the_size_lies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # /proc files are regular files that report st_size 0 and still hold ~1 KiB: the same
    # situation as a file that grows between the size check and the read.
    path = Path("/proc/self/status")
    if not path.is_file() or path.stat().st_size != 0:
        pytest.skip("needs Linux /proc, whose files report size 0")
    limits = IntakeLimits(100, DEFAULT_LIMITS.max_pixels, 20.0)
    returned = _count_reads(monkeypatch, path)
    exc = rejection(lambda: read_local(path, limits))
    assert exc.reason is RejectReason.TOO_LARGE
    assert sum(returned) == limits.max_bytes + 1


@pytest.mark.parametrize(("extra", "accepted"), [(0, True), (1, False)])
def test_read_local_size_boundary(tmp_path: Path, extra: int, accepted: bool) -> None:
    limits = IntakeLimits(1000, DEFAULT_LIMITS.max_pixels, 20.0)
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * (limits.max_bytes + extra))
    if accepted:
        assert len(read_local(path, limits)) == limits.max_bytes
    else:
        assert rejection(lambda: read_local(path, limits)).reason is RejectReason.TOO_LARGE


# --- sniffing -------------------------------------------------------------------------


def test_misnamed_real_images_are_accepted_by_content(tmp_path: Path) -> None:
    paths = write_good_misnamed(tmp_path)
    assert len(paths) == 4
    for path in paths:
        decoded = take_in(path)
        assert decoded.format == path.stem.removeprefix("really_").upper(), path.name
        assert decoded.format != {".jpg": "JPEG", ".png": "PNG", ".gif": "GIF"}.get(path.suffix)
        assert decoded.image.mode == "RGB"
        assert decoded.image.size == sample_picture().size


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    payload = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (len(payload) + 8).to_bytes(4, "big") + b"ftyp" + payload + b"\x00\x00\x00\x08meta"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        pytest.param(encode(sample_picture(), "JPEG"), "JPEG", id="jpeg"),
        pytest.param(encode(sample_picture(), "PNG"), "PNG", id="png"),
        pytest.param(encode(sample_picture(), "GIF"), "GIF", id="gif"),
        pytest.param(encode(sample_picture(), "WEBP"), "WEBP", id="webp"),
        pytest.param(encode(sample_picture(), "TIFF"), "TIFF", id="tiff"),
        pytest.param(b"MM\x00+\x00\x08\x00\x00", "TIFF", id="bigtiff"),
        pytest.param(encode(sample_picture(), "BMP"), "BMP", id="bmp"),
        pytest.param(_ftyp(b"heic", b"mif1", b"heic"), "HEIF", id="heic"),
        pytest.param(_ftyp(b"mif1", b"mif1", b"heix"), "HEIF", id="mif1-heix"),
        pytest.param(_ftyp(b"msf1", b"msf1", b"hevc"), "HEIF", id="heic-sequence"),
        pytest.param(_ftyp(b"avif", b"avif", b"mif1"), "AVIF", id="avif"),
        pytest.param(_ftyp(b"mif1", b"mif1", b"avif"), "AVIF", id="mif1-avif"),
        pytest.param(_ftyp(b"avis", b"avis", b"msf1"), "AVIF", id="avif-sequence"),
        pytest.param(_ftyp(b"isom", b"isom", b"mp42"), None, id="mp4-video"),
        pytest.param(encode(sample_picture(), "PDF"), "PDF", id="pdf"),
        pytest.param(b"\xef\xbb\xbf<?xml version='1.0'?>\n<!-- x -->\n<svg/>", "SVG", id="svg"),
        pytest.param(b"<!DOCTYPE html><html><body><svg></svg>", None, id="html-with-svg"),
        pytest.param(b"8BPS\x00\x01\x00\x00\x00\x00\x00\x00", "PSD", id="psd"),
        pytest.param(b"\xff\x0a\xfa\x7f", "JXL", id="jxl-codestream"),
        pytest.param(b"\x00\x00\x00\x0cJXL \r\n\x87\n\x00\x00\x00\x14ftypjxl ", "JXL", id="jxl"),
        pytest.param(encode(sample_picture(), "ICO"), "ICO", id="ico"),
        pytest.param(encode(sample_picture(), "JPEG2000"), "JPEG2000", id="jpeg2000"),
        pytest.param(b"BM but only text, no bitmap header", None, id="bm-text"),
        pytest.param(b"hello, I am a text file", None, id="text"),
        pytest.param(b"", None, id="empty"),
    ],
)
def test_sniff_reads_content_only(head: bytes, expected: str | None) -> None:
    assert sniff(head[:SNIFF_BYTES]) == expected


# --- good images in every mode --------------------------------------------------------

Pixel = tuple[int, int, int]
RED: Pixel = (255, 0, 0)


@dataclass(frozen=True)
class GoodCase:
    build: Callable[[], bytes]
    format: str
    mode: str  # the file's Pillow mode before conversion
    frames: int = 1
    header: tuple[int, int] = SIZE
    upright: tuple[int, int] = SIZE
    pixels: tuple[tuple[tuple[int, int], Pixel], ...] = ()
    tolerance: int = 0
    mime: str | None = None  # default: image/<format>

    @property
    def expected_mime(self) -> str:
        return self.mime or f"image/{self.format.lower()}"


def good(
    case_id: str, build: Callable[[], bytes], fmt: str, mode: str, **expected: object
) -> object:
    return pytest.param(GoodCase(build, fmt, mode, **expected), id=case_id)  # type: ignore[arg-type]


def grey(*levels: int) -> tuple[tuple[tuple[int, int], Pixel], ...]:
    """Expected pixels of the four vertical bands made by ``_grey_levels``."""
    return tuple(((band * SIZE[0] // 4 + 2, 0), (level,) * 3) for band, level in enumerate(levels))


def _palette_png(transparency: int | bytes) -> bytes:
    image = Image.new("P", SIZE, 1)
    image.putpalette([0, 0, 0, 10, 200, 30, 255, 255, 255])
    image.putpixel((0, 0), 2)
    return encode(image, "PNG", transparency=transparency)


def _grey_levels(values: list[float], dtype: type[np.generic] | str) -> Image.Image:
    """Four vertical bands of the given levels."""
    array = np.repeat(np.array(values, dtype=dtype), SIZE[0] // 4)
    return Image.fromarray(np.tile(array, (SIZE[1], 1)))


def _grey16_big_endian_tiff() -> bytes:
    array = np.repeat(np.array([65535, 128 * 257, 1000, 0], dtype=">u2"), SIZE[0] // 4)
    raw = np.tile(array, (SIZE[1], 1)).tobytes()
    return encode(Image.frombytes("I;16B", SIZE, raw), "TIFF")


def _animated(image_format: str, **params: object) -> bytes:
    frames = [Image.new("RGB", SIZE, color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], image_format, save_all=True, append_images=frames[1:], **params)


def _exif_rotated_jpeg() -> bytes:
    # Left half red, right half blue, stored landscape; orientation 6 = turn 90° clockwise,
    # so upright the red half is on top.
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif, quality=95)


def _heif() -> bytes:
    pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif (optional) not installed")
    pillow_heif.register_heif_opener()
    try:
        return encode(Image.new("RGB", SIZE, (255, 0, 0)), "HEIF", quality=90)
    except (KeyError, OSError, RuntimeError, ValueError) as exc:
        pytest.skip(f"pillow-heif cannot write HEIF here: {exc}")


def _avif() -> bytes:
    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")
    try:
        return encode(Image.new("RGB", SIZE, (255, 0, 0)), "AVIF", quality=90)
    except (KeyError, OSError, ValueError) as exc:
        pytest.skip(f"Pillow cannot write AVIF here: {exc}")


GREY16 = [65535, 128 * 257, 1000, 0]  # 128 * 257 and 1000 clip to 255 with convert("L")
GOOD_CASES = [
    good(
        "rgb-jpeg",
        lambda: encode(Image.new("RGB", SIZE, (200, 30, 60)), "JPEG", quality=95),
        "JPEG",
        "RGB",
        pixels=(((5, 5), (200, 30, 60)),),
        tolerance=4,
    ),
    good(
        "p-with-transparent-index",
        lambda: _palette_png(1),
        "PNG",
        "P",
        pixels=(((5, 5), (10, 200, 30)), ((0, 0), (255, 255, 255))),
    ),
    good(
        "p-with-alpha-table",
        lambda: _palette_png(bytes([0, 0, 255])),
        "PNG",
        "P",
        pixels=(((5, 5), (10, 200, 30)), ((0, 0), (255, 255, 255))),
    ),
    # Alpha is dropped, not composited: a fully transparent red pixel stays red.
    good(
        "rgba-fully-transparent",
        lambda: encode(Image.new("RGBA", SIZE, (255, 0, 0, 0)), "PNG"),
        "PNG",
        "RGBA",
        pixels=(((5, 5), RED),),
    ),
    good(
        "cmyk-jpeg",
        lambda: encode(Image.new("CMYK", SIZE, (0, 255, 255, 0)), "JPEG"),
        "JPEG",
        "CMYK",
        pixels=(((5, 5), RED),),
        tolerance=8,
    ),
    good(
        "i16-png-scaled",
        lambda: encode(_grey_levels(GREY16, np.uint16), "PNG"),
        "PNG",
        "I;16",
        pixels=grey(255, 128, 3, 0),
    ),
    good("i16b-tiff-scaled", _grey16_big_endian_tiff, "TIFF", "I;16B", pixels=grey(255, 128, 3, 0)),
    good(
        "i32-tiff-16bit-range",
        lambda: encode(_grey_levels(GREY16, np.int32), "TIFF"),
        "TIFF",
        "I",
        pixels=grey(255, 128, 3, 0),
    ),
    good(
        "i32-tiff-stretched",
        lambda: encode(_grey_levels([-1000, 0, 10**6, 2 * 10**6], np.int32), "TIFF"),
        "TIFF",
        "I",
        pixels=grey(0, 0, 127, 255),
        tolerance=1,
    ),
    good(
        "float-tiff",
        lambda: encode(_grey_levels([1.0, 0.5, 0.25, 0.0], np.float32), "TIFF"),
        "TIFF",
        "F",
        pixels=grey(255, 128, 64, 0),
    ),
    good(
        "l-png",
        lambda: encode(Image.new("L", SIZE, 77), "PNG"),
        "PNG",
        "L",
        pixels=(((5, 5), (77, 77, 77)),),
    ),
    good(
        "la-png",
        lambda: encode(Image.new("LA", SIZE, (100, 0)), "PNG"),
        "PNG",
        "LA",
        pixels=(((5, 5), (100, 100, 100)),),
    ),
    good(
        "1bit-png",
        lambda: encode(Image.new("1", SIZE, 1), "PNG"),
        "PNG",
        "1",
        pixels=(((5, 5), (255, 255, 255)),),
    ),
    good(
        "animated-gif-frame0",
        lambda: _animated("GIF"),
        "GIF",
        "P",
        frames=3,
        pixels=(((5, 5), RED),),
    ),
    good(
        "animated-webp-frame0",
        lambda: _animated("WEBP", lossless=True),
        "WEBP",
        "RGB",
        frames=3,
        pixels=(((5, 5), RED),),
    ),
    good("apng-frame0", lambda: _animated("PNG"), "PNG", "RGB", frames=3, pixels=(((5, 5), RED),)),
    good(
        "multipage-tiff-page0",
        lambda: _animated("TIFF"),
        "TIFF",
        "RGB",
        frames=3,
        pixels=(((5, 5), RED),),
    ),
    good(
        "exif-rotated-jpeg",
        _exif_rotated_jpeg,
        "JPEG",
        "RGB",
        header=(64, 32),
        upright=(32, 64),
        pixels=(((16, 8), RED), ((16, 56), (0, 0, 255))),
        tolerance=6,
    ),
    good(
        "webp",
        lambda: encode(Image.new("RGB", SIZE, RED), "WEBP", quality=95),
        "WEBP",
        "RGB",
        pixels=(((5, 5), RED),),
        tolerance=6,
    ),
    good(
        "tiff-deflate",
        lambda: encode(sample_picture(SIZE), "TIFF", compression="tiff_deflate"),
        "TIFF",
        "RGB",
        pixels=(((5, 5), sample_picture(SIZE).getpixel((5, 5))),),
    ),
    good(
        "bmp",
        lambda: encode(sample_picture(SIZE), "BMP"),
        "BMP",
        "RGB",
        pixels=(((5, 5), sample_picture(SIZE).getpixel((5, 5))),),
    ),
    good("heic", _heif, "HEIF", "RGB", mime="image/heic", pixels=(((5, 5), RED),), tolerance=16),
    good("avif", _avif, "AVIF", "RGB", pixels=(((5, 5), RED),), tolerance=16),
]


@pytest.mark.parametrize("case", GOOD_CASES)
def test_good_image_decodes_to_rgb(case: GoodCase) -> None:
    data = case.build()
    decoded, emitted = _decode_recording_warnings(data, DEFAULT_LIMITS)
    assert isinstance(decoded, DecodedImage), decoded
    assert emitted == []  # no Pillow warning escapes for a good image
    assert (decoded.format, decoded.mode, decoded.frames) == (case.format, case.mode, case.frames)
    assert decoded.mime == case.expected_mime
    assert (decoded.width, decoded.height) == case.header
    assert decoded.image.mode == "RGB"
    # A plain image: nothing of the opened file (its bytes, its decoder) is kept with it.
    assert type(decoded.image) is Image.Image
    assert decoded.image.size == case.upright
    for xy, expected in case.pixels:
        actual = decoded.image.getpixel(xy)
        assert isinstance(actual, tuple)
        assert max(abs(a - e) for a, e in zip(actual, expected, strict=True)) <= case.tolerance, (
            xy,
            actual,
            expected,
        )


_WITHOUT_PILLOW_HEIF = """
import sys
sys.modules["pillow_heif"] = None  # import pillow_heif now raises ImportError
from pathlib import Path
from workers.intake import IntakeLimits, Rejected, decode
limits = IntakeLimits(10**6, 10**6, 20.0)
for name in sys.argv[1:]:
    try:
        print(decode(Path(name).read_bytes(), limits).format)
    except Rejected as exc:
        print(exc.reason, exc.message)
"""


def test_heic_without_pillow_heif_is_unsupported_and_avif_still_decodes(tmp_path: Path) -> None:
    # A fresh interpreter, because this one has registered pillow-heif's opener already.
    heic, avif = tmp_path / "photo.heic", tmp_path / "photo.avif"
    heic.write_bytes(_heif())
    avif.write_bytes(_avif())  # Pillow's own AVIF plugin, not pillow-heif
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_PILLOW_HEIF, str(heic), str(avif)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    heic_line, avif_line = result.stdout.splitlines()
    assert heic_line.startswith("unsupported_format ") and "pillow-heif" in heic_line
    assert avif_line == "AVIF"


# --- the shared corpus of real-world files ---------------------------------------------


def _corpus_rows() -> list[dict[str, str]]:
    manifest = CORPUS / "MANIFEST.tsv"
    if not manifest.is_file():
        return []
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        path_column = (reader.fieldnames or ["file"])[0]  # "file" today; the path column
        return [{**row, "path": row[path_column]} for row in reader]


_CORPUS_ROWS = _corpus_rows()


@pytest.mark.parametrize(
    "row",
    [pytest.param(row, id=row["path"]) for row in _CORPUS_ROWS]
    or [pytest.param(None, marks=pytest.mark.skip(reason=f"no shared corpus at {CORPUS}"))],
)
def test_corpus_file_decodes_with_default_limits(row: dict[str, str]) -> None:
    data = read_local(CORPUS / row["path"], DEFAULT_LIMITS)
    assert len(data) == int(row["bytes"]), "the file differs from its MANIFEST row"
    decoded = decode(data, DEFAULT_LIMITS)
    assert (decoded.width, decoded.height) == (int(row["width"]), int(row["height"]))
    assert decoded.image.mode == "RGB"
    assert decoded.image.size in {(decoded.width, decoded.height), (decoded.height, decoded.width)}
