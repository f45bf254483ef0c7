"""Peak memory (RSS) of ``synthsentry scan`` over 1, 4 and 16 near-limit images, with the
intake memory budget at its default and with the budget out of the way (how a scan
behaved before it had one: a chunk of ``--batch-size`` decoded images, and the next one
decoding beside it).

    .venv/bin/python benchmarks/bench_scan_memory.py [--megapixels 100] [--counts 1 4 16]

Each scan is the real command in a fresh process (the model-free provenance detector, so
the figures are intake's, not a model's), measured by a parent of its own: ``ru_maxrss``
of its children is the scan's peak. Both budgets run side by side on the same files.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

UNBOUNDED_MB = 1_000_000  # a budget no scan reaches: the behaviour without one


def near_limit_jpeg(megapixels: float, seed: int) -> bytes:
    """A photo-like JPEG of about ``megapixels`` (distinct bytes per seed)."""
    side = int((megapixels * 1_000_000) ** 0.5)
    gradient = Image.linear_gradient("L").resize((side, side))
    noise = Image.effect_noise((side, side), 8 + seed)
    picture = Image.merge("RGB", (gradient, noise, gradient.transpose(Image.Transpose.ROTATE_90)))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def measure(folder: Path, data_dir: Path, budget_mb: int) -> tuple[int, float, int]:
    """Run the scan from a parent of its own; returns (files, seconds, peak RSS MiB)."""
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), str(data_dir), str(budget_mb)],
        capture_output=True,
        text=True,
        check=True,
    )
    files, seconds, peak = result.stdout.split()[-3:]
    return int(files), float(seconds), int(peak)


def child(folder: str, data_dir: str, budget_mb: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    env.update(
        SYNTHSENTRY_DATA_DIR=data_dir,
        SYNTHSENTRY_INTAKE_MEMORY_MB=budget_mb,
        SYNTHSENTRY_LOG_LEVEL="WARNING",
    )
    started = time.perf_counter()
    scan = subprocess.run(
        [
            *(sys.executable, "-m", "synthsentry.cli", "scan", folder),
            *("--json", "--no-progress", "--detector", "provenance"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    print(len(scan.stdout.splitlines()), f"{elapsed:.1f}", peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megapixels", type=float, default=100.0)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    from synthsentry.settings import Settings

    default_mb = Settings().intake_memory_mb
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"{args.megapixels:g} Mpx JPEGs; budget {default_mb} MiB (default) vs unbounded")
        print(f"{'images':>6} {'budget':>10} {'files':>5} {'seconds':>8} {'peak RSS MiB':>13}")
        for count in args.counts:
            folder = root / f"n{count}"
            folder.mkdir()
            for i in range(count):
                (folder / f"{i:02d}.jpg").write_bytes(near_limit_jpeg(args.megapixels, i))
            figures = {}
            for label, budget in (("default", default_mb), ("unbounded", UNBOUNDED_MB)):
                data_dir = root / f"data-{count}-{label}"  # a fresh database: nothing reused
                files, seconds, peak = measure(folder, data_dir, budget)
                figures[label] = peak
                print(f"{count:>6} {label:>10} {files:>5} {seconds:>8.1f} {peak:>13}")
            print(
                f"{'':>6} {'ratio':>10} unbounded / default = "
                f"{figures['unbounded'] / figures['default']:.2f}"
            )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
