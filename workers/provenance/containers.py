"""Metadata blocks of an image file, read from its container structure with bounded work.

PNG chunks (``tEXt``, ``zTXt``, ``iTXt``, ``eXIf``, ``caBX``), JPEG segments (APP1 Exif and
XMP, APP11 JUMBF, COM) and WebP chunks (``EXIF``, ``XMP ``, ``C2PA``) are walked by length
without decoding pixels. Compressed text is inflated with a per-chunk and a per-file cap, so
a zip bomb in a ``zTXt`` chunk costs at most the cap. Other formats get XMP packet
scanning only. A broken structure ends the walk: what was read before it is kept and the
break is reported.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from workers.provenance.findings import Report, clip, error_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
XMP_JPEG_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
XMP_PNG_KEYWORD = "XML:com.adobe.xmp"

# Largest text taken from one chunk after inflating, and from one file in total.
MAX_CHUNK_TEXT_BYTES = 2 * 1024 * 1024
MAX_FILE_TEXT_BYTES = 8 * 1024 * 1024
MAX_TEXT_ENTRIES = 256
MAX_XMP_BYTES = 2 * 1024 * 1024
MAX_EXIF_BYTES = 1024 * 1024

_EXIF_IFD = 0x8769
_IMAGE_DESCRIPTION = 0x010E
_MAKE = 0x010F
_MODEL = 0x0110
_SOFTWARE = 0x0131
_USER_COMMENT = 0x9286
_MAKER_NOTE = 0x927C
_ORIENTATION = 0x0112


@dataclass(frozen=True)
class TextEntry:
    """A keyword/text pair: a PNG text chunk, a JPEG comment or an EXIF text field."""

    keyword: str
    text: str
    source: str  # "tEXt", "zTXt", "iTXt", "COM", "exif"
    truncated: bool = False  # cut at the text cap, or its compressed stream ends early
    damaged: bool = False  # its chunk fails its CRC check

    @property
    def intact(self) -> bool:
        """Neither damaged nor truncated: preferred to another entry of the same keyword,
        so a broken chunk added to a file cannot hide the settings it holds."""
        return not (self.damaged or self.truncated)


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    color_type: int

    @property
    def has_alpha(self) -> bool:
        return self.color_type in (4, 6)


@dataclass
class ContainerMetadata:
    """What the container holds besides pixels."""

    format: str | None
    texts: list[TextEntry] = field(default_factory=list)
    xmp_packets: list[bytes] = field(default_factory=list)
    exif: bytes | None = None
    # An embedded C2PA manifest store (PNG caBX, JPEG APP11 JUMBF, WebP C2PA chunk).
    c2pa_store: bool = False
    png_header: PngHeader | None = None
    # The structure could not be walked to its end (what was read before is kept).
    broken: bool = False
    texts_dropped: int = 0  # text blocks beyond MAX_TEXT_ENTRIES

    def text(self, keyword: str) -> TextEntry | None:
        for entry in self.texts:
            if entry.keyword == keyword:
                return entry
        return None


class _TextBudget:
    """Bytes of text still allowed for this file: one budget for text stored as is and one
    for inflated text, so a zip bomb cannot hide the plain chunks that follow it."""

    def __init__(self) -> None:
        self.remaining = MAX_FILE_TEXT_BYTES


class _TextBudgets:
    def __init__(self) -> None:
        self.plain = _TextBudget()
        self.inflated = _TextBudget()


def read_container(raw: bytes, fmt: str | None, report: Report) -> ContainerMetadata:
    """Walk the file's metadata blocks. Never raises on bad data: problems go to ``report``."""
    meta = ContainerMetadata(format=fmt)
    try:
        if fmt == "PNG":
            _walk_png(raw, meta, report)
        elif fmt == "JPEG":
            _walk_jpeg(raw, meta, report)
        elif fmt == "WEBP":
            _walk_webp(raw, meta, report)
    except Exception as exc:  # a parser bug must not cost the other signals
        meta.broken = True
        report.error(f"{fmt} metadata could not be walked: {error_text(exc)}")
    if meta.texts_dropped:
        report.error(
            f"{meta.texts_dropped} text blocks beyond the first {MAX_TEXT_ENTRIES} ignored"
        )
    if not meta.xmp_packets and (meta.broken or fmt not in ("PNG", "JPEG", "WEBP")):
        packet = scan_xmp_packet(raw)
        if packet is not None:
            meta.xmp_packets.append(packet)
    return meta


# ---------------------------------------------------------------------------------------- PNG


