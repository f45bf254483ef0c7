"""The one explicit registry: built-in detector specs, the families that build them, and the
operator's TOML file that adds or overrides specs.

Specs are plain data. A family's loader is imported only when a detector of that family is
built, so reading the registry never imports torch.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from workers.detectors.base import Detector, DetectorSpec, DetectorUnavailable, Loader

SUMSUB_CONVNEXT = "convnext_large_mlp.clip_laion2b_soup_ft_in12k_in1k_384"
SUMSUB_MOBILENET = "tf_mobilenetv3_large_100.in1k"
COMMFOR_VIT_384 = "vit_small_patch16_384.augreg_in21k_ft_in1k"
COMMFOR_VIT_224 = "vit_small_patch16_224.augreg_in21k_ft_in1k"


def _sumsub(name: str, repo: str, backbone: str, description: str) -> DetectorSpec:
    return DetectorSpec(
        name=name,
        family="sumsub",
        version="1",
        weights=f"hf://{repo}",
        description=description,
        # The index of the "by AI" class is not confirmed against the real weights;
        # third-party code that runs them reads index 0 as "real". Override per spec.
        options={"backbone": backbone, "ai_index": 1},
    )


def _commfor(name: str, repo: str, backbone: str, resize: int, crop: int) -> DetectorSpec:
    return DetectorSpec(
        name=name,
        family="commfor",
        version="1",
        weights=f"hf://{repo}",
        description=f"Community Forensics (Park & Owens, CVPR 2025), ViT-S/16 at {crop} px",
        options={"backbone": backbone, "resize": resize, "crop": crop},
    )


BUILTIN_SPECS: dict[str, DetectorSpec] = {
    spec.name: spec
    for spec in (
        _sumsub(
            "sumsub-sd5",
            "Sumsub/Sumsub-ffs-synthetic-1.0_sd_5",
            SUMSUB_MOBILENET,
            "Sumsub For Fake's Sake 1.0, Stable Diffusion, MobileNetV3-L (~5M)",
        ),
        _sumsub(
            "sumsub-sd200",
            "Sumsub/Sumsub-ffs-synthetic-1.0_sd_200",
            SUMSUB_CONVNEXT,
            "Sumsub For Fake's Sake 1.0, Stable Diffusion, ConvNeXt-L CLIP (~200M)",
        ),
        _sumsub(
            "sumsub-mj5",
            "Sumsub/Sumsub-ffs-synthetic-1.0_mj_5",
            SUMSUB_MOBILENET,
            "Sumsub For Fake's Sake 1.0, Midjourney, MobileNetV3-L (~5M)",
        ),
        _sumsub(
            "sumsub-mj200",
            "Sumsub/Sumsub-ffs-synthetic-1.0_mj_200",
            SUMSUB_CONVNEXT,
            "Sumsub For Fake's Sake 1.0, Midjourney, ConvNeXt-L CLIP (~200M)",
        ),
        _sumsub(
            "sumsub-v2",
            "Sumsub/Sumsub-ffs-synthetic-2.0/synthetic.pt",
            SUMSUB_CONVNEXT,
            "Sumsub For Fake's Sake 2.0, ConvNeXt-L CLIP (~200M)",
        ),
        _commfor("commfor-vit384", "OwensLab/commfor-model-384", COMMFOR_VIT_384, 440, 384),
        _commfor("commfor-vit224", "OwensLab/commfor-model-224", COMMFOR_VIT_224, 256, 224),
        DetectorSpec(
            name="provenance",
            family="provenance",
            version="1",
            description="What the file says about its origin: C2PA, IPTC digital source "
            "type, generator metadata, hidden alpha payloads, invisible watermarks",
            # A signed "made by AI" manifest or a generator's own metadata is grounds for
            # review whatever the pixel models say.
            options={"decisive": True, "watermark_max_p_value": 1e-6},
        ),
    )
}


def _torch_family(family: str) -> Loader:
    """A loader that imports the torch package only when a detector of ``family`` is built."""

    def load(spec: DetectorSpec, *, device: str, weights_path: Path) -> Detector:
        from workers.detectors.torch_models import LOADERS

        return LOADERS[family](spec, device=device, weights_path=weights_path)

    return load


def _load_provenance(spec: DetectorSpec, *, device: str, weights_path: Path) -> Detector:
    from workers.detectors.provenance import load_provenance

    return load_provenance(spec, device=device, weights_path=weights_path)


# family name -> loader. A family that needs no weights file gets weights_path=Path().
# What each family's options mean: workers.detectors.options.FAMILY_OPTIONS.
FAMILIES: dict[str, Loader] = {
    "provenance": _load_provenance,
    "sumsub": _torch_family("sumsub"),
    "commfor": _torch_family("commfor"),
    "timm": _torch_family("timm"),
}


class SpecError(ValueError):
    """A detector spec (from the CLI or a TOML file) is malformed or names nothing known."""


def load_spec_file(path: Path) -> dict[str, DetectorSpec]:
    """Read operator specs from TOML: one ``[detectors.NAME]`` table per detector with
    ``family``, ``version``, ``weights``, optional ``sha256`` and ``description``, and an
    ``[detectors.NAME.options]`` table. A name that exists already is overridden."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"cannot read detector specs from {path}: {exc}") from exc
    tables = document.get("detectors", {})
    if not isinstance(tables, dict):
        raise SpecError(f"{path}: [detectors] must be a table of tables")
    return {name: _spec_from_table(name, table, path) for name, table in tables.items()}


