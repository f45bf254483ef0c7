"""Resolving weights URIs (local, S3 on a real moto server, Hugging Face cache offline) and
reading checkpoints safely."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from botocore.exceptions import ResponseStreamingError
from safetensors.torch import save_file

from workers.detectors.base import DetectorUnavailable
from workers.detectors.weights import (
    CheckpointFormatError,
    S3Client,
    UnsafeCheckpointError,
    WeightsIntegrityError,
    load_state_dict,
    resolve_weights,
    sha256_file,
    strip_wrapper_prefixes,
    verify_sha256,
)

from checkpoints import (
    SUMSUB_MOBILENET,
    populate_hub_cache,
    write_commfor_hub_folder,
    write_commfor_training_checkpoint,
    write_sumsub_lightning,
    write_sumsub_raw,
)
from conftest import s3_client

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"layer.weight": torch.randn(4, 3), "layer.bias": torch.randn(4)}


def assert_one_line(exc: BaseException, *fragments: str) -> None:
    message = str(exc)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def resolve_local(uri: str, cache_dir: Path) -> Path:
    return resolve_weights(uri, s3_client_factory=None, cache_dir=cache_dir)


# --------------------------------------------------------------------------------------------
# Local paths and folders
# --------------------------------------------------------------------------------------------


def test_local_path_and_file_uri_are_used_where_they_are(tmp_path: Path) -> None:
    weights = tmp_path / "my weights" / "synthetic.pt"
    weights.parent.mkdir()
    torch.save(small_state(), weights)

    assert resolve_local(str(weights), tmp_path / "cache") == weights
    assert resolve_local(weights.as_uri(), tmp_path / "cache") == weights  # %20-quoted space
    assert not (tmp_path / "cache").exists()  # nothing copied


def test_local_folder_with_one_weights_file_resolves_to_it(tmp_path: Path) -> None:
    folder = tmp_path / "commfor-model-384"
    write_commfor_hub_folder(folder, "vit_tiny_patch16_224")
    (folder / "README.md").write_text("model card")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "model.safetensors.lock").write_text("")

    assert resolve_local(str(folder), tmp_path) == folder / "model.safetensors"


def test_folder_with_two_weights_files_is_refused_with_both_named(tmp_path: Path) -> None:
    folder = tmp_path / "snapshot"
    folder.mkdir()
    save_file(small_state(), str(folder / "model.safetensors"))
    torch.save(small_state(), folder / "pytorch_model.bin")

    with pytest.raises(DetectorUnavailable) as caught:
        resolve_local(str(folder), tmp_path)
    assert_one_line(caught.value, "model.safetensors", "pytorch_model.bin", str(folder))


def test_folder_without_weights_and_missing_path_are_unavailable(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DetectorUnavailable) as caught:
        resolve_local(str(tmp_path / "empty"), tmp_path)
    assert_one_line(caught.value, "no weights file", "*.safetensors")

    missing = tmp_path / "nope" / "synthetic.pt"
    with pytest.raises(DetectorUnavailable) as caught:
        resolve_weights(
            str(missing), s3_client_factory=None, cache_dir=tmp_path, detector_name="sumsub-v2"
        )
    assert_one_line(caught.value, str(missing), "--detector sumsub-v2=")


# --------------------------------------------------------------------------------------------
# S3, against a real moto server
# --------------------------------------------------------------------------------------------

BUCKET = "synthsentry-weights"


@pytest.fixture
def s3(s3_endpoint: str) -> Iterator[Any]:
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield client
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


def test_s3_object_is_downloaded_once_and_again_when_it_changes(s3: Any, tmp_path: Path) -> None:
    first = b"first checkpoint bytes" * 1000
    s3.put_object(Bucket=BUCKET, Key="sumsub/v2/synthetic.pt", Body=first)
    uri = f"s3://{BUCKET}/sumsub/v2/synthetic.pt"
    cache = tmp_path / "cache"

    path = resolve_weights(uri, s3_client_factory=lambda: s3, cache_dir=cache)
    assert path.name == "synthetic.pt"
    assert path.is_relative_to(cache)
    assert path.read_bytes() == first
    inode = path.stat().st_ino

    # Same ETag and size: the cached file is kept, not rewritten (a rewrite renames a new
    # file into place, which changes the inode).
    again = resolve_weights(uri, s3_client_factory=lambda: s3, cache_dir=cache)
    assert again == path
    assert again.stat().st_ino == inode

    second = b"second checkpoint" * 999
    s3.put_object(Bucket=BUCKET, Key="sumsub/v2/synthetic.pt", Body=second)
    changed = resolve_weights(uri, s3_client_factory=lambda: s3, cache_dir=cache)
    assert changed == path
    assert changed.read_bytes() == second
    assert not [p for p in cache.rglob("*.part")]


def test_s3_cached_copy_of_another_size_is_replaced(s3: Any, tmp_path: Path) -> None:
    s3.put_object(Bucket=BUCKET, Key="w.safetensors", Body=b"x" * 100)
    uri = f"s3://{BUCKET}/w.safetensors"
    path = resolve_weights(uri, s3_client_factory=lambda: s3, cache_dir=tmp_path)
    path.write_bytes(b"truncated")

    assert resolve_weights(uri, s3_client_factory=lambda: s3, cache_dir=tmp_path).read_bytes() == (
        b"x" * 100
    )


def test_s3_keys_that_share_a_file_name_do_not_collide(s3: Any, tmp_path: Path) -> None:
    s3.put_object(Bucket=BUCKET, Key="a/model.pt", Body=b"a")
    s3.put_object(Bucket=BUCKET, Key="b/model.pt", Body=b"b")

    a = resolve_weights(
        f"s3://{BUCKET}/a/model.pt", s3_client_factory=lambda: s3, cache_dir=tmp_path
    )
    b = resolve_weights(
        f"s3://{BUCKET}/b/model.pt", s3_client_factory=lambda: s3, cache_dir=tmp_path
    )
    assert (a.read_bytes(), b.read_bytes()) == (b"a", b"b")


@pytest.mark.parametrize(
    "uri", [f"s3://{BUCKET}/missing/synthetic.pt", "s3://no-such-bucket-here/synthetic.pt"]
)
def test_s3_missing_object_is_unavailable_with_one_line(s3: Any, tmp_path: Path, uri: str) -> None:
    with pytest.raises(DetectorUnavailable) as caught:
        resolve_weights(
            uri, s3_client_factory=lambda: s3, cache_dir=tmp_path, detector_name="sumsub-v2"
        )
    assert_one_line(caught.value, uri, "--detector sumsub-v2=/path/to/weights")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_s3_without_a_client_or_with_a_bad_uri_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DetectorUnavailable) as caught:
        resolve_weights(f"s3://{BUCKET}/x.pt", s3_client_factory=None, cache_dir=tmp_path)
    assert_one_line(caught.value, f"s3://{BUCKET}/x.pt", "no S3 client")
    for uri in ("s3://bucket-only", "s3://B@d/x.pt", f"s3://{BUCKET}/folder/"):
        with pytest.raises(DetectorUnavailable):
            resolve_weights(uri, s3_client_factory=None, cache_dir=tmp_path)


class _BrokenBody:
    """A response body whose connection drops after the first chunk."""

    def __init__(self, body: Any) -> None:
        self._body = body
        self._reads = 0

    def read(self, amount: int) -> bytes:
        self._reads += 1
        if self._reads > 1:
            raise ResponseStreamingError(error="connection reset by peer")
        data: bytes = self._body.read(amount)
        return data

    def close(self) -> None:
        self._body.close()


class _DroppingClient:
    """The real moto-backed client, except that downloads break half-way."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def head_object(self, *, Bucket: str, Key: str) -> Mapping[str, Any]:
        response: Mapping[str, Any] = self._client.head_object(Bucket=Bucket, Key=Key)
        return response

    def get_object(self, *, Bucket: str, Key: str, IfMatch: str) -> Mapping[str, Any]:
        response = dict(self._client.get_object(Bucket=Bucket, Key=Key, IfMatch=IfMatch))
        response["Body"] = _BrokenBody(response["Body"])
        return response


