"""Typed family options: every spec we ship or document is accepted, a bad value or an
unknown key is refused with a message naming the detector and the option, and reading them
needs no torch."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from workers.detectors.base import DetectorSpec, DetectorUnavailable, derive_version
from workers.detectors.options import (
    FAMILY_OPTIONS,
    DetectorOptionsError,
    Interpolation,
    ProvenanceOptions,
    TimmOptions,
    parse_options,
)
from workers.detectors.registry import BUILTIN_SPECS, FAMILIES, build_available

REPO = Path(__file__).resolve().parents[1]


def spec(family: str, **options: Any) -> DetectorSpec:
    return DetectorSpec(name=f"my-{family}", family=family, version="1", options=options)


def documented_specs() -> dict[str, DetectorSpec]:
    """The operator examples: README's TOML block and docker/detectors.toml (commented)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    example = "\n".join(
        line.removeprefix("# ")
        for line in (REPO / "docker" / "detectors.toml").read_text(encoding="utf-8").splitlines()
        if re.match(r"# (\[|\w+ = )", line)
    )
    specs: dict[str, DetectorSpec] = {}
    for source in [*blocks, example]:
        for name, table in tomllib.loads(source)["detectors"].items():
            specs[name] = DetectorSpec(name, table["family"], "1", options=table["options"])
    return specs


