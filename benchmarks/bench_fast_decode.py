"""Fast decoding (the detector option ``fast_decode``): throughput and score drift.

    .venv/bin/python benchmarks/bench_fast_decode.py [--device cpu|cuda] [--shapes a,b]
        [--per N] [--threads N] [--batch-size N] [--repeat N] [--images DIR] [--json FILE]

For each detector shape (sumsub-mj5 = MobileNetV3-L at 224 after Resize 256 bilinear;
commfor-vit384 = ViT-S/16 at 384 after Resize 440 bilinear; sumsub-sd200 = ConvNeXt-L at
384 squashed, bicubic) it writes a checkpoint in the published format with seeded random
weights (tests/checkpoints.py), builds the detector three times: exact (the default),
``fast_decode = "draft"`` and ``fast_decode = "gpu"``, and measures on two sets of JPEGs:

- corpus: the JPEG files of the shared corpus as they are (other formats skipped);
- re-encoded: every corpus image larger than 32 px re-encoded ``--per`` times as JPEG at a
  random size of 0.8-4 Mpx and quality 85, 90 or 95 (seeded), as photos arrive.

Throughput (images per second, best of ``--repeat``, file bytes already in memory,
``--threads`` intake threads, default the CPU count) of decode + preprocess as the engine
runs it: exact = ``intake.decode`` + ``preprocess``; draft =
``intake.decode(draft=decode_size)`` + ``preprocess``; gpu =
``intake.decode(draft=decode_size)`` + ``preprocess_encoded`` in the threads while the main
thread collates batches and decodes them on the device (``to_device``); its CPU side
(threads alone) and device side (``to_device`` alone) are also given.

Score drift: |P(AI) - P(AI) of the exact path| per image, median, 99th percentile and
maximum, with the spread of the exact scores (random heads are scaled so the scores spread
out; a drift means something only against that spread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # checkpoint writers shared with the tests

from workers.detectors.registry import BUILTIN_SPECS, build_detector  # noqa: E402
from workers.detectors.torch_models import TorchDetector  # noqa: E402
from workers.intake import IntakeLimits, decode  # noqa: E402

from checkpoints import (  # noqa: E402
    COMMFOR_VIT_384,
    SUMSUB_CONVNEXT,
    SUMSUB_MOBILENET,
    write_commfor_training_checkpoint,
    write_sumsub_raw,
)

LIMITS = IntakeLimits(max_bytes=50 << 20, max_pixels=100_000_000, decode_timeout_s=60)
PATHS = ("exact", "draft", "gpu")
SHAPES: dict[str, Callable[[Path], object]] = {
    "sumsub-mj5": lambda path: write_sumsub_raw(path, SUMSUB_MOBILENET),
    "commfor-vit384": lambda path: write_commfor_training_checkpoint(path, COMMFOR_VIT_384),
    "sumsub-sd200": lambda path: write_sumsub_raw(path, SUMSUB_CONVNEXT),
}

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (still warned once
# per call); the decoder itself is what is measured here.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")


def reencode(job: tuple[Path, Path, int]) -> Path:
    source, target, seed = job
    rng = random.Random(seed)
    with Image.open(source) as image:
        rgb = image.convert("RGB")
    scale = (rng.uniform(0.8, 4.0) * 1e6 / (rgb.width * rgb.height)) ** 0.5
    size = (max(64, round(rgb.width * scale)), max(64, round(rgb.height * scale)))
    rgb.resize(size, Image.Resampling.BICUBIC).save(
        target, "JPEG", quality=rng.choice([85, 90, 95])
    )
    return target


def image_sets(corpus: Path, folder: Path, per: int, workers: int) -> dict[str, list[bytes]]:
    files = sorted(p for p in corpus.iterdir() if p.is_file())
    jpegs = [p for p in files if p.read_bytes()[:3] == b"\xff\xd8\xff"]
    sources = [p for p in files if min(Image.open(p).size) > 32]
    jobs = [
        (source, folder / f"{source.stem}_{k}.jpg", index * 1000 + k)
        for index, source in enumerate(sources)
        for k in range(per)
    ]
    with ProcessPoolExecutor(workers) as pool:
        reencoded = sorted(pool.map(reencode, jobs))
    return {
        "corpus": [p.read_bytes() for p in jpegs],
        "re-encoded": [p.read_bytes() for p in reencoded],
    }


def megapixels(raws: Sequence[bytes]) -> float:
    import io

    sizes = []
    for raw in raws:
        with Image.open(io.BytesIO(raw)) as image:
            sizes.append(image.width * image.height)
    return statistics.median(sizes) / 1e6


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_input(detector: TorchDetector, path: str, raw: bytes) -> Any:
    """What an intake thread hands the detector for one file on ``path``."""
    decoded = decode(raw, LIMITS, draft=detector.decode_size)
    if path == "gpu":
        assert detector.preprocess_encoded is not None
        return detector.preprocess_encoded(decoded.image, raw)
    return detector.preprocess(decoded.image)


def batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def throughput(
    detector: TorchDetector, path: str, raws: Sequence[bytes], threads: int, batch_size: int
) -> dict[str, float]:
    """Images per second of what the CPU does for ``path`` (and, for gpu, the device's
    decoding, pipelined with it as the engine would)."""
    figures: dict[str, float] = {}
    with ThreadPoolExecutor(threads) as pool:
        prepare = lambda raw: host_input(detector, path, raw)  # noqa: E731
        list(pool.map(prepare, raws[:threads]))  # warm-up
        started = time.perf_counter()
        prepared = list(pool.map(prepare, raws))
        figures["cpu"] = len(raws) / (time.perf_counter() - started)
        if path != "gpu":
            return figures
        for batch in batches(iter(prepared[:batch_size]), batch_size):  # warm-up
            detector.to_device(detector.collate(batch))
        sync(detector.device)
        started = time.perf_counter()
        for batch in batches(iter(prepared), batch_size):
            detector.to_device(detector.collate(batch))
        sync(detector.device)
        figures["device"] = len(raws) / (time.perf_counter() - started)
        del prepared
        started = time.perf_counter()
        for batch in batches(pool.map(prepare, raws), batch_size):
            detector.to_device(detector.collate(batch))
        sync(detector.device)
        figures["pipelined"] = len(raws) / (time.perf_counter() - started)
    return figures


def scores(
    detector: TorchDetector, path: str, raws: Sequence[bytes], threads: int, batch_size: int
) -> list[float]:
    out: list[float] = []
    with ThreadPoolExecutor(threads) as pool:
        prepared = pool.map(lambda raw: host_input(detector, path, raw), raws)
        for batch in batches(prepared, batch_size):
            for output in detector.forward(detector.collate(batch)):
                assert output.score is not None, output.evidence
                out.append(output.score)
    return out


def drift(exact: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    deltas = sorted(abs(a - b) for a, b in zip(exact, other, strict=True))
    return {
        "median": statistics.median(deltas),
        "p99": deltas[min(len(deltas) - 1, round(0.99 * (len(deltas) - 1)))],
        "max": deltas[-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "corpus" / "images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default="sumsub-mj5,commfor-vit384")
    parser.add_argument("--per", type=int, default=8, help="re-encoded copies of each image")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="runs per rate; the best counts")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {sorted(SHAPES)}")
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "device": args.device,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        sets = image_sets(args.images, Path(folder), args.per, args.threads)
        for name, raws in sets.items():
            results[f"{name}_images"] = len(raws)
            results[f"{name}_median_mpx"] = megapixels(raws)
            print(f"{name}: {len(raws)} JPEGs, median {megapixels(raws):.2f} Mpx", flush=True)
        print(f"(made in {time.perf_counter() - started:.0f} s)", flush=True)
        for shape in shapes:
            weights = Path(folder) / f"{shape}.pt"
            SHAPES[shape](weights)
            spec = BUILTIN_SPECS[shape]
            detectors: dict[str, TorchDetector] = {}
            for path in PATHS:
                options = dict(spec.options) | ({} if path == "exact" else {"fast_decode": path})
                built = build_detector(
                    dataclasses.replace(spec, options=options),
                    device=args.device,
                    resolve=lambda _uri, _name, w=weights: w,
                )
                assert isinstance(built, TorchDetector)
                detectors[path] = built
            weights.unlink()
            shape_results: dict[str, Any] = {"decode_size": {}}
            results[shape] = shape_results
            for path, detector in detectors.items():
                shape_results["decode_size"][path] = detector.decode_size
            print(
                f"\n== {shape}: decode sizes "
                + ", ".join(f"{p} {d.decode_size}" for p, d in detectors.items()),
                flush=True,
            )
            for name, raws in sets.items():
                per_set: dict[str, Any] = {}
                shape_results[name] = per_set
                exact_scores: list[float] = []
                for path, detector in detectors.items():
                    runs = [
                        throughput(detector, path, raws, args.threads, args.batch_size)
                        for _ in range(args.repeat)
                    ]
                    rate = {key: max(run[key] for run in runs) for key in runs[0]}
                    path_scores = scores(detector, path, raws, args.threads, args.batch_size)
                    per_set[path] = {"img_per_s": rate}
                    if path == "exact":
                        exact_scores = path_scores
                        per_set["exact_spread"] = [
                            min(path_scores),
                            statistics.median(path_scores),
                            max(path_scores),
                        ]
                    else:
                        per_set[path]["drift"] = drift(exact_scores, path_scores)
                    print(f"  {name:10s} {path:5s} {rate} {per_set[path].get('drift', '')}")
                    sys.stdout.flush()
            detectors.clear()
    print_table(results, shapes, list(sets))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def print_table(results: dict[str, Any], shapes: list[str], sets: list[str]) -> None:
    print(
        f"\ndevice {results['device']}, {results['threads']} threads, torch {results['torch']}; "
        "img/s of decode + preprocess; |delta P(AI)| against the exact path"
    )
    header = (
        "| shape | images | exact img/s | draft img/s | gpu img/s: CPU side / device / "
        "pipelined | exact scores min-median-max | draft drift median / p99 / max | "
        "gpu drift median / p99 / max |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for shape in shapes:
        for name in sets:
            row = results[shape][name]
            gpu = row["gpu"]["img_per_s"]
            spread = "-".join(f"{value:.3f}" for value in row["exact_spread"])
            print(
                f"| {shape} | {name} ({results[f'{name}_images']}) "
                f"| {row['exact']['img_per_s']['cpu']:.1f} "
                f"| {row['draft']['img_per_s']['cpu']:.1f} "
                f"| {gpu['cpu']:.1f} / {gpu['device']:.1f} / {gpu['pipelined']:.1f} "
                f"| {spread} | {_drift(row['draft']['drift'])} | {_drift(row['gpu']['drift'])} |"
            )


def _drift(figures: dict[str, float]) -> str:
    return " / ".join(f"{figures[key]:.1e}" for key in ("median", "p99", "max"))


if __name__ == "__main__":
    raise SystemExit(main())
