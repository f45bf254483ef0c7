"""Fast decoding (the option ``fast_decode``): what it may change and what it may not.

The option is part of the version; ``draft`` never decodes below what the detector's first
resize needs and moves scores on real images by no more than benchmarks/bench_fast_decode.py
measured; ``gpu`` (run here on the CPU, where torchvision's decoder is libjpeg-turbo like
Pillow's) decodes a batch of JPEGs and transforms them with tensor operations into what the
exact path gives, to one 8-bit step; PNG, CMYK and EXIF-rotated files are handled the way
the exact path handles them; ``intake.decode(draft=...)`` keeps the file's facts and every
limit. The exact path stays the default.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from workers.detectors.base import DetectorSpec, derive_version
from workers.detectors.options import (
    FAMILY_OPTIONS,
    CommForOptions,
    DetectorOptionsError,
    SumsubOptions,
    parse_options,
)
from workers.detectors.registry import BUILTIN_SPECS
from workers.detectors.torch_models import load_commfor, load_sumsub, load_timm
from workers.detectors.torch_models.fast_decode import (
    GPU_VALIDATION_SIZE,
    EncodedBatch,
    EncodedJpeg,
    decode_size,
)
from workers.detectors.torch_models.preprocessing import (
    explicit_preprocessing,
    timm_data_config,
    timm_geometry,
)
from workers.detectors.torch_models.runtime import TorchDetector
from workers.intake import IntakeLimits, Rejected, RejectReason, decode

from checkpoints import CONVNEXT_STAND_IN, SUMSUB_MOBILENET, write_sumsub_raw

# torchvision 0.29 deprecates its decoders in favour of TorchCodec and warns on every call.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision")

LIMITS = IntakeLimits(max_bytes=50 << 20, max_pixels=100_000_000, decode_timeout_s=20)
MJ5_STD = 0.5  # tf_mobilenetv3_large_100.in1k normalises with mean = std = 0.5
ONE_STEP = 1 / 255 / MJ5_STD + 1e-6
"""One 8-bit level after normalisation. On the CPU the gpu path decodes with the same
libjpeg-turbo as Pillow (identical pixels) and resizes with torch's 8-bit antialiased
kernel, which uses Pillow's filter weights but rounds its fixed-point sums its own way:
a pixel may differ by one level, never more (measured: 0-1 on every corpus JPEG)."""
GPU_PATH_ON_CPU_SCORE_TOLERANCE = 1e-3
"""|delta P(AI)| of the gpu path run on the CPU: one-level differences in a few pixels,
measured at most 3.6e-4 on the corpus JPEGs with these weights (benchmarks/
bench_fast_decode.py). nvJPEG on a GPU has its own IDCT and chroma upsampling: its drift
is measured by the benchmark with ``--device cuda``, not here."""
DRAFT_DRIFT_MAX = 1e-2
"""|delta P(AI)| bound for the draft path with these weights (seed 0, MobileNetV3-L, head
gain 20): the benchmark measured at most 3.5e-3 on the corpus JPEGs and 7.1e-3 on 336
re-encoded photos (99th percentile 4.8e-3), with exact scores spread 0.00-0.39."""


def jpeg(image: Image.Image, **save: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **save)
    return out.getvalue()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth picture with detail at every scale (gradients and a few sharp edges), so
    resampling differences show but stay those of real photos rather than of noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy = rng.uniform(2, 12, 2)
        wave = np.sin(x / width * fx * math.pi) * np.cos(y / height * fy * math.pi)
        edge = (x > width * rng.uniform(0.2, 0.8)).astype(np.float32)
        channels.append(127 + 80 * wave + 40 * edge)
    pixels = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def with_fast_decode(name: str, mode: str | None) -> DetectorSpec:
    spec = BUILTIN_SPECS[name]
    options = dict(spec.options) | ({"fast_decode": mode} if mode else {})
    return DetectorSpec(name=spec.name, family=spec.family, version=spec.version, options=options)


# --------------------------------------------------------------------------------------------
# The option
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sumsub", "commfor", "timm"])
def test_every_torch_family_takes_the_option(family: str) -> None:
    required = {"sumsub": {"backbone": "b"}, "commfor": {"backbone": "b"}}
    base = required.get(family, {"architecture": "a"})
    model = FAMILY_OPTIONS[family]
    for mode in ("draft", "gpu"):
        spec = DetectorSpec("d", family, "1", options={**base, "fast_decode": mode})
        assert parse_options(spec, model).fast_decode == mode
    unset = parse_options(DetectorSpec("d", family, "1", options=base), model)
    assert unset.fast_decode is None


@pytest.mark.parametrize("value", ["exact", "GPU", "", True, 1, ["draft"]])
def test_bad_values_are_refused(value: object) -> None:
    spec = DetectorSpec("d", "sumsub", "1", options={"backbone": "b", "fast_decode": value})
    with pytest.raises(DetectorOptionsError, match="option fast_decode"):
        parse_options(spec, SumsubOptions)


def test_the_option_is_a_new_version_and_absent_is_the_old_one() -> None:
    for name in ("sumsub-mj5", "commfor-vit384", "sumsub-sd200"):
        versions = {
            mode: derive_version(with_fast_decode(name, mode), None)
            for mode in (None, "draft", "gpu")
        }
        assert versions[None] == derive_version(BUILTIN_SPECS[name], None)
        assert len(set(versions.values())) == 3, versions


def test_gpu_is_refused_where_tensor_operations_would_not_redo_the_transform(
    tmp_path: Path,
) -> None:
    """Refused from the options alone, before any weights are read (there are none)."""
    missing = tmp_path / "no-weights.pt"
    refusals = [
        (load_sumsub, {"backbone": SUMSUB_MOBILENET, "interpolation": "nearest"}, "nearest"),
        (load_sumsub, {"backbone": SUMSUB_MOBILENET, "crop_mode": "border"}, "centre crop"),
        (
            load_commfor,
            {"backbone": "vit_small_patch16_224", "interpolation": "lanczos"},
            "lanczos",
        ),
    ]
    for loader, options, fragment in refusals:
        spec = DetectorSpec(
            "picky",
            loader.__name__.removeprefix("load_"),
            "1",
            options={**options, "fast_decode": "gpu"},
        )
        with pytest.raises(DetectorOptionsError, match=f"detector picky .*fast_decode.*{fragment}"):
            loader(spec, device="cpu", weights_path=missing)
    # draft needs only the resize target: accepted (and fails later, on the missing weights).
    spec = DetectorSpec(
        "d",
        "timm",
        "1",
        options={
            "architecture": CONVNEXT_STAND_IN,
            "input_size": 64,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "crop_mode": "border",
            "fast_decode": "draft",
        },
    )
    with pytest.raises(Exception, match="no-weights") as caught:
        load_timm(spec, device="cpu", weights_path=missing)
    assert not isinstance(caught.value, DetectorOptionsError)


def test_geometry_is_what_the_published_transforms_do() -> None:
    """The numbers fast decoding works from, for the three published shapes."""
    mobilenet = timm_geometry(
        timm_data_config(SUMSUB_MOBILENET, SumsubOptions(backbone=SUMSUB_MOBILENET))
    )
    assert (mobilenet.resize, mobilenet.crop, mobilenet.interpolation) == (
        256,
        (224, 224),
        "bilinear",
    )
    convnext_tag = "convnext_large_mlp.clip_laion2b_soup_ft_in12k_in1k_384"
    convnext = timm_geometry(timm_data_config(convnext_tag, SumsubOptions(backbone=convnext_tag)))
    assert (convnext.resize, convnext.crop, convnext.interpolation) == (
        (384, 384),
        (384, 384),
        "bicubic",
    )
    commfor = explicit_preprocessing(CommForOptions(backbone="b"), default_crop=384).geometry
    assert (commfor.resize, commfor.crop, commfor.interpolation) == (440, (384, 384), "bilinear")
    assert decode_size("draft", mobilenet) == (256, 256)
    assert decode_size("draft", convnext) == (384, 384)
    assert decode_size("draft", commfor) == (440, 440)
    assert decode_size("gpu", commfor) == GPU_VALIDATION_SIZE
    assert decode_size(None, commfor) is None


# --------------------------------------------------------------------------------------------
# intake.decode(draft=...)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "scale"),
    [
        ((3000, 2000), 4),
        ((2000, 3000), 4),
        ((4100, 300), 1),
        ((2048, 1024), 4),
        ((600, 400), 1),
        ((1024, 1024), 4),
    ],
)
def test_draft_keeps_both_sides_at_least_the_size_asked_for(
    size: tuple[int, int], scale: int
) -> None:
    decoded = decode(jpeg(photo(size)), LIMITS, draft=(256, 256))
    assert (decoded.width, decoded.height) == size  # the file's facts
    assert decoded.draft_scale == scale
    assert decoded.image.size == (math.ceil(size[0] / scale), math.ceil(size[1] / scale))
    assert min(decoded.image.size) >= min(256, *size)
    assert decoded.format == "JPEG" and decoded.mode == "RGB" and decoded.image.mode == "RGB"


def test_draft_checks_every_limit_on_the_declared_size() -> None:
    data = jpeg(photo((1600, 1200)))
    small = IntakeLimits(
        max_bytes=LIMITS.max_bytes, max_pixels=1600 * 1200 - 1, decode_timeout_s=20
    )
    with pytest.raises(Rejected) as caught:
        decode(data, small, draft=(64, 64))
    assert caught.value.reason is RejectReason.TOO_MANY_PIXELS
    admitted: list[tuple[int, int, int]] = []
    decoded = decode(data, LIMITS, draft=(64, 64), admit=lambda w, h, n: admitted.append((w, h, n)))
    assert admitted == [(1600, 1200, len(data))]
    assert decoded.draft_scale == 8 and decoded.image.size == (200, 150)
    with pytest.raises(Rejected) as caught:
        decode(data[: len(data) // 2], LIMITS, draft=(64, 64))
    assert caught.value.reason is RejectReason.TRUNCATED


@pytest.mark.parametrize("orientation", range(1, 9))
def test_draft_turns_the_picture_upright_as_the_exact_path_does(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(photo((1200, 800)), exif=exif)
    exact = decode(data, LIMITS)
    drafted = decode(data, LIMITS, draft=(256, 256))
    assert (drafted.width, drafted.height) == (exact.width, exact.height) == (1200, 800)
    assert drafted.draft_scale == 2
    assert drafted.image.size == (exact.image.size[0] // 2, exact.image.size[1] // 2)
    # Same picture at half the size: compare with the exact decode shrunk.
    shrunk = np.asarray(exact.image.resize(drafted.image.size, Image.Resampling.BOX), dtype=float)
    assert np.abs(np.asarray(drafted.image, dtype=float) - shrunk).mean() < 3


def test_draft_leaves_other_formats_alone() -> None:
    picture = photo((1200, 800))
    decoded = decode(png(picture), LIMITS, draft=(64, 64))
    assert decoded.draft_scale == 1 and decoded.image.size == (1200, 800)
    assert np.array_equal(np.asarray(decoded.image), np.asarray(picture))


# --------------------------------------------------------------------------------------------
# Detectors: exact, draft, gpu (on the CPU)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mj5(tmp_path_factory: pytest.TempPathFactory) -> dict[str | None, TorchDetector]:
    """sumsub-mj5's shape with seeded random weights, once per fast_decode mode."""
    torch.set_num_threads(2)
    weights = tmp_path_factory.mktemp("mj5") / "synthetic.pt"
    write_sumsub_raw(weights, SUMSUB_MOBILENET)
    return {
        mode: load_sumsub(with_fast_decode("sumsub-mj5", mode), device="cpu", weights_path=weights)
        for mode in (None, "draft", "gpu")
    }


