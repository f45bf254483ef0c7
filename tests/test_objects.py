"""The embedded mode's object store: a folder answering boto3's S3 calls with S3's shapes,
order and error codes, so the fleet's steps run on it unchanged."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from db.models import SourceStatus
from db.repository import StoredObject
from workers.fleet import fetch_object
from workers.intake import IntakeLimits, Rejected, RejectReason
from workers.objects import LocalObjectStore

KEYS = [
    "a-c.jpg",  # '-' sorts before '/': before every key in a/
    "a/b.jpg",
    "a/b/c.jpg",
    "a/z.jpg",
    "a0.jpg",  # '0' follows '/': after every key in a/
    "b/é.jpg",
    "b/z.jpg",
    "zz",
]


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    store = LocalObjectStore(tmp_path)
    for key in reversed(KEYS):
        store.put_object(Bucket="media", Key=key, Body=key.encode())
    # A write in progress leaves a temporary file beside its object: never listed.
    (tmp_path / "media" / "a" / ".synthsentry-partial-x1").write_bytes(b"half")
    return store


def _all(store: LocalObjectStore, **kwargs: object) -> list[str]:
    keys: list[str] = []
    token = None
    while True:
        page = store.list_objects_v2(
            Bucket="media", MaxKeys=3, **kwargs, **({"ContinuationToken": token} if token else {})
        )
        keys += [item["Key"] for item in page["Contents"]]
        assert page["KeyCount"] == len(page["Contents"]) <= 3
        if not page["IsTruncated"]:
            return keys
        token = page["NextContinuationToken"]


def test_listing_pages_through_every_key_in_s3_order(store: LocalObjectStore) -> None:
    assert _all(store) == sorted(KEYS, key=str.encode)
    assert _all(store, Prefix="a/") == ["a/b.jpg", "a/b/c.jpg", "a/z.jpg"]
    assert _all(store, Prefix="a/b") == ["a/b.jpg", "a/b/c.jpg"]
    assert _all(store, StartAfter="a/b.jpg") == sorted(KEYS, key=str.encode)[2:]
    assert _all(store, Prefix="b/", StartAfter="b/é.jpg") == []  # 'é' sorts after 'z'
    assert _all(store, Prefix="nothing/") == []


def test_objects_read_back_and_errors_speak_s3(store: LocalObjectStore) -> None:
    with store.get_object(Bucket="media", Key="a/b.jpg")["Body"] as body:
        assert body.read() == b"a/b.jpg"
    assert store.head_object(Bucket="media", Key="zz")["ContentLength"] == 2
    for bucket, key, code in (
        ("media", "missing.jpg", "NoSuchKey"),
        ("nobucket", "a", "NoSuchBucket"),
        ("media", "../escape", "InvalidArgument"),
        ("media", "/abs", "InvalidArgument"),
        ("media", "a//b", "InvalidArgument"),
        ("Bad_Bucket", "a", "InvalidBucketName"),
    ):
        with pytest.raises(ClientError) as caught:
            store.get_object(Bucket=bucket, Key=key)
        assert caught.value.response["Error"]["Code"] == code, (bucket, key)


def test_a_name_the_store_cannot_hold_is_a_rejection_not_a_retry(
    store: LocalObjectStore,
) -> None:
    limits = IntakeLimits(max_bytes=1024, max_pixels=10_000, decode_timeout_s=5)
    for key, reason in (("a//b.jpg", RejectReason.UNREADABLE), ("gone.jpg", RejectReason.MISSING)):
        with pytest.raises(Rejected) as caught:
            fetch_object(
                store,
                StoredObject(
                    source_id=1,
                    bucket="media",
                    key=key,
                    version_id=None,
                    status=SourceStatus.PENDING,
                ),
                limits,
            )
        assert caught.value.reason is reason


def test_an_s3_refusal_is_judged_by_its_status_where_its_code_is_unknown() -> None:
    """A store's own error codes (MinIO's, an object under a customer key) say no more than
    their status: a 4xx refusal is final, a 5xx or throttling answer is worth a retry."""
    from workers.scoring import TransientError

    class Refusing:
        def __init__(self, code: str, status: int) -> None:
            self.error = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}

        def get_object(self, **kwargs: Any) -> Mapping[str, Any]:
            raise ClientError(self.error, "GetObject")  # type: ignore[arg-type]

    stored = StoredObject(
        source_id=1, bucket="media", key="a.jpg", version_id=None, status=SourceStatus.PENDING
    )
    limits = IntakeLimits(max_bytes=1024, max_pixels=10_000, decode_timeout_s=5)
    for code, status, reason in (
        ("XMinioInvalidObjectName", 400, RejectReason.UNREADABLE),
        ("InvalidRequest", 400, RejectReason.UNREADABLE),
        ("AllAccessDisabled", 403, RejectReason.UNREADABLE),
        ("NoSuchKey", 404, RejectReason.MISSING),
        ("SomethingElse", 404, RejectReason.MISSING),
    ):
        with pytest.raises(Rejected) as caught:
            fetch_object(Refusing(code, status), stored, limits)
        assert caught.value.reason is reason, code
    for code, status in (("SlowDown", 503), ("InternalError", 500)):
        with pytest.raises(TransientError):
            fetch_object(Refusing(code, status), stored, limits)


def test_names_no_s3_key_can_have_are_left_out_and_links_stay_inside(
    store: LocalObjectStore, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    (media / "old").mkdir()
    with open(os.fsencode(media / "old") + b"/caf\xe9.jpg", "wb") as latin1:  # not UTF-8
        latin1.write(b"x")
    (media / "old" / "ok.jpg").write_bytes(b"y")
    outside = tmp_path.parent / f"{tmp_path.name}-secret.txt"  # beside the store, not in it
    outside.write_bytes(b"not an object")
    (media / "link.txt").symlink_to(outside)
    assert _all(store, Prefix="old/") == ["old/ok.jpg"]
    assert "link.txt" not in _all(store)
    with pytest.raises(ClientError) as caught:
        store.get_object(Bucket="media", Key="link.txt")
    assert caught.value.response["Error"]["Code"] == "NoSuchKey"
    (media / "escape").symlink_to(tmp_path.parent, target_is_directory=True)
    with pytest.raises(ClientError):
        store.put_object(Bucket="media", Key="escape/planted.jpg", Body=b"z")
    assert not (tmp_path.parent / "planted.jpg").exists()
