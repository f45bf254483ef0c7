"""Safe intake of untrusted image bytes: read, sniff, bound, decode, normalise to RGB.

Every way an upload can be bad ends in :class:`Rejected` with a stable
:class:`RejectReason` (stored in the database) and a sentence for a moderator. Limits are
enforced before the expensive step they guard: the byte size before reading everything,
the pixel count from the header before any pixel buffer exists, what the file's own
structure would make the decoder allocate or repeat (TIFF tiles and strip lists, a GIF
frame past its screen, JPEG scans) before Pillow sees it, and the wall-clock budget while
Pillow pulls the data. Damaged ancillary PNG chunks are skipped, as browsers skip them,
rather than costing the whole image. Nothing here uses signals, so it runs in worker
threads.
"""

from __future__ import annotations

import enum
import functools
import io
import itertools
import os
import re
import stat
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Literal

from PIL import Image, ImageFile, ImageOps, PngImagePlugin

from workers.names import printable

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
        # Messages quote file names and decoder text: keep them printable and storable.
        message = printable(message)
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
    the other fields describe the file as stored, before orientation and conversion.
    ``anomalies`` names damage that was stepped over to decode it (one sentence each, e.g.
    a PNG text chunk with a bad CRC that was skipped), for the evidence. ``draft_scale`` is
    1 for the file's own pixels, or 2, 4 or 8 when a JPEG was decoded at that fraction of
    its size (``decode(..., draft=...)``): ``width`` and ``height`` stay the file's, and
    ``image`` is the smaller picture."""

    image: Image.Image
    format: str
    mime: str
    width: int
    height: int
    mode: str
    frames: int
    anomalies: tuple[str, ...] = ()
    draft_scale: int = 1


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
SUPPORTED_FORMATS = frozenset(_MIME_TYPES)
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
    that buffer, and a decode overruns its budget by at most that much. The exception is
    a progressive JPEG, whose every scan is a pass over the whole image and whose scans
    can be a few bytes each: their number is bounded before decoding instead
    (:func:`_check_jpeg_scans`). WebP, HEIF, AVIF
    and libtiff take the whole file in one call and decode it in C without coming back:
    for those the pixel limit alone bounds the decode, and the check after ``load()``
    still reports the overrun. ``expired`` is sticky, so a plugin that swallows the
    exception cannot turn a timeout into a different reason.
    """

    def __init__(self, data: bytes, deadline: float) -> None:
        super().__init__(data)
        self._deadline = deadline
        self.expired = False

    def extend_deadline(self, seconds: float) -> None:
        """Move the deadline back by time spent waiting outside the decoder."""
        self._deadline += seconds

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


# Called with (width, height, file bytes) from the header, before pixels are decoded.
Admit = Callable[[int, int, int], None]

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


