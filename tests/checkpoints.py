"""Small checkpoints written in exactly the formats the published detectors ship.

The real weights cannot be downloaded here, so tests build the same module structures with a
seeded random initialisation and save them the way the authors did:

- Sumsub "For Fake's Sake": a plain ``torch.save(state_dict)`` (``synthetic.pt``) with keys
  ``model.*`` (timm backbone, ``num_classes=0``), ``clf.0.*``, ``clf.2.*``; or a PyTorch
  Lightning checkpoint with that state dict under ``state_dict``.
- Community Forensics: the Hub's ``PyTorchModelHubMixin`` folder (``config.json`` with the
  constructor arguments + ``model.safetensors``, keys ``vit.*``), or the training script's
  ``{"model": state_dict, ...}`` saved from a ``torch.compile``d model (``_orig_mod.`` keys).

Everything here is built from timm and torch directly, never from the code under test, so
the tests compare the loaders against an independent construction. Random heads give scores
close to 0.5 for every image; the last layer is scaled so scores spread out and a wrong
preprocessing step shows up as a different score.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import nn

SUMSUB_CONVNEXT = "convnext_large_mlp.clip_laion2b_soup_ft_in12k_in1k_384"
SUMSUB_MOBILENET = "tf_mobilenetv3_large_100.in1k"
CONVNEXT_STAND_IN = "test_convnext"  # ConvNeXt structure small enough for the test budget
COMMFOR_VIT_384 = "vit_small_patch16_384.augreg_in21k_ft_in1k"
COMMFOR_VIT_224 = "vit_small_patch16_224.augreg_in21k_ft_in1k"

StateDict = dict[str, torch.Tensor]

# Last-layer gains that put the corpus images' scores well inside (0, 1) for seed 0: found by
# trying, and checked by the fidelity tests (they assert the scores spread out).
SUMSUB_HEAD_GAIN = {SUMSUB_MOBILENET: 20.0, CONVNEXT_STAND_IN: 3.0}
COMMFOR_HEAD_GAIN = 3.0


class SumsubReference(nn.Module):
    """The module Sumsub's checkpoints were saved from, as described on the model cards."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        self.model = timm.create_model(backbone, pretrained=False, num_classes=0)
        self.model.eval()
        # The pooled width is whatever the backbone returns; measure it rather than trust an
        # attribute (works on the meta device too).
        width = self.model(torch.zeros(1, 3, 64, 64)).shape[-1]
        self.clf = nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 2))


