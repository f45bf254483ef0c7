"""Every family loads from every weights source, through the real command line: the same
checkpoint from a local path, from s3:// on a real S3-protocol server (moto over HTTP) and
from hf:// out of a pre-populated Hugging Face cache in offline mode gives the same weights
hash and the same score."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from checkpoints import (
    COMMFOR_VIT_224,
    SUMSUB_MOBILENET,
    populate_hub_cache,
    write_commfor_hub_folder,
    write_sumsub_raw,
)
from conftest import s3_client

BUCKET = "synthsentry-models"
COMMIT = "7" * 40


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    return BUCKET


def _upload(endpoint: str, key: str, path: Path) -> str:
    s3_client(endpoint).upload_file(str(path), BUCKET, key)
    return f"s3://{BUCKET}/{key}"


def _verify(selector: str, data_dir: Path, endpoint: str, **env: str) -> dict[str, str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    full_env.update(
        SYNTHSENTRY_DATA_DIR=str(data_dir),
        SYNTHSENTRY_S3_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        HF_HOME=str(data_dir / "hf"),
        HF_HUB_OFFLINE="1",
        **env,
    )
    result = subprocess.run(
        [sys.executable, "-m", "synthsentry.cli", "detectors", "verify", selector],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    fields = dict(re.findall(r"^(weights sha256|probe score|version)\s+(\S+)", result.stdout, re.M))
    assert set(fields) == {"weights sha256", "probe score", "version"}, result.stdout
    return fields


def _same_everywhere(results: list[dict[str, str]], weights_file: Path) -> None:
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert {r["weights sha256"] for r in results} == {digest}
    assert len({r["version"] for r in results}) == 1
    scores = [float(r["probe score"]) for r in results]
    assert max(scores) - min(scores) <= 1e-4


def test_sumsub_from_local_s3_and_hub(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    weights = tmp_path / "model.pt"
    write_sumsub_raw(weights, SUMSUB_MOBILENET, seed=5)
    data_dir = tmp_path / "data"
    populate_hub_cache(
        data_dir / "hf" / "hub",
        "Sumsub/Sumsub-ffs-synthetic-1.0_mj_5",
        {"model.pt": weights.read_bytes()},
        commit=COMMIT,
        ref="main",
    )
    s3_uri = _upload(s3_endpoint, "sumsub/mj5/model.pt", weights)
    results = [
        _verify(f"sumsub-mj5={weights}", data_dir, s3_endpoint),
        _verify(f"sumsub-mj5={s3_uri}", data_dir, s3_endpoint),
        _verify("sumsub-mj5", data_dir, s3_endpoint),  # the built-in hf:// URI
        _verify(
            f"sumsub-mj5=hf://Sumsub/Sumsub-ffs-synthetic-1.0_mj_5@{COMMIT}", data_dir, s3_endpoint
        ),
    ]
    _same_everywhere(results, weights)


def test_commfor_from_local_s3_and_hub(tmp_path: Path, s3_endpoint: str, bucket: str) -> None:
    folder = tmp_path / "commfor-model-224"
    write_commfor_hub_folder(folder, COMMFOR_VIT_224, seed=5)
    data_dir = tmp_path / "data"
    populate_hub_cache(
        data_dir / "hf" / "hub",
        "OwensLab/commfor-model-224",
        {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")},
        commit=COMMIT,
        ref="main",
    )
    s3_uri = _upload(s3_endpoint, "commfor/model.safetensors", folder / "model.safetensors")
    results = [
        _verify(f"commfor-vit224={folder}", data_dir, s3_endpoint),
        _verify(f"commfor-vit224={s3_uri}", data_dir, s3_endpoint),
        _verify("commfor-vit224", data_dir, s3_endpoint),
    ]
    _same_everywhere(results, folder / "model.safetensors")


def test_generic_timm_spec_from_local_s3_and_hub(
    tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    torch.manual_seed(5)
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=2)
    weights = tmp_path / "classifier.pth"
    torch.save(net.state_dict(), weights)
    data_dir = tmp_path / "data"
    populate_hub_cache(
        data_dir / "hf" / "hub",
        "acme/ai-detector",
        {"classifier.pth": weights.read_bytes()},
        commit=COMMIT,
        ref="main",
    )
    s3_uri = _upload(s3_endpoint, "acme/classifier.pth", weights)
    config = tmp_path / "detectors.toml"
    config.write_text(
        '[detectors.acme]\nfamily = "timm"\nweights = "hf://acme/ai-detector"\n'
        '[detectors.acme.options]\narchitecture = "test_efficientnet"\nnum_classes = 2\n'
        'activation = "softmax"\nai_index = 1\n',
        encoding="utf-8",
    )
    env = {"SYNTHSENTRY_DETECTOR_CONFIG": str(config)}
    results = [
        _verify(f"acme={weights}", data_dir, s3_endpoint, **env),
        _verify(f"acme={s3_uri}", data_dir, s3_endpoint, **env),
        _verify("acme", data_dir, s3_endpoint, **env),
    ]
    _same_everywhere(results, weights)