def test_interrupted_s3_download_leaves_no_file(s3: Any, tmp_path: Path) -> None:
    s3.put_object(Bucket=BUCKET, Key="big.pt", Body=os.urandom(3 * 1024 * 1024))
    client: S3Client = _DroppingClient(s3)

    with pytest.raises(DetectorUnavailable) as caught:
        resolve_weights(
            f"s3://{BUCKET}/big.pt", s3_client_factory=lambda: client, cache_dir=tmp_path
        )
    assert_one_line(caught.value, f"s3://{BUCKET}/big.pt", "ResponseStreamingError")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


# --------------------------------------------------------------------------------------------
# Hugging Face Hub: a pre-populated cache, HF_HUB_OFFLINE=1
# --------------------------------------------------------------------------------------------

COMMIT = "3f1c0e1ad1b2c3d4e5f60718293a4b5c6d7e8f90"
OLDER_COMMIT = "0123456789abcdef0123456789abcdef01234567"


# huggingface_hub reads HF_HOME / HF_HUB_OFFLINE once, at import; the resolution therefore
# runs in a fresh interpreter started with the environment a worker would have.
_RESOLVE_SCRIPT = """
import json, sys
from pathlib import Path
from workers.detectors.base import DetectorUnavailable
from workers.detectors.weights import resolve_weights

results = {}
for uri in json.loads(sys.argv[1]):
    try:
        path = resolve_weights(
            uri, s3_client_factory=None, cache_dir=Path(sys.argv[2]), detector_name="sumsub-v2"
        )
        results[uri] = {"path": str(path)}
    except DetectorUnavailable as exc:
        results[uri] = {"error": type(exc).__name__, "message": str(exc)}
print(json.dumps(results))
"""

