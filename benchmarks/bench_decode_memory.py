"""Peak memory (RSS) of decoding: near-limit images held together as a scan's batch holds
them, and hostile TIFFs before and after intake's layout check.

    .venv/bin/python benchmarks/bench_decode_memory.py [--megapixels 100] [--counts 1 4 16]

Every figure comes from a fresh child process (its ``ru_maxrss``), so one case's memory
never hides another's. "Pillow alone" decodes the file as intake did before it checked
the TIFF layout: the plugin's opener, then ``load()``.
"""

from __future__ import annotations

import argparse
import io
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from PIL import Image  # noqa: E402

from workers.intake import IntakeLimits, Rejected, decode  # noqa: E402

from badfiles import tiff_listing_strips, tiff_tile_bomb  # noqa: E402

LIMITS = IntakeLimits(max_bytes=50 << 20, max_pixels=100_000_000, decode_timeout_s=120)


def child(mode: str, path: str, count: int) -> None:
    """Decode ``path`` ``count`` times, keeping every result (and the file's bytes, as an
    intake result does), then print the outcome, the seconds and this process's peak RSS."""
    held = []
    started = time.perf_counter()
    outcome = "decoded"
    for _ in range(count):
        data = Path(path).read_bytes()
        try:
            image: Image.Image
            if mode == "pillow":
                image = Image.open(io.BytesIO(data), formats=["TIFF"])
                image.load()
            else:
                image = decode(data, LIMITS).image
        except Rejected as exc:
            outcome = exc.reason.value
            break
        except Exception as exc:  # Pillow alone: whatever the decoder says
            outcome = f"error:{type(exc).__name__}"
            break
        held.append((data, image))
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(outcome, f"{elapsed:.2f}", peak)


def measure(mode: str, path: Path, count: int = 1) -> tuple[str, float, int]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path), str(count)],
        capture_output=True,
        text=True,
        check=True,
    )
    outcome, seconds, peak = result.stdout.split()[-3:]
    return outcome, float(seconds), int(peak)


def near_limit_jpeg(megapixels: float, progressive: bool) -> bytes:
    side = int((megapixels * 1_000_000) ** 0.5)
    gradient = Image.linear_gradient("L").resize((side, side))
    noise = Image.effect_noise((side, side), 12)
    picture = Image.merge("RGB", (gradient, noise, gradient.transpose(Image.Transpose.ROTATE_90)))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=85, progressive=progressive)
    return buffer.getvalue()


def make_files(folder: Path, megapixels: float) -> None:
    """Write the test files (in a child: the parent's memory would count in every child
    forked from it)."""
    files = {
        "baseline.jpg": near_limit_jpeg(megapixels=0.01, progressive=False),
        "near_limit.jpg": near_limit_jpeg(megapixels, progressive=False),
        "near_limit_progressive.jpg": near_limit_jpeg(megapixels, progressive=True),
        "tile_16384.tif": tiff_tile_bomb((16384, 16384)),
        "tile_8192.tif": tiff_tile_bomb((8192, 8192)),
        "strips_2M.tif": tiff_listing_strips(2_000_000),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)


def row(label: str, outcome: str, seconds: float, peak: int) -> str:
    return f"| {label} | {outcome} | {seconds:.2f} s | {peak} MiB |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, default=100.0)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        subprocess.run(
            [sys.executable, __file__, "--make", str(work), str(args.megapixels)], check=True
        )
        sizes = {path.name: path.stat().st_size for path in work.iterdir()}
        side = int((args.megapixels * 1_000_000) ** 0.5)
        print(f"near-limit image: {side}x{side} JPEG, {sizes['near_limit.jpg']} bytes")
        print("| case | outcome | time | peak RSS |")
        print("|---|---|---:|---:|")
        print(
            row("interpreter + intake, one 100x100 JPEG", *measure("intake", work / "baseline.jpg"))
        )
        for count in args.counts:
            label = f"{count} x {side}x{side} JPEG held together"
            print(row(label, *measure("intake", work / "near_limit.jpg", count)))
        label = f"1 x {side}x{side} progressive JPEG"
        print(row(label, *measure("intake", work / "near_limit_progressive.jpg")))
        for name, what in (
            ("tile_16384.tif", "64x64 TIFF, one 16384x16384 tile"),
            ("tile_8192.tif", "64x64 TIFF, one 8192x8192 tile"),
            ("strips_2M.tif", "64x64 TIFF listing 2,000,000 strips"),
        ):
            label = f"{what} ({sizes[name]} bytes)"
            print(row(f"{label}: Pillow alone", *measure("pillow", work / name)))
            print(row(f"{label}: intake", *measure("intake", work / name)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--make":
        make_files(Path(sys.argv[2]), float(sys.argv[3]))
        sys.exit(0)
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    sys.exit(main())
