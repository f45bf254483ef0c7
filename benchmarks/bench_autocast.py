"""Reduced precision (the detector option ``autocast``): speed and score drift.

    .venv/bin/python benchmarks/bench_autocast.py [--device cpu|cuda] [--shapes a,b]
        [--dtypes bf16,fp16] [--per N] [--batch-size N] [--threads N] [--limit-heavy N]
        [--seconds S] [--images DIR] [--json FILE]

For each detector shape (sumsub-mj5 = MobileNetV3-L 224, commfor-vit384 = ViT-S/16 384,
sumsub-sd200 = ConvNeXt-L 384) it writes a checkpoint in the published format with seeded
random weights (tests/checkpoints.py; the heads are scaled so that the scores spread out),
builds the detector as configured (float32) and once per ``--dtypes`` with
``autocast = "<dtype>"``, and measures on two sets of JPEGs (the shared corpus's JPEGs, and
every corpus image re-encoded ``--per`` times at 0.8-4 Mpx, as ``bench_fast_decode.py``
makes them):

- the forward pass alone, images per second, on random batches of ``--batch-size`` (or of
  the shorter batch the engine gives a large model on the CPU), copy to the device included
  (``bench_engine.model_ceiling``; taken once beside each set, two samples);
- score drift: |P(AI) - P(AI) in float32| per image, median, 99th percentile and maximum,
  against the spread of the float32 scores, and how many outputs were not finite (an
  abstention, never a made-up score).

Preprocessing is the same for every precision (autocast changes the model's arithmetic,
not its input), so each image is decoded and preprocessed once. A large model on the CPU is
measured on the first ``--limit-heavy`` images of each set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_engine import model_ceiling  # noqa: E402
from bench_fast_decode import LIMITS, SHAPES, batches, drift, image_sets  # noqa: E402

from workers.detectors.registry import BUILTIN_SPECS, build_detector  # noqa: E402
from workers.detectors.torch_models import TorchDetector  # noqa: E402
from workers.engine import batch_limit  # noqa: E402
from workers.intake import decode  # noqa: E402

HEAVY = {"sumsub-sd200"}  # seconds an image on a CPU: fewer images there


def build(shape: str, weights: Path, device: str, autocast: str | None) -> TorchDetector:
    spec = BUILTIN_SPECS[shape]
    options = dict(spec.options) | ({"autocast": autocast} if autocast else {})
    detector = build_detector(
        dataclasses.replace(spec, options=options), device=device, resolve=lambda _u, _n: weights
    )
    assert isinstance(detector, TorchDetector)
    return detector


def preprocessed(detector: TorchDetector, raw: bytes) -> torch.Tensor:
    return detector.preprocess(decode(raw, LIMITS).image)


def scores(detector: TorchDetector, inputs: list[torch.Tensor], batch: int) -> list[float | None]:
    out: list[float | None] = []
    for chunk in batches(iter(inputs), batch):
        out.extend(output.score for output in detector.forward(detector.collate(chunk)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "corpus" / "images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--per", type=int, default=2, help="re-encoded copies of each image")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--limit-heavy", type=int, default=12, help="images for ConvNeXt-L")
    parser.add_argument("--seconds", type=float, default=3.0, help="per forward-rate figure")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    shapes, dtypes = args.shapes.split(","), args.dtypes.split(",")
    if unknown := sorted(set(shapes) - set(SHAPES)):
        parser.error(f"unknown shapes {unknown}; known: {sorted(SHAPES)}")
    if unknown := sorted(set(dtypes) - {"bf16", "fp16"}):
        parser.error(f"unknown dtypes {unknown}; known: bf16, fp16")
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "device": args.device,
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory() as folder:
        sets = image_sets(args.images, Path(folder), args.per, args.threads)
        for shape in shapes:
            weights = Path(folder) / f"{shape}.pt"
            SHAPES[shape](weights)
            exact = build(shape, weights, args.device, None)
            heavy = shape in HEAVY and exact.device.type == "cpu"
            batch = batch_limit(exact, args.batch_size)
            shape_results: dict[str, Any] = {"batch": batch}
            results[shape] = shape_results
            print(f"\n== {shape}: batch {batch}", flush=True)
            for name, raws in sets.items():
                chosen = raws[: args.limit_heavy] if heavy else raws
                with ThreadPoolExecutor(args.threads) as pool:
                    inputs = list(pool.map(partial(preprocessed, exact), chosen))
                reference = scores(exact, inputs, batch)
                assert all(score is not None for score in reference)
                floats = [float(score) for score in reference if score is not None]
                row: dict[str, Any] = {
                    "images": len(inputs),
                    "spread": [min(floats), statistics.median(floats), max(floats)],
                    "fp32": model_ceiling(exact, batch, seconds=args.seconds),
                }
                for dtype in dtypes:
                    reduced = build(shape, weights, args.device, dtype)
                    got = scores(reduced, inputs, batch)
                    kept = [i for i, score in enumerate(got) if score is not None]
                    exact_kept = [floats[i] for i in kept]
                    reduced_kept = [float(got[i] or 0.0) for i in kept]
                    row[dtype] = {
                        "img_per_s": model_ceiling(reduced, batch, seconds=args.seconds),
                        "drift": drift(exact_kept, reduced_kept) if kept else None,
                        "not_finite": len(got) - len(kept),
                    }
                    del reduced
                shape_results[name] = row
                print(f"  {name}: {row}", flush=True)
            weights.unlink()
    print_table(results, shapes, dtypes, list(sets))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def print_table(
    results: dict[str, Any], shapes: list[str], dtypes: list[str], sets: list[str]
) -> None:
    print(
        f"\ndevice {results['device']}, {results['threads']} threads, torch {results['torch']}; "
        "forward pass img/s (the ratio to float32); |delta P(AI)| against float32"
    )
    header = "| shape | set | fp32 img/s | " + " | ".join(
        f"{d} img/s | {d} drift median / p99 / max" for d in dtypes
    )
    print(header + " | fp32 scores min-median-max |")
    print("|" + "---|" * (header.count(" | ") + 2))
    for shape in shapes:
        for name in sets:
            row = results[shape][name]
            cells = [f"{row['fp32']:.1f}"]
            for dtype in dtypes:
                figures = row[dtype]
                rate = figures["img_per_s"]
                drifted = (
                    " / ".join(f"{figures['drift'][k]:.1e}" for k in ("median", "p99", "max"))
                    if figures["drift"]
                    else "-"
                )
                lost = f" ({figures['not_finite']} not finite)" if figures["not_finite"] else ""
                cells += [f"{rate:.1f} ({rate / row['fp32']:.2f}x)", drifted + lost]
            spread = "-".join(f"{value:.3f}" for value in row["spread"])
            print(
                f"| {shape} (batch {results[shape]['batch']}) | {name} ({row['images']}) | "
                + " | ".join(cells)
                + f" | {spread} |"
            )


if __name__ == "__main__":
    raise SystemExit(main())