@pytest.fixture(scope="module")
def corpus_jpegs(corpus_dir: Path) -> list[bytes]:
    """The corpus JPEGs, and three photos re-encoded larger (2-4 Mpx) so 1/4 and 1/8 scale
    are exercised too."""
    files = sorted((corpus_dir / "images").iterdir())
    raws = [p.read_bytes() for p in files if p.read_bytes()[:3] == b"\xff\xd8\xff"]
    for name, side in (
        ("comfy_sdxl.png", 1700),
        ("midjourney_75a40390.png", 2000),
        ("comfy_input_sunset.png", 2400),
    ):
        with Image.open(corpus_dir / "images" / name) as source:
            rgb = source.convert("RGB")
        rgb = rgb.resize((side, round(side * rgb.height / rgb.width)), Image.Resampling.BICUBIC)
        raws.append(jpeg(rgb, quality=90))
    assert len(raws) >= 20
    return raws


def exact_tensors(detector: TorchDetector, raws: list[bytes]) -> torch.Tensor:
    return torch.stack([detector.preprocess(decode(raw, LIMITS).image) for raw in raws])


def scores(detector: TorchDetector, batch: Any) -> list[float]:
    outputs = detector.forward(batch)
    assert all(output.score is not None for output in outputs)
    return [float(output.score) for output in outputs if output.score is not None]


