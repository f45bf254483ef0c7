"""The one loading sequence every torch family goes through, and its steps: read the
weights (hash-checked before anything is unpickled), build the architecture on the meta
device, check the checkpoint fits it, load it strictly, place it on the device.

A family supplies only what differs, as a :class:`FamilyBuild` made from its typed
options: the module factory, the preprocessing (transform, input size, geometry), the score
head, and any check of files beside the weights (Community Forensics' ``config.json``). The
common option ``fast_decode`` is checked against the preprocessing here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from workers.detectors.base import DetectorSpec, DetectorUnavailable
from workers.detectors.options import DetectorOptionsError, TorchOptions, parse_options
from workers.detectors.torch_models.fast_decode import check_fast_decode
from workers.detectors.torch_models.head import ScoreHead
from workers.detectors.torch_models.preprocessing import Preprocessing
from workers.detectors.torch_models.runtime import (
    TorchDetector,
    cpu_batch_limit,
    freeze_graph,
    place,
    resolve_device,
    wants_channels_last,
    wants_frozen_graph,
)
from workers.detectors.weights import (
    CheckpointFormatError,
    load_state_dict,
    select_weights_file,
    sha256_file,
    verify_sha256,
)

logger = logging.getLogger(__name__)

Options = TypeVar("Options", bound=TorchOptions)
# (spec, weights file) -> None, raising when a file beside the weights contradicts the spec.
WeightsCheck = Callable[[DetectorSpec, Path], None]


def _no_check(spec: DetectorSpec, weights_file: Path) -> None:
    del spec, weights_file


@dataclass(frozen=True)
class FamilyBuild:
    """What a family contributes to :func:`load_torch_detector`."""

    architecture: str
    """The timm name or tag, for error messages."""
    factory: Callable[[], nn.Module]
    """Builds the architecture (called on the meta device)."""
    preprocessing: Preprocessing
    head: ScoreHead
    check_weights: WeightsCheck = _no_check


def load_torch_detector(
    spec: DetectorSpec,
    options_model: type[Options],
    plan: Callable[[Options], FamilyBuild],
    *,
    device: str,
    weights_path: Path,
) -> TorchDetector:
    """Options -> the family's plan -> device -> weights -> strict build -> placed detector.

    Everything that can be refused without the weights is refused before they are read;
    an options error from the family's own (timm) checks names the detector too."""
    options = parse_options(spec, options_model)
    try:
        build = plan(options)
        check_fast_decode(options.fast_decode, build.preprocessing.geometry)
        torch_device, autocast_dtype = resolve_device(spec, device, options.autocast)
        path, digest, state = read_weights(spec, weights_path)
        build.check_weights(spec, path)
        module = build_loaded(build.factory, state, spec, path, architecture=build.architecture)
    except DetectorOptionsError as exc:
        raise DetectorOptionsError(f"detector {spec.name} (family {spec.family}): {exc}") from exc
    channels_last = wants_channels_last(build.architecture, torch_device, options.channels_last)
    place(module, torch_device, channels_last=channels_last)
    if wants_frozen_graph(torch_device, options.frozen_graph):
        module = freeze_graph(
            module,
            build.preprocessing.input_size,
            torch_device,
            channels_last=channels_last,
            name=spec.name,
        )
    logger.info(
        "detector loaded",
        extra={
            "detector": spec.name,
            "device": str(torch_device),
            "weights_sha256": digest,
            "frozen_graph": isinstance(module, torch.jit.ScriptModule),
        },
    )
    return TorchDetector(
        spec=spec,
        module=module,
        transform=build.preprocessing.transform,
        input_size=build.preprocessing.input_size,
        head=build.head,
        device=torch_device,
        weights_sha256=digest,
        autocast_dtype=autocast_dtype,
        geometry=build.preprocessing.geometry,
        fast_decode=options.fast_decode,
        channels_last=channels_last,
        largest_useful_batch=cpu_batch_limit(
            build.architecture, build.preprocessing.input_size, torch_device
        ),
    )


def read_weights(
    spec: DetectorSpec, weights_path: Path
) -> tuple[Path, str, dict[str, torch.Tensor]]:
    """The weights file (a folder stands for its single weights file), its sha256 (checked
    against the spec's pin *before* anything is unpickled) and its state dict."""
    if weights_path == Path():
        raise DetectorUnavailable(
            f"detector {spec.name} has no weights: set its weights URI or pass "
            f"--detector {spec.name}=/path/to/weights"
        )
    path = select_weights_file(weights_path)
    digest = verify_sha256(path, spec.sha256) if spec.sha256 else sha256_file(path)
    return path, digest, load_state_dict(path)


def build_loaded(
    factory: Callable[[], nn.Module],
    state: Mapping[str, torch.Tensor],
    spec: DetectorSpec,
    path: Path,
    *,
    architecture: str,
) -> nn.Module:
    """Build the architecture and load ``state`` into it, strictly.

    The module is built on the meta device and takes the checkpoint's tensors as they are
    (``assign=True``), so no time goes into a random initialisation that the weights replace
    at once (ConvNeXt-L has 200M parameters). Floating tensors are then made float32, as
    copying into a freshly built module would. Architectures with non-persistent buffers
    (computed at construction, absent from checkpoints) are built for real instead.
    """
    with torch.device("meta"):
        skeleton = factory()
    _check_fit(skeleton, state, spec, path, architecture)
    saved = set(skeleton.state_dict())
    if any(name not in saved for name, _ in skeleton.named_buffers()):
        module = factory()
        module.load_state_dict(state, strict=True)
        return module
    skeleton.load_state_dict(state, strict=True, assign=True)
    return skeleton.float()


def _check_fit(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    spec: DetectorSpec,
    path: Path,
    architecture: str,
) -> None:
    """A clear error naming the first missing / unexpected / mis-shaped keys, rather than
    torch's multi-line one."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} vs {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_first_few(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_first_few(unexpected)})")
        if wrong_shape:
            problems.append(
                f"{len(wrong_shape)} shape mismatches, checkpoint vs model "
                f"({_first_few(wrong_shape)})"
            )
        raise CheckpointFormatError(
            f"weights {path} do not fit detector {spec.name} (family {spec.family}, "
            f"architecture {architecture}): " + "; ".join(problems)
        )


def check_commfor_config(spec: DetectorSpec, weights_file: Path, *, backbone: str) -> None:
    """The Hub layout's ``config.json`` beside the weights holds the authors' constructor
    arguments (model_size, input_size, patch_size): refuse a backbone option that
    contradicts them."""
    config_path = weights_file.parent / "config.json"
    if not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text())
        expected = (
            f"vit_{config['model_size']}_patch{int(config['patch_size'])}_"
            f"{int(config['input_size'])}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning(
            "unreadable Community Forensics config.json ignored",
            extra={"detector": spec.name, "path": str(config_path)},
        )
        return
    if backbone.split(".", 1)[0] != expected:
        raise CheckpointFormatError(
            f"weights {config_path.parent} are a {expected} model (config.json), but detector "
            f"{spec.name} has backbone {backbone}: set options.backbone to {expected}"
            ".augreg_in21k_ft_in1k"
        )


def _first_few(items: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(items[:count])
    return shown + (", ..." if len(items) > count else "")
