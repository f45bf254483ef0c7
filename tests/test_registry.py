"""The detector catalog: built-in specs, operator TOML files and the CLI's NAME=URI form."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from workers.detectors.base import DetectorSpec, DetectorUnavailable, derive_version
from workers.detectors.registry import (
    BUILTIN_SPECS,
    Catalog,
    SpecError,
    build_available,
    load_spec_file,
)


def test_builtin_specs_cover_the_published_detectors() -> None:
    assert set(BUILTIN_SPECS) == {
        "sumsub-sd5",
        "sumsub-sd200",
        "sumsub-mj5",
        "sumsub-mj200",
        "sumsub-v2",
        "commfor-vit384",
        "commfor-vit224",
        "provenance",
    }
    assert BUILTIN_SPECS["sumsub-v2"].weights == "hf://Sumsub/Sumsub-ffs-synthetic-2.0/synthetic.pt"
    assert BUILTIN_SPECS["sumsub-mj5"].options["backbone"] == "tf_mobilenetv3_large_100.in1k"
    assert BUILTIN_SPECS["commfor-vit224"].options["crop"] == 224


def test_reading_the_registry_does_not_import_torch() -> None:
    # The API process reads the catalog and must be able to run without torch.
    import subprocess

    code = (
        "import sys; from workers.detectors.registry import Catalog; Catalog.build(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_cli_selector_overrides_weights_and_drops_the_pinned_hash() -> None:
    catalog = Catalog({"x": DetectorSpec("x", "sumsub", "1", weights="hf://a/b", sha256="ab" * 32)})
    spec = catalog.resolve("x=/tmp/w.pt")
    assert spec.weights == "/tmp/w.pt"
    assert spec.sha256 is None
    assert catalog.resolve("x").weights == "hf://a/b"


@pytest.mark.parametrize(
    ("selector", "message"),
    [("nope", "unknown detector 'nope'"), ("x=", "needs a weights URI")],
)
def test_bad_selectors_are_usage_errors(selector: str, message: str) -> None:
    catalog = Catalog({"x": DetectorSpec("x", "sumsub", "1")})
    with pytest.raises(SpecError, match=message):
        catalog.resolve(selector)


def test_spec_file_adds_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "detectors.toml"
    path.write_text(
        """
[detectors.my-vit]
family = "timm"
version = "3"
weights = "s3://models/vit.safetensors"
sha256 = "00ff"
[detectors.my-vit.options]
architecture = "vit_small_patch16_224"
activation = "sigmoid"

[detectors.sumsub-v2]
family = "sumsub"
weights = "/srv/weights/synthetic.pt"
[detectors.sumsub-v2.options]
backbone = "convnext_large_mlp.clip_laion2b_soup_ft_in12k_in1k_384"
ai_index = 0
""",
        encoding="utf-8",
    )
    catalog = Catalog.build(path)
    assert catalog.specs["my-vit"].family == "timm"
    assert catalog.specs["my-vit"].options["activation"] == "sigmoid"
    assert catalog.specs["sumsub-v2"].weights == "/srv/weights/synthetic.pt"
    assert catalog.specs["sumsub-v2"].options["ai_index"] == 0
    assert "commfor-vit384" in catalog.specs


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[detectors.a]\nfamily = "nope"\n', "family must be one of"),
        ('[detectors.a]\nfamily = "timm"\nweight = "x"\n', "unknown keys"),
        ("[detectors\n", "cannot read"),
        ('detectors = "x"\n', "must be a table"),
    ],
)
def test_malformed_spec_files_are_refused(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "d.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(SpecError, match=message):
        load_spec_file(path)


def test_unavailable_weights_are_skipped_with_the_reason() -> None:
    def offline(uri: str, name: str) -> Path:
        raise DetectorUnavailable(f"weights {uri} are not available offline")

    built, skipped = build_available(
        [BUILTIN_SPECS["sumsub-mj5"], BUILTIN_SPECS["commfor-vit384"]],
        device="cpu",
        resolve=offline,
    )
    assert built == []
    assert [s.name for s in skipped] == ["sumsub-mj5", "commfor-vit384"]
    assert "hf://Sumsub/Sumsub-ffs-synthetic-1.0_mj_5" in skipped[0].why


def test_version_changes_with_options_and_weights() -> None:
    spec = DetectorSpec("x", "sumsub", "1", options={"ai_index": 1})
    base = derive_version(spec, "a" * 64)
    assert base.startswith("1+o")
    assert base.endswith("+w" + "a" * 12)
    assert derive_version(spec, "b" * 64) != base
    assert (
        derive_version(DetectorSpec("x", "sumsub", "1", options={"ai_index": 0}), "a" * 64) != base
    )
    assert (
        derive_version(DetectorSpec("x", "sumsub", "2", options={"ai_index": 1}), "a" * 64) != base
    )
