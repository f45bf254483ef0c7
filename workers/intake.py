"""Safe intake of untrusted image bytes: read, sniff, bound, decode, normalise to RGB.

Every way an upload can be bad ends in :class:`Rejected` with a stable
:class:`RejectReason` (stored in the database) and a sentence for a moderator. Limits are
enforced before the expensive step they guard: the byte size before reading everything,
the pixel count from the header before any pixel buffer exists, and the wall-clock budget
while Pillow pulls the data. Nothing here uses signals, so it runs in worker threads.
"""

from __future__ import annotations

import enum
import functools
import io
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from PIL import Image, ImageFile, ImageOps

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# sniff() needs the ftyp box of HEIF/AVIF and an SVG's XML prolog; 4 KiB covers both.
SNIFF_BYTES = 4096

_READ_CHUNK = 1024 * 1024
# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class RejectReason(enum.StrEnum):
    """Why an upload was not scored; the values are stored, so they never change."""

    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    DECODE_ERROR = "decode_error"
    DECODE_TIMEOUT = "decode_timeout"
    UNREADABLE = "unreadable"
    MISSING = "missing"


class Rejected(Exception):
    """An upload that will not be scored: ``reason`` for machines, ``message`` for people."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[Rejected], tuple[RejectReason, str]]:
        # Result backends pickle exceptions; the default would call Rejected(message).
        return (type(self), (self.reason, self.message))


@dataclass(frozen=True)
class IntakeLimits:
    """Bounds on one upload: file size, width x height from the header, decode wall time."""

    max_bytes: int
    max_pixels: int
    decode_timeout_s: float

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or not self.decode_timeout_s > 0:
            raise ValueError(f"intake limits must be positive, got {self!r}")


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload. ``image`` is RGB, upright (EXIF orientation applied) and loaded;
    the other fields describe the file as stored, before orientation and conversion."""

    image: Image.Image
    format: str
    mime: str
    width: int
    height: int
    mode: str
    frames: int


# Formats we decode, by the name sniff() gives them (which is also Pillow's plugin name).
_MIME_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "HEIF": "image/heif",
    "AVIF": "image/avif",
}
_SUPPORTED_LIST = "JPEG, PNG, WebP, GIF, TIFF, BMP, HEIF/HEIC and AVIF"

# Formats sniff() recognises but we refuse: documents, vector drawings, layered editor
# files and formats whose decoders we do not want to expose to uploads.
_UNSUPPORTED_DESCRIPTIONS = {
    "PDF": "a PDF document",
    "SVG": "an SVG vector drawing",
    "PSD": "a Photoshop document",
    "JXL": "a JPEG XL image",
    "ICO": "a Windows icon",
    "CUR": "a Windows cursor",
    "JPEG2000": "a JPEG 2000 image",
    "JXR": "a JPEG XR image",
    "EPS": "a PostScript document",
    "QOI": "a QOI image",
    "DDS": "a DirectDraw texture",
    "XCF": "a GIMP document",
    "HDR": "a Radiance HDR image",
    "EXR": "an OpenEXR image",
}

_HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
_GENERIC_HEIF_BRANDS = frozenset({b"mif1", b"msf1", b"mif2", b"miaf"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND_END = b"IEND\xae\x42\x60\x82"


def _ftyp_brands(head: bytes) -> tuple[bytes, ...]:
    """Major and compatible brands of a leading ISO-BMFF ``ftyp`` box; () if there is none."""
    if len(head) < 12 or head[4:8] != b"ftyp":
        return ()
    box_end = min(int.from_bytes(head[0:4], "big"), len(head))
    compatible = [head[i : i + 4] for i in range(16, box_end - 3, 4)]
    return (head[8:12], *compatible)


def _looks_like_svg(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith(b"<") and b"<svg" in text and b"<html" not in text


def sniff(head: bytes) -> str | None:
    """The format of a file from its first bytes (see ``SNIFF_BYTES``), never its name.

    Returns a supported format (``JPEG``, ``PNG``, ``GIF``, ``WEBP``, ``TIFF``, ``BMP``,
    ``HEIF``, ``AVIF``), the name of a recognised unsupported one (``PDF``, ``SVG``, ``PSD``,
    ``JXL``, ``ICO``, ...), or None when nothing matches.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if brands := _ftyp_brands(head):
        if _AVIF_BRANDS.intersection(brands):
            return "AVIF"
        if _HEIC_BRANDS.intersection(brands) or _GENERIC_HEIF_BRANDS.intersection(brands):
            return "HEIF"
        return None  # video and other ISO-BMFF files
    return _sniff_unsupported(head)


# Recognised-but-unsupported formats with a fixed leading signature.
_UNSUPPORTED_SIGNATURES: tuple[tuple[tuple[bytes, ...], str], ...] = (
    ((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n"), "JXL"),
    ((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51"), "JPEG2000"),
    ((b"II\xbc\x01",), "JXR"),
    ((b"8BPS",), "PSD"),
    ((b"%!PS", b"\xc5\xd0\xd3\xc6"), "EPS"),
    ((b"qoif",), "QOI"),
    ((b"DDS ",), "DDS"),
    ((b"gimp xcf",), "XCF"),
    ((b"#?RADIANCE", b"#?RGBE"), "HDR"),
    ((b"\x76\x2f\x31\x01",), "EXR"),
)


def _sniff_unsupported(head: bytes) -> str | None:
    for prefixes, name in _UNSUPPORTED_SIGNATURES:
        if head.startswith(prefixes):
            return name
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"%PDF-"):
        return "PDF"
    # ICO/CUR have a weak signature: also require a non-empty directory whose first
    # entry has its reserved byte at zero.
    if (
        head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")
        and len(head) >= 10
        and int.from_bytes(head[4:6], "little") > 0
        and head[9] == 0
    ):
        return "ICO" if head[2] == 1 else "CUR"
    if _looks_like_svg(head):
        return "SVG"
    return None


def read_local(path: Path, limits: IntakeLimits) -> bytes:
    """The bytes of a local file, or :class:`Rejected` (MISSING, UNREADABLE, TOO_LARGE, EMPTY).

    The size is checked on the open descriptor before reading, and the read stops after
    ``max_bytes + 1`` bytes whatever the size said: a file can grow after the check, and
    some files (``/proc``, network mounts) report a size that is not their length.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise Rejected(
            RejectReason.MISSING, f"{path} does not exist (it may have been removed): {exc}"
        ) from exc
    except OSError as exc:
        raise Rejected(RejectReason.UNREADABLE, f"{path} could not be opened: {exc}") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise Rejected(RejectReason.UNREADABLE, f"{path} is a directory, not an image file.")
        if not stat.S_ISREG(info.st_mode):
            raise Rejected(RejectReason.UNREADABLE, f"{path} is not a regular file.")
        if info.st_size > limits.max_bytes:
            raise _too_large(str(path), info.st_size, limits)
        data = _read_at_most(fd, limits.max_bytes + 1)
    except OSError as exc:
        raise Rejected(RejectReason.UNREADABLE, f"{path} could not be read: {exc}") from exc
    finally:
        os.close(fd)
    if len(data) > limits.max_bytes:
        raise Rejected(
            RejectReason.TOO_LARGE,
            f"{path} is larger than the {limits.max_bytes}-byte limit "
            "(it grew, or its size was misreported, after it was checked).",
        )
    if not data:
        raise Rejected(RejectReason.EMPTY, f"{path} is empty (0 bytes).")
    return data


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _too_large(subject: str, size: int, limits: IntakeLimits) -> Rejected:
    return Rejected(
        RejectReason.TOO_LARGE,
        f"{subject} is {size} bytes, over the {limits.max_bytes}-byte limit.",
    )


class _DeadlineExceeded(Exception):
    """Raised inside Pillow by :class:`_DeadlineStream`; never leaves this module."""


class _DeadlineStream(io.BytesIO):
    """The bytes handed to Pillow, refusing to give out more once the deadline has passed.

    Pillow pulls data through ``read()`` in blocks of at most ``ImageFile.MAXBLOCK``
    (64 KiB) and decodes each block into a pixel buffer sized from the header, which the
    pixel limit caps; so the work between two deadline checks is bounded by one block and
    that buffer, and a decode overruns its budget by at most that much. WebP, HEIF, AVIF
    and libtiff take the whole file in one call and decode it in C without coming back:
    for those the pixel limit alone bounds the decode, and the check after ``load()``
    still reports the overrun. ``expired`` is sticky, so a plugin that swallows the
    exception cannot turn a timeout into a different reason.
    """

    def __init__(self, data: bytes, deadline: float) -> None:
        super().__init__(data)
        self._deadline = deadline
        self.expired = False

    def check_deadline(self) -> None:
        if self.expired or time.monotonic() > self._deadline:
            self.expired = True
            raise _DeadlineExceeded

    def read(self, size: int | None = -1, /) -> bytes:
        self.check_deadline()
        return super().read(size)

    def read1(self, size: int | None = -1, /) -> bytes:
        self.check_deadline()
        return super().read1(size)

    def readline(self, size: int | None = -1, /) -> bytes:
        self.check_deadline()
        return super().readline(size)

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        self.check_deadline()
        return super().readinto(buffer)

    def getvalue(self) -> bytes:
        self.check_deadline()
        return super().getvalue()


_Opener = Callable[[IO[bytes], str | bytes], ImageFile.ImageFile]

_pillow_limit_lock = threading.Lock()


def _raise_pillow_pixel_limit(max_pixels: int) -> None:
    """Keep Pillow's process-wide bomb threshold at or above our per-call limit.

    Some plugins run Pillow's own check against the global ``Image.MAX_IMAGE_PIXELS``
    (89.5 Mpx by default, below our 100 Mpx default): TIFF when it allocates in
    ``load()``, GIF for frame extents, WebP before its decoder allocates the canvas.
    Left lower than our limit it would refuse images we accept, or warn through the
    process-global warnings machinery, which cannot be scoped to one call from a worker
    thread (``catch_warnings`` swaps global state). So we touch the global, but only to
    raise it to the largest limit any caller asked for, under a lock: it never goes down,
    so no thread sees it drop below the limit it relies on. Our own check stays the one
    that decides, and Pillow's remains a backstop for other code in the process.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None or current >= max_pixels:
        return
    with _pillow_limit_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


@functools.cache
def _heif_plugin_available() -> bool:
    # pillow-heif is optional: HEIC uploads are refused as unsupported without it.
    try:
        from pillow_heif import register_heif_opener
    except (ImportError, OSError):
        return False
    register_heif_opener()
    return True


def _opener_for(fmt: str, head: bytes) -> _Opener:
    """Pillow's opener for exactly this format.

    ``Image.open(fp, formats=[fmt])`` would pick the same opener but then run Pillow's
    bomb check against the global threshold, which warns (process-wide, see
    :func:`_raise_pillow_pixel_limit`) for sizes up to twice it, before our own check
    could reject them. Calling the registered opener leaves the header check to us.
    """
    if fmt == "HEIF" and not _heif_plugin_available():
        raise Rejected(
            RejectReason.UNSUPPORTED_FORMAT,
            "The file is a HEIF/HEIC image, which this server cannot decode "
            "(the optional pillow-heif package is not installed).",
        )
    Image.init()
    registered = Image.OPEN.get(fmt)
    if registered is None:
        raise _cannot_decode(fmt, "Pillow has no plugin for it")
    open_image, accept = registered
    # A plugin whose codec library is missing answers with a reason instead of a bool.
    verdict = accept(head) if accept else True
    if isinstance(verdict, str):
        raise _cannot_decode(fmt, verdict)
    return open_image


def _cannot_decode(fmt: str, why: str) -> Rejected:
    return Rejected(
        RejectReason.UNSUPPORTED_FORMAT,
        f"The file is a {fmt} image, which this server cannot decode ({why}).",
    )


def _webp_canvas_size(head: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP header; Pillow's WebP opener allocates the canvas."""
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(head[26:28], "little") & 0x3FFF
        return width, int.from_bytes(head[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _check_pixels(fmt: str, width: int, height: int, limits: IntakeLimits) -> None:
    if width <= 0 or height <= 0:
        raise Rejected(
            RejectReason.DECODE_ERROR, f"The {fmt} image has no pixels ({width}x{height})."
        )
    if width * height > limits.max_pixels:
        raise Rejected(
            RejectReason.TOO_MANY_PIXELS,
            f"The image is {width}x{height} = {width * height} pixels, "
            f"over the {limits.max_pixels}-pixel limit.",
        )


def decode(data: bytes, limits: IntakeLimits) -> DecodedImage:
    """Decode untrusted bytes into an RGB image, or raise :class:`Rejected`.

    Bad data never raises anything else. Animated images are represented by frame 0.
    """
    deadline = time.monotonic() + limits.decode_timeout_s
    if not data:
        raise Rejected(RejectReason.EMPTY, "The file is empty (0 bytes).")
    if len(data) > limits.max_bytes:
        raise _too_large("The file", len(data), limits)
    head = data[:SNIFF_BYTES]
    fmt = sniff(head)
    if fmt is None:
        raise Rejected(
            RejectReason.NOT_AN_IMAGE,
            "The file is not an image: its content matches no known image format.",
        )
    if fmt not in _MIME_TYPES:
        raise Rejected(
            RejectReason.UNSUPPORTED_FORMAT,
            f"The file is {_UNSUPPORTED_DESCRIPTIONS.get(fmt, fmt)} ({fmt}), which is not "
            f"accepted; supported formats are {_SUPPORTED_LIST}.",
        )
    opener = _opener_for(fmt, head)
    if fmt == "WEBP" and (canvas := _webp_canvas_size(head)):
        _check_pixels(fmt, *canvas, limits)
    _raise_pillow_pixel_limit(limits.max_pixels)

    stream = _DeadlineStream(data, deadline)
    try:
        return _decode_stream(opener, stream, fmt, _mime(fmt, head), limits)
    except (Rejected, MemoryError):
        raise  # MemoryError: the worker ran short, not a verdict on the file; let it retry
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected(
            RejectReason.TOO_MANY_PIXELS,
            f"The image has more pixels than the {limits.max_pixels}-pixel limit ({exc}).",
        ) from exc
    except Exception as exc:  # whatever Pillow (or a plugin) refuses the data with
        if stream.expired:
            raise Rejected(
                RejectReason.DECODE_TIMEOUT,
                f"Decoding the {fmt} image took longer than the "
                f"{limits.decode_timeout_s:g} s budget.",
            ) from exc
        raise _classify_failure(fmt, data, exc) from exc


def _mime(fmt: str, head: bytes) -> str:
    if fmt == "HEIF" and _HEIC_BRANDS.intersection(_ftyp_brands(head)):
        return "image/heic"
    return _MIME_TYPES[fmt]


def _decode_stream(
    opener: _Opener, stream: _DeadlineStream, fmt: str, mime: str, limits: IntakeLimits
) -> DecodedImage:
    with opener(stream, "") as source:
        width, height = source.size
        _check_pixels(fmt, width, height, limits)
        frames = int(getattr(source, "n_frames", 1))
        if frames > 1:
            source.seek(0)
        source.load()
        # pillow-heif takes the size from the decoded data, which may differ from ispe.
        _check_pixels(fmt, *source.size, limits)
        stream.check_deadline()
        mode = source.mode
        rgb = _to_rgb(ImageOps.exif_transpose(source))
    stream.check_deadline()
    return DecodedImage(
        image=rgb, format=fmt, mime=mime, width=width, height=height, mode=mode, frames=frames
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the published detectors' own pipelines see it (``.convert("RGB")``: alpha
    dropped, not composited), except where a plain convert would lose the picture."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _greyscale_to_8bit(image).convert("RGB")
    if mode == "PA" or (mode == "P" and "transparency" in image.info):
        # Straight to RGB gives the same colours, but Pillow warns about palette
        # transparency unless it goes through RGBA.
        image = image.convert("RGBA")
    return image.convert("RGB")


def _greyscale_to_8bit(image: Image.Image) -> Image.Image:
    """Scale high-bit-depth greyscale to 0..255 (``convert("L")`` clips at 255 instead).

    ``I;16*``, and ``I`` (32-bit integers, usually 16-bit data widened by Pillow) whose
    values fit 16 bits: the top 8 of 16 bits. ``F`` with values in 0..1: times 255.
    Anything else: the values' own min..max stretched to 0..255.
    """
    import numpy as np

    values = np.asarray(image)
    if image.mode.startswith("I;16") or (
        image.mode == "I" and values.min() >= 0 and values.max() <= 0xFFFF
    ):
        return Image.fromarray((values >> 8).astype(np.uint8))
    floats = np.nan_to_num(values.astype(np.float64), posinf=0.0, neginf=0.0)
    low, high = float(floats.min()), float(floats.max())
    if image.mode == "F" and low >= 0 and high <= 1:
        scaled = floats * 255.0
    elif high > low:
        scaled = (floats - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(floats)
    return Image.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8))


def _classify_failure(fmt: str, data: bytes, exc: Exception) -> Rejected:
    detail = str(exc)[:300] or type(exc).__name__
    # Pillow says "image file is truncated" / "Truncated File Read"; other failures on a
    # file that also lacks its end marker are treated as the truncation they most likely are.
    if "truncated" in detail.lower() or _ends_early(fmt, data):
        return Rejected(RejectReason.TRUNCATED, f"The {fmt} file ends early ({detail}).")
    return Rejected(RejectReason.DECODE_ERROR, f"The {fmt} file could not be decoded ({detail}).")


def _ends_early(fmt: str, data: bytes) -> bool:
    """True when the file's own structure says bytes are missing at the end."""
    tail = data[-4096:].rstrip(b"\x00")
    if fmt == "JPEG":
        return not tail.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return not tail.endswith(_PNG_IEND_END)
    if fmt == "GIF":
        return not tail.endswith(b";")
    if fmt in ("WEBP", "BMP"):
        declared = int.from_bytes(data[4:8] if fmt == "WEBP" else data[2:6], "little")
        return declared + (8 if fmt == "WEBP" else 0) > len(data)
    if fmt == "TIFF":
        order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
        big_tiff = int.from_bytes(data[2:4], order) == 43
        first_ifd = int.from_bytes(data[8:16] if big_tiff else data[4:8], order)
        return first_ifd >= len(data)
    if fmt in ("HEIF", "AVIF"):
        return _boxes_overrun(data)
    return False


def _boxes_overrun(data: bytes) -> bool:
    position = 0
    while position + 8 <= len(data):
        size = int.from_bytes(data[position : position + 4], "big")
        if size == 1 and position + 16 <= len(data):
            size = int.from_bytes(data[position + 8 : position + 16], "big")
        if size == 0:  # the last box runs to the end of the file
            return False
        if size < 8:
            return False  # malformed rather than cut short
        position += size
    return position != len(data)
