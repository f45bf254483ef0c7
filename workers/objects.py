"""The object store as the services see it: the subset of boto3's S3 client they call.
In production it is boto3's client itself; in the embedded mode, ``LocalObjectStore``: a
folder with one sub-folder per bucket, answering the same calls with the same shapes and
the same error codes, so the fleet's steps run unchanged on a laptop."""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Mapping
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
        if not path.is_file():
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
        data = path.read_bytes()
        return {"Body": io.BytesIO(data), "ContentLength": len(data)}

    def put_object(self, **kwargs: Any) -> Mapping[str, Any]:
        path = self._path(kwargs["Bucket"], kwargs["Key"], "PutObject", create=True)
        body = kwargs["Body"]
        data = body if isinstance(body, bytes) else body.read()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole or not at all: a reader never sees half an object.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        Path(tmp.name).replace(path)
        return {"ETag": f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'}

    def list_objects_v2(self, **kwargs: Any) -> Mapping[str, Any]:
        """Keys under ``Prefix`` in lexicographic order, ``MaxKeys`` (at most 1000) at a
        time, continued from ``ContinuationToken`` (the last key returned) or
        ``StartAfter``."""
        folder = self._bucket(kwargs["Bucket"], "ListObjectsV2")
        prefix = kwargs.get("Prefix", "")
        after = kwargs.get("ContinuationToken") or kwargs.get("StartAfter") or ""
        limit = min(int(kwargs.get("MaxKeys", 1000)), 1000)
        keys = sorted(
            key
            for path in folder.rglob("*")
            if path.is_file()
            and (key := path.relative_to(folder).as_posix()).startswith(prefix)
            and key > after
        )
        page = keys[:limit]
        truncated = len(keys) > limit
        answer: dict[str, Any] = {
            "Contents": [{"Key": k, "Size": (folder / k).stat().st_size} for k in page],
            "KeyCount": len(page),
            "IsTruncated": truncated,
        }
        if truncated:
            answer["NextContinuationToken"] = page[-1]
        return answer