def _check_time(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise _DeadlineExceeded


# --- PNG: damaged ancillary chunks ------------------------------------------------------

# Ancillary chunks whose payload Pillow reads, with the fewest bytes it accepts.
_PNG_MIN_LENGTHS = {
    b"gAMA": 4,
    b"cHRM": 32,
    b"sRGB": 1,
    b"pHYs": 9,
    b"acTL": 8,
    b"fcTL": 26,
    b"fdAT": 4,
}
_APNG_CHUNKS = (b"acTL", b"fcTL", b"fdAT")
# Distinct anomaly sentences kept per file; chunk names are the uploader's to choose.
_MAX_ANOMALIES = 16


class _PngBudgets:
    """What is left, for one file, of the text Pillow will hold and of the bytes we are
    willing to inflate to test compressed chunks (the inflating work is bounded by this,
    however many compressed chunks the file has)."""

    def __init__(self) -> None:
        self.text = PngImagePlugin.MAX_TEXT_MEMORY
        self.inflate = PngImagePlugin.MAX_TEXT_MEMORY


def drop_damaged_png_chunks(
    data: bytes, *, deadline: float | None = None
) -> tuple[bytes, tuple[str, ...]]:
    """The PNG without its damaged or oversized ancillary chunks, and a sentence for each
    kind of chunk dropped.

    Reference decoders (libpng, browsers) skip an ancillary chunk (lowercase first letter)
    whose CRC is wrong or whose content they cannot use, and show the picture. Pillow
    refuses the whole file instead, unless ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set, a
    process-wide switch that would also relax critical chunks for every thread. So the
    chunk list is walked here and Pillow gets a copy without: ancillary chunks with a bad
    CRC; text and ICC profiles that inflate past ``PngImagePlugin.MAX_TEXT_CHUNK``, that
    do not inflate, or that use an unknown compression method; text past Pillow's
    per-file ``MAX_TEXT_MEMORY``; chunks too short for their type; and all animation
    chunks when one is damaged or they do not form a valid sequence (the still image is
    then decoded, as a decoder without APNG support would). Inflating is bounded by
    ``max_length`` and by one per-file budget. Critical chunks (IHDR, PLTE, IDAT, IEND)
    are left as they are, so the decoder stays strict about them, and so is everything
    from the first chunk that does not fit in the file. The input comes back unchanged
    (not copied) when nothing is dropped.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return data, ()
    walk = _walk_png(data, deadline)
    anomalies = _png_anomalies(walk.problems)
    kept = walk.kept
    if walk.animation and (why := _apng_problem(walk)):
        kept = [chunk for chunk in kept if chunk[0] not in _APNG_CHUNKS]
        anomalies.append(
            f"the animation chunks (acTL, fcTL, fdAT) were skipped because {why}; "
            "the still image was decoded"
        )
    if not anomalies:
        return data, ()
    view = memoryview(data)
    parts: list[bytes | memoryview] = [_PNG_SIGNATURE]
    parts.extend(view[start:end] for _, start, end in kept)
    parts.append(view[walk.end :])
    return b"".join(parts), tuple(anomalies)


@dataclass
class _PngWalk:
    """The chunk list of a PNG as far as it can be walked."""

    kept: list[tuple[bytes, int, int]] = field(default_factory=list)  # (type, start, end)
    problems: dict[tuple[bytes, str], int] = field(default_factory=dict)  # (type, why): count
    animation: list[tuple[bytes, bytes]] = field(default_factory=list)  # (type, payload)
    header: bytes = b""  # IHDR's payload
    end: int = len(_PNG_SIGNATURE)  # where the walk stopped; the rest is kept as it is


def _walk_png(data: bytes, deadline: float | None) -> _PngWalk:
    walk = _PngWalk()
    budgets = _PngBudgets()
    view = memoryview(data)
    pos = walk.end
    for walked in itertools.count(1):
        if pos + 12 > len(data):
            break
        if walked % 4096 == 0:
            _check_time(deadline)
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > len(data) or not kind.isalpha():
            break  # not a chunk we can step over: the decoder judges the rest as it is
        body = data[pos + 8 : end - 4] if kind[0] & 0x20 or kind == b"IHDR" else b""
        if not kind[0] & 0x20:  # critical
            walk.header = body if kind == b"IHDR" else walk.header
            problem = None
        elif zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            problem = "with a bad CRC"
        else:
            problem = _ancillary_problem(kind, body, walk.header, budgets)
        if problem is None:
            walk.kept.append((kind, pos, end))
        else:
            walk.problems[kind, problem] = walk.problems.get((kind, problem), 0) + 1
        if kind in _APNG_CHUNKS:
            walk.animation.append((kind, body))
        pos = end
        if kind == b"IEND":
            break
    walk.end = pos
    return walk


def _ancillary_problem(kind: bytes, body: bytes, header: bytes, budgets: _PngBudgets) -> str | None:
    """Why Pillow would refuse the file over this (CRC-correct) ancillary chunk, or None."""
    # tRNS: greyscale needs one 16-bit sample, truecolour three; Pillow checks no others.
    least = {0: 2, 2: 6}.get(header[9], 0) if kind == b"tRNS" and len(header) >= 13 else 0
    if len(body) < max(least, _PNG_MIN_LENGTHS.get(kind, 0)):
        return "with too few bytes for its type"
    if kind in (b"tEXt", b"zTXt", b"iTXt"):
        return _text_problem(kind, body, budgets)
    if kind == b"iCCP":
        name, separator, rest = body.partition(b"\x00")
        if not (name and separator and rest):
            return "with a malformed header"
        if rest[0] != 0:
            return "with an unknown compression method"
        return _inflated_size(rest[1:], budgets)[0]
    return None


def _text_problem(kind: bytes, body: bytes, budgets: _PngBudgets) -> str | None:
    if kind == b"tEXt":
        keyword, _, text = body.partition(b"\x00")
        return _charge_text(len(text) if keyword else 0, budgets)
    if kind == b"zTXt":
        keyword, _, rest = body.partition(b"\x00")
        if rest and rest[0] != 0:
            return "with an unknown compression method"
        problem, size = _inflated_size(rest[1:], budgets)
        return problem or _charge_text(size if keyword else 0, budgets)
    if kind == b"iTXt":
        _keyword, separator, rest = body.partition(b"\x00")
        fields = rest[2:].split(b"\x00", 2)
        if not separator or len(rest) < 2 or len(fields) < 3:
            return None  # Pillow ignores an iTXt chunk it cannot parse
        if not rest[0]:
            return _charge_text(len(fields[2]), budgets)
        if rest[1] != 0:
            return None  # unknown method: ignored by Pillow
        problem, size = _inflated_size(fields[2], budgets)
        return problem or _charge_text(size, budgets)
    return None


_INFLATE_BUDGET_SPENT = "left unchecked (the file's budget for inflating them was spent)"


def _inflated_size(compressed: bytes, budgets: _PngBudgets) -> tuple[str | None, int]:
    """(why the chunk is unusable, or None; its inflated size), inflating at most one byte
    past what Pillow accepts (``MAX_TEXT_CHUNK``) and past what is left of the budget."""
    cap = PngImagePlugin.MAX_TEXT_CHUNK
    limit = min(cap, budgets.inflate)
    if limit <= 0:
        return _INFLATE_BUDGET_SPENT, 0
    inflater = zlib.decompressobj()
    try:
        size = len(inflater.decompress(compressed, limit + 1))
    except zlib.error:
        return "with corrupt compressed data", 0
    budgets.inflate -= size
    if size <= limit:  # output stopped short of max_length, so all input was consumed
        return None, size
    if limit == cap:
        return f"inflating past {cap} bytes", 0
    return _INFLATE_BUDGET_SPENT, 0


def _charge_text(size: int, budgets: _PngBudgets) -> str | None:
    if size > budgets.text:
        return f"past the file's {PngImagePlugin.MAX_TEXT_MEMORY}-byte total for text"
    budgets.text -= size
    return None


def _apng_problem(walk: _PngWalk) -> str | None:
    """Why the animation chunks cannot be used: one is damaged, or they do not form a
    sequence that Pillow accepts."""
    if any(kind in _APNG_CHUNKS for kind, _ in walk.problems):
        return "one of them is damaged"
    animation, header = walk.animation, walk.header
    controls = [body for kind, body in animation if kind == b"acTL"]
    if len(controls) != 1:
        return "there is no acTL chunk" if not controls else "there is more than one acTL chunk"
    frames = int.from_bytes(controls[0][:4], "big")
    if not 0 < frames <= 0x80000000:
        return f"the acTL chunk declares {frames} frames"
    width = int.from_bytes(header[0:4], "big")
    height = int.from_bytes(header[4:8], "big")
    expected = 0
    for kind, body in animation:
        if kind == b"acTL":
            continue
        if int.from_bytes(body[:4], "big") != expected:
            return "their sequence numbers are out of order"
        expected += 1
        if kind == b"fcTL":
            frame_w, frame_h, x, y = (
                int.from_bytes(body[i : i + 4], "big") for i in (4, 8, 12, 16)
            )
            if x + frame_w > width or y + frame_h > height:
                return "a frame lies outside the image"
    return None


def _png_anomalies(problems: dict[tuple[bytes, str], int]) -> list[str]:
    sentences = []
    for (kind, problem), count in list(problems.items())[:_MAX_ANOMALIES]:
        name = kind.decode("ascii")
        if count == 1:
            article = "an" if name[0].lower() in "aefhilmnorsx" else "a"
            sentences.append(f"{article} {name} chunk {problem} was skipped")
        else:
            sentences.append(f"{count} {name} chunks {problem} were skipped")
    rest = sum(list(problems.values())[_MAX_ANOMALIES:])
    if rest:
        sentences.append(f"{rest} more damaged ancillary chunks were skipped")
    return sentences


# --- GIF: the canvas Pillow allocates ---------------------------------------------------


def _gif_canvas_size(data: bytes, deadline: float) -> tuple[int, int] | None:
    """The logical screen grown to the first frame's extent, as Pillow grows it; None when
    the blocks before the first frame cannot be walked (the decoder will say why)."""
    if len(data) < 13:
        return None
    screen_w, screen_h = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    walked = 0
    while pos < len(data):
        if data[pos] == 0x2C:  # image descriptor
            if pos + 9 > len(data):
                return None
            x, y, width, height = (
                int.from_bytes(data[i : i + 2], "little") for i in range(pos + 1, pos + 9, 2)
            )
            return max(screen_w, x + width), max(screen_h, y + height)
        if data[pos] != 0x21:  # only extensions may come before the first frame
            return None
        pos += 2
        while pos < len(data):  # data sub-blocks, each led by its length
            size = data[pos]
            pos += 1 + size
            walked += 1
            if walked % 65536 == 0:
                _check_time(deadline)
            if size == 0:
                break
    return None


# --- TIFF: the tiles and strips libtiff allocates ---------------------------------------

# A tile may exceed the image only by padding to whole 16-pixel blocks, or up to this many
# pixels on a side for small images (common tilers use 256 or 512).
MAX_TIFF_TILE_SIDE = 1024
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
_TIFF_TYPE_SIZES.update({13: 4, 16: 8, 17: 8, 18: 8})
_TIFF_LAYOUT_TAGS = frozenset({256, 257, 277, 278, 284, 273, 279, 322, 323, 324, 325})
_MAX_IFD_ENTRIES = 65535


def _tiff_first_ifd(data: bytes) -> dict[int, tuple[int, int]] | None:
    """Tag -> (count, value) for the layout tags of the first IFD (value: the first one
    when stored inline, else 0); None when the IFD cannot be read (the decoder says why)."""
    order: Literal["little", "big"] = "little" if data[:2] == b"II" else "big"
    big = int.from_bytes(data[2:4], order) == 43
    offset = int.from_bytes(data[8:16] if big else data[4:8], order)
    count_size, entry_size, value_size = (8, 20, 8) if big else (2, 12, 4)
    if offset < 8 or offset + count_size > len(data):
        return None
    entries = int.from_bytes(data[offset : offset + count_size], order)
    start = offset + count_size
    if entries > _MAX_IFD_ENTRIES or start + entries * entry_size > len(data):
        return None
    tags: dict[int, tuple[int, int]] = {}
    for index in range(entries):
        entry = data[start + index * entry_size : start + (index + 1) * entry_size]
        tag = int.from_bytes(entry[0:2], order)
        if tag not in _TIFF_LAYOUT_TAGS:
            continue
        kind = int.from_bytes(entry[2:4], order)
        count = int.from_bytes(entry[4 : 4 + value_size], order)
        size = _TIFF_TYPE_SIZES.get(kind, 0)
        field = entry[4 + value_size :]
        value = int.from_bytes(field[:size], order) if 0 < size <= value_size else 0
        tags[tag] = (count, value)
    return tags


def _check_tiff_layout(data: bytes, limits: IntakeLimits) -> None:
    """Refuse tiles larger than the image and more strips or tiles than the image has.

    libtiff allocates one tile (width x height x bytes per pixel) whatever the image size,
    so a 64 x 64 image declaring 16384 x 16384 tiles costs 768 MiB before any check on the
    image sees it; and Pillow builds Python objects for every strip or tile listed.
    RowsPerStrip past the image height and byte counts past the file are harmless (libtiff
    clamps the first and refuses the second without allocating) and stay legal.
    """
    tags = _tiff_first_ifd(data)
    if tags is None:
        return
    width, height = tags.get(256, (0, 0))[1], tags.get(257, (0, 0))[1]
    if width <= 0 or height <= 0:
        return  # the pixel check after opening says what is wrong
    planes = tags.get(277, (1, 1))[1] if tags.get(284, (1, 1))[1] == 2 else 1
    tile_w, tile_h = tags.get(322, (0, 0))[1], tags.get(323, (0, 0))[1]
    if tile_w > 0 and tile_h > 0:
        if tile_w * tile_h > limits.max_pixels:
            raise Rejected(
                RejectReason.TOO_MANY_PIXELS,
                f"The TIFF image is {width}x{height} but declares {tile_w}x{tile_h} tiles, "
                f"{tile_w * tile_h} pixels each, over the {limits.max_pixels}-pixel limit: "
                "the decoder allocates a whole tile at a time.",
            )
        side_w = max(-(-width // 16) * 16, MAX_TIFF_TILE_SIDE)
        side_h = max(-(-height // 16) * 16, MAX_TIFF_TILE_SIDE)
        if tile_w > side_w or tile_h > side_h:
            raise Rejected(
                RejectReason.DECODE_ERROR,
                f"The TIFF image is {width}x{height} but declares {tile_w}x{tile_h} tiles; "
                f"a tile may be at most the image rounded up to 16 pixels, or "
                f"{MAX_TIFF_TILE_SIDE} pixels, on a side (the decoder allocates whole tiles).",
            )
        units, what = -(-width // tile_w) * -(-height // tile_h) * planes, "tile"
        listed = max(tags.get(324, (0, 0))[0], tags.get(325, (0, 0))[0])
    else:
        rows = tags.get(278, (0, 0))[1]
        rows = min(rows, height) if rows > 0 else 1  # without RowsPerStrip: a row each
        units, what = -(-height // rows) * planes, "strip"
        listed = max(tags.get(273, (0, 0))[0], tags.get(279, (0, 0))[0])
    if listed > units:
        raise Rejected(
            RejectReason.DECODE_ERROR,
            f"The TIFF image is {width}x{height} and has room for {units} {what}"
            f"{'s' if units != 1 else ''}, but lists {listed}.",
        )


# --- JPEG: the number of scans ----------------------------------------------------------

# TurboJPEG's recommended scan limit for untrusted input; real encoders write 1 to ~12.
MAX_JPEG_SCANS = 500
# Each scan of a progressive JPEG is a pass over the whole image inside one block that the
# deadline reader hands out. Measured worst case (refinement scans of end-of-band runs):
# about 0.5 ns per pixel per scan; the budget below allows ten times that to stay inside
# the decode time on a slow or busy CPU: 4e9 scan-pixels for 20 s, i.e. 40 scans at
# 100 Mpx, 500 at 8 Mpx.
JPEG_SCAN_PIXELS_PER_SECOND = 200_000_000
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# The next marker: 0xFF (the last of any fill bytes) then neither a stuffed zero nor a
# restart marker. One 0xFF, not "0xFF+": a run of fill bytes would be matched again from
# each of its bytes, quadratic in its length (a file of 0xFF bytes would take hours).
_JPEG_NEXT_MARKER = re.compile(rb"\xff([^\x00\xd0-\xd7\xff])")


def _jpeg_scans(data: bytes, deadline: float) -> tuple[int, int, int]:
    """(scans, width, height) of the first image (up to its EOI), counting at most
    ``MAX_JPEG_SCANS + 1``. Markers are found the way libjpeg finds them: segments are
    skipped by their length, and anything else up to the next marker is passed over."""
    scans = width = height = 0
    pos = 2
    walked = 0
    while scans <= MAX_JPEG_SCANS and (found := _JPEG_NEXT_MARKER.search(data, pos)):
        walked += 1
        if walked % 4096 == 0:
            _check_time(deadline)
        marker, pos = found.group(1)[0], found.end()
        if marker == 0xD9:
            break
        if marker in (0x01, 0xD8):  # no length field
            continue
        if marker == 0xDA:
            scans += 1
        elif marker in _JPEG_SOF_MARKERS and not width and pos + 7 <= len(data):
            height = int.from_bytes(data[pos + 3 : pos + 5], "big")
            width = int.from_bytes(data[pos + 5 : pos + 7], "big")
        pos += int.from_bytes(data[pos : pos + 2], "big")
    return scans, width, height


def _check_jpeg_scans(data: bytes, limits: IntakeLimits, deadline: float) -> None:
    scans, width, height = _jpeg_scans(data, deadline)
    if scans > MAX_JPEG_SCANS:
        raise Rejected(
            RejectReason.DECODE_ERROR,
            f"The JPEG image has more than {MAX_JPEG_SCANS} scans; encoders write at most "
            "a few dozen, and each scan costs a pass over the whole image.",
        )
    budget = int(JPEG_SCAN_PIXELS_PER_SECOND * limits.decode_timeout_s)
    if scans * width * height > budget:
        raise Rejected(
            RejectReason.DECODE_TIMEOUT,
            f"The JPEG image has {scans} scans of {width}x{height} pixels: decoding it means "
            f"{scans} passes over the image, more than the {limits.decode_timeout_s:g} s "
            f"budget allows ({budget} pixels in all).",
        )


def decode(
    data: bytes,
    limits: IntakeLimits,
    *,
    admit: Admit | None = None,
    draft: tuple[int, int] | None = None,
) -> DecodedImage:
    """Decode untrusted bytes into an RGB image, or raise :class:`Rejected`.

    Bad data never raises anything else. Animated images are represented by frame 0.
    ``admit(width, height, file_bytes)`` is called once the header has passed the checks
    and before any pixel buffer exists: a caller with a memory budget reserves the image
    there (and may wait). The wait does not count against the decode time budget.

    ``draft=(width, height)`` lets a JPEG be decoded at 1/2, 1/4 or 1/8 of its size (DCT
    scaling in libjpeg, Pillow's draft mode), the strongest reduction that keeps both sides
    at least the size given: several times faster for a large photo that a detector shrinks
    anyway, at the price of slightly different pixels. Other formats ignore it. Every check
    still applies to the size the header declares, which ``width`` and ``height`` report;
    ``draft_scale`` says how much smaller ``image`` is.
    """
    started = time.monotonic()
    file_bytes = len(data)
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
    deadline = started + limits.decode_timeout_s
    try:
        data, anomalies = _prepare(fmt, data, limits, deadline)
    except _DeadlineExceeded as exc:
        raise _timed_out(fmt, limits) from exc
    _raise_pillow_pixel_limit(limits.max_pixels)

    stream = _DeadlineStream(data, deadline)

    def header_passed(width: int, height: int) -> None:
        if admit is not None:
            waiting = time.monotonic()
            admit(width, height, file_bytes)
            stream.extend_deadline(time.monotonic() - waiting)

    try:
        decoded = _decode_stream(
            opener,
            stream,
            fmt,
            _mime(fmt, head),
            limits,
            header_passed=header_passed,
            draft=draft if fmt == "JPEG" else None,
        )
    except (Rejected, MemoryError):
        raise  # MemoryError: the worker ran short, not a verdict on the file; let it retry
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected(
            RejectReason.TOO_MANY_PIXELS,
            f"The image has more pixels than the {limits.max_pixels}-pixel limit ({exc}).",
        ) from exc
    except Exception as exc:  # whatever Pillow (or a plugin) refuses the data with
        if stream.expired:
            raise _timed_out(fmt, limits) from exc
        raise _classify_failure(fmt, data, exc) from exc
    return replace(decoded, anomalies=anomalies) if anomalies else decoded


def _timed_out(fmt: str, limits: IntakeLimits) -> Rejected:
    return Rejected(
        RejectReason.DECODE_TIMEOUT,
        f"Decoding the {fmt} image took longer than the {limits.decode_timeout_s:g} s budget.",
    )


def _prepare(
    fmt: str, data: bytes, limits: IntakeLimits, deadline: float
) -> tuple[bytes, tuple[str, ...]]:
    """Check, from the file's own structure, what the decoder would allocate or how much
    work it would do, before Pillow sees the file: the pixel limit bounds the image, but
    some fields make a decoder allocate or loop far beyond the image they describe.
    Returns the bytes to decode (a PNG without its damaged ancillary chunks) and what was
    stepped over. Raises :class:`Rejected`, or :class:`_DeadlineExceeded` from long walks."""
    if fmt == "PNG":
        return drop_damaged_png_chunks(data, deadline=deadline)
    canvas = None
    if fmt == "WEBP":
        canvas = _webp_canvas_size(data[:SNIFF_BYTES])
    elif fmt == "GIF":
        canvas = _gif_canvas_size(data, deadline)
    elif fmt == "TIFF":
        _check_tiff_layout(data, limits)
    elif fmt == "JPEG":
        _check_jpeg_scans(data, limits, deadline)
    if canvas is not None:
        _check_pixels(fmt, *canvas, limits)
    return data, ()


def _mime(fmt: str, head: bytes) -> str:
    if fmt == "HEIF" and _HEIC_BRANDS.intersection(_ftyp_brands(head)):
        return "image/heic"
    return _MIME_TYPES[fmt]


def _decode_stream(
    opener: _Opener,
    stream: _DeadlineStream,
    fmt: str,
    mime: str,
    limits: IntakeLimits,
    *,
    header_passed: Callable[[int, int], None],
    draft: tuple[int, int] | None = None,
) -> DecodedImage:
    with opener(stream, "") as source:
        width, height = source.size
        _check_pixels(fmt, width, height, limits)
        header_passed(width, height)
        frames = int(getattr(source, "n_frames", 1))
        if frames > 1:
            source.seek(0)
        draft_scale = 1
        # The mode stays the file's (None): only the scale changes, so the conversion
        # below is the exact path's. Pillow keeps both sides >= the size asked for.
        if draft is not None and (configured := source.draft(None, draft)) is not None:
            draft_scale = round(width / configured[1][2])
        source.load()
        # pillow-heif takes the size from the decoded data, which may differ from ispe.
        _check_pixels(fmt, *source.size, limits)
        stream.check_deadline()
        mode = source.mode
        # In place: a copy of every decoded image (what ``exif_transpose`` returns when
        # there is nothing to turn) was about a tenth of a scan's CPU, most of it the
        # kernel zeroing the copy's fresh pages.
        ImageOps.exif_transpose(source, in_place=True)
        rgb = _to_rgb(source)
        if rgb is source:
            # A plain image over the same pixels: the opened file's object would keep its
            # stream (the file's bytes) and its decoder's state (libwebp's, pillow-heif's)
            # alive for as long as the pixels, beyond what the memory budget reserves.
            rgb = source._new(source.im)
    stream.check_deadline()
    return DecodedImage(
        image=rgb,
        format=fmt,
        mime=mime,
        width=width,
        height=height,
        mode=mode,
        frames=frames,
        draft_scale=draft_scale,
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
