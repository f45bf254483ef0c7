"""Time per image of the provenance detector on the corpus, with and without the
invisible-watermark check.

    .venv/bin/python benchmarks/bench_provenance.py [--images DIR] [--repeat N]

Decoding is done once, up front: the figures are the detector's own cost per image.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from workers.detectors.base import DetectorSpec
from workers.detectors.provenance import load_provenance
from workers.intake import IntakeLimits, decode

REPO = Path(__file__).resolve().parents[1]
LIMITS = IntakeLimits(max_bytes=50 << 20, max_pixels=100_000_000, decode_timeout_s=60)


def per_image_ms(
    options: dict[str, object], items: list[tuple[object, bytes]], repeat: int
) -> list[float]:
    detector = load_provenance(
        DetectorSpec("provenance", "provenance", "1", options=options),
        device="cpu",
        weights_path=Path(),
    )
    best: list[float] = [float("inf")] * len(items)
    for _ in range(repeat):
        for i, (image, raw) in enumerate(items):
            started = time.perf_counter()
            detector.detect_batch([image], [raw])  # type: ignore[list-item]
            best[i] = min(best[i], (time.perf_counter() - started) * 1000)
    return best


def describe(label: str, times: list[float]) -> str:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"{label:<28} median {statistics.median(ordered):6.1f} ms   p95 {p95:6.1f} ms   "
        f"max {ordered[-1]:6.1f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "corpus" / "images")
    parser.add_argument("--repeat", type=int, default=3, help="runs per image; the best counts")
    args = parser.parse_args()
    paths = sorted(p for p in args.images.iterdir() if p.is_file())
    items = []
    for path in paths:
        raw = path.read_bytes()
        items.append((decode(raw, LIMITS).image, raw))
    print(f"{len(items)} images from {args.images}, best of {args.repeat}")
    full = per_image_ms({"decisive": True}, items, args.repeat)
    no_mark = per_image_ms({"decisive": True, "watermark_max_pixels": 1}, items, args.repeat)
    print(describe("all signals", full))
    print(describe("without the watermark check", no_mark))
    share = 1 - statistics.median(no_mark) / statistics.median(full)
    print(f"watermark check's share of the median: {share:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
