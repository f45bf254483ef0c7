"""The moderator's pictures: originals found again on real files and a real object store,
decoded under the intake limits, re-encoded without metadata, cached on disk."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageCms
from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import SourceKind
from workers.budget import MemoryBudget
from workers.intake import IntakeLimits
from workers.names import identity, printable
from workers.objects import LocalObjectStore
from workers.review_media import (
    NO_READABLE_COPY,
    MediaCache,
    MediaUnavailable,
    ReviewMedia,
    fetch_original,
    render,
)

from badfiles import encode, pixel_bomb_png, sample_picture

LIMITS = IntakeLimits(max_bytes=1_000_000, max_pixels=4_000_000, decode_timeout_s=10.0)
BUCKET = "review-uploads"


@pytest.fixture
def sessions(db_session: Session) -> sessionmaker[Session]:
    """Sessions for the code under test on the test's own connection: they see what the
    test wrote, and everything is rolled back with it."""
    return sessionmaker(bind=db_session.connection(), join_transaction_mode="create_savepoint")


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def _image(session: Session, data: bytes) -> tuple[int, str]:
    sha256 = hashlib.sha256(data).hexdigest()
    image = repository.get_or_create_image(
        session, repository.ImageFacts(sha256=sha256, size_bytes=len(data), format="JPEG")
    )
    return image.id, sha256


def _scanned(session: Session, path: Path) -> tuple[int, str]:
    """An image recorded from a local file, as ``synthsentry scan`` records it."""
    data = path.read_bytes()
    image_id, sha256 = _image(session, data)
    repository.record_source(
        session,
        repository.SourceRef(
            kind=SourceKind.CLI,
            ref_key=f"{identity(path)}@{sha256}",
            local_path=printable(path),
        ),
        image_id,
    )
    session.flush()
    return image_id, sha256


def _uploaded(session: Session, store: LocalObjectStore, key: str, data: bytes) -> int:
    """An image recorded from an object in the bucket, as an upload event records it."""
    store.put_object(Bucket=BUCKET, Key=key, Body=data)
    image_id, _ = _image(session, data)
    repository.record_source(
        session,
        repository.SourceRef(
            kind=SourceKind.UPLOAD_EVENT,
            ref_key=f"{BUCKET}/{key}",
            bucket=BUCKET,
            object_key=key,
        ),
        image_id,
    )
    session.flush()
    return image_id


def _photo(size: tuple[int, int] = (120, 90)) -> bytes:
    """A JPEG carrying what a camera file carries: EXIF (a make, a GPS tag, an orientation
    that turns it upright), a colour profile and a comment."""
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    exif.get_ifd(0x8825)[1] = "N"  # GPSLatitudeRef
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return encode(
        sample_picture(size),
        "JPEG",
        quality=90,
        exif=exif.tobytes(),
        icc_profile=profile,
        comment=b"taken at home",
    )


def _media(
    sessions: sessionmaker[Session], store: LocalObjectStore | None, root: Path, **options: Any
) -> ReviewMedia:
    return ReviewMedia(
        sessions, store, options.pop("limits", LIMITS), MediaCache(root, 10_000_000), **options
    )


# --- rendering ----------------------------------------------------------------------------


def test_thumbnail_of_a_scanned_file_is_an_upright_jpeg_without_metadata(
    tmp_path: Path, db_session: Session, sessions: sessionmaker[Session]
) -> None:
    original = tmp_path / "photo.jpg"
    original.write_bytes(_photo((120, 90)))
    assert Image.open(original).getexif()[0x010F] == "SecretCam"
    image_id, sha256 = _scanned(db_session, original)
    media = _media(sessions, None, tmp_path / "cache", thumbnail_side=40)

    thumbnail = Image.open(io.BytesIO(media.thumbnail(image_id, sha256)))

    assert thumbnail.format == "JPEG"
    assert thumbnail.mode == "RGB"
    assert thumbnail.size == (30, 40)  # 120x90 stored, 90x120 upright, fitted into 40
    assert len(thumbnail.getexif()) == 0
    assert not {"exif", "icc_profile", "comment", "xmp"} & set(thumbnail.info)


def test_display_is_never_scaled_up(
    tmp_path: Path, db_session: Session, sessions: sessionmaker[Session]
) -> None:
    original = tmp_path / "photo.jpg"
    original.write_bytes(_photo((120, 90)))
    image_id, sha256 = _scanned(db_session, original)
    media = _media(sessions, None, tmp_path / "cache", display_side=2048)

    assert Image.open(io.BytesIO(media.display(image_id, sha256))).size == (90, 120)


def test_a_png_with_transparency_renders_as_rgb_jpeg() -> None:
    picture = sample_picture((64, 32)).convert("RGBA")
    picture.putalpha(128)
    rendered = Image.open(io.BytesIO(render(encode(picture, "PNG"), LIMITS, 16)))
    assert (rendered.format, rendered.mode, rendered.size) == ("JPEG", "RGB", (16, 8))


def test_a_decompression_bomb_is_refused_before_any_pixel_is_decoded(
    tmp_path: Path, db_session: Session, sessions: sessionmaker[Session]
) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(pixel_bomb_png(50_000, 50_000))
    assert bomb.stat().st_size < 100_000
    image_id, sha256 = _scanned(db_session, bomb)
    memory = MemoryBudget(1024**3)
    media = _media(sessions, None, tmp_path / "cache", memory=memory)

    with pytest.raises(MediaUnavailable, match="4000000-pixel limit") as refused:
        media.thumbnail(image_id, sha256)

    assert "50000x50000" in refused.value.reason
    assert memory.peak == 0  # refused from the header: nothing was admitted for decoding
    assert media.cache.total_bytes() == 0


def test_bytes_over_the_size_limit_are_refused(
    tmp_path: Path, db_session: Session, sessions: sessionmaker[Session]
) -> None:
    data = _photo((160, 120))
    small = IntakeLimits(max_bytes=len(data) - 1, max_pixels=4_000_000, decode_timeout_s=10.0)
    original = tmp_path / "photo.jpg"
    original.write_bytes(data)
    image_id, _ = _scanned(db_session, original)

    with pytest.raises(MediaUnavailable, match=f"over the {len(data) - 1}-byte limit"):
        render(data, small, 64)
    with pytest.raises(MediaUnavailable, match=f"over the {len(data) - 1}-byte limit"):
        fetch_original(sessions, None, image_id, small)


def test_a_file_that_grew_past_the_limit_since_the_scan_is_not_read(
    tmp_path: Path, db_session: Session, sessions: sessionmaker[Session]
) -> None:
    data = _photo((160, 120))
    limits = IntakeLimits(max_bytes=len(data) + 10, max_pixels=4_000_000, decode_timeout_s=10.0)
    original = tmp_path / "photo.jpg"
    original.write_bytes(data)
    image_id, _ = _scanned(db_session, original)
    original.write_bytes(data + b"\x00" * 1000)

    with pytest.raises(MediaUnavailable) as refused:
        fetch_original(sessions, None, image_id, limits)
    assert refused.value.reason == NO_READABLE_COPY


def test_max_side_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_side"):
        render(_photo(), LIMITS, 0)


# --- finding the original -------------------------------------------------------------------


@pytest.mark.parametrize("changed", ["file", "object"])
def test_a_copy_changed_since_it_was_seen_is_skipped(
    changed: str,
    tmp_path: Path,
    db_session: Session,
    sessions: sessionmaker[Session],
    store: LocalObjectStore,
) -> None:
    """The changed copy is the newest, so it is tried first: only the sha256 check keeps
    its bytes off the page."""
    data = _photo()
    other = _photo((100, 100))
    local = tmp_path / "photo.jpg"
    local.write_bytes(data)
    if changed == "object":
        image_id, _ = _scanned(db_session, local)
        assert _uploaded(db_session, store, "up/photo.jpg", data) == image_id
        store.put_object(Bucket=BUCKET, Key="up/photo.jpg", Body=other)
    else:
        image_id = _uploaded(db_session, store, "up/photo.jpg", data)
        assert _scanned(db_session, local)[0] == image_id
        local.write_bytes(other)

    assert fetch_original(sessions, store, image_id, LIMITS) == data


def test_no_readable_copy_is_unavailable(
    tmp_path: Path,
    db_session: Session,
    sessions: sessionmaker[Session],
    store: LocalObjectStore,
) -> None:
    data = _photo()
    local = tmp_path / "photo.jpg"
    local.write_bytes(data)
    image_id, sha256 = _scanned(db_session, local)
    _uploaded(db_session, store, "up/photo.jpg", data)
    local.unlink()
    (store.root / BUCKET / "up" / "photo.jpg").unlink()

    with pytest.raises(MediaUnavailable) as refused:
        fetch_original(sessions, store, image_id, LIMITS)
    assert refused.value.reason == NO_READABLE_COPY
    assert not refused.value.transient
    with pytest.raises(MediaUnavailable, match=NO_READABLE_COPY):
        _media(sessions, store, tmp_path / "cache").display(image_id, sha256)


def test_objects_are_skipped_without_a_store(
    db_session: Session, sessions: sessionmaker[Session], store: LocalObjectStore
) -> None:
    data = _photo()
    image_id = _uploaded(db_session, store, "up/photo.jpg", data)

    assert fetch_original(sessions, store, image_id, LIMITS) == data
    with pytest.raises(MediaUnavailable, match=NO_READABLE_COPY):
        fetch_original(sessions, None, image_id, LIMITS)


def test_an_image_without_copies_or_without_a_row_is_unavailable(
    db_session: Session, sessions: sessionmaker[Session]
) -> None:
    image_id, _ = _image(db_session, b"bytes seen nowhere")
    db_session.flush()
    with pytest.raises(MediaUnavailable, match="no copy of these bytes was recorded"):
        fetch_original(sessions, None, image_id, LIMITS)
    with pytest.raises(MediaUnavailable, match="no such image"):
        fetch_original(sessions, None, image_id + 1000, LIMITS)


class _RecordingStore:
    """The local object store, noting which keys were read."""

    def __init__(self, inner: LocalObjectStore) -> None:
        self.inner = inner
        self.read: list[str] = []

    def head_object(self, **kwargs: Any) -> Mapping[str, Any]:
        return self.inner.head_object(**kwargs)

    def get_object(self, **kwargs: Any) -> Mapping[str, Any]:
        self.read.append(kwargs["Key"])
        return self.inner.get_object(**kwargs)

    def put_object(self, **kwargs: Any) -> Mapping[str, Any]:
        return self.inner.put_object(**kwargs)

    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]:
        return self.inner.list_objects_v2(**kwargs)


def test_the_most_recently_seen_copy_is_read_first(
    db_session: Session, sessions: sessionmaker[Session], store: LocalObjectStore
) -> None:
    data = _photo()
    image_id = _uploaded(db_session, store, "first.jpg", data)
    _uploaded(db_session, store, "second.jpg", data)
    recording = _RecordingStore(store)

    assert fetch_original(sessions, recording, image_id, LIMITS) == data
    assert recording.read == ["second.jpg"]

    # Seen again: the first copy is now the most recent.
    repository.record_source(
        db_session,
        repository.SourceRef(
            kind=SourceKind.UPLOAD_EVENT,
            ref_key=f"{BUCKET}/first.jpg",
            bucket=BUCKET,
            object_key="first.jpg",
        ),
        image_id,
    )
    db_session.flush()
    recording.read.clear()
    assert fetch_original(sessions, recording, image_id, LIMITS) == data
    assert recording.read == ["first.jpg"]


def test_a_file_name_that_is_not_utf8_is_found_by_its_bytes(
    tmp_path: Path, db_session: Session, sessions: sessionmaker[Session]
) -> None:
    local = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    data = _photo()
    local.write_bytes(data)
    image_id, _ = _scanned(db_session, local)

    assert fetch_original(sessions, None, image_id, LIMITS) == data


# --- the service and its cache --------------------------------------------------------------


def test_a_cached_render_is_served_without_its_source(
    tmp_path: Path, db_session: Session, sessions: sessionmaker[Session]
) -> None:
    original = tmp_path / "photo.jpg"
    original.write_bytes(_photo())
    image_id, sha256 = _scanned(db_session, original)
    media = _media(sessions, None, tmp_path / "cache")

    first = media.thumbnail(image_id, sha256)
    original.unlink()

    assert media.thumbnail(image_id, sha256) == first
    with pytest.raises(MediaUnavailable, match=NO_READABLE_COPY):
        media.display(image_id, sha256)  # another variant: not cached, and the file is gone


def test_a_sha256_that_is_not_the_images_is_refused(
    tmp_path: Path, db_session: Session, sessions: sessionmaker[Session]
) -> None:
    original = tmp_path / "photo.jpg"
    original.write_bytes(_photo())
    image_id, sha256 = _scanned(db_session, original)
    media = _media(sessions, None, tmp_path / "cache")

    with pytest.raises(MediaUnavailable, match="not this image's"):
        media.thumbnail(image_id, "0" * 64)
    assert media.cache.get(f"{'0' * 64}-thumb320") is None
    with pytest.raises(ValueError, match="sha256"):
        media.thumbnail(image_id, sha256.upper())


SHA = "ab" * 32


@pytest.mark.parametrize(
    "key",
    [
        "",
        SHA,
        f"{SHA}-",
        f"{SHA}-../../etc/passwd",
        f"{SHA}-thumb/320",
        f"{SHA}-Thumb",
        f"{SHA}-{'x' * 33}",
        f"{SHA.upper()}-thumb",
        f"{'g' * 64}-thumb",
        f"{SHA[:-1]}-thumb",
        f"../{SHA}-thumb",
        f"/tmp/{SHA}-thumb",
        f"{SHA}-thumb\n",
    ],
)
def test_keys_other_than_sha256_and_variant_are_refused(tmp_path: Path, key: str) -> None:
    cache = MediaCache(tmp_path / "cache", 10_000)
    with pytest.raises(ValueError, match="not a media cache key"):
        cache.put(key, b"x")
    with pytest.raises(ValueError, match="not a media cache key"):
        cache.get(key)
    assert list(tmp_path.rglob("*")) == [tmp_path / "cache"]


def _key(number: int) -> str:
    return f"{hashlib.sha256(str(number).encode()).hexdigest()}-thumb"


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


def test_the_least_recently_used_entries_go_first(tmp_path: Path) -> None:
    cache = MediaCache(tmp_path / "cache", 3000)
    for number in range(3):
        assert cache.put(_key(number), bytes([number]) * 1000)
    assert cache.get(_key(0)) == bytes([0]) * 1000  # 0 is now used after 1 and 2

    cache.put(_key(3), b"\x03" * 1000)

    assert cache.get(_key(1)) is None
    assert [cache.get(_key(n)) is not None for n in (0, 2, 3)] == [True, True, True]
    assert _folder_bytes(cache.root) <= 3000

    for number in range(4, 40):
        cache.put(_key(number), b"\x04" * (300 + 37 * number))
        assert _folder_bytes(cache.root) <= 3000
    assert cache.get(_key(39)) == b"\x04" * (300 + 37 * 39)


def test_an_entry_larger_than_the_cache_is_not_stored(tmp_path: Path) -> None:
    cache = MediaCache(tmp_path / "cache", 1000)
    assert cache.put(_key(1), b"a" * 600)
    assert not cache.put(_key(2), b"b" * 1001)
    assert cache.get(_key(2)) is None
    assert cache.get(_key(1)) == b"a" * 600


def test_an_entry_removed_by_another_process_is_a_miss(tmp_path: Path) -> None:
    cache = MediaCache(tmp_path / "cache", 10_000)
    cache.put(_key(1), b"render")
    (cache.root / _key(1)).unlink()
    assert cache.get(_key(1)) is None
    assert cache.put(_key(2), b"next")
    assert cache.get(_key(2)) == b"next"


def test_a_temporary_file_left_by_a_dead_writer_is_removed(tmp_path: Path) -> None:
    cache = MediaCache(tmp_path / "cache", 10_000)
    abandoned = cache.root / ".partial-abandoned"
    abandoned.write_bytes(b"half")
    fresh = cache.root / ".partial-writing"
    fresh.write_bytes(b"half")
    a_day_ago = time.time() - 86_400
    os.utime(abandoned, (a_day_ago, a_day_ago))

    cache.put(_key(1), b"render")

    assert not abandoned.exists()
    assert fresh.exists()  # another writer may still be at work on it


def test_concurrent_puts_and_gets_leave_whole_entries(tmp_path: Path) -> None:
    cache = MediaCache(tmp_path / "cache", 6000)

    def content(number: int) -> bytes:
        return hashlib.sha256(str(number).encode()).digest() * (20 + 5 * number)

    threads = 8
    start = threading.Barrier(threads)

    def work(worker: int) -> list[str]:
        start.wait(timeout=10)
        problems = []
        for step in range(40):
            number = (worker * 7 + step) % 12
            cache.put(_key(number), content(number))
            found = cache.get(_key((number + 5) % 12))
            if found is not None and found != content((number + 5) % 12):
                problems.append(f"{(number + 5) % 12} read torn")
        return problems

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(work, range(threads)))

    assert results == [[] for _ in range(threads)]
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".partial-")]
    assert _folder_bytes(cache.root) <= 6000
    kept = [n for n in range(12) if cache.get(_key(n)) is not None]
    assert kept
    assert all(cache.get(_key(n)) == content(n) for n in kept)