HF_URIS = {
    "repo": "hf://Sumsub/Sumsub-ffs-synthetic-2.0",
    "file": "hf://Sumsub/Sumsub-ffs-synthetic-2.0/synthetic.pt",
    "commit": f"hf://Sumsub/Sumsub-ffs-synthetic-2.0@{COMMIT}",
    "commit_file": f"hf://Sumsub/Sumsub-ffs-synthetic-2.0@{COMMIT}/synthetic.pt",
    "older_commit": f"hf://Sumsub/Sumsub-ffs-synthetic-2.0@{OLDER_COMMIT}",
    "mixin": "hf://OwensLab/commfor-model-384",
    "two": "hf://someone/two-checkpoints",
    "not_cached": "hf://Sumsub/Sumsub-ffs-synthetic-1.0_mj_200",
    "not_cached_file": "hf://Sumsub/Sumsub-ffs-synthetic-1.0_mj_200/synthetic.pt",
    "missing_file": "hf://Sumsub/Sumsub-ffs-synthetic-2.0/other.pt",
}


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hf")
    hub_cache = root / "home" / "hub"  # HF_HOME/hub is the hub cache
    sumsub_file = root / "synthetic.pt"
    torch.save(small_state(), sumsub_file)
    populate_hub_cache(
        hub_cache,
        "Sumsub/Sumsub-ffs-synthetic-2.0",
        {
            "synthetic.pt": sumsub_file.read_bytes(),
            "README.md": b"---\nlicense: cc-by-sa-3.0\n---\n",
            "images/2.jpg": b"\xff\xd8 not really a jpeg",
        },
        commit=COMMIT,
        ref="main",
    )
    mixin = root / "mixin"
    write_commfor_hub_folder(mixin, "vit_tiny_patch16_224")
    populate_hub_cache(
        hub_cache,
        "OwensLab/commfor-model-384",
        {name: (mixin / name).read_bytes() for name in ("config.json", "model.safetensors")},
        commit=COMMIT,
        ref="main",
    )
    populate_hub_cache(
        hub_cache,
        "someone/two-checkpoints",
        {"a.safetensors": b"a", "b.bin": b"b"},
        commit=COMMIT,
        ref="main",
    )

    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "HUGGINGFACE_"))
    }
    env.update({"HF_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1"})
    completed = subprocess.run(
        [sys.executable, "-c", _RESOLVE_SCRIPT, json.dumps(list(HF_URIS.values())), str(root)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    return {"results": results, "hub_cache": hub_cache, "sumsub_bytes": sumsub_file.read_bytes()}


def hf_result(offline_hub: dict[str, Any], case: str) -> dict[str, str]:
    result: dict[str, str] = offline_hub["results"][HF_URIS[case]]
    return result


def test_hf_repo_snapshot_resolves_to_its_single_weights_file(offline_hub: dict[str, Any]) -> None:
    snapshot = offline_hub["hub_cache"] / "models--Sumsub--Sumsub-ffs-synthetic-2.0" / "snapshots"
    for case in ("repo", "file", "commit", "commit_file"):
        path = Path(hf_result(offline_hub, case)["path"])
        assert path == snapshot / COMMIT / "synthetic.pt", case
        assert path.read_bytes() == offline_hub["sumsub_bytes"]
    torch.testing.assert_close(load_state_dict(path), small_state())


def test_hf_mixin_repo_resolves_to_model_safetensors(offline_hub: dict[str, Any]) -> None:
    path = Path(hf_result(offline_hub, "mixin")["path"])
    assert path.name == "model.safetensors"
    assert (path.parent / "config.json").is_file()


def test_hf_repo_with_two_weights_files_lists_them(offline_hub: dict[str, Any]) -> None:
    result = hf_result(offline_hub, "two")
    assert result["error"] == "DetectorUnavailable"
    assert "a.safetensors, b.bin" in result["message"]
    assert HF_URIS["two"] in result["message"]


@pytest.mark.parametrize("case", ["not_cached", "older_commit", "missing_file"])
def test_hf_offline_and_not_cached_is_one_clear_line(
    offline_hub: dict[str, Any], case: str
) -> None:
    result = hf_result(offline_hub, case)
    assert result["error"] == "DetectorUnavailable"
    message = result["message"]
    assert "\n" not in message
    assert message.startswith(f"weights {HF_URIS[case]} are not available offline: download ")
    assert message.endswith("or set HF_HUB_OFFLINE=0 with network access")
    assert "--detector sumsub-v2=/path/to/" in message


def test_hf_offline_message_names_the_file_to_download(offline_hub: dict[str, Any]) -> None:
    assert hf_result(offline_hub, "not_cached_file")["message"] == (
        f"weights {HF_URIS['not_cached_file']} are not available offline: download synthetic.pt "
        "and pass --detector sumsub-v2=/path/to/synthetic.pt, or set HF_HUB_OFFLINE=0 with "
        "network access"
    )


# --------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------


def test_sha256_file_matches_hashlib_and_pin_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    data = os.urandom(2 * 1024 * 1024 + 17)  # more than one read chunk
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()

    assert sha256_file(path) == digest
    assert verify_sha256(path, digest.upper()) == digest

    with pytest.raises(WeightsIntegrityError) as caught:
        verify_sha256(path, "0" * 64)
    assert isinstance(caught.value, DetectorUnavailable)
    assert_one_line(caught.value, digest, "0" * 64, str(path))


# --------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------


def _write_marker(path: str) -> None:
    Path(path).write_text("code from the checkpoint ran")


class CodeOnLoad:
    """Unpickling this runs ``_write_marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_write_marker, (str(self.marker),))


def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"layer.weight": torch.zeros(2), "payload": CodeOnLoad(marker)}, checkpoint)

    with pytest.raises(UnsafeCheckpointError) as caught:
        load_state_dict(checkpoint)
    assert_one_line(caught.value, str(checkpoint), "_write_marker", "refused")
    assert not marker.exists()

    # The file really does run code when loaded without weights_only (so the check above
    # proves something): demonstrated on a copy, with a marker of its own.
    demo_marker = tmp_path / "demo-marker"
    torch.save({"payload": CodeOnLoad(demo_marker)}, tmp_path / "demo.pt")
    torch.load(tmp_path / "demo.pt", weights_only=False)
    assert demo_marker.exists()


def test_unreadable_files_are_clear_format_errors(tmp_path: Path) -> None:
    cases = {
        "garbage.pt": b"this is not a checkpoint",
        "truncated.pt": b"PK\x03\x04 truncated zip",
        "empty.bin": b"",
        "garbage.safetensors": b"\xff" * 32,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointFormatError) as caught:
            load_state_dict(tmp_path / name)
        assert_one_line(caught.value, str(tmp_path / name))

    torch.save({"not": "tensors", "count": 3}, tmp_path / "config.pt")
    with pytest.raises(CheckpointFormatError, match="not tensors: not, count"):
        load_state_dict(tmp_path / "config.pt")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("module.vit.head.weight", "vit.head.weight"),
        ("_orig_mod.vit.head.weight", "vit.head.weight"),
        ("module._orig_mod.model.stem.0.weight", "model.stem.0.weight"),
        ("_orig_mod.module.clf.0.bias", "clf.0.bias"),
        ("vit._orig_mod.blocks.0.norm1.weight", "vit.blocks.0.norm1.weight"),
        ("model.blocks.0.module_x.weight", "model.blocks.0.module_x.weight"),
        ("clf.2.weight", "clf.2.weight"),
    ],
)
def test_wrapper_prefixes_are_stripped(key: str, expected: str) -> None:
    assert strip_wrapper_prefixes(key) == expected


def test_prefixed_state_dict_loads_with_clean_keys(tmp_path: Path) -> None:
    state = small_state()
    torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    torch.testing.assert_close(load_state_dict(tmp_path / "ddp.pt"), state)

    torch.save(
        {"layer.weight": state["layer.weight"], "module.layer.weight": state["layer.bias"]},
        tmp_path / "dup.pt",
    )
    with pytest.raises(CheckpointFormatError, match=r"two entries map to .layer\.weight."):
        load_state_dict(tmp_path / "dup.pt")


def test_published_checkpoint_layouts_unwrap_to_the_same_state_dict(tmp_path: Path) -> None:
    raw = write_sumsub_raw(tmp_path / "synthetic.pt", SUMSUB_MOBILENET)
    lightning = write_sumsub_lightning(tmp_path / "epoch=29.ckpt", SUMSUB_MOBILENET)
    assert set(raw) == set(lightning)
    assert any(key.startswith("clf.2.") for key in raw)
    torch.testing.assert_close(load_state_dict(tmp_path / "synthetic.pt"), raw)
    torch.testing.assert_close(load_state_dict(tmp_path / "epoch=29.ckpt"), lightning)

    trained = write_commfor_training_checkpoint(tmp_path / "ckpt.pt", "vit_tiny_patch16_224")
    hub = write_commfor_hub_folder(tmp_path / "hub", "vit_tiny_patch16_224")
    assert all(key.startswith("vit.") for key in trained)
    assert "vit.head.weight" in hub
    torch.testing.assert_close(load_state_dict(tmp_path / "ckpt.pt"), trained)
    torch.testing.assert_close(load_state_dict(tmp_path / "hub" / "model.safetensors"), hub)
