"""A loaded model at work: the device it runs on, mixed precision, and
:class:`TorchDetector`, which scores in two steps so a batching engine can pipeline them:
``preprocess(image) -> (C, H, W) tensor`` on the CPU, then ``forward(batch) -> outputs`` on
the device. ``detect_batch`` does both."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from workers.detectors.base import DetectorOutput, DetectorSpec, DetectorUnavailable, derive_version
from workers.detectors.options import Autocast
from workers.detectors.torch_models.head import ScoreHead
from workers.detectors.torch_models.preprocessing import Transform

AUTOCAST_DTYPES: dict[Autocast, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Staged:
    """A batch on its way to the device: ``copied`` fires on the GPU when it has arrived;
    ``host`` keeps the page-locked source alive until then."""

    tensor: torch.Tensor
    copied: torch.cuda.Event | None = None
    host: torch.Tensor | None = None


@dataclass
class Launched:
    """The model's logits for a batch; ``done`` fires on the GPU when they are computed."""

    logits: torch.Tensor
    done: torch.cuda.Event | None = None


@dataclass(frozen=True)
class _Streams:
    copy: torch.cuda.Stream
    compute: torch.cuda.Stream


class TorchDetector:
    """A loaded torch model with its preprocessing; satisfies :class:`Detector`."""

    def __init__(
        self,
        *,
        spec: DetectorSpec,
        module: nn.Module,
        transform: Transform,
        input_size: tuple[int, int, int],
        head: ScoreHead,
        device: torch.device,
        weights_sha256: str,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.spec = spec
        self._module = module
        self._transform = transform
        self._head = head
        self._device = device
        self._weights_sha256 = weights_sha256
        self._autocast_dtype = autocast_dtype if device.type == "cuda" else None
        self._version = derive_version(spec, weights_sha256)
        self._streams: _Streams | None = None  # made on first use, on a GPU only
        self.input_size = input_size
        """(C, H, W) of every tensor :meth:`preprocess` returns."""

    @property
    def version(self) -> str:
        return self._version

    @property
    def weights_sha256(self) -> str | None:
        return self._weights_sha256

    @property
    def device(self) -> torch.device:
        return self._device

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One image -> a float (C, H, W) tensor on the CPU. Any mode is turned into RGB the
        way the authors' pipelines do (``convert("RGB")``: alpha dropped, grey replicated)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self._transform(image)

    # The forward pass in the steps a streaming engine overlaps: ``collate`` on the host,
    # ``to_device`` (the copy, issued without waiting), ``launch`` (the model's kernels,
    # queued without waiting) and ``read`` (the one point where the host waits for the
    # device). ``forward`` runs them back to back.

    def collate(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Preprocessed images -> one (N, C, H, W) batch on the host; in page-locked memory
        when the model is on a GPU, so that the copy can run while the device works."""
        if self._device.type != "cuda":
            return torch.stack(list(inputs))
        shape = (len(inputs), *inputs[0].shape)
        batch = torch.empty(shape, dtype=inputs[0].dtype, pin_memory=True)
        return torch.stack(list(inputs), out=batch)

    def to_device(self, batch: torch.Tensor) -> Staged:
        """Start copying a collated batch to the model's device (channels-last on CUDA). On
        a GPU the copy runs on a stream of its own, so the next batch travels while the
        current one is computed; the model waits for it (:meth:`launch`), the host does not."""
        if self._device.type != "cuda":
            return Staged(batch.to(self._device))
        streams = self._cuda_streams()
        with torch.cuda.stream(streams.copy):
            moved = batch.to(self._device, non_blocking=True)
            moved = moved.contiguous(memory_format=torch.channels_last)
            copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            copied.record(streams.copy)
        return Staged(moved, copied, host=batch)

    def launch(self, staged: Staged) -> Launched:
        """Queue the model on a staged batch; the logits, not yet read."""
        streams = self._cuda_streams() if self._device.type == "cuda" else None
        with (
            torch.cuda.stream(streams.compute) if streams else nullcontext(),
            torch.inference_mode(),
            torch.autocast(
                device_type=self._device.type,
                dtype=self._autocast_dtype,
                enabled=self._autocast_dtype is not None,
            ),
        ):
            if streams is not None and staged.copied is not None:
                streams.compute.wait_event(staged.copied)
                # The batch was made on the copy stream: its memory is not reused before
                # the model has read it.
                staged.tensor.record_stream(streams.compute)
            logits: torch.Tensor = self._module(staged.tensor)
            done = None
            if streams is not None:
                done = torch.cuda.Event()  # type: ignore[no-untyped-call]
                done.record(streams.compute)
        return Launched(logits, done)

    def read(self, launched: Launched) -> list[DetectorOutput]:
        """Wait for the logits and turn them into one output per image: the one point where
        the host waits for the device."""
        if launched.done is not None:
            launched.done.synchronize()
        return self._head.outputs(launched.logits)

    def _cuda_streams(self) -> _Streams:
        if self._streams is None:
            new_stream = torch.cuda.Stream
            self._streams = _Streams(
                copy=new_stream(self._device),  # type: ignore[no-untyped-call]
                compute=new_stream(self._device),  # type: ignore[no-untyped-call]
            )
        return self._streams

    def forward(self, batch: torch.Tensor) -> list[DetectorOutput]:
        """A stacked (N, C, H, W) batch from :meth:`preprocess` -> one output per row."""
        if batch.shape[0] == 0:
            return []
        return self.read(self.launch(self.to_device(batch)))

    def detect_batch(
        self, images: Sequence[Image.Image], raw: Sequence[bytes]
    ) -> list[DetectorOutput]:
        if not images:
            return []
        return self.forward(torch.stack([self.preprocess(image) for image in images]))


def resolve_device(
    spec: DetectorSpec, device: str, autocast: Autocast | None
) -> tuple[torch.device, torch.dtype | None]:
    """The torch device a detector runs on (``cpu``, ``cuda`` or ``cuda:N``, present here)
    and the autocast dtype of its ``autocast`` option."""
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be cpu, cuda or cuda:N, not {device!r}") from exc
    if torch_device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, not {device!r}")
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise DetectorUnavailable(
                f"detector {spec.name} is set to run on {device}, but this torch build or "
                "machine has no CUDA device: use device cpu or run on a GPU node"
            )
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise DetectorUnavailable(
                f"detector {spec.name} is set to run on {device}, but only "
                f"{torch.cuda.device_count()} CUDA devices are visible"
            )
    # Autocast is a CUDA speed-up; on the CPU scores stay float32 (TorchDetector ignores it).
    return torch_device, AUTOCAST_DTYPES[autocast] if autocast is not None else None


def place(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in eval mode on ``device``; channels-last on CUDA, as :meth:`forward`
    feeds it."""
    module.eval()
    module.to(device)
    if device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    return module
