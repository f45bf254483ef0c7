"""The streaming engine against its ceilings, per detector shape, in one run.

    .venv/bin/python benchmarks/bench_engine.py [--device cpu|cuda] [--shapes ...]
        [--batch-size 16] [--threads N] [--images DIR] [--copies 1] [--limit-heavy 12]
        [--repeat 3] [--standin-repeat 9]
    .venv/bin/python benchmarks/bench_engine.py --rss 1000 10000    # peak memory by count

For each detector shape (sumsub-mj5: MobileNetV3-L 224; commfor-vit384: ViT-S/16 384;
sumsub-sd200: ConvNeXt-L 384) it builds a checkpoint in the published format with random
weights (speed does not depend on the values) and measures, on the same image files:

- authors' loop: ``Image.open(path).convert("RGB")`` -> the authors' transform -> the
  model on one image, as the model cards' scripts do;
- intake ceiling: read + hash + decode + preprocess alone, on ``--threads`` threads (what
  the engine's intake stage does, with nothing after it);
- model ceiling: the forward pass alone on random batches of ``--batch-size`` (or of the
  shorter batch the engine gives a large model on the CPU), host to device copy included;
- engine: ``synthsentry scan``'s pipeline (``workers.scan.Scanner``), every result stored
  in a throwaway SQLite database; and its ratio to the lower ceiling.

With the real models on a CPU both stages share the same cores, so the ceilings are not
independent. The run therefore also puts a GPU-like stand-in model behind the real
preprocessing: its forward pass sleeps a fixed ``--standin-ms`` per batch (the time a
GPU would take, without using the CPU) and computes a trivial score from the tensors.
That exposes the pipeline's own losses: the engine should reach its intake ceiling.

``--rss`` scans N generated JPEGs with the stand-in model in a fresh process per count
and prints each process's peak RSS: it must not grow with the count.
Figures are images per second (higher is better): the median of ``--repeat`` runs of each,
taken in turn, with the slowest and fastest run in brackets. The stand-in runs in
``--standin-repeat`` pairs (its intake ceiling, then its engine) after one pair that warms
both up; its ratio is the median of the pairs' ratios, with the lowest and highest.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # checkpoint writers shared with the tests

from db import migrate  # noqa: E402
from db.session import make_engine, make_sessionmaker  # noqa: E402
from workers import allocator  # noqa: E402
from workers.detectors.base import Detector, DetectorOutput, DetectorSpec  # noqa: E402
from workers.detectors.registry import BUILTIN_SPECS, build_detector  # noqa: E402
from workers.engine import batch_limit  # noqa: E402
from workers.ensemble import EnsembleConfig  # noqa: E402
from workers.intake import IntakeLimits, decode  # noqa: E402
from workers.scan import Scanner  # noqa: E402

from checkpoints import (  # noqa: E402
    COMMFOR_VIT_384,
    SUMSUB_CONVNEXT,
    SUMSUB_MOBILENET,
    CommForReference,
    SumsubReference,
    write_commfor_training_checkpoint,
    write_sumsub_raw,
)

LIMITS = IntakeLimits(max_bytes=50 << 20, max_pixels=100_000_000, decode_timeout_s=60)
Transform = Callable[[Image.Image], torch.Tensor]
HEAVY = {"sumsub-sd200"}  # a CPU needs seconds per image: measured on fewer files


@dataclass(frozen=True)
class Shape:
    name: str
    label: str
    backbone: str


SHAPES = {
    shape.name: shape
    for shape in (
        Shape("sumsub-mj5", "sumsub-mj5 (MobileNetV3-L, 224)", SUMSUB_MOBILENET),
        Shape("commfor-vit384", "commfor-vit384 (ViT-S/16, 384)", COMMFOR_VIT_384),
        Shape("sumsub-sd200", "sumsub-sd200 (ConvNeXt-L, 384)", SUMSUB_CONVNEXT),
    )
}


# --- the authors' pipelines -----------------------------------------------------------


def authors_pipeline(
    shape: Shape, state: dict[str, torch.Tensor], device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Transform]:
    """The model and transform as the authors' own code builds them (not synthsentry's)."""
    import timm
    from torchvision import transforms

    module: torch.nn.Module
    if shape.name.startswith("sumsub"):
        module = SumsubReference(shape.backbone)
        config = timm.data.resolve_data_config(
            {}, pretrained_cfg=timm.get_pretrained_cfg(shape.backbone).to_dict()
        )
        transform = timm.data.create_transform(**config, is_training=False)
    else:
        module = CommForReference(shape.backbone)
        transform = transforms.Compose(
            [
                transforms.Resize(440, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(384),
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
    module.load_state_dict(state)
    module.eval().to(device)
    if isinstance(module, SumsubReference):
        sumsub = module
        return lambda x: torch.softmax(sumsub.clf(sumsub.model(x.to(device))), dim=1), transform
    commfor = module
    assert isinstance(commfor, CommForReference)
    return lambda x: torch.sigmoid(commfor.vit(x.to(device))), transform


def authors_loop(
    model: Callable[[torch.Tensor], torch.Tensor], transform: Transform, paths: list[Path]
) -> float:
    """Images per second of the one-image-at-a-time loop of the authors' pipelines."""
    started = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            with Image.open(path) as image:
                x = transform(image.convert("RGB"))
            float(model(x.unsqueeze(0))[0, 0])  # the answer read, as a script prints it
    return len(paths) / (time.perf_counter() - started)


