"""The object store as the services see it: the subset of boto3's S3 client they call.
In production it is boto3's client itself; in the embedded mode, ``LocalObjectStore``: a
folder with one sub-folder per bucket, answering the same calls with the same shapes and
the same error codes, so the fleet's steps run unchanged on a laptop."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from workers.events import BUCKET_NAME_PATTERN


class ObjectStore(Protocol):
    def head_object(self, **kwargs: Any) -> Mapping[str, Any]: ...

    def get_object(self, **kwargs: Any) -> Mapping[str, Any]: ...

    def put_object(self, **kwargs: Any) -> Mapping[str, Any]: ...

    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]: ...


def _client_error(code: str, operation: str, message: str) -> Exception:
    from botocore.exceptions import ClientError

    error: Exception = ClientError({"Error": {"Code": code, "Message": message}}, operation)
    return error


class LocalObjectStore:
    """Objects as files under ``root/<bucket>/<key>``. Keys are checked before they touch
    the file system: no absolute paths, no ``..`` or empty segments, no NUL; a bucket is a
    folder that exists (``put_object`` makes it). Versions are not kept: an object has one
    version, and asking for another answers NoSuchVersion."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    # --- paths --------------------------------------------------------------------------

    def _bucket(self, bucket: str, operation: str, *, create: bool = False) -> Path:
        if not BUCKET_NAME_PATTERN.fullmatch(bucket):
            raise _client_error("InvalidBucketName", operation, f"{bucket!r} is not a bucket name")
        folder = self.root / bucket
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise _client_error("NoSuchBucket", operation, f"no bucket {bucket!r}")
        return folder

    def _path(self, bucket: str, key: str, operation: str, *, create: bool = False) -> Path:
        parts = key.split("/")
        if (
            not key
            or "\x00" in key
            or key.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise _client_error("InvalidArgument", operation, "the key cannot name a local file")
        return self._bucket(bucket, operation, create=create).joinpath(*parts)

    def _existing(self, kwargs: Mapping[str, Any], operation: str) -> Path:
        path = self._path(kwargs["Bucket"], kwargs["Key"], operation)
        # A link is an object only where it stays in the store (as a listing shows it).
        if not path.is_file() or not path.resolve().is_relative_to(self.root):
            raise _client_error("NoSuchKey", operation, "no such key")
        version = kwargs.get("VersionId")
        if version and version != self._version(path):
            raise _client_error("NoSuchVersion", operation, "no such version")
        return path

    @staticmethod
    def _version(path: Path) -> str:
        stat = path.stat()
        return f"{stat.st_mtime_ns:x}-{stat.st_size:x}"

    # --- the S3 calls -------------------------------------------------------------------

    def head_object(self, **kwargs: Any) -> Mapping[str, Any]:
        path = self._existing(kwargs, "HeadObject")
        return {"ContentLength": path.stat().st_size, "VersionId": self._version(path)}

    def get_object(self, **kwargs: Any) -> Mapping[str, Any]:
        path = self._existing(kwargs, "GetObject")
        size = path.stat().st_size
        # Read by the caller as far as it wants, and closed by it.
        return {"Body": path.open("rb"), "ContentLength": size}

    def put_object(self, **kwargs: Any) -> Mapping[str, Any]:
        path = self._path(kwargs["Bucket"], kwargs["Key"], "PutObject", create=True)
        body = kwargs["Body"]
        data = body if isinstance(body, bytes) else body.read()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.parent.resolve().is_relative_to(self.root):
            raise _client_error("InvalidArgument", "PutObject", "the key leads out of the store")
        # Written whole or not at all: a reader never sees half an object, and a listing
        # never shows the file being written (its name has the temporary prefix).
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=_TEMPORARY, delete=False) as tmp:
            tmp.write(data)
        Path(tmp.name).replace(path)
        return {"ETag": f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'}

    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]:
        """Keys under ``Prefix`` in S3's order (by their UTF-8 bytes), ``MaxKeys`` (at most
        1000) at a time, continued from ``ContinuationToken`` (the last key returned) or
        ``StartAfter``. The walk is lazy and skips whole folders before the start (see
        ``_walk`` for what a page costs)."""
        folder = self._bucket(kwargs["Bucket"], "ListObjectsV2")
        prefix = kwargs.get("Prefix", "")
        after = kwargs.get("ContinuationToken") or kwargs.get("StartAfter") or ""
        limit = min(int(kwargs.get("MaxKeys", 1000)), 1000)
        page: list[dict[str, Any]] = []
        truncated = False
        for key, size in _walk(folder, "", prefix=prefix, after=after):
            if len(page) == limit:
                truncated = True
                break
            page.append({"Key": key, "Size": size})
        answer: dict[str, Any] = {"Contents": page, "KeyCount": len(page), "IsTruncated": truncated}
        if truncated:
            answer["NextContinuationToken"] = page[-1]["Key"]
        return answer


_TEMPORARY = ".synthsentry-partial-"


def _walk(folder: Path, base: str, *, prefix: str, after: str) -> Iterator[tuple[str, int]]:
    """The files under ``folder`` as keys (``base`` + their relative path), in S3's order,
    only those under ``prefix`` and after ``after``. A folder ``d`` holds the keys between
    ``d/`` and ``d0`` ('0' follows '/'), so it sorts as ``d/`` among its siblings and is
    skipped whole when that range lies before ``after`` or outside ``prefix``: a page reads
    the folders on its path, each listed and sorted whole (a flat folder of a million
    files costs a million names per page). Links are not followed, and names that are not
    UTF-8 are left out."""
    entries = []
    with os.scandir(folder) as found:
        for entry in found:
            if entry.name.startswith(_TEMPORARY):
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            if not is_dir and not entry.is_file(follow_symlinks=False):
                continue  # links and devices are not objects
            name = base + entry.name + ("/" if is_dir else "")
            try:
                encoded = name.encode("utf-8")  # S3 orders keys by their UTF-8 bytes
            except UnicodeEncodeError:
                continue  # a file name in another encoding cannot be an S3 key
            entries.append((encoded, name, entry, is_dir))
    entries.sort(key=lambda item: item[0])
    for _, name, entry, is_dir in entries:
        if is_dir:
            end = name[:-1] + "0"  # every key in the folder sorts before this
            if end <= after or not (name.startswith(prefix) or prefix.startswith(name)):
                continue
            yield from _walk(Path(entry.path), name, prefix=prefix, after=after)
        elif name > after and name.startswith(prefix):
            yield name, entry.stat().st_size