def test_importing_the_options_does_not_import_torch() -> None:
    code = (
        "import sys, workers.detectors.options; "
        "print(sorted({'torch', 'timm', 'torchvision'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out.strip() == "[]"


def test_every_family_has_an_options_model_and_a_loader() -> None:
    from workers.detectors.torch_models import LOADERS

    assert set(FAMILY_OPTIONS) == set(FAMILIES) == {*LOADERS, "provenance"}


@pytest.mark.parametrize("name", sorted(BUILTIN_SPECS))
def test_builtin_specs_are_accepted(name: str) -> None:
    builtin = BUILTIN_SPECS[name]
    options = parse_options(builtin, FAMILY_OPTIONS[builtin.family])
    assert options.decisive == builtin.decisive


def test_documented_specs_are_accepted() -> None:
    specs = documented_specs()
    assert {"sumsub-v2", "commfor-vit384"} <= set(specs)
    for documented in specs.values():
        parse_options(documented, FAMILY_OPTIONS[documented.family])


def test_builtin_versions_are_unchanged() -> None:
    # The version hashes the raw options mapping: typing the options must not move it.
    assert {name: derive_version(s, None) for name, s in BUILTIN_SPECS.items()} == {
        "sumsub-sd5": "1+o10c920f8",
        "sumsub-sd200": "1+oa54d18f0",
        "sumsub-mj5": "1+o10c920f8",
        "sumsub-mj200": "1+oa54d18f0",
        "sumsub-v2": "1+oa54d18f0",
        "commfor-vit384": "1+oc41783e7",
        "commfor-vit224": "1+o7096554d",
        "provenance": "1+o5336f062",
    }


REQUIRED = {
    "sumsub": {"backbone": "b"},
    "commfor": {"backbone": "b"},
    "timm": {"architecture": "a"},
}


@pytest.mark.parametrize("family", sorted(FAMILY_OPTIONS))
def test_decisive_is_a_common_option(family: str) -> None:
    decided = spec(family, **REQUIRED.get(family, {}), decisive=True)
    assert parse_options(decided, FAMILY_OPTIONS[family]).decisive is True
    assert decided.decisive is True
    with pytest.raises(DetectorOptionsError, match="option decisive"):
        parse_options(spec(family, decisive="yes"), FAMILY_OPTIONS[family])


@pytest.mark.parametrize("family", sorted(FAMILY_OPTIONS))
def test_unknown_options_are_refused(family: str) -> None:
    typo = spec(family, **REQUIRED.get(family, {}), decisve=True)
    with pytest.raises(DetectorOptionsError) as caught:
        parse_options(typo, FAMILY_OPTIONS[family])
    message = str(caught.value)
    assert message.startswith(f"detector my-{family} (family {family}): ")
    assert f"unknown {family} options ['decisve']" in message
    assert "known: [" in message and "'decisive'" in message


@pytest.mark.parametrize(
    ("family", "options", "fragment"),
    [
        ("sumsub", {}, "needs option backbone"),
        ("sumsub", {"backbone": ""}, "option backbone"),
        ("sumsub", {"backbone": "b", "ai_index": 2}, "option ai_index"),
        ("sumsub", {"backbone": "b", "ai_index": True}, "option ai_index"),
        ("sumsub", {"backbone": "b", "input_size": [0, 9]}, "option input_size: must be N"),
        ("sumsub", {"backbone": "b", "input_size": "384"}, "option input_size"),
        ("sumsub", {"backbone": "b", "interpolation": "cubic"}, "option interpolation"),
        ("sumsub", {"backbone": "b", "crop_pct": 0}, "option crop_pct"),
        ("sumsub", {"backbone": "b", "crop_pct": float("inf")}, "option crop_pct"),
        ("sumsub", {"backbone": "b", "crop_mode": "zoom"}, "option crop_mode"),
        ("sumsub", {"backbone": "b", "mean": [0.5, 0.5]}, "option mean: must be three numbers"),
        ("sumsub", {"backbone": "b", "std": [0.5, "x", 0.5]}, "option std"),
        ("sumsub", {"backbone": "b", "autocast": "fp8"}, "option autocast"),
        ("commfor", {"backbone": "b", "resize": [440]}, "option resize"),
        ("commfor", {"backbone": "b", "resize": 0}, "option resize"),
        ("commfor", {"backbone": "b", "crop": 2.5}, "option crop"),
        ("commfor", {"backbone": "b", "ai_index": 0}, r"unknown commfor options \['ai_index'\]"),
        ("timm", {}, "needs option architecture"),
        ("timm", {"architecture": "a", "head": "mlp"}, "option head"),
        ("timm", {"architecture": "a", "num_classes": 0}, "option num_classes"),
        ("timm", {"architecture": "a", "head": "commfor", "num_classes": 2}, "1 outputs"),
        ("timm", {"architecture": "a", "activation": "relu"}, "option activation"),
        ("timm", {"architecture": "a", "num_classes": 1, "activation": "softmax"}, "softmax"),
        ("timm", {"architecture": "a", "ai_index": 2}, r"option ai_index .* \[0, 1\]"),
        ("timm", {"architecture": "a", "preprocessing": "manual"}, "option preprocessing"),
        ("timm", {"architecture": "a", "preprocessing": "explicit", "crop": 9}, "mean and std"),
        ("timm", {"architecture": "a", "resize": 256}, r"\['resize'\] do not apply"),
        (
            "timm",
            {"architecture": "a", "preprocessing": "explicit", "crop_pct": 1.0},
            r"\['crop_pct'\] do not apply",
        ),
        ("provenance", {"watermark_max_p_value": 1}, "option watermark_max_p_value"),
        ("provenance", {"watermark_max_pixels": -1}, "option watermark_max_pixels"),
        ("provenance", {"stealth_max_pixels": True}, "option stealth_max_pixels"),
    ],
)
def test_bad_values_are_refused_naming_the_option(
    family: str, options: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(DetectorOptionsError, match=fragment) as caught:
        parse_options(spec(family, **options), FAMILY_OPTIONS[family])
    assert str(caught.value).startswith(f"detector my-{family} (family {family}): ")
    assert isinstance(caught.value, DetectorUnavailable)
    assert isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value)


def test_shorthand_sizes_are_normalised_but_the_spec_is_not() -> None:
    written = spec("timm", architecture="a", input_size=[256, 320], mean=[0, 0.5, 1])
    options = parse_options(written, TimmOptions)
    assert options.input_size == (3, 256, 320)
    assert options.mean == (0.0, 0.5, 1.0)
    assert written.options["input_size"] == [256, 320]


@pytest.mark.parametrize(
    ("options", "outputs", "activation", "index"),
    [
        ({}, 2, "softmax", 1),
        ({"num_classes": 1}, 1, "sigmoid", 0),
        ({"head": "sumsub", "ai_index": 0}, 2, "softmax", 0),
        ({"head": "commfor"}, 1, "sigmoid", 0),
        ({"num_classes": 3, "activation": "sigmoid", "ai_index": 2}, 3, "sigmoid", 2),
    ],
)
def test_timm_head_defaults(
    options: dict[str, Any], outputs: int, activation: str, index: int
) -> None:
    parsed = parse_options(spec("timm", architecture="a", **options), TimmOptions)
    assert (parsed.outputs, parsed.score_activation, parsed.score_index) == (
        outputs,
        activation,
        index,
    )


def test_interpolation_names_are_torchvisions() -> None:
    from typing import get_args

    from torchvision.transforms import InterpolationMode

    assert set(get_args(Interpolation)) == {mode.value for mode in InterpolationMode}


def test_provenance_options_are_provenance_config_fields() -> None:
    from workers.provenance import ProvenanceConfig

    limits = set(ProvenanceOptions.model_fields) - {"decisive"}
    assert limits == {field.name for field in dataclasses.fields(ProvenanceConfig)}


def test_a_mistyped_option_skips_only_that_detector(tmp_path: Path) -> None:
    typo = DetectorSpec(
        "typo",
        "sumsub",
        "1",
        weights=str(tmp_path / "w.pt"),
        options={"backbone": "tf_mobilenetv3_large_100.in1k", "ai_indx": 0},
    )
    built, skipped = build_available([typo], device="cpu", resolve=lambda uri, name: Path(uri))
    assert built == []
    assert [s.name for s in skipped] == ["typo"]
    assert "unknown sumsub options ['ai_indx']" in skipped[0].why