@pytest.mark.slow
def test_exact_is_the_default(mj5: dict[str | None, TorchDetector]) -> None:
    exact = mj5[None]
    assert exact.decode_size is None and exact.preprocess_encoded is None
    assert exact.version == derive_version(BUILTIN_SPECS["sumsub-mj5"], exact.weights_sha256)
    assert mj5["draft"].preprocess_encoded is None  # draft changes the decode only
    assert mj5["draft"].decode_size == (256, 256)
    assert (
        mj5["gpu"].decode_size == GPU_VALIDATION_SIZE and mj5["gpu"].preprocess_encoded is not None
    )
    assert len({d.version for d in mj5.values()}) == 3


@pytest.mark.slow
def test_draft_scores_stay_within_the_measured_drift(
    mj5: dict[str | None, TorchDetector], corpus_jpegs: list[bytes]
) -> None:
    draft = mj5["draft"]
    size = draft.decode_size
    assert size is not None
    decoded = [decode(raw, LIMITS, draft=size) for raw in corpus_jpegs]
    assert any(d.draft_scale > 1 for d in decoded) and {4, 8} & {d.draft_scale for d in decoded}
    for d in decoded:  # never below the resize target, unless the file itself is smaller
        assert min(d.image.size) >= min(256, d.width, d.height)
    exact = scores(mj5[None], exact_tensors(mj5[None], corpus_jpegs))
    drafted = scores(draft, torch.stack([draft.preprocess(d.image) for d in decoded]))
    drift = [abs(a - b) for a, b in zip(exact, drafted, strict=True)]
    assert max(exact) - min(exact) > 0.2, exact  # the scores spread: a drift can show
    assert max(drift) <= DRAFT_DRIFT_MAX, max(drift)
    assert max(drift) > 0  # the pixels did change


