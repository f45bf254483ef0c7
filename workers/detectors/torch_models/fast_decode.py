"""Opt-in fast decoding (the option ``fast_decode``): on a GPU the model is nearly free and
CPU decoding becomes the limit. Both ways here change the pixels the model sees relative to
the authors' pipelines, so the scores move slightly (the measured drift is published in
docs/performance.md, from benchmarks/bench_fast_decode.py); the exact path stays the
default, and the option is part of the detector's version.

- ``draft``: the worker decodes a JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling in libjpeg,
  Pillow's draft mode, ``intake.decode(..., draft=...)``), never below what the first
  resize needs (:func:`draft_size`), then the detector's own transform runs as usual.
- ``gpu``: the worker only validates the JPEG (decoded at 1/8 scale, within the intake
  limits) and hands the detector the file's bytes; :class:`DeviceJpegPipeline` decodes
  them on the model's device (``torchvision.io.decode_jpeg``: nvJPEG on CUDA, libjpeg-turbo
  on the CPU), turns them upright from the EXIF orientation, and resizes, crops and
  normalises them with tensor operations. Anything else (PNG, WebP, a CMYK JPEG, a JPEG the
  device decoder refuses) takes the exact path, image by image.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, JpegImagePlugin
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tensor_ops

from workers.detectors.options import DetectorOptionsError, FastDecode
from workers.detectors.torch_models.preprocessing import Geometry
from workers.intake import IntakeLimits, Rejected, decode

logger = logging.getLogger(__name__)

GPU_VALIDATION_SIZE = (64, 64)
"""What the worker decodes a JPEG to when the device decodes it again: Pillow picks the
1/8 scale for anything 512 px or larger, which is enough to validate the file (every byte of
entropy-coded data is still read) and cheap."""

FALLBACK_DECODE_TIMEOUT_S = 60.0
"""Budget of a full decode from the file's bytes when a file must take the exact path but
the worker decoded it at draft scale. The file already passed the intake limits; this only
keeps one image from holding a batch up forever."""

# Pillow's JPEG modes that the device decoder turns into what ``convert("RGB")`` gives:
# colour as it is, grey replicated. CMYK and YCCK take the exact path (Pillow inverts
# Adobe CMYK; decoders differ there).
_DEVICE_MODES = frozenset({"RGB", "L"})

# EXIF orientation -> the tensor operation of ImageOps.exif_transpose on (..., H, W).
_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda image: image.flip(-1),
    3: lambda image: image.flip(-1).flip(-2),
    4: lambda image: image.flip(-2),
    5: lambda image: image.transpose(-1, -2),
    6: lambda image: torch.rot90(image, -1, (-2, -1)),
    7: lambda image: image.flip(-1).flip(-2).transpose(-1, -2),
    8: lambda image: torch.rot90(image, 1, (-2, -1)),
}


def draft_size(geometry: Geometry) -> tuple[int, int]:
    """The (width, height) to ask Pillow's draft mode for: square, since the aspect and the
    orientation are the image's own; Pillow keeps both decoded sides at least this, so the
    detector's resize still only shrinks."""
    side = geometry.least_side
    return side, side


def decode_size(fast_decode: FastDecode | None, geometry: Geometry) -> tuple[int, int] | None:
    """What a worker passes to ``intake.decode(..., draft=...)`` for this detector: None
    for the exact path."""
    if fast_decode == "draft":
        return draft_size(geometry)
    if fast_decode == "gpu":
        return GPU_VALIDATION_SIZE
    return None


def check_fast_decode(fast_decode: FastDecode | None, geometry: Geometry) -> None:
    """Refuse ``gpu`` for a transform that tensor operations would not redo (the scores
    would then differ by more than decoding)."""
    if fast_decode != "gpu":
        return
    mismatch = geometry.tensor_mismatch()
    if mismatch is not None:
        raise DetectorOptionsError(
            f"option fast_decode: gpu redoes the transform with tensor operations, but "
            f"{mismatch}; use fast_decode draft, or leave it unset"
        )


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG to decode on the model's device: the file's bytes and how to turn its pixels
    into what the exact path sees."""

    data: torch.Tensor
    """The file's bytes, a 1-D uint8 tensor on the CPU (where the decoder reads them)."""
    grey: bool
    """One component: decoded as grey and replicated, as ``convert("RGB")`` does."""
    orientation: int
    """EXIF orientation (1: as stored), applied as ``ImageOps.exif_transpose`` does."""