def _spec_from_table(name: str, table: Any, path: Path) -> DetectorSpec:
    if not isinstance(table, dict):
        raise SpecError(f"{path}: [detectors.{name}] must be a table")
    unknown = set(table) - {"family", "version", "weights", "sha256", "description", "options"}
    if unknown:
        raise SpecError(f"{path}: [detectors.{name}] has unknown keys {sorted(unknown)}")
    family = table.get("family")
    if family not in FAMILIES:
        raise SpecError(
            f"{path}: [detectors.{name}] family must be one of {sorted(FAMILIES)}, got {family!r}"
        )
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise SpecError(f"{path}: [detectors.{name}.options] must be a table")
    return DetectorSpec(
        name=name,
        family=family,
        version=str(table.get("version", "1")),
        weights=table.get("weights"),
        sha256=table.get("sha256"),
        description=str(table.get("description", "")),
        options=options,
    )


@dataclass(frozen=True)
class Catalog:
    """The specs known to this process: built-ins overlaid with the operator's file."""

    specs: Mapping[str, DetectorSpec]

    @classmethod
    def build(cls, spec_file: Path | None = None) -> Catalog:
        specs = dict(BUILTIN_SPECS)
        if spec_file is not None:
            specs.update(load_spec_file(spec_file))
        return cls(specs)

    def resolve(self, selector: str) -> DetectorSpec:
        """``NAME`` or ``NAME=WEIGHTS_URI`` (the CLI's ``--detector``)."""
        name, sep, weights = selector.partition("=")
        name = name.strip()
        spec = self.specs.get(name)
        if spec is None:
            raise SpecError(f"unknown detector {name!r}; known: {', '.join(sorted(self.specs))}")
        if sep:
            if not weights.strip():
                raise SpecError(f"--detector {name}= needs a weights URI after '='")
            # An explicit file replaces the published one, and so does its pinned hash.
            spec = replace(spec, weights=weights.strip(), sha256=None)
        return spec


# (weights URI, detector name) -> local file; the name only improves error messages.
WeightsResolver = Callable[[str, str], Path]


def build_detector(spec: DetectorSpec, *, device: str, resolve: WeightsResolver) -> Detector:
    """Fetch the spec's weights and build it. Raises DetectorUnavailable when it cannot run
    here; the message is meant for the operator."""
    loader = FAMILIES.get(spec.family)
    if loader is None:
        raise DetectorUnavailable(f"{spec.name}: unknown family {spec.family!r}")
    weights_path = Path()
    if spec.weights is not None:
        weights_path = resolve(spec.weights, spec.name)
    try:
        return loader(spec, device=device, weights_path=weights_path)
    except ImportError as exc:
        raise DetectorUnavailable(
            f"{spec.name}: needs the Python package {exc.name or exc} ({exc})"
        ) from exc


@dataclass(frozen=True)
class Skipped:
    name: str
    why: str


def build_available(
    specs: Iterable[DetectorSpec], *, device: str, resolve: WeightsResolver
) -> tuple[list[Detector], list[Skipped]]:
    """Build every spec that can run here; the others are returned with the reason."""
    built: list[Detector] = []
    skipped: list[Skipped] = []
    for spec in specs:
        try:
            built.append(build_detector(spec, device=device, resolve=resolve))
        except DetectorUnavailable as exc:
            skipped.append(Skipped(spec.name, str(exc)))
    return built, skipped


def weights_resolver(
    *,
    cache_dir: Path,
    s3_endpoint_url: str | None = None,
    s3_region: str = "us-east-1",
    local_only: bool = False,
) -> WeightsResolver:
    """Resolve weights URIs with this process's S3 endpoint and cache folder (where s3://
    weights are kept; hf:// uses huggingface_hub's cache).

    ``local_only``: hf:// weights only from the local Hugging Face cache (no download).
    """
    from workers.detectors.weights import S3Client, resolve_weights

    def s3_client() -> S3Client:
        import boto3

        client: S3Client = boto3.client("s3", endpoint_url=s3_endpoint_url, region_name=s3_region)
        return client

    def resolve(uri: str, name: str) -> Path:
        return resolve_weights(
            uri,
            s3_client_factory=s3_client,
            cache_dir=cache_dir,
            detector_name=name,
            local_only=local_only,
        )

    return resolve
