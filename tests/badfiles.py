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


def gif_frame_bomb() -> bytes:
    """A 16x16 GIF whose first frame claims 60000x60000: Pillow grows the canvas to the frame
    while opening and refuses it with its own DecompressionBombError."""
    screen = struct.pack("<HHBBB", 16, 16, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, 60_000, 60_000, 0) + b"\x02\x02\x4c\x01\x00"
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
