"""The pictures a moderator sees: an image's original bytes, found again from where they
were seen, decoded under the intake limits and re-encoded as a plain JPEG.

The dashboard never links to a bucket: it serves the bytes this module renders. A render
is a fresh JPEG from decoded pixels, so nothing of the file's own structure (metadata,
embedded thumbnails, colour profiles, trailing data) reaches the moderator's browser, and
the decode is the intake's, with the same byte, pixel and time limits: a file that the
intake would refuse is refused here too. Renders are addressed by the image's sha256 and
the variant, so they never change once made and are kept in a bounded on-disk cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import Source, SourceKind
from workers.budget import DEFAULT_MEMORY_BUDGET, MemoryBudget, reserving
from workers.fleet import fetch_object
from workers.intake import Admit, IntakeLimits, Rejected, decode, read_local
from workers.objects import ObjectStore
from workers.scoring import TransientError

log = logging.getLogger(__name__)

NO_READABLE_COPY = "no stored copy of these bytes is readable"

THUMBNAIL_QUALITY = 80
# The full view is where a moderator looks for generation artefacts: keep fine detail and
# full colour resolution (no chroma subsampling).
DISPLAY_QUALITY = 92


class MediaUnavailable(Exception):
    """An image that cannot be shown: ``reason`` is a short sentence for the page.

    ``transient`` is True when a copy could not be read for a reason that may pass (the
    object store unreachable): asking again later may succeed, so the page may say so and
    the HTTP layer may answer 503 rather than 404.
    """

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


# --- the original bytes -----------------------------------------------------------------


@dataclass(frozen=True)
class _Copy:
    """One place the image's bytes were seen, as plain values read inside the session."""

    source_id: int
    stored: repository.StoredObject | None  # a bucket object
    local_path: Path | None  # a file the CLI scanned


def _local_path(source: Source) -> Path | None:
    """The exact path of a scanned file. ``local_path`` is printable text, which loses the
    bytes of a name that is not UTF-8; the scan keeps those bytes in ``ref_key``
    (``base64:<path bytes>@<sha256>``, see ``workers.names.identity``)."""
    if source.local_path is None:
        return None
    if source.kind == SourceKind.CLI and source.ref_key.startswith("base64:"):
        encoded = source.ref_key.removeprefix("base64:").rsplit("@", 1)[0]
        with suppress(binascii.Error, ValueError):
            return Path(os.fsdecode(base64.b64decode(encoded, validate=True)))
    return Path(source.local_path)


def _copies(sources: list[Source]) -> list[_Copy]:
    """The copies worth trying, the most recently seen first: the place that delivered
    these bytes last is the likeliest still to hold them."""
    newest_first = sorted(sources, key=lambda s: (s.last_seen_at, s.id), reverse=True)
    copies = []
    for source in newest_first:
        stored = None
        if source.bucket is not None and source.object_key is not None:
            stored = repository.StoredObject(
                source_id=source.id,
                bucket=source.bucket,
                key=source.object_key,
                version_id=source.version_id,
                status=source.status,
            )
        local = _local_path(source)
        if stored is not None or local is not None:
            copies.append(_Copy(source.id, stored, local))
    return copies


