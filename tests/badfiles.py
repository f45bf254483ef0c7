"""Real bad files, made at test time, for any test that feeds files to intake.

``write_bad_files(folder)`` writes one file per kind of bad upload and returns
``{file name: the RejectReason intake must give it}`` (also available before writing as
``BAD_FILES``, for parametrising). Everything is built with Pillow or by hand with
``struct``/``zlib``, and stays small on disk: the "3 GiB" file is sparse, so copy the folder
with care (``shutil.copy`` would write it out in full).

Files that must be *accepted* despite a misleading name come from
``write_good_misnamed(folder)``. Paths that fail at the file-system level are separate,
because they are not files: ``make_unreadable`` (a directory named like an image; tests run
as root, for whom chmod 000 does not stop a read), ``make_fifo`` (a named pipe, which would
block a naive reader forever) and ``make_vanished`` (a path whose file was deleted).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

from PIL import Image

from workers.intake import RejectReason

SPARSE_SIZE = 3 * 1024**3

BAD_FILES: dict[str, RejectReason] = {
    "empty.jpg": RejectReason.EMPTY,
    "notes.jpg": RejectReason.NOT_AN_IMAGE,
    "truncated_half.jpg": RejectReason.TRUNCATED,
    "truncated.png": RejectReason.TRUNCATED,
    "pixel_bomb_50000x50000.png": RejectReason.TOO_MANY_PIXELS,
    "gif_frame_bomb.gif": RejectReason.TOO_MANY_PIXELS,
    "document.pdf": RejectReason.UNSUPPORTED_FORMAT,
    "drawing.svg": RejectReason.UNSUPPORTED_FORMAT,
    "favicon.ico": RejectReason.UNSUPPORTED_FORMAT,
    "garbage_after_jpeg_magic.jpg": RejectReason.DECODE_ERROR,
    "huge_sparse.jpg": RejectReason.TOO_LARGE,
    "tiff_tile_bomb.tif": RejectReason.TOO_MANY_PIXELS,
    "jpeg_scan_flood.jpg": RejectReason.DECODE_ERROR,
}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sample_picture(size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A deterministic RGB picture with detail everywhere, so any cut lands in image data."""
    mandelbrot = Image.effect_mandelbrot(size, (-2.0, -1.2, 0.8, 1.2), 64)
    gradient = Image.linear_gradient("L").resize(size)
    return Image.merge(
        "RGB", (mandelbrot, gradient, gradient.transpose(Image.Transpose.ROTATE_180))
    )