def gpu_inputs(detector: TorchDetector, raws: list[bytes]) -> list[Any]:
    """What intake threads hand a gpu detector: the image validated at 1/8 scale, the bytes."""
    assert detector.preprocess_encoded is not None and detector.decode_size is not None
    return [
        detector.preprocess_encoded(decode(raw, LIMITS, draft=detector.decode_size).image, raw)
        for raw in raws
    ]


@pytest.mark.slow
def test_gpu_path_on_the_cpu_decodes_a_batch_and_matches_the_exact_path(
    mj5: dict[str | None, TorchDetector], corpus_jpegs: list[bytes]
) -> None:
    gpu = mj5["gpu"]
    inputs = gpu_inputs(gpu, corpus_jpegs)
    assert all(isinstance(item, EncodedJpeg) for item in inputs)
    assert any(item.orientation == 6 for item in inputs)  # the corpus has rotated camera files
    batch = gpu.collate(inputs)
    assert isinstance(batch, EncodedBatch) and len(batch) == len(corpus_jpegs)
    staged = gpu.to_device(batch)
    exact = exact_tensors(mj5[None], corpus_jpegs)
    assert staged.tensor.shape == exact.shape
    assert float((staged.tensor - exact).abs().max()) <= ONE_STEP
    delta = [a - b for a, b in zip(scores(gpu, batch), scores(mj5[None], exact), strict=True)]
    assert max(map(abs, delta)) <= GPU_PATH_ON_CPU_SCORE_TOLERANCE


@pytest.fixture(scope="module")
def variety() -> dict[str, bytes]:
    """One file of each kind the gpu path must route: colour and grey JPEGs, a progressive
    one, every EXIF orientation, CMYK, PNG with alpha, WebP."""
    picture = photo((900, 620), seed=3)
    files = {
        "baseline": jpeg(picture, quality=90),
        "progressive": jpeg(picture, quality=85, progressive=True),
        "grey": jpeg(picture.convert("L"), quality=92),
        "cmyk": jpeg(picture.convert("CMYK"), quality=92),
        "png-rgba": png(picture.convert("RGBA")),
    }
    webp = io.BytesIO()
    picture.save(webp, "WEBP", quality=90)
    files["webp"] = webp.getvalue()
    for orientation in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files[f"orientation-{orientation}"] = jpeg(picture, quality=90, exif=exif)
    return files