def fetch_original(
    session_factory: sessionmaker[Session],
    store: ObjectStore | None,
    image_id: int,
    limits: IntakeLimits,
) -> bytes:
    """The image's original bytes, from the first of its copies that still holds them.

    The sources are read in one short session; the copies are read after it has closed
    (a slow store holds no connection). Bucket objects are read through ``store`` as the
    fleet reads them (``store`` None: they are skipped), scanned files as the scan reads
    them; both stop at ``limits.max_bytes``. A copy counts only when its sha256 is the
    image's: a file changed since it was scanned is another picture, and a path or key
    that now names other bytes can show nothing but these.
    """
    with session_factory() as session:
        image = repository.get_image(session, image_id)
        if image is None:
            raise MediaUnavailable("no such image")
        sha256, size_bytes = image.sha256, image.size_bytes
        copies = _copies(list(repository.sources_for_image(session, image_id)))
    if size_bytes > limits.max_bytes:
        raise MediaUnavailable(
            f"the original is {size_bytes} bytes, over the {limits.max_bytes}-byte limit"
        )
    if not copies:
        raise MediaUnavailable("no copy of these bytes was recorded")
    transient = False
    for copy in copies:
        try:
            data = _read_copy(copy, store, limits)
        except TransientError as exc:
            transient = True
            _log_unusable(image_id, copy, str(exc))
            continue
        except (Rejected, OSError) as exc:
            _log_unusable(image_id, copy, str(exc))
            continue
        if data is None:
            continue
        if hashlib.sha256(data).hexdigest() != sha256:
            _log_unusable(image_id, copy, "its bytes changed since they were seen")
            continue
        return data
    raise MediaUnavailable(NO_READABLE_COPY, transient=transient)


def _read_copy(copy: _Copy, store: ObjectStore | None, limits: IntakeLimits) -> bytes | None:
    if copy.stored is not None:
        if store is None:
            return None
        return fetch_object(store, copy.stored, limits)
    assert copy.local_path is not None
    return read_local(copy.local_path, limits)


def _log_unusable(image_id: int, copy: _Copy, why: str) -> None:
    log.info(
        "stored copy not usable",
        extra={"image_id": image_id, "source_id": copy.source_id, "why": why},
    )


# --- rendering --------------------------------------------------------------------------


def render(
    data: bytes,
    limits: IntakeLimits,
    max_side: int,
    *,
    quality: int = 85,
    admit: Admit | None = None,
) -> bytes:
    """A baseline RGB JPEG of the picture in ``data``, upright, scaled down to fit
    ``max_side`` (never up), with no metadata.

    The decode is the intake's (``workers.intake.decode``): the same byte and pixel limits,
    checked from the header before any pixel buffer exists, and the same time budget. Its
    refusal becomes :class:`MediaUnavailable` with the refusal's sentence. Colour profiles
    are dropped with the rest of the metadata: the pixels are shown as stored. From
    ``quality`` 90 up, colour keeps full resolution (no chroma subsampling), for close
    inspection.
    """
    if max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    try:
        decoded = decode(data, limits, admit=admit)
    except Rejected as exc:
        raise MediaUnavailable(exc.message) from exc
    picture = decoded.image
    if max(picture.size) > max_side:
        picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    picture.info.clear()
    buffer = io.BytesIO()
    picture.save(
        buffer,
        "JPEG",
        quality=quality,
        optimize=True,
        subsampling=0 if quality >= 90 else 2,
    )
    return buffer.getvalue()


# --- the cache --------------------------------------------------------------------------