class CommForReference(nn.Module):
    """Community Forensics' ``ViTClassifier``: the timm ViT under ``vit`` with its head
    replaced by ``Linear(width, 1)``, as the authors' models.py does."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        self.vit = timm.create_model(backbone, pretrained=False)
        self.vit.head = nn.Linear(self.vit.head.in_features, 1)


def _plain(module: nn.Module) -> StateDict:
    return {key: value.detach().clone().contiguous() for key, value in module.state_dict().items()}


def sumsub_state_dict(backbone: str, *, seed: int = 0, gain: float | None = None) -> StateDict:
    """Seeded Sumsub weights; ``clf.2`` scaled by ``gain`` so softmax scores spread."""
    gain = SUMSUB_HEAD_GAIN.get(backbone, 4.0) if gain is None else gain
    torch.manual_seed(seed)
    module = SumsubReference(backbone)
    with torch.no_grad():
        module.clf[2].weight.mul_(gain)
        module.clf[2].bias.zero_()
        _randomise_norm_statistics(module, seed)
    return _plain(module)


def commfor_state_dict(
    backbone: str, *, seed: int = 0, gain: float = COMMFOR_HEAD_GAIN
) -> StateDict:
    """Seeded Community Forensics weights; ``vit.head`` scaled by ``gain``."""
    torch.manual_seed(seed)
    module = CommForReference(backbone)
    with torch.no_grad():
        module.vit.head.weight.mul_(gain)
        module.vit.head.bias.zero_()
    return _plain(module)


def _randomise_norm_statistics(module: nn.Module, seed: int) -> None:
    """Fresh BatchNorm statistics are mean 0 / var 1; give them values so eval-mode
    normalisation does real work, as it does in trained weights."""
    generator = torch.Generator().manual_seed(seed + 1)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d) and layer.running_mean is not None:
            assert layer.running_var is not None
            size = layer.running_mean.shape
            layer.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            layer.running_var.copy_(torch.rand(size, generator=generator) * 0.5 + 0.75)


def write_sumsub_raw(path: Path, backbone: str, *, seed: int = 0) -> StateDict:
    """``synthetic.pt``: the state dict itself, saved with ``torch.save``."""
    state = sumsub_state_dict(backbone, seed=seed)
    torch.save(state, path)
    return state


def write_sumsub_lightning(path: Path, backbone: str, *, seed: int = 0) -> StateDict:
    """A PyTorch Lightning checkpoint of the same module: the weights under ``state_dict``
    beside training state. Only plain containers, numbers, strings and tensors, as Lightning
    writes them, so ``torch.load(weights_only=True)`` accepts it."""
    state = sumsub_state_dict(backbone, seed=seed)
    first_weight = state["clf.0.weight"]
    checkpoint = {
        "epoch": 29,
        "global_step": 93750,
        "pytorch-lightning_version": "2.0.9",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"ready": 30}}}},
        "callbacks": {
            "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                "wait_count": 2,
                "stopped_epoch": 0,
                "best_score": torch.tensor(0.1834),
                "patience": 5,
            }
        },
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(93750.0), "exp_avg": first_weight * 0}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}],
            }
        ],
        "lr_schedulers": [{"last_epoch": 29, "base_lrs": [1e-4]}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"backbone": backbone, "lr": 1e-4, "batch_size": 32},
    }
    torch.save(checkpoint, path)
    return state


def commfor_hub_config(backbone: str) -> dict[str, object]:
    """The ``config.json`` PyTorchModelHubMixin writes: ViTClassifier's constructor kwargs."""
    architecture = backbone.split(".", 1)[0]  # vit_small_patch16_384
    _, size, patch, input_size = architecture.split("_")
    return {
        "device": "cuda",
        "freeze_backbone": False,
        "input_size": int(input_size),
        "model_size": size,
        "patch_size": int(patch.removeprefix("patch")),
    }


def write_commfor_hub_folder(folder: Path, backbone: str, *, seed: int = 0) -> StateDict:
    """The Hub layout of ``OwensLab/commfor-model-384``: ``config.json`` +
    ``model.safetensors``."""
    state = commfor_state_dict(backbone, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(commfor_hub_config(backbone), indent=2))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return state


def write_commfor_training_checkpoint(path: Path, backbone: str, *, seed: int = 0) -> StateDict:
    """A training-script checkpoint of a ``torch.compile``d model: ``{"model": ...}`` with
    every key prefixed ``_orig_mod.``, beside optimizer and loop state."""
    state = commfor_state_dict(backbone, seed=seed)
    checkpoint = {
        "model": {f"_orig_mod.{key}": value for key, value in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-5, "weight_decay": 1e-2}]},
        "scheduler": {"last_epoch": 12000, "_step_count": 12001},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 17},
        "epoch": 9,
        "itr": 12000,
        "args": {"input_size": 384, "patch_size": 16, "model_size": "small"},
    }
    torch.save(checkpoint, path)
    return state


def populate_hub_cache(
    hub_cache: Path, repo_id: str, files: Mapping[str, bytes], *, commit: str, ref: str | None
) -> None:
    """Lay files out the way huggingface_hub's cache does: content-addressed ``blobs/``,
    ``snapshots/<commit>/<path>`` symlinks to them, and ``refs/<branch>`` naming the commit."""
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
