"""Throughput of the model detectors: the authors' one-image loop against synthsentry's engine.

    .venv/bin/python benchmarks/bench_detectors.py [--images DIR] [--repeat N]

For each detector shape (Sumsub MobileNetV3-L = sumsub-mj5, Community Forensics ViT-S/16 at
384 px = commfor-vit384) it builds a checkpoint in the published format with random weights
(the real weights are not needed for speed) and measures, on the same image files:

- authors' loop: ``Image.open(path).convert("RGB")`` -> transform -> ``model(x[None])``, one
  image at a time, as the model cards' and the authors' scripts do;
- engine: ``synthsentry scan``'s pipeline (intake threads decode and preprocess the next
  chunk while the model runs batches), storing results in a throwaway SQLite database;

and, separately, decoding + preprocessing alone with a thread pool against a process pool.
Figures are images per second (higher is better); ratios are engine / authors' loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # checkpoint writers shared with the tests

from db import migrate  # noqa: E402
from db.session import make_engine, make_sessionmaker  # noqa: E402
from workers.detectors.base import Detector  # noqa: E402
from workers.detectors.registry import BUILTIN_SPECS, build_detector  # noqa: E402
from workers.ensemble import EnsembleConfig  # noqa: E402
from workers.intake import IntakeLimits, decode  # noqa: E402
from workers.scan import Scanner  # noqa: E402

from checkpoints import (  # noqa: E402
    COMMFOR_VIT_384,
    SUMSUB_MOBILENET,
    CommForReference,
    SumsubReference,
    write_commfor_training_checkpoint,
    write_sumsub_raw,
)

LIMITS = IntakeLimits(max_bytes=50 << 20, max_pixels=100_000_000, decode_timeout_s=60)


Transform = Callable[[Image.Image], torch.Tensor]


def authors_pipeline(
    name: str, state: dict[str, torch.Tensor]
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Transform]:
    """The model and transform as the authors' own code builds them (not synthsentry's)."""
    import timm
    from torchvision import transforms

    if name == "sumsub-mj5":
        module: torch.nn.Module = SumsubReference(SUMSUB_MOBILENET)
        config = timm.data.resolve_data_config(
            {}, pretrained_cfg=timm.get_pretrained_cfg(SUMSUB_MOBILENET).to_dict()
        )
        transform = timm.data.create_transform(**config, is_training=False)
    else:
        module = CommForReference(COMMFOR_VIT_384)
        transform = transforms.Compose(
            [
                transforms.Resize(440, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(384),
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
    module.load_state_dict(state)
    module.eval()
    if name == "sumsub-mj5":
        return lambda x: torch.softmax(module.clf(module.model(x)), dim=1), transform
    return lambda x: torch.sigmoid(module.vit(x)), transform


def authors_loop(
    model: Callable[[torch.Tensor], torch.Tensor], transform: Transform, paths: list[Path]
) -> float:
    """Seconds for the one-image-at-a-time loop of the authors' pipelines."""
    started = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            with Image.open(path) as image:
                x = transform(image.convert("RGB"))
            model(x.unsqueeze(0))
    return time.perf_counter() - started


def engine_run(detector: Detector, paths: list[Path], batch_size: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/bench.db"
        migrate.upgrade(url)
        engine = make_engine(url)
        scanner = Scanner(
            [detector], make_sessionmaker(engine), LIMITS, EnsembleConfig(), batch_size=batch_size
        )
        started = time.perf_counter()
        count = sum(1 for _ in scanner.scan(paths))
        elapsed = time.perf_counter() - started
        engine.dispose()
    assert count == len(paths)
    return elapsed


_PROCESS_TRANSFORM: Transform | None = None


def _decode_and_preprocess(path: Path) -> tuple[int, ...]:
    assert _PROCESS_TRANSFORM is not None
    tensor = _PROCESS_TRANSFORM(decode(path.read_bytes(), LIMITS).image)
    return tuple(tensor.shape)


def _init_process(transform: Transform) -> None:
    global _PROCESS_TRANSFORM  # noqa: PLW0603 - per-process state for the pool's workers
    _PROCESS_TRANSFORM = transform
    torch.set_num_threads(1)


def intake_pool(kind: str, transform: Transform, paths: list[Path], workers: int) -> float:
    pool: Executor
    if kind == "threads":
        global _PROCESS_TRANSFORM  # noqa: PLW0603
        _PROCESS_TRANSFORM = transform
        pool = ThreadPoolExecutor(workers)
    else:
        pool = ProcessPoolExecutor(workers, initializer=_init_process, initargs=(transform,))
        list(pool.map(_decode_and_preprocess, paths[:workers]))  # start the workers first
    with pool:
        started = time.perf_counter()
        list(pool.map(_decode_and_preprocess, paths))
        return time.perf_counter() - started


def best_of(repeat: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeat))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "corpus" / "images")
    parser.add_argument("--repeat", type=int, default=2, help="runs per figure; the best counts")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if not args.images.is_dir():
        parser.error(f"{args.images} is not a folder of images")
    paths = sorted(p for p in args.images.rglob("*") if p.is_file())
    paths = [p for p in paths if Image.open(p).size[0] > 1]  # 1x1 metadata fixtures say nothing
    megapixels = statistics.median(Image.open(p).size[0] * Image.open(p).size[1] for p in paths)
    print(
        f"{len(paths)} images from {args.images} (median {megapixels / 1e6:.1f} Mpx); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeat}"
    )
    with tempfile.TemporaryDirectory() as folder:
        mj5_weights = Path(folder) / "mj5.pt"
        vit_weights = Path(folder) / "commfor.pt"
        shapes = {
            "sumsub-mj5 (MobileNetV3-L, 224)": (
                "sumsub-mj5",
                mj5_weights,
                write_sumsub_raw(mj5_weights, SUMSUB_MOBILENET),
            ),
            "commfor-vit384 (ViT-S/16, 384)": (
                "commfor-vit384",
                vit_weights,
                write_commfor_training_checkpoint(vit_weights, COMMFOR_VIT_384),
            ),
        }
        for label, (name, weights, state) in shapes.items():
            detector = build_detector(
                BUILTIN_SPECS[name], device="cpu", resolve=lambda _u, _n, w=weights: w
            )
            module, transform = authors_pipeline(name, state)
            authors_loop(module, transform, paths[:2])  # warm-up
            loop = best_of(args.repeat, lambda m=module, t=transform: authors_loop(m, t, paths))
            engine = best_of(args.repeat, lambda d=detector: engine_run(d, paths, args.batch_size))
            print(f"\n{label}")
            print(f"  authors' loop (1 image at a time)   {len(paths) / loop:7.1f} img/s")
            print(
                f"  engine (batch {args.batch_size}, intake threads)    "
                f"{len(paths) / engine:7.1f} img/s   ratio {loop / engine:.2f}x"
            )
            threads = best_of(args.repeat, lambda t=transform: intake_pool("threads", t, paths, 2))
            processes = best_of(
                args.repeat, lambda t=transform: intake_pool("processes", t, paths, 2)
            )
            print(
                f"  decode+preprocess only: 2 threads {len(paths) / threads:6.1f} img/s, "
                f"2 processes {len(paths) / processes:6.1f} img/s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