# --- ceilings -------------------------------------------------------------------------


def intake_ceiling(detector: Any, paths: list[Path], threads: int) -> float:
    """Images per second of read + hash + decode + preprocess alone on ``threads``."""

    def take_in(path: Path) -> tuple[int, ...]:
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        return tuple(detector.preprocess(decode(data, LIMITS).image).shape)

    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        list(pool.map(take_in, paths))
        return len(paths) / (time.perf_counter() - started)


def model_ceiling(detector: Any, batch_size: int, *, seconds: float = 2.0) -> float:
    """Images per second of the forward pass alone on random batches (copy included)."""
    channels, height, width = detector.input_size
    inputs = [torch.randn(channels, height, width) for _ in range(batch_size)]
    detector.forward(torch.stack(inputs))  # warm-up
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or done == 0:
        detector.read(detector.launch(detector.to_device(detector.collate(inputs))))
        done += batch_size
    return done / (time.perf_counter() - started)


# --- the GPU-like stand-in ------------------------------------------------------------


class StandIn:
    """A real detector's preprocessing in front of a model that takes ``ms`` per batch
    without using the CPU, as a GPU's forward pass does from the host's point of view.
    Its score is the mean of the input through a sigmoid: a stand-in, for timing only."""

    def __init__(self, real: Any, ms: float) -> None:
        self._real = real
        self._seconds = ms / 1000
        self.spec = DetectorSpec(
            name=f"standin-{real.spec.name}",
            family="standin",
            version="1",
            weights="",
            description="GPU-like stand-in (benchmark only)",
        )
        self.input_size = real.input_size

    @property
    def version(self) -> str:
        return f"standin-{self._real.version}"

    @property
    def weights_sha256(self) -> str | None:
        return None

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        tensor: torch.Tensor = self._real.preprocess(image)
        return tensor

    def collate(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(inputs))

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def launch(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(self._seconds)  # the device at work: no CPU, the GIL released
        return batch.mean(dim=(1, 2, 3))

    def read(self, launched: torch.Tensor) -> list[DetectorOutput]:
        return [DetectorOutput(float(torch.sigmoid(v))) for v in launched]

    def forward(self, batch: torch.Tensor) -> list[DetectorOutput]:
        return self.read(self.launch(self.to_device(batch)))

    def detect_batch(
        self, images: Sequence[Image.Image], raw: Sequence[bytes]
    ) -> list[DetectorOutput]:
        return self.forward(torch.stack([self.preprocess(image) for image in images]))


# --- the engine -----------------------------------------------------------------------


def engine_run(detector: Any, paths: list[Path], *, batch_size: int, threads: int) -> float:
    """Images per second of ``synthsentry scan``'s pipeline, results stored."""
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/bench.db"
        migrate.upgrade(url)
        engine = make_engine(url)
        scanner = Scanner(
            [detector],
            make_sessionmaker(engine),
            LIMITS,
            EnsembleConfig(),
            batch_size=batch_size,
            decode_threads=threads,
        )
        started = time.perf_counter()
        count = sum(1 for _ in scanner.scan(paths))
        elapsed = time.perf_counter() - started
        engine.dispose()
    assert count == len(paths)
    return len(paths) / elapsed


# --- images ---------------------------------------------------------------------------


def bench_images(source: Path, folder: Path, copies: int) -> list[Path]:
    """The corpus images larger than 32 px, plus ``copies`` distinct JPEG re-encodings of
    each (quality 85-95, a small crop), so that no two files share content (a scan reuses
    the results of content it has seen)."""
    originals = sorted(p for p in source.rglob("*") if p.is_file())
    paths = []
    rng = random.Random(7)
    for original in originals:
        with Image.open(original) as image:
            if min(image.size) <= 32:
                continue
            paths.append(original)
            picture = image.convert("RGB")
        for copy in range(copies):
            crop = picture.crop((copy + 1, copy + 1, picture.width, picture.height))
            target = folder / f"{original.stem}-{copy}.jpg"
            crop.save(target, "JPEG", quality=rng.choice((85, 90, 95)))
            paths.append(target)
    return paths


def generated_jpegs(folder: Path, count: int) -> list[Path]:
    """``count`` distinct 640x480 JPEGs (a gradient with a per-file noise seed)."""
    gradient = Image.linear_gradient("L").resize((640, 480))
    paths = []
    for i in range(count):
        noise = Image.effect_noise((640, 480), 4 + i % 50)
        shade = Image.new("L", (640, 480), i % 251)
        picture = Image.merge("RGB", (gradient, noise, shade))
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=80 + i % 15)
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


