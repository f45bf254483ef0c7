"""Where a detector's weights come from and how they are read.

A weights URI is one of:

- a local path, plain or ``file://``: used where it is;
- ``s3://bucket/key``: downloaded once into a cache folder (atomic rename; kept while the
  object's ETag and size are unchanged);
- ``hf://org/repo[@revision][/path/in/repo]``: fetched through ``huggingface_hub``, which
  keeps its own cache and honours ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``.

A folder (a local one or a hub snapshot) stands for the single weights file inside it.

Reading follows one rule: a checkpoint is data, never code. Safetensors files are read with
safetensors; anything else with ``torch.load(weights_only=True)``, and a pickle that needs
more than tensors and plain containers is refused.

Torch is imported inside the functions that need it, so resolving and hashing weights stays
cheap to import.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

from workers.detectors.base import DetectorUnavailable

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

WEIGHTS_SUFFIXES: tuple[str, ...] = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
"""File endings that count as a weights file when a folder has to be resolved to one."""

_WRAPPER_PREFIXES: tuple[str, ...] = ("_orig_mod.", "module.")
_CHUNK = 1024 * 1024
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class WeightsIntegrityError(DetectorUnavailable):
    """The weights file is not the one the spec pinned (sha256 mismatch)."""


class CheckpointFormatError(DetectorUnavailable):
    """The weights file cannot be read as a state dict, or does not fit the architecture."""


class UnsafeCheckpointError(CheckpointFormatError):
    """The checkpoint is a pickle that would run code (or build arbitrary objects) to load."""


class S3Client(Protocol):
    """The part of a boto3 S3 client that weights resolution uses."""

    def head_object(self, *, Bucket: str, Key: str) -> Mapping[str, Any]: ...

    def get_object(self, *, Bucket: str, Key: str, IfMatch: str) -> Mapping[str, Any]: ...


# --------------------------------------------------------------------------------------------
# Resolving a URI to a local file
# --------------------------------------------------------------------------------------------


def resolve_weights(
    uri: str,
    *,
    s3_client_factory: Callable[[], S3Client] | None,
    cache_dir: Path,
    detector_name: str | None = None,
    local_only: bool = False,
) -> Path:
    """Return a local weights file for ``uri``, fetching it first when it is remote.

    ``detector_name`` only improves the error message (it says which ``--detector`` flag to
    pass). ``local_only`` takes ``hf://`` weights from the local Hugging Face cache only, so
    that a scan with the default ensemble never starts a multi-gigabyte download.
    Raises :class:`DetectorUnavailable` with one line naming the URI and how to provide the
    file when the weights cannot be obtained.
    """
    hint_name = detector_name or "NAME"
    if uri.startswith("s3://"):
        return _resolve_s3(uri, s3_client_factory, cache_dir, hint_name)
    if uri.startswith("hf://"):
        return _resolve_hf(uri, hint_name, local_only=local_only)
    return _resolve_local(uri, hint_name)


def select_weights_file(path: Path, *, uri: str | None = None) -> Path:
    """``path`` itself when it is a file; the single weights file inside it when it is a folder.

    Looks through sub-folders too (hidden ones excepted). No candidate, or several, is a
    :class:`DetectorUnavailable` that lists what was found.
    """
    label = uri or str(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise DetectorUnavailable(f"weights {label} not found: no file or folder at {path}")
    candidates = sorted(
        candidate
        for candidate in path.rglob("*")
        if candidate.suffix in WEIGHTS_SUFFIXES
        and candidate.is_file()
        and not any(part.startswith(".") for part in candidate.relative_to(path).parts)
    )
    if len(candidates) == 1:
        return candidates[0]
    patterns = ", ".join("*" + suffix for suffix in WEIGHTS_SUFFIXES)
    if not candidates:
        raise DetectorUnavailable(f"weights {label}: no weights file ({patterns}) in {path}")
    names = ", ".join(candidate.relative_to(path).as_posix() for candidate in candidates)
    example = candidates[0].relative_to(path).as_posix()
    raise DetectorUnavailable(
        f"weights {label} hold several weights files ({names}): name one in the URI, "
        f"e.g. {label.rstrip('/')}/{example}"
    )


def _resolve_local(uri: str, hint_name: str) -> Path:
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise DetectorUnavailable(
                f"weights {uri}: file:// URIs must name a local path (file:///abs/path)"
            )
        path = Path(unquote(parts.path))
    else:
        path = Path(uri).expanduser()
    if not path.exists():
        raise DetectorUnavailable(
            f"weights {uri} not found: put the file there or pass "
            f"--detector {hint_name}=/path/to/weights"
        )
    return select_weights_file(path, uri=uri)


def _resolve_s3(
    uri: str,
    s3_client_factory: Callable[[], S3Client] | None,
    cache_dir: Path,
    hint_name: str,
) -> Path:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not _BUCKET_NAME.match(bucket) or not key or key.endswith("/"):
        raise DetectorUnavailable(f"weights {uri}: expected s3://bucket/key naming one object")
    how_to = f"upload the file there or pass --detector {hint_name}=/path/to/weights"
    if s3_client_factory is None:
        raise DetectorUnavailable(f"weights {uri} need S3 access but no S3 client is configured")

    name = PurePosixPath(key).name
    if name in ("", ".", ".."):
        name = "weights"
    # A digest of the key keeps every object in its own folder: no collisions between keys
    # with the same file name, and no path taken from the key can leave the cache.
    folder = cache_dir / "s3" / bucket / hashlib.sha256(key.encode()).hexdigest()[:16]
    target = folder / name
    meta_path = folder / (name + ".s3meta.json")

    try:
        client = s3_client_factory()
        head = client.head_object(Bucket=bucket, Key=key)
        etag = str(head["ETag"])
        size = int(head["ContentLength"])
        if _cached_copy_matches(target, meta_path, etag, size):
            return target
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("downloading detector weights", extra={"weights_uri": uri, "bytes": size})
        response = client.get_object(Bucket=bucket, Key=key, IfMatch=etag)
        body = response["Body"]
        with _atomic_output(target) as out:
            written = 0
            try:
                for chunk in iter(lambda: body.read(_CHUNK), b""):
                    out.write(chunk)
                    written += len(chunk)
            finally:
                body.close()
            if written != size:
                raise DetectorUnavailable(
                    f"weights {uri}: download stopped after {written} of {size} bytes; try again"
                )
        with _atomic_output(meta_path) as out:
            out.write(json.dumps({"etag": etag, "size": size}).encode())
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "?")
        message = error.get("Message") or ""
        reason = f"{code} {message}".strip()
        raise DetectorUnavailable(
            f"weights {uri} could not be downloaded ({reason}): {how_to}"
        ) from exc
    except (BotoCoreError, OSError) as exc:
        raise DetectorUnavailable(
            f"weights {uri} could not be downloaded ({type(exc).__name__}: "
            f"{_first_line(exc)}): {how_to}"
        ) from exc
    return target


def _cached_copy_matches(target: Path, meta_path: Path, etag: str, size: int) -> bool:
    try:
        meta = json.loads(meta_path.read_text())
        return bool(
            meta.get("etag") == etag and meta.get("size") == size and target.stat().st_size == size
        )
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _atomic_output(target: Path) -> Iterator[Any]:
    """Write to a temporary file beside ``target`` and rename it into place on success, so a
    reader never sees a partial file and an interrupted download leaves nothing behind."""
    handle, temp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".part"
    )
    temp_path = Path(temp_name)
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        temp_path.replace(target)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def _parse_hf_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``hf://org/repo[@revision][/path]`` -> (repo_id, revision, path in repo)."""
    parts = uri.removeprefix("hf://").strip("/").split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise DetectorUnavailable(
            f"weights {uri}: expected hf://org/repo[@revision][/path/in/repo]"
        )
    org, repo_and_revision = parts[0], parts[1]
    repo, _, revision = repo_and_revision.partition("@")
    filename = parts[2] if len(parts) == 3 and parts[2] else None
    return f"{org}/{repo}", revision or None, filename