_CACHE_KEY = re.compile(r"[0-9a-f]{64}-[a-z0-9]{1,32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PARTIAL = ".partial-"
# A temporary file this old was left by a writer that died: no write takes this long.
_ABANDONED_AFTER_S = 3600.0


class MediaCache:
    """Renders on disk under ``root``, at most ``max_bytes`` of them, the least recently
    used removed first.

    One file per key, named by the key: keys are ``<sha256>-<variant>`` (lowercase hex, a
    variant of at most 32 lowercase letters and digits), and anything else is refused, so
    no key can name a path outside ``root``. A write goes to a temporary file that
    replaces the entry at once: a reader sees a whole entry or none. A file's modification
    time is its last use (set on every write and hit), and each write trims the folder
    back under ``max_bytes``. Several threads may share one cache, and several processes
    one folder: an entry removed by another process is a miss, never an error; each
    process trims what it finds.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the media cache size must be positive, got {max_bytes}")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.max_bytes = max_bytes
        self._trimming = threading.Lock()
        self._clock_lock = threading.Lock()
        self._clock = 0

    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not _CACHE_KEY.fullmatch(key):
            raise ValueError(f"{key!r} is not a media cache key (<sha256>-<variant>)")
        return self.root / key

    def _tick(self) -> int:
        """Now in nanoseconds, strictly later than any earlier tick of this cache: uses in
        quick succession keep their order (file times from the kernel are coarser)."""
        with self._clock_lock:
            self._clock = max(time.time_ns(), self._clock + 1)
            return self._clock

    def get(self, key: str) -> bytes | None:
        """The entry's bytes, or None when there is none; a hit marks it used."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        stamp = self._tick()
        with suppress(FileNotFoundError):
            os.utime(path, ns=(stamp, stamp))
        return data

    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key``, then trim the folder back under ``max_bytes``.
        Returns False, storing nothing, when the entry alone is larger than the cache."""
        path = self._path(key)
        if len(data) > self.max_bytes:
            return False
        descriptor, name = tempfile.mkstemp(dir=self.root, prefix=_PARTIAL)
        temporary = Path(name)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
            stamp = self._tick()
            os.utime(temporary, ns=(stamp, stamp))
            temporary.replace(path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self._trim(keep=path.name)
        return True

    def total_bytes(self) -> int:
        """The size of the entries now in the folder."""
        return sum(size for _, _, size in self._entries())

    def _entries(self) -> Iterator[tuple[int, str, int]]:
        """``(last use, key, size)`` of each entry; removes abandoned temporary files."""
        abandoned_before = time.time() - _ABANDONED_AFTER_S
        with os.scandir(self.root) as found:
            for entry in found:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.name.startswith(_PARTIAL):
                    if info.st_mtime < abandoned_before:
                        Path(entry.path).unlink(missing_ok=True)
                    continue
                if stat.S_ISREG(info.st_mode) and _CACHE_KEY.fullmatch(entry.name):
                    yield info.st_mtime_ns, entry.name, info.st_size

    def _trim(self, *, keep: str) -> None:
        with self._trimming:
            entries = sorted(self._entries())
            total = sum(size for _, _, size in entries)
            for _, name, size in entries:
                if total <= self.max_bytes:
                    break
                if name == keep:
                    continue
                (self.root / name).unlink(missing_ok=True)
                total -= size


# --- the service ------------------------------------------------------------------------


@dataclass
class ReviewMedia:
    """The dashboard's pictures of an image: a thumbnail for lists and a display size for
    the case page, both JPEG renders kept in ``cache`` by sha256 and variant.

    The side is part of the variant's name, so a changed setting makes new entries rather
    than serving renders of the old size. ``memory`` bounds the pixels decoded at once
    across the threads that serve pictures, as the intake's budget does for the fleet.
    """

    session_factory: sessionmaker[Session]
    store: ObjectStore | None
    limits: IntakeLimits
    cache: MediaCache
    thumbnail_side: int = 320
    display_side: int = 2048
    memory: MemoryBudget = field(default_factory=lambda: MemoryBudget(DEFAULT_MEMORY_BUDGET))

    def thumbnail(self, image_id: int, sha256: str) -> bytes:
        """The picture scaled to fit ``thumbnail_side``, for lists."""
        return self._rendered(
            image_id, sha256, f"thumb{self.thumbnail_side}", self.thumbnail_side, THUMBNAIL_QUALITY
        )

    def display(self, image_id: int, sha256: str) -> bytes:
        """The picture scaled to fit ``display_side``, for the case page."""
        return self._rendered(
            image_id, sha256, f"display{self.display_side}", self.display_side, DISPLAY_QUALITY
        )

    def _rendered(self, image_id: int, sha256: str, variant: str, side: int, quality: int) -> bytes:
        """The cached render, or a new one. ``sha256`` names the entry, so it must be the
        image's own: bytes of another image are never stored under it."""
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"{sha256!r} is not a lowercase hex sha256")
        key = f"{sha256}-{variant}"
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        original = fetch_original(self.session_factory, self.store, image_id, self.limits)
        if hashlib.sha256(original).hexdigest() != sha256:
            raise MediaUnavailable("these bytes are not this image's")
        with reserving(self.memory) as admit:
            rendered = render(original, self.limits, side, quality=quality, admit=admit)
        self.cache.put(key, rendered)
        return rendered