DeviceInput = EncodedJpeg | torch.Tensor
"""What :meth:`DeviceJpegPipeline.prepare` returns: a JPEG for the device, or the exact
path's (C, H, W) tensor for a file that takes it."""


@dataclass
class EncodedBatch:
    """Collated :data:`DeviceInput`: the JPEGs with their rows, and the rows that took the
    exact path stacked into one tensor (page-locked when the model is on a GPU)."""

    size: int
    jpegs: list[tuple[int, EncodedJpeg]]
    tensor_rows: list[int]
    tensors: torch.Tensor | None

    def __len__(self) -> int:
        return self.size


class DeviceJpegPipeline:
    """Decode, orient, resize, crop and normalise JPEGs on ``device`` as the detector's
    transform does on the CPU (same sizes, same crop box, antialiased bilinear or bicubic
    filter, rounding to 8 bits after the resize as Pillow does).

    ``exact`` is the detector's own preprocessing, for the files that take the exact path;
    ``stack`` collates those tensors as the detector's collate does."""

    def __init__(
        self,
        geometry: Geometry,
        device: torch.device,
        *,
        exact: Callable[[Image.Image], torch.Tensor],
        stack: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    ) -> None:
        if geometry.crop is None or geometry.tensor_mismatch() is not None:
            raise ValueError(f"tensor operations cannot redo {geometry}")
        self._crop = list(geometry.crop)
        self._resize = (
            [geometry.resize] if isinstance(geometry.resize, int) else list(geometry.resize)
        )
        self._interpolation = InterpolationMode(geometry.interpolation)
        self._device = device
        self._exact = exact
        self._stack = stack
        self._mean = torch.tensor(geometry.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(geometry.std, device=device).view(1, 3, 1, 1)

    # -- on the worker's CPU, per image ------------------------------------------------------

    def prepare(self, image: Image.Image, raw: bytes) -> DeviceInput:
        """One decoded upload and its file's bytes -> a JPEG for the device, or the exact
        path's tensor. ``image`` may be a draft (the worker validated the JPEG at a small
        scale): a JPEG that must take the exact path is then decoded again at full size."""
        header = _jpeg_header(raw)
        if header is None:
            return self._exact(image)  # not a JPEG: intake decoded it at full size
        mode, _, orientation, plain = header
        if mode in _DEVICE_MODES and plain:
            data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            return EncodedJpeg(data=data, grey=mode == "L", orientation=orientation)
        return self._exact(_full_size(image, raw))

    def collate(self, inputs: Sequence[DeviceInput]) -> EncodedBatch:
        jpegs = [(row, item) for row, item in enumerate(inputs) if isinstance(item, EncodedJpeg)]
        rows = [row for row, item in enumerate(inputs) if not isinstance(item, EncodedJpeg)]
        tensors = [item for item in inputs if isinstance(item, torch.Tensor)]
        stacked = self._stack(tensors) if tensors else None
        return EncodedBatch(len(inputs), jpegs, rows, stacked)

    # -- on the device, per batch ------------------------------------------------------------

    def assemble(self, batch: EncodedBatch) -> torch.Tensor:
        """The (N, C, H, W) float batch on the device, in the order collated: JPEGs decoded
        and transformed there, exact-path rows copied. On CUDA, call it on the stream that
        should carry the work; torchvision makes that stream wait for nvJPEG's own."""
        rows: dict[int, torch.Tensor] = {}
        if batch.tensors is not None:
            moved = batch.tensors.to(self._device, non_blocking=True)
            rows.update(zip(batch.tensor_rows, moved.unbind(0), strict=True))
        if batch.jpegs:
            pixels: list[tuple[int, torch.Tensor]] = []
            for index, decoded in self._decode([jpeg for _, jpeg in batch.jpegs]):
                target = batch.jpegs[index][0]
                if decoded.dtype == torch.uint8:
                    pixels.append((target, decoded))
                else:
                    rows[target] = decoded
            if pixels:
                stacked = torch.stack([image for _, image in pixels]).float().div_(255)
                normalised = stacked.sub_(self._mean).div_(self._std)
                rows.update(zip([row for row, _ in pixels], normalised.unbind(0), strict=True))
        return torch.stack([rows[row] for row in range(batch.size)])

    def _decode(self, jpegs: list[EncodedJpeg]) -> list[tuple[int, torch.Tensor]]:
        """(index in ``jpegs``, image): uint8 (3, H, W) resized and cropped on the device,
        or, for a file the device decoder refuses, the exact path's float tensor there."""
        out: list[tuple[int, torch.Tensor]] = []
        for grey in (False, True):
            group = [i for i, jpeg in enumerate(jpegs) if jpeg.grey == grey]
            if not group:
                continue
            mode = ImageReadMode.GRAY if grey else ImageReadMode.RGB
            decoded = self._decode_group([jpegs[i].data for i in group], mode)
            for i, image in zip(group, decoded, strict=True):
                jpeg = jpegs[i]
                if image is None:
                    exact = self._exact(_full_size(None, jpeg.data.numpy().tobytes()))
                    out.append((i, exact.to(self._device)))
                    continue
                rgb = image.expand(3, -1, -1) if grey else image
                out.append((i, self._geometry_ops(rgb, jpeg.orientation)))
        return out

    def _decode_group(
        self, data: list[torch.Tensor], mode: ImageReadMode
    ) -> list[torch.Tensor | None]:
        """Decode in one call (nvJPEG's batched decode on CUDA); a batch the decoder refuses
        is decoded file by file, and a file it refuses on its own is None (exact path)."""
        try:
            return list(decode_jpeg(data, mode=mode, device=self._device))
        except RuntimeError as batch_error:
            if len(data) == 1:
                logger.warning(
                    "the device decoder refused a JPEG; taking the exact path",
                    extra={"error": str(batch_error)[:300]},
                )
                return [None]
        return [self._decode_group([one], mode)[0] for one in data]

    def _geometry_ops(self, image: torch.Tensor, orientation: int) -> torch.Tensor:
        if orientation in _ORIENT:
            image = _ORIENT[orientation](image).contiguous()
        image = tensor_ops.resize(
            image, self._resize, interpolation=self._interpolation, antialias=True
        )
        cropped: torch.Tensor = tensor_ops.center_crop(image, self._crop)
        return cropped


def _jpeg_header(
    raw: bytes,
) -> tuple[str, tuple[int, int], int, bool] | None:
    """(mode, (width, height), EXIF orientation, whether its colour transform is the
    ordinary one) from a JPEG's header, or None for any other file. Opened with the JPEG
    plugin itself, as intake does, so an MPO (a camera's JPEG with previews) is its first
    picture here too."""
    if not raw.startswith(b"\xff\xd8\xff"):
        return None
    try:
        with JpegImagePlugin.JpegImageFile(io.BytesIO(raw)) as header:
            orientation = int(header.getexif().get(0x0112, 1) or 1)
            # An Adobe marker saying "no transform" on three components: RGB stored as is.
            plain = not (header.mode == "RGB" and header.info.get("adobe_transform") == 0)
            return header.mode, header.size, orientation, plain
    except (OSError, SyntaxError, ValueError):
        return None  # intake decoded it; let the exact path have it as decoded


def _full_size(image: Image.Image | None, raw: bytes) -> Image.Image:
    """``image`` when it has the file's full size, else the JPEG decoded again at full size
    through the same intake as the exact path (its checks, orientation and conversion)."""
    header = _jpeg_header(raw)
    size = header[1] if header is not None else None
    if image is not None:
        if header is None:
            return image  # not a JPEG: never drafted
        upright = (size[1], size[0]) if size and header[2] in (5, 6, 7, 8) else size
        if image.size == upright:
            return image
    # The file passed the intake limits already; these only bound this second decode.
    width, height = size if size is not None else (0, 0)
    limits = IntakeLimits(
        max_bytes=len(raw),
        max_pixels=max(1, width * height),
        decode_timeout_s=FALLBACK_DECODE_TIMEOUT_S,
    )
    try:
        return decode(raw, limits).image
    except Rejected as exc:
        raise ValueError(f"the image could not be decoded at full size: {exc.message}") from exc
