"""A loaded model at work: the device it runs on, mixed precision, and
:class:`TorchDetector`, which scores in two steps so a batching engine can pipeline them:
``preprocess(image) -> (C, H, W) tensor`` on the CPU, then ``forward(batch) -> outputs`` on
the device. ``detect_batch`` does both. With the option ``fast_decode``
(:mod:`~workers.detectors.torch_models.fast_decode`) a detector also says how small a JPEG
may be decoded for it (``decode_size``), and with ``gpu`` takes the file's bytes
(``preprocess_encoded``) and decodes them on its device in ``to_device``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from workers.detectors.base import DetectorOutput, DetectorSpec, DetectorUnavailable, derive_version
from workers.detectors.options import Autocast, FastDecode
from workers.detectors.torch_models.fast_decode import (
    DeviceInput,
    DeviceJpegPipeline,
    EncodedBatch,
    EncodedJpeg,
    decode_size,
)
from workers.detectors.torch_models.head import ScoreHead
from workers.detectors.torch_models.preprocessing import Geometry, Transform

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES: dict[Autocast, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

# How far a frozen graph's logits may stray from the module's on the check batch (folding a
# batch norm into its convolution moves float32 results by ~1e-7).
GRAPH_TOLERANCE = 1e-4

# Backbones whose forward pass on the CPU is faster channels-last (a substring of the timm
# name). Measured with benchmarks/bench_engine.py's model ceiling: MobileNetV3-L 2.6x at
# batch 16; ConvNeXt-L 0.95x and ViT-S 1.0x, so they stay contiguous on the CPU.
CPU_CHANNELS_LAST = ("mobilenetv3",)

# On the CPU a batch of large inputs gains nothing once its activations outgrow the caches,
# and a long batch holds every image of it back: inputs of CPU_LARGE_INPUT px or more go
# in batches of at most CPU_LARGE_INPUT_BATCH, one at a time for the backbones of
# CPU_LARGE_INPUT_ALONE (a substring of the timm name). Measured on two cores with frozen
# graphs (forward alone, img/s at batch 1/2/4/8, two runs): ConvNeXt-L 384 0.70-0.77 /
# 0.64-0.72 / 0.45-0.61, ViT-S/16 384 4.7 / 5.0 / 4.3-4.6 / 4.0; MobileNetV3-L 224 gains
# up to 16 (123/262/318 img/s at 1/4/16).
CPU_LARGE_INPUT = 384
CPU_LARGE_INPUT_BATCH = 2
CPU_LARGE_INPUT_ALONE = ("convnext",)


def wants_channels_last(architecture: str, device: torch.device, option: bool | None) -> bool:
    """Whether a model runs channels-last: the option when set, else always on CUDA and on
    the CPU for the backbones of ``CPU_CHANNELS_LAST``."""
    if option is not None:
        return option
    return device.type == "cuda" or any(name in architecture for name in CPU_CHANNELS_LAST)


def cpu_batch_limit(
    architecture: str, input_size: tuple[int, int, int], device: torch.device
) -> int | None:
    """The longest batch worth forming for this model (None: no limit of its own): short
    ones for large inputs on the CPU (see CPU_LARGE_INPUT), none on a GPU."""
    if device.type != "cpu" or min(input_size[1:]) < CPU_LARGE_INPUT:
        return None
    if any(name in architecture for name in CPU_LARGE_INPUT_ALONE):
        return 1
    return CPU_LARGE_INPUT_BATCH


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
        geometry: Geometry | None = None,
        fast_decode: FastDecode | None = None,
        channels_last: bool = False,
        largest_useful_batch: int | None = None,
    ) -> None:
        if fast_decode is not None and geometry is None:
            raise ValueError("fast decoding needs the transform's geometry")
        self.spec = spec
        self._module = module
        self._transform = transform
        self._head = head
        self._device = device
        self._weights_sha256 = weights_sha256
        self._autocast_dtype = autocast_dtype
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.frozen_graph = isinstance(module, torch.jit.ScriptModule)
        """The model runs as a frozen TorchScript graph (see :func:`freeze_graph`)."""
        self._version = derive_version(spec, weights_sha256)
        self._streams: _Streams | None = None  # made on first use, on a GPU only
        self.input_size = input_size
        """(C, H, W) of every tensor :meth:`preprocess` returns."""
        self.largest_useful_batch = largest_useful_batch
        """The largest batch worth forming for this model here (None: no limit of its own);
        the engine's batches are never longer (``workers.engine.batch_limit``)."""
        self._decode_size = decode_size(fast_decode, geometry) if geometry else None
        self._device_jpeg = (
            DeviceJpegPipeline(geometry, device, exact=self.preprocess, stack=self._stack)
            if fast_decode == "gpu" and geometry is not None
            else None
        )
        self.preprocess_encoded: Callable[[Image.Image, bytes], DeviceInput] | None = (
            self._device_jpeg.prepare if self._device_jpeg is not None else None
        )
        """With ``fast_decode = "gpu"``: ``(image, file bytes)`` -> what :meth:`collate`
        takes, used instead of :meth:`preprocess` (``image`` may be a draft: the device
        decodes the bytes); None otherwise."""

    @property
    def version(self) -> str:
        return self._version

    @property
    def weights_sha256(self) -> str | None:
        return self._weights_sha256

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def decode_size(self) -> tuple[int, int] | None:
        """The (width, height) a worker may decode a JPEG down to for this detector
        (``intake.decode(..., draft=decode_size)``); None: the file's own size (the exact
        path). A worker feeding several detectors decodes at the largest they ask for."""
        return self._decode_size

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

    def collate(self, inputs: Sequence[DeviceInput]) -> torch.Tensor | EncodedBatch:
        """Preprocessed images -> one (N, C, H, W) batch on the host; in page-locked memory
        when the model is on a GPU, so that the copy can run while the device works. With
        JPEGs from :attr:`preprocess_encoded` among them, their bytes and the other rows'
        tensors, for :meth:`to_device` to decode and assemble there."""
        if any(isinstance(item, EncodedJpeg) for item in inputs):
            if self._device_jpeg is None:
                raise TypeError(f"detector {self.spec.name} does not decode JPEGs on its device")
            return self._device_jpeg.collate(inputs)
        return self._stack([item for item in inputs if isinstance(item, torch.Tensor)])

    def _stack(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if self._device.type != "cuda":
            return torch.stack(list(inputs))
        shape = (len(inputs), *inputs[0].shape)
        batch = torch.empty(shape, dtype=inputs[0].dtype, pin_memory=True)
        return torch.stack(list(inputs), out=batch)

    def to_device(self, batch: torch.Tensor | EncodedBatch) -> Staged:
        """Start copying a collated batch to the model's device (channels-last where the model
        is, see :func:`wants_channels_last`). On
        a GPU the copy runs on a stream of its own, so the next batch travels while the
        current one is computed; the model waits for it (:meth:`launch`), the host does not.

        An :class:`EncodedBatch` is decoded, resized and normalised on the device, on that
        same stream. torchvision's nvJPEG call returns once its decode is done, so the
        host does wait for the decoding itself (not for the model)."""
        if isinstance(batch, EncodedBatch):
            return self._decode_on_device(batch)
        if self._device.type != "cuda":
            return Staged(batch.to(self._device).contiguous(memory_format=self._memory_format))
        streams = self._cuda_streams()
        with torch.cuda.stream(streams.copy):
            moved = batch.to(self._device, non_blocking=True)
            moved = moved.contiguous(memory_format=self._memory_format)
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
                # Blocking: the read thread sleeps until the model is done instead of
                # spinning a core the intake threads need.
                done = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
                done.record(streams.compute)
        return Launched(logits, done)

    def read(self, launched: Launched) -> list[DetectorOutput]:
        """Wait for the logits and turn them into one output per image: the one point where
        the host waits for the device."""
        if launched.done is not None:
            launched.done.synchronize()
        return self._head.outputs(launched.logits)

    def _decode_on_device(self, batch: EncodedBatch) -> Staged:
        if self._device_jpeg is None:
            raise TypeError(f"detector {self.spec.name} does not decode JPEGs on its device")
        if self._device.type != "cuda":
            assembled = self._device_jpeg.assemble(batch)
            return Staged(assembled.contiguous(memory_format=self._memory_format))
        streams = self._cuda_streams()
        with torch.cuda.stream(streams.copy):
            moved = self._device_jpeg.assemble(batch)
            moved = moved.contiguous(memory_format=self._memory_format)
            copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            copied.record(streams.copy)
        return Staged(moved, copied, host=batch.tensors)

    def _cuda_streams(self) -> _Streams:
        if self._streams is None:
            new_stream = torch.cuda.Stream
            self._streams = _Streams(
                copy=new_stream(self._device),  # type: ignore[no-untyped-call]
                compute=new_stream(self._device),  # type: ignore[no-untyped-call]
            )
        return self._streams

    def forward(self, batch: torch.Tensor | EncodedBatch) -> list[DetectorOutput]:
        """A stacked (N, C, H, W) batch from :meth:`preprocess`, or what :meth:`collate`
        returns -> one output per row."""
        if len(batch) == 0:
            return []
        return self.read(self.launch(self.to_device(batch)))

    def detect_batch(
        self, images: Sequence[Image.Image], raw: Sequence[bytes]
    ) -> list[DetectorOutput]:
        if not images:
            return []
        encode = self.preprocess_encoded
        if encode is not None and len(raw) == len(images) and all(raw):
            inputs = [encode(image, data) for image, data in zip(images, raw, strict=True)]
            return self.forward(self.collate(inputs))
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
    # Autocast runs where the model runs, on a GPU or a CPU (on a CPU with AMX, bf16 ran the
    # 384 px models 2.2-3.2x as fast; fp16, without fp16 units, 0.8-1.1x: docs/performance.md).
    if autocast is None:
        return torch_device, None
    dtype = AUTOCAST_DTYPES[autocast]
    check_autocast(spec, torch_device, dtype)
    return torch_device, dtype


def check_autocast(spec: DetectorSpec, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse an autocast this torch build cannot run on ``device``: torch would only warn and
    run in float32, under a detector version that says otherwise."""
    # Recorded, not turned into errors: the filters are the process's, and another thread's
    # warning must not become an exception in that thread.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(device_type=device.type, dtype=dtype):
                pass
            refused = next((str(w.message) for w in caught if "autocast" in str(w.message)), "")
        except RuntimeError as exc:  # a GPU without the dtype (bf16 before Ampere)
            refused = str(exc)
    if refused:
        raise DetectorUnavailable(
            f"detector {spec.name}: autocast to {dtype} is not supported on {device.type} by "
            f"torch {torch.__version__} ({refused}); remove the option or use another device"
        )


def wants_frozen_graph(device: torch.device, option: bool | None) -> bool:
    """Whether a model runs as a frozen graph: the option when set, else on the CPU."""
    return option if option is not None else device.type == "cpu"


def freeze_graph(
    module: nn.Module,
    input_size: tuple[int, int, int],
    device: torch.device,
    *,
    channels_last: bool,
    name: str,
) -> nn.Module:
    """``module`` as a frozen TorchScript graph, traced on a batch of two.

    In eager mode every layer returns to Python, and each return waits for the interpreter
    lock: with 8 busy Python threads beside it, MobileNetV3-L fell from 190 to 0.9 img/s on
    two cores, the graph from 197 to 28 (frozen: 411 alone, 61 beside them). The graph is
    checked against the module on a batch of three (a batch size baked into the trace would
    show); one that disagrees, or a module that cannot be traced, stays as it is.

    TorchScript is deprecated in favour of ``torch.compile``, which needs a C++ compiler
    where the worker runs and still calls its kernels from Python; its warnings are muted
    here."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)

    def batch(size: int) -> torch.Tensor:
        random = torch.rand((size, *input_size), generator=generator)
        return random.to(device).contiguous(memory_format=memory_format)

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, batch(2))  # type: ignore[no-untyped-call]
            graph: nn.Module = torch.jit.freeze(traced.eval())
            check = batch(3)
            expected, got = module(check), graph(check)
    except Exception as exc:  # an architecture TorchScript cannot follow: run it eagerly
        logger.warning(
            "model kept in eager mode: it cannot be traced",
            extra={"detector": name, "error": f"{type(exc).__name__}: {exc}"},
        )
        return module
    if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor)):
        return module
    drift = float((got.float() - expected.float()).abs().max())
    if not drift <= GRAPH_TOLERANCE:
        logger.warning(
            "model kept in eager mode: its traced graph disagrees with it",
            extra={"detector": name, "max_abs_difference": drift},
        )
        return module
    return graph


def place(module: nn.Module, device: torch.device, *, channels_last: bool) -> nn.Module:
    """``module`` in eval mode on ``device``, channels-last when ``channels_last`` (as
    :meth:`TorchDetector.to_device` then feeds it)."""
    module.eval()
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module