def _walk_png(raw: bytes, meta: ContainerMetadata, report: Report) -> None:
    if not raw.startswith(PNG_SIGNATURE):
        meta.broken = True
        report.error("PNG signature missing")
        return
    budgets = _TextBudgets()
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(raw):
        length = int.from_bytes(raw[pos : pos + 4], "big")
        kind = raw[pos + 4 : pos + 8]
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > len(raw):
            meta.broken = True
            report.error(
                f"PNG chunk {kind.decode('latin-1')!r} at offset {pos} runs past the end of "
                "the file; chunks after it were not read"
            )
            return
        body = raw[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and length >= 13:
            meta.png_header = PngHeader(
                width=int.from_bytes(body[0:4], "big"),
                height=int.from_bytes(body[4:8], "big"),
                bit_depth=body[8],
                color_type=body[9],
            )
        elif kind in (b"tEXt", b"zTXt", b"iTXt"):
            damaged = zlib.crc32(kind + body) != int.from_bytes(raw[end - 4 : end], "big")
            if damaged:
                report.error(
                    f"PNG {kind.decode()} chunk at offset {pos} fails its CRC check; read anyway"
                )
            _png_text_chunk(kind.decode(), body, meta, budgets, report, damaged=damaged)
        elif kind == b"eXIf":
            meta.exif = body[:MAX_EXIF_BYTES]
        elif kind == b"caBX":
            meta.c2pa_store = True
        elif kind == b"IEND":
            return
        pos = end
    meta.broken = True
    report.error("PNG ends before its IEND chunk")


def _png_text_chunk(
    name: str,
    body: bytes,
    meta: ContainerMetadata,
    budgets: _TextBudgets,
    report: Report,
    *,
    damaged: bool,
) -> None:
    if len(meta.texts) >= MAX_TEXT_ENTRIES:
        meta.texts_dropped += 1
        return
    entry = _png_text(name, body, budgets, report)
    if entry is None:
        return
    if damaged:
        entry = replace(entry, damaged=True)
    if entry.keyword == XMP_PNG_KEYWORD:
        meta.xmp_packets.append(entry.text.encode("utf-8"))
    else:
        meta.texts.append(entry)


def _png_text(name: str, body: bytes, budgets: _TextBudgets, report: Report) -> TextEntry | None:
    keyword_raw, sep, rest = body.partition(b"\x00")
    if not sep or not 1 <= len(keyword_raw) <= 79:
        report.error(f"PNG {name} chunk has no valid keyword; skipped")
        return None
    keyword = keyword_raw.decode("latin-1")
    try:
        if name == "tEXt":
            data, truncated = _take(rest, budgets.plain)
            return TextEntry(keyword, data.decode("latin-1"), name, truncated)
        if name == "zTXt":
            if not rest or rest[0] != 0:
                raise ValueError("unknown compression method")
            data, truncated = _inflate_text(rest[1:], budgets.inflated, name, keyword, report)
            return TextEntry(keyword, data.decode("latin-1"), name, truncated)
        # iTXt: compression flag, method, language tag NUL, translated keyword NUL, text.
        if len(rest) < 2:
            raise ValueError("header is cut short")
        compressed, method = rest[0], rest[1]
        _language, sep1, rest = rest[2:].partition(b"\x00")
        _translated, sep2, text = rest.partition(b"\x00")
        if not (sep1 and sep2):
            raise ValueError("language tag or translated keyword is not terminated")
        if compressed:
            if method != 0:
                raise ValueError("unknown compression method")
            data, truncated = _inflate_text(text, budgets.inflated, name, keyword, report)
        else:
            data, truncated = _take(text, budgets.plain)
        return TextEntry(keyword, data.decode("utf-8", errors="replace"), name, truncated)
    except (ValueError, zlib.error) as exc:
        report.error(f"PNG {name} chunk {clip(keyword, 80)!r} could not be read: {exc}")
        return None


def _inflate_text(
    data: bytes, budget: _TextBudget, name: str, keyword: str, report: Report
) -> tuple[bytes, bool]:
    if budget.remaining <= 0:
        report.error(
            f"PNG {name} chunk {clip(keyword, 80)!r} not read: the file's "
            f"{MAX_FILE_TEXT_BYTES}-byte budget for inflated text is used up"
        )
        return b"", True
    out, capped, complete = inflate(data, budget)
    if capped:
        report.error(
            f"PNG {name} chunk {clip(keyword, 80)!r} inflates past the "
            f"{MAX_CHUNK_TEXT_BYTES}-byte text cap (or what is left of the file's budget); "
            "cut there"
        )
    elif not complete:
        report.error(f"PNG {name} chunk {clip(keyword, 80)!r} has a cut-short compressed stream")
    return out, capped or not complete


def _take(data: bytes, budget: _TextBudget) -> tuple[bytes, bool]:
    limit = min(MAX_CHUNK_TEXT_BYTES, budget.remaining)
    budget.remaining -= min(len(data), limit)
    return data[:limit], len(data) > limit


def inflate(
    data: bytes, budget: _TextBudget | None = None, *, wbits: int = 15
) -> tuple[bytes, bool, bool]:
    """zlib-inflate at most the chunk cap (and what is left of the file's budget).

    Returns the bytes, whether the output was cut at the cap, and whether the compressed
    stream was complete. ``wbits=31`` reads gzip. The work is bounded by the cap whatever
    the compression ratio, which is what makes a zip bomb harmless here.
    """
    limit = MAX_CHUNK_TEXT_BYTES if budget is None else min(MAX_CHUNK_TEXT_BYTES, budget.remaining)
    if limit <= 0:
        return b"", True, False
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(data, limit)
    capped = bool(inflater.unconsumed_tail) or (len(out) >= limit and not inflater.eof)
    if budget is not None:
        budget.remaining -= len(out)
    return out, capped, inflater.eof


# --------------------------------------------------------------------------------------- JPEG


def _walk_jpeg(raw: bytes, meta: ContainerMetadata, report: Report) -> None:
    budget = _TextBudget()
    pos = 2
    while pos + 4 <= len(raw):
        if raw[pos] != 0xFF:
            meta.broken = True
            report.error(f"JPEG segment marker expected at offset {pos}; later segments not read")
            return
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no metadata after this
            return
        length = int.from_bytes(raw[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > len(raw):
            meta.broken = True
            report.error(f"JPEG segment 0x{marker:02X} at offset {pos} runs past the end")
            return
        _jpeg_segment(marker, raw[pos + 4 : end], meta, budget)
        pos = end


def _jpeg_segment(marker: int, body: bytes, meta: ContainerMetadata, budget: _TextBudget) -> None:
    if marker == 0xE1:
        if body.startswith(b"Exif\x00\x00") and meta.exif is None:
            meta.exif = body
        elif body.startswith(XMP_JPEG_PREFIX):
            meta.xmp_packets.append(body[len(XMP_JPEG_PREFIX) :][:MAX_XMP_BYTES])
    elif marker == 0xEB:
        # APP11 carries JUMBF boxes ("JP" common identifier); C2PA stores live there.
        if body.startswith(b"JP") and b"jumb" in body[:64]:
            meta.c2pa_store = True
    elif marker == 0xFE:
        if len(meta.texts) >= MAX_TEXT_ENTRIES:
            meta.texts_dropped += 1
            return
        data, truncated = _take(body, budget)
        meta.texts.append(
            TextEntry("comment", data.decode("utf-8", errors="replace"), "COM", truncated)
        )


# --------------------------------------------------------------------------------------- WebP


def _walk_webp(raw: bytes, meta: ContainerMetadata, report: Report) -> None:
    end_of_riff = min(len(raw), 8 + int.from_bytes(raw[4:8], "little"))
    pos = 12
    while pos + 8 <= end_of_riff:
        fourcc = raw[pos : pos + 4]
        size = int.from_bytes(raw[pos + 4 : pos + 8], "little")
        end = pos + 8 + size
        if end > len(raw):
            meta.broken = True
            report.error(f"WebP chunk {fourcc!r} at offset {pos} runs past the end of the file")
            return
        body = raw[pos + 8 : end]
        if fourcc == b"EXIF":
            meta.exif = body[:MAX_EXIF_BYTES]
        elif fourcc == b"XMP ":
            meta.xmp_packets.append(body[:MAX_XMP_BYTES])
        elif fourcc == b"C2PA":
            meta.c2pa_store = True
        pos = end + (size & 1)


# ---------------------------------------------------------------------------------------- XMP


def scan_xmp_packet(raw: bytes) -> bytes | None:
    """The first ``<x:xmpmeta>`` element found in the bytes (XMP packet scanning, the XMP
    specification's fallback for containers we do not walk)."""
    start = raw.find(b"<x:xmpmeta")
    if start < 0:
        return None
    end = raw.find(b"</x:xmpmeta>", start, start + MAX_XMP_BYTES)
    if end < 0:
        return raw[start : start + MAX_XMP_BYTES]
    return raw[start : end + len(b"</x:xmpmeta>")]


# --------------------------------------------------------------------------------------- EXIF


@dataclass(frozen=True)
class ExifText:
    """The EXIF fields that can name a generator."""

    software: str | None = None
    make: str | None = None
    model: str | None = None
    image_description: str | None = None
    user_comment: str | None = None
    maker_note: str | None = None
    orientation: int | None = None


def read_exif_text(exif: bytes, report: Report) -> ExifText:
    """Text fields of an EXIF block (TIFF structure, with or without the ``Exif\\0\\0``
    prefix). UserComment and MakerNote are read from IFD0 as well as the Exif IFD: some
    generators write them there.

    A small bounds-checked IFD reader rather than Pillow's: Pillow reports corrupt EXIF
    through the process-wide warnings machinery, which a worker thread cannot scope."""
    tiff = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
    tiff = tiff[:MAX_EXIF_BYTES]
    try:
        order = _tiff_byte_order(tiff)
        ifd0 = _read_ifd(tiff, int.from_bytes(tiff[4:8], order), order)
        pointer = ifd0.get(_EXIF_IFD)
        sub = _read_ifd(tiff, pointer, order) if isinstance(pointer, int) else {}
    except ValueError as exc:
        report.error(f"EXIF block could not be read: {exc}")
        return ExifText()

    def pick(tag: int) -> int | bytes | None:
        return sub.get(tag, ifd0.get(tag))

    orientation = ifd0.get(_ORIENTATION)
    return ExifText(
        software=_exif_string(ifd0.get(_SOFTWARE)),
        make=_exif_string(ifd0.get(_MAKE)),
        model=_exif_string(ifd0.get(_MODEL)),
        image_description=_exif_string(ifd0.get(_IMAGE_DESCRIPTION)),
        user_comment=decode_user_comment(pick(_USER_COMMENT)),
        maker_note=_exif_string(pick(_MAKER_NOTE), limit=200),
        orientation=orientation if isinstance(orientation, int) else None,
    )


_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
_WANTED_TAGS = frozenset(
    {
        _IMAGE_DESCRIPTION,
        _MAKE,
        _MODEL,
        _SOFTWARE,
        _ORIENTATION,
        _EXIF_IFD,
        _USER_COMMENT,
        _MAKER_NOTE,
    }
)
MAX_IFD_ENTRIES = 1024


def _tiff_byte_order(tiff: bytes) -> Literal["little", "big"]:
    if tiff[:4] == b"II*\x00":
        return "little"
    if tiff[:4] == b"MM\x00*":
        return "big"
    raise ValueError(f"not a TIFF header ({tiff[:4]!r})")


def _read_ifd(tiff: bytes, offset: int, order: Literal["little", "big"]) -> dict[int, int | bytes]:
    """The wanted tags of one IFD: integers for single SHORT/LONG values, bytes otherwise."""
    if not 8 <= offset <= len(tiff) - 2:
        raise ValueError(f"IFD offset {offset} is outside the {len(tiff)}-byte block")
    count = int.from_bytes(tiff[offset : offset + 2], order)
    if count > MAX_IFD_ENTRIES or offset + 2 + 12 * count > len(tiff):
        raise ValueError(f"IFD at {offset} declares {count} entries that do not fit")
    values: dict[int, int | bytes] = {}
    for index in range(count):
        entry = tiff[offset + 2 + 12 * index : offset + 14 + 12 * index]
        tag = int.from_bytes(entry[0:2], order)
        kind = int.from_bytes(entry[2:4], order)
        length = int.from_bytes(entry[4:8], order) * _TIFF_TYPE_SIZES.get(kind, 1)
        if tag not in _WANTED_TAGS:
            continue
        if length <= 4:
            data = entry[8 : 8 + length]
        else:
            start = int.from_bytes(entry[8:12], order)
            if start + length > len(tiff):
                raise ValueError(f"EXIF tag 0x{tag:04X} points past the end of the block")
            data = tiff[start : start + length]
        if kind in (3, 4) and length == _TIFF_TYPE_SIZES[kind]:
            values[tag] = int.from_bytes(data, order)
        else:
            values[tag] = data
    return values


def _exif_string(value: Any, limit: int = MAX_CHUNK_TEXT_BYTES) -> str | None:
    if isinstance(value, bytes):
        value = value[:limit].decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    value = value.rstrip("\x00").strip()
    return value[:limit] or None


def decode_user_comment(value: Any) -> str | None:
    """EXIF UserComment: 8 bytes naming the character code, then the text.

    A1111 (through piexif) writes ``UNICODE\\0`` followed by UTF-16 big-endian; other
    writers use little-endian, so the byte order is taken from where the zero bytes are.
    """
    if isinstance(value, str):
        return _exif_string(value)
    if not isinstance(value, bytes) or not value:
        return None
    value = value[:MAX_CHUNK_TEXT_BYTES]
    prefix, body = value[:8], value[8:]
    if prefix == b"UNICODE\x00":
        if body.startswith((b"\xfe\xff", b"\xff\xfe")):
            text = body.decode("utf-16", errors="replace")
        else:
            little = len(body) >= 2 and body[1] == 0 and body[0] != 0
            text = body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    elif prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        text = body.decode("utf-8", errors="replace")
    elif prefix.startswith(b"JIS"):
        text = body.decode("shift_jis", errors="replace")
    else:
        text = value.decode("utf-8", errors="replace")
    return _exif_string(text)