def encode(image: Image.Image, image_format: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def pixel_bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` 1-bit pixels (312 MB of rows for the
    default) with only the first rows' data: intake must refuse it from the header alone."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    first_rows = (b"\x00" + b"\x00" * ((width + 7) // 8)) * 8
    return (
        _PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(first_rows, 9))
        + png_chunk(b"IEND", b"")
    )


def gif_frame_bomb(frame_size: tuple[int, int] = (60_000, 60_000)) -> bytes:
    """A 16x16 GIF whose first frame claims ``frame_size``: Pillow grows the canvas to the
    frame while opening it, so intake checks the grown canvas first."""
    screen = struct.pack("<HHBBB", 16, 16, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, *frame_size, 0) + b"\x02\x02\x4c\x01\x00"
    return b"GIF89a" + screen + frame + b";"


def write_bad_files(folder: Path) -> dict[str, RejectReason]:
    """Write every file of ``BAD_FILES`` into ``folder``; return name -> expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = sample_picture()
    jpeg = encode(picture, "JPEG", quality=90)
    png = encode(picture, "PNG")
    contents = {
        "empty.jpg": b"",
        "notes.jpg": b"Meeting notes: this is text that someone named .jpg\n" * 4,
        "truncated_half.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "pixel_bomb_50000x50000.png": pixel_bomb_png(),
        "gif_frame_bomb.gif": gif_frame_bomb(),
        "document.pdf": encode(picture, "PDF"),
        "drawing.svg": (
            b'<?xml version="1.0" encoding="UTF-8"?>\n'
            b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
            b'<circle cx="32" cy="32" r="30" fill="teal"/></svg>\n'
        ),
        "favicon.ico": encode(picture, "ICO", sizes=[(32, 32)]),
        # Starts and ends like a JPEG (SOI ... EOI), nothing valid in between.
        "garbage_after_jpeg_magic.jpg": b"\xff\xd8\xff" + b"not JPEG segments " * 64 + b"\xff\xd9",
        "tiff_tile_bomb.tif": tiff_tile_bomb(),
        "jpeg_scan_flood.jpg": jpeg_with_extra_scans((64, 48), 600),
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    with (folder / "huge_sparse.jpg").open("wb") as sparse:
        sparse.write(jpeg[:1024])
        sparse.truncate(SPARSE_SIZE)
    assert set(contents) | {"huge_sparse.jpg"} == set(BAD_FILES)
    return dict(BAD_FILES)


def write_good_misnamed(folder: Path) -> list[Path]:
    """Real images whose extension names another format; intake must accept them all
    (it goes by content). Each name says what the content really is."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = sample_picture()
    files = {
        "really_png.jpg": encode(picture, "PNG"),
        "really_jpeg.png": encode(picture, "JPEG"),
        "really_webp.gif": encode(picture, "WEBP"),
        "really_gif.txt": encode(picture.convert("P"), "GIF"),
    }
    paths = []
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def make_unreadable(folder: Path) -> Path:
    """A directory named ``unreadable.jpg``: fails to read even for root (-> UNREADABLE)."""
    path = folder / "unreadable.jpg"
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_fifo(folder: Path) -> Path:
    """A named pipe ``pipe.jpg`` with no writer (-> UNREADABLE, without blocking)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipe.jpg"
    os.mkfifo(path)
    return path


def make_vanished(folder: Path) -> Path:
    """The path of a real JPEG that was deleted after it was listed (-> MISSING)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vanished.jpg"
    path.write_bytes(encode(sample_picture(), "JPEG"))
    path.unlink()
    return path


# --- files that make a decoder allocate or work far beyond the image they describe ------


def tiff_tile_bomb(
    tile: tuple[int, int] = (16384, 16384), size: tuple[int, int] = (64, 64)
) -> bytes:
    """A ~150-byte deflate-compressed RGB TIFF of ``size`` pixels whose one tile is declared
    ``tile`` pixels: libtiff allocates the whole tile (768 MiB for the default) before the
    data proves too short."""
    payload = zlib.compress(b"\x00" * 1024)
    entries = [
        (256, 4, size[0]),  # ImageWidth
        (257, 4, size[1]),  # ImageLength
        (258, 3, 8),  # BitsPerSample
        (259, 3, 8),  # Compression: deflate
        (262, 3, 2),  # PhotometricInterpretation: RGB
        (277, 3, 3),  # SamplesPerPixel
        (322, 4, tile[0]),  # TileWidth
        (323, 4, tile[1]),  # TileLength
        (324, 4, 0),  # TileOffsets: filled in below
        (325, 4, len(payload)),  # TileByteCounts
    ]
    return _tiff(entries, payload, offsets_tag=324)


def tiff_in_one_tile(image: Image.Image, tile: int) -> bytes:
    """An uncompressed RGB TIFF holding ``image`` in one ``tile`` x ``tile`` tile (tiles
    larger than the image are normal; Pillow cannot write tiled TIFF itself)."""
    canvas = Image.new("RGB", (tile, tile))
    canvas.paste(image.convert("RGB"))
    entries = [
        (256, 4, image.width),
        (257, 4, image.height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 2),
        (277, 3, 3),
        (322, 4, tile),
        (323, 4, tile),
    ]
    return _tiff(entries, canvas.tobytes(), offsets_tag=324)


def tiff_listing_strips(listed: int, size: tuple[int, int] = (64, 64)) -> bytes:
    """An uncompressed greyscale TIFF with one strip of ``size`` pixels that lists
    ``listed`` strips (all pointing at the same data): Pillow builds an object per strip."""
    width, height = size
    pixels = bytes(range(256)) * (width * height // 256 + 1)
    pixels = pixels[: width * height]
    entries = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),  # no compression
        (262, 3, 1),  # BlackIsZero
        (277, 3, 1),
        (278, 4, height),  # RowsPerStrip: the whole image in one strip
    ]
    return _tiff(entries, pixels, offsets_tag=273, listed=listed)


def _tiff(
    entries: list[tuple[int, int, int]], payload: bytes, *, offsets_tag: int, listed: int = 1
) -> bytes:
    """Little-endian TIFF: header, one IFD (``entries`` plus the offsets and, for strips,
    byte counts of ``listed`` copies of ``payload``'s place), then the arrays and payload."""
    entries = list(entries)
    count_tag = offsets_tag + 1
    fixed = [e for e in entries if e[0] not in (offsets_tag, count_tag)]
    ifd_size = 2 + 12 * (len(fixed) + 2) + 4
    arrays_at = 8 + ifd_size
    payload_at = arrays_at + (8 * listed if listed > 1 else 0)
    declared_count = next((e[2] for e in entries if e[0] == count_tag), len(payload))
    if listed > 1:
        offsets_value, counts_value = arrays_at, arrays_at + 4 * listed
        arrays = struct.pack(f"<{listed}I", *[payload_at] * listed)
        arrays += struct.pack(f"<{listed}I", *[declared_count] * listed)
    else:
        offsets_value, counts_value, arrays = payload_at, declared_count, b""
    all_entries = [(t, k, v, 1) for t, k, v in fixed]
    all_entries += [(offsets_tag, 4, offsets_value, listed), (count_tag, 4, counts_value, listed)]
    all_entries.sort()
    ifd = struct.pack("<H", len(all_entries))
    for tag, kind, value, count in all_entries:
        field = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + field
    ifd += b"\x00\x00\x00\x00"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + arrays + payload


def jpeg_with_extra_scans(
    size: tuple[int, int], extra_scans: int, color: tuple[int, int, int] = (90, 120, 200)
) -> bytes:
    """A flat-coloured progressive JPEG followed by ``extra_scans`` more scans, each a
    refinement pass whose few bytes (end-of-band runs) still make the decoder walk every
    block of the image: the work grows with scans x pixels, not with the file size. The
    picture is unchanged (a flat image has no AC coefficients to refine)."""
    progressive = encode(Image.new("RGB", size, color), "JPEG", progressive=True, subsampling=0)
    end = progressive.rindex(b"\xff\xd9")
    # AC table 3 with one 1-bit code: symbol 0xE0, an end-of-band run of 2^14 + 14 bits.
    table = b"\xff\xc4" + struct.pack(">HB", 20, 0x13) + bytes([1] + [0] * 15) + b"\xe0"
    blocks = -(-size[0] // 8) * -(-size[1] // 8)
    bits = ("0" + "1" * 14) * -(-blocks // 32767)
    bits += "1" * (-len(bits) % 8)
    entropy = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
    entropy = entropy.replace(b"\xff", b"\xff\x00")
    scans = b"".join(
        b"\xff\xda" + struct.pack(">HB", 8, 1) + bytes([1 + n % 3, 0x03, 1, 63, 0x10]) + entropy
        for n in range(extra_scans)
    )
    return progressive[:end] + table + scans + b"\xff\xd9"


def png_chunks(png: bytes) -> list[bytes]:
    """The chunks of a well-formed PNG, each framed (length, type, data, CRC)."""
    chunks, pos = [], len(_PNG_SIGNATURE)
    while pos < len(png):
        end = pos + 12 + int.from_bytes(png[pos : pos + 4], "big")
        chunks.append(png[pos:end])
        pos = end
    return chunks


def png_inserting(png: bytes, extra: list[bytes], *, before: bytes = b"IDAT") -> bytes:
    """``png`` with the framed ``extra`` chunks placed before its first ``before`` chunk."""
    chunks = png_chunks(png)
    at = next(i for i, chunk in enumerate(chunks) if chunk[4:8] == before)
    return _PNG_SIGNATURE + b"".join(chunks[:at] + extra + chunks[at:])


def with_bad_crc(chunk: bytes) -> bytes:
    return chunk[:-4] + struct.pack(">I", (zlib.crc32(chunk[4:-4]) ^ 0xFFFFFFFF) & 0xFFFFFFFF)


def inflation_bomb(kind: bytes, size: int = 2 * 1024 * 1024) -> bytes:
    """A framed zTXt, iTXt (compressed) or iCCP chunk whose ~2 KiB inflate to ``size``."""
    squeezed = zlib.compress(b"\x00" * size, 9)
    header = {
        b"zTXt": b"Comment\x00\x00",
        b"iTXt": b"Comment\x00\x01\x00\x00\x00",
        b"iCCP": b"ICC Profile\x00\x00",
    }[kind]
    return png_chunk(kind, header + squeezed)