# --- runs -----------------------------------------------------------------------------


def build(shape: Shape, folder: Path, device: str) -> tuple[Detector, dict[str, torch.Tensor]]:
    weights = folder / f"{shape.name}.pt"
    if shape.name.startswith("sumsub"):
        state = write_sumsub_raw(weights, shape.backbone)
    else:
        state = write_commfor_training_checkpoint(weights, shape.backbone)
    detector = build_detector(
        BUILTIN_SPECS[shape.name], device=device, resolve=lambda _u, _n: weights
    )
    return detector, state


def measure_shape(shape: Shape, paths: list[Path], args: argparse.Namespace, folder: Path) -> None:
    """Every figure of one shape, each measured ``--repeat`` times in turn (so that a
    slow moment of a shared machine hits them alike); medians, with the spread."""
    detector, state = build(shape, folder, args.device)
    real_paths = paths[: args.limit_heavy] if shape.name in HEAVY else paths
    model, transform = authors_pipeline(shape, state, torch.device(args.device))
    authors_loop(model, transform, real_paths[:2])  # warm-up
    stand_in = StandIn(detector, args.standin_ms)
    stand_in_model = args.batch_size / (args.standin_ms / 1000)
    batch = batch_limit(detector, args.batch_size)  # what the engine gives this model
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for key, measure in (
            ("authors", lambda: authors_loop(model, transform, real_paths)),
            ("intake", lambda: intake_ceiling(detector, real_paths, args.threads)),
            ("model", lambda: model_ceiling(detector, batch)),
            (
                "engine",
                lambda: engine_run(
                    detector, real_paths, batch_size=args.batch_size, threads=args.threads
                ),
            ),
        ):
            runs.setdefault(key, []).append(measure())
    # The stand-in's figures take a second or two each, and a shared machine's speed moves
    # by more than the engine loses: each engine run is compared with the intake run just
    # before it (a pair sees the same machine), after a pair that warms both up.
    pairs = []
    for warm_up in [True] + [False] * args.standin_repeat:
        ceiling = intake_ceiling(stand_in, paths, args.threads)
        engine = engine_run(stand_in, paths, batch_size=args.batch_size, threads=args.threads)
        if not warm_up:
            runs.setdefault("standin_intake", []).append(ceiling)
            runs.setdefault("standin_engine", []).append(engine)
            pairs.append(engine / min(ceiling, stand_in_model))
    median = {key: statistics.median(values) for key, values in runs.items()}

    def figure(key: str) -> str:
        values = runs[key]
        digits = 2 if median[key] < 10 else 1  # a ConvNeXt-L on the CPU runs ~1 img/s
        spread = f"({min(values):.{digits}f}-{max(values):.{digits}f})" if len(values) > 1 else ""
        return f"{median[key]:8.{digits}f} img/s {spread}"

    lower = min(median["intake"], median["model"])
    print(f"\n{shape.label}, real model on {args.device}, {len(real_paths)} images")
    print(f"  authors' loop                      {figure('authors')}")
    print(f"  intake ceiling ({args.threads} threads)         {figure('intake')}")
    print(f"  model ceiling (batch {batch:3d})          {figure('model')}")
    print(
        f"  engine                             {figure('engine')}   "
        f"engine/min(ceilings) {median['engine'] / lower:.2f}   "
        f"engine/authors {median['engine'] / median['authors']:.2f}x"
    )
    print(
        f"  GPU-like stand-in ({args.standin_ms:g} ms a batch), {len(paths)} images, "
        f"{len(pairs)} pairs of runs:"
    )
    print(f"    intake ceiling                   {figure('standin_intake')}")
    print(f"    model ceiling                    {stand_in_model:8.1f} img/s")
    print(
        f"    engine                           {figure('standin_engine')}   "
        f"engine/min(ceilings) {statistics.median(pairs):.2f} "
        f"({min(pairs):.2f}-{max(pairs):.2f}, median of the pairs)"
    )