@pytest.mark.slow
def test_gpu_path_routes_each_kind_of_file(
    mj5: dict[str | None, TorchDetector], variety: dict[str, bytes]
) -> None:
    files = variety
    gpu, exact_detector = mj5["gpu"], mj5[None]
    inputs = dict(zip(files, gpu_inputs(gpu, list(files.values())), strict=True))
    on_device = {name for name, item in inputs.items() if isinstance(item, EncodedJpeg)}
    assert on_device == {"baseline", "progressive", "grey"} | {
        f"orientation-{o}" for o in range(2, 9)
    }
    assert isinstance(inputs["grey"], EncodedJpeg) and inputs["grey"].grey
    assert (
        isinstance(inputs["orientation-6"], EncodedJpeg)
        and inputs["orientation-6"].orientation == 6
    )
    exact = exact_tensors(exact_detector, list(files.values()))
    # The exact path's own tensors, bit for bit: the CMYK JPEG was validated at 1/8 scale
    # and decoded again at full size for it.
    for row, name in enumerate(files):
        if name not in on_device:
            assert torch.equal(inputs[name], exact[row]), name
    staged = gpu.to_device(gpu.collate(list(inputs.values())))  # one mixed batch, in order
    for row, name in enumerate(files):
        assert float((staged.tensor[row] - exact[row]).abs().max()) <= ONE_STEP, name


@pytest.mark.slow
def test_detect_batch_uses_the_device_path_when_given_the_bytes(
    mj5: dict[str | None, TorchDetector], variety: dict[str, bytes]
) -> None:
    files = variety
    images = [decode(raw, LIMITS).image for raw in files.values()]
    with_bytes = mj5["gpu"].detect_batch(images, list(files.values()))
    without = mj5["gpu"].detect_batch(images, [b""] * len(images))  # the exact transform
    exact = mj5[None].detect_batch(images, [])
    for one, two, three in zip(with_bytes, without, exact, strict=True):
        assert one.score is not None and two.score is not None and three.score is not None
        assert two.score == pytest.approx(three.score, abs=1e-6)
        assert one.score == pytest.approx(three.score, abs=GPU_PATH_ON_CPU_SCORE_TOLERANCE)


@pytest.fixture
def refusing_decoder(monkeypatch: pytest.MonkeyPatch) -> Iterator[bytes]:
    """torchvision's decoder, refusing one file as nvJPEG refuses some JPEGs (a CPU build's
    libjpeg-turbo takes every file Pillow takes, so the refusal is staged here): a batch
    holding it fails whole, as torchvision's batched CUDA decode does."""
    from workers.detectors.torch_models import fast_decode

    refused = jpeg(photo((700, 500), seed=9), quality=88)
    real = fast_decode.decode_jpeg

    def decode_jpeg(data: list[torch.Tensor], **kwargs: Any) -> list[torch.Tensor]:
        if any(item.numpy().tobytes() == refused for item in data):
            raise RuntimeError("Error while decoding JPEG images: NVJPEG_STATUS_JPEG_NOT_SUPPORTED")
        return list(real(data, **kwargs))

    monkeypatch.setattr(fast_decode, "decode_jpeg", decode_jpeg)
    yield refused


@pytest.mark.slow
def test_a_jpeg_the_device_refuses_takes_the_exact_path_alone(
    mj5: dict[str | None, TorchDetector], refusing_decoder: bytes
) -> None:
    raws = [jpeg(photo((800, 600), seed=1)), refusing_decoder, jpeg(photo((640, 960), seed=2))]
    gpu = mj5["gpu"]
    staged = gpu.to_device(gpu.collate(gpu_inputs(gpu, raws)))
    exact = exact_tensors(mj5[None], raws)
    assert torch.equal(staged.tensor[1], exact[1])  # decoded by Pillow, at full size
    for row in (0, 2):
        assert float((staged.tensor[row] - exact[row]).abs().max()) <= ONE_STEP


@pytest.mark.slow
def test_a_jpeg_pillow_reads_as_mpo_is_its_first_picture(
    mj5: dict[str | None, TorchDetector],
) -> None:
    """Camera files with previews open as MPO in Pillow; intake and the gpu path both read
    the first picture with the JPEG plugin."""
    first, second = photo((640, 480), seed=4), photo((640, 480), seed=5)
    out = io.BytesIO()
    first.save(out, "MPO", save_all=True, append_images=[second], quality=92)
    raw = out.getvalue()
    with Image.open(io.BytesIO(raw)) as opened:
        assert opened.format == "MPO"
    gpu = mj5["gpu"]
    (item,) = gpu_inputs(gpu, [raw])
    assert isinstance(item, EncodedJpeg)
    staged = gpu.to_device(gpu.collate([item]))
    exact = exact_tensors(mj5[None], [raw])
    assert float((staged.tensor - exact).abs().max()) <= ONE_STEP