def _resolve_hf(uri: str, hint_name: str, *, local_only: bool = False) -> Path:
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    try:
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # huggingface_hub < 0.24 keeps its errors in utils
        from huggingface_hub.utils import EntryNotFoundError  # type: ignore[attr-defined]

    repo_id, revision, filename = _parse_hf_uri(uri)
    try:
        if filename is not None:
            return Path(
                hf_hub_download(repo_id, filename, revision=revision, local_files_only=local_only)
            )
        # Only weights and their small config files: a model repo may also hold sample
        # images or code we never need.
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*" + suffix for suffix in WEIGHTS_SUFFIXES] + ["*.json"],
            local_files_only=local_only,
        )
    except (OSError, ValueError, EntryNotFoundError) as exc:
        if filename is not None:
            wanted = PurePosixPath(filename).name
            how_to = f"download {wanted} and pass --detector {hint_name}=/path/to/{wanted}"
        else:
            how_to = (
                f"download the weights file from https://huggingface.co/{repo_id} and pass "
                f"--detector {hint_name}=/path/to/weights"
            )
        if local_only and not getattr(constants, "HF_HUB_OFFLINE", False):
            raise DetectorUnavailable(
                f"weights {uri} are not in the local Hugging Face cache: {how_to}, or name "
                f"the detector (--detector {hint_name}) to download them"
            ) from exc
        if getattr(constants, "HF_HUB_OFFLINE", False):
            raise DetectorUnavailable(
                f"weights {uri} are not available offline: {how_to}, "
                "or set HF_HUB_OFFLINE=0 with network access"
            ) from exc
        raise DetectorUnavailable(
            f"weights {uri} could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {_first_line(exc)}): {how_to}"
        ) from exc
    return select_weights_file(Path(str(snapshot)), uri=uri)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (weights files run to gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> str:
    """Check ``path`` against a pinned sha256; return the digest, or raise
    :class:`WeightsIntegrityError` naming both digests."""
    actual = sha256_file(path)
    if actual != expected.strip().lower():
        raise WeightsIntegrityError(
            f"weights {path} have sha256 {actual}, but the detector spec pins {expected}: "
            "refusing to load a different checkpoint (fix the file or the pin)"
        )
    return actual


# --------------------------------------------------------------------------------------------
# Reading a state dict
# --------------------------------------------------------------------------------------------


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` state dict on the CPU.

    Unwraps a Lightning-style ``{"state_dict": ...}`` and a ``{"model": ...}`` checkpoint and
    strips the ``_orig_mod.`` (torch.compile) and ``module.`` (DataParallel / DDP) prefixes.
    """
    import torch

    raw: object
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw = load_file(str(path), device="cpu")
        except SafetensorError as exc:
            raise CheckpointFormatError(
                f"weights {path} are not a readable safetensors file: {_first_line(exc)}"
            ) from exc
    else:
        import pickle

        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            unsafe = _UNSAFE_GLOBAL.search(str(exc))
            if unsafe:
                raise UnsafeCheckpointError(
                    f"weights {path} are a pickle that needs {unsafe.group(1)} to load, which "
                    "could run arbitrary code: refused (only tensors and plain containers are "
                    "accepted; convert the checkpoint to safetensors or a plain state dict)"
                ) from exc
            raise CheckpointFormatError(
                f"weights {path} cannot be read as a plain torch checkpoint "
                f"({_weights_unpickler_reason(exc)})"
            ) from exc
        except Exception as exc:
            # A damaged file fails anywhere inside torch.load (EOFError, RuntimeError from
            # the zip reader, IndexError from the unpickler, ...): all mean "not readable".
            raise CheckpointFormatError(
                f"weights {path} cannot be read as a torch checkpoint "
                f"({type(exc).__name__}: {_first_line(exc)})"
            ) from exc
    return _flatten_state_dict(raw, path)


def _weights_unpickler_reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            tail = line.split("WeightsUnpickler error:", 1)[1].strip()
            return tail or (lines[index + 1] if index + 1 < len(lines) else "unreadable pickle")
    return lines[0] if lines else type(exc).__name__


def _flatten_state_dict(raw: object, path: Path) -> dict[str, torch.Tensor]:
    import torch

    state: object = raw
    # Lightning keeps the weights under "state_dict"; Community Forensics' training script
    # under "model". Either may hold the other, so unwrap until only tensors remain.
    for _ in range(3):
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        elif isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
            state = state["model"]
        else:
            break
    if not isinstance(state, Mapping) or not state:
        raise CheckpointFormatError(
            f"weights {path} hold no state dict (expected a mapping of names to tensors, or one "
            "under 'state_dict' or 'model')"
        )
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointFormatError(
            f"weights {path}: entries that are not tensors: {', '.join(not_tensors[:5])}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = strip_wrapper_prefixes(str(key))
        if name in out:
            raise CheckpointFormatError(
                f"weights {path}: two entries map to {name!r} once wrapper prefixes are removed"
            )
        out[name] = tensor
    return out


def strip_wrapper_prefixes(key: str) -> str:
    """Remove the ``_orig_mod.`` / ``module.`` prefixes that torch.compile and DataParallel
    add, at the start of a key and, for ``_orig_mod.``, after any parent module (a compiled
    sub-module saves as ``parent._orig_mod.child``)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key.replace("._orig_mod.", ".")