def rss_child(count: int, folder: Path, batch_size: int, threads: int) -> None:
    """Scan the first ``count`` files of ``folder`` with the stand-in; print peak RSS."""
    paths = sorted(folder.glob("*.jpg"))[:count]
    with tempfile.TemporaryDirectory() as weights_folder:
        detector, _ = build(SHAPES["sumsub-mj5"], Path(weights_folder), "cpu")
    stand_in = StandIn(detector, 5.0)
    started = time.perf_counter()
    rate = engine_run(stand_in, paths, batch_size=batch_size, threads=threads)
    elapsed = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{count} {peak_mib:.0f} {rate:.1f} {elapsed:.1f}")


def rss_runs(counts: list[int], args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        print(f"generating {max(counts)} distinct 640x480 JPEGs ...", flush=True)
        generated_jpegs(Path(folder), max(counts))
        print("\n| images | peak RSS | img/s | seconds |\n|---:|---:|---:|---:|")
        for count in counts:
            result = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--rss-child",
                    str(count),
                    folder,
                    "--batch-size",
                    str(args.batch_size),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            n, peak, rate, seconds = result.stdout.split()[-4:]
            print(f"| {int(n):,} | {peak} MiB | {rate} | {seconds} |", flush=True)


def main() -> int:
    allocator.tune_for_images()  # as the synthsentry command does
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "corpus" / "images")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--copies", type=int, default=1, help="JPEG re-encodings per image")
    parser.add_argument("--limit-heavy", type=int, default=12, help="files for ConvNeXt-L")
    parser.add_argument("--standin-ms", type=float, default=5.0, help="stand-in ms a batch")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each figure (median)")
    parser.add_argument(
        "--standin-repeat", type=int, default=9, help="pairs of stand-in runs (median)"
    )
    parser.add_argument("--rss", type=int, nargs="+", metavar="COUNT")
    parser.add_argument("--rss-child", nargs=2, metavar=("COUNT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1 or args.standin_repeat < 1:
        parser.error("--repeat and --standin-repeat take at least 1")
    if args.rss_child:
        rss_child(int(args.rss_child[0]), Path(args.rss_child[1]), args.batch_size, args.threads)
        return 0
    if args.rss:
        rss_runs(args.rss, args)
        return 0
    if not args.images.is_dir():
        parser.error(f"{args.images} is not a folder of images")
    with tempfile.TemporaryDirectory() as folder:
        paths = bench_images(args.images, Path(folder), args.copies)
        megapixels = statistics.median(Image.open(p).size[0] * Image.open(p).size[1] for p in paths)
        print(
            f"{len(paths)} images from {args.images} and {args.copies} re-encoding(s) each "
            f"(median {megapixels / 1e6:.1f} Mpx); torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
            f"batch {args.batch_size}, {args.threads} intake threads"
        )
        for name in args.shapes:
            measure_shape(SHAPES[name], paths, args, Path(folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
