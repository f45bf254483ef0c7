"""The batching engine: staged preprocessing + batched forward agree with the detector's own
one-image path, failures stay with their image, and batches form by size or by time."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from workers.detectors.base import Detector
from workers.detectors.registry import BUILTIN_SPECS, build_detector
from workers.engine import collect_batches, is_staged, prepare, run_detector

from badfiles import sample_picture
from checkpoints import SUMSUB_MOBILENET, write_sumsub_raw


@pytest.fixture(scope="module")
def mj5(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    weights = tmp_path_factory.mktemp("w") / "mj5.pt"
    write_sumsub_raw(weights, SUMSUB_MOBILENET, seed=3)
    return build_detector(BUILTIN_SPECS["sumsub-mj5"], device="cpu", resolve=lambda _u, _n: weights)


def _images() -> list[Image.Image]:
    return [sample_picture((96 + 24 * i, 160 - 16 * i)) for i in range(5)]


def test_batched_engine_matches_one_image_at_a_time(mj5: Detector) -> None:
    assert is_staged(mj5)
    images = _images()
    prepared = [prepare(image, b"", [mj5]) for image in images]
    batched = run_detector(mj5, prepared, max_batch=3)  # batches of 3 and 2
    single = [mj5.detect_batch([image], [b""])[0] for image in images]
    for (output, latency, error), reference in zip(batched, single, strict=True):
        assert error is None and output is not None and latency is not None
        assert output.score == pytest.approx(reference.score, abs=1e-4)
    scores = [o.score for o, _, _ in batched if o is not None]
    assert max(scores) - min(scores) > 1e-3, "distinct images must get distinct scores"


def test_preprocessing_failure_stays_with_its_image(mj5: Detector) -> None:
    images = _images()[:3]
    prepared = [prepare(image, b"", [mj5]) for image in images]
    prepared[1].tensors.clear()
    prepared[1].errors["sumsub-mj5"] = "ValueError: cannot preprocess"
    results = run_detector(mj5, prepared, max_batch=8)
    assert [r[2] for r in results] == [None, "ValueError: cannot preprocess", None]
    assert results[0][0] is not None and results[2][0] is not None


def test_batches_fill_up_to_the_size_limit() -> None:
    source: queue.Queue[int | None] = queue.Queue()
    for item in [1, 2, 3, 4, 5, None]:
        source.put(item)
    assert list(collect_batches(source, max_batch=2, max_wait_s=5.0)) == [[1, 2], [3, 4], [5]]


def test_a_lone_item_waits_only_the_window() -> None:
    source: queue.Queue[int | None] = queue.Queue()
    source.put(7)
    batches = collect_batches(source, max_batch=16, max_wait_s=0.05)
    started = time.monotonic()
    assert next(batches) == [7]
    # Bounded by the 50 ms window, not by the batch size; the slack covers a loaded machine.
    assert time.monotonic() - started < 2.0
    source.put(None)
    assert list(batches) == []


def test_items_arriving_within_the_window_share_a_batch() -> None:
    source: queue.Queue[int | None] = queue.Queue()

    def producer() -> None:
        for item in (1, 2, 3):
            source.put(item)
            time.sleep(0.01)
        source.put(None)

    thread = threading.Thread(target=producer)
    thread.start()
    batches = list(collect_batches(source, max_batch=16, max_wait_s=5.0))
    thread.join()
    assert batches == [[1, 2, 3]]


def test_scan_pipeline_keeps_input_order(tmp_path: Path, mj5: Detector, sqlite_url: str) -> None:
    from db import migrate
    from db.session import make_engine, make_sessionmaker
    from workers.ensemble import EnsembleConfig
    from workers.intake import IntakeLimits
    from workers.scan import Scanner

    paths = []
    for i, image in enumerate(_images() * 3):
        path = tmp_path / f"{i:02d}.png"
        image.save(path)
        paths.append(path)
    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    limits = IntakeLimits(max_bytes=1 << 24, max_pixels=1 << 24, decode_timeout_s=10)
    scanner = Scanner([mj5], make_sessionmaker(engine), limits, EnsembleConfig(), batch_size=4)
    outcomes = list(scanner.scan(paths))
    engine.dispose()
    assert [o.path for o in outcomes] == [str(p) for p in paths]
    # The same picture gets the same score wherever it fell in the batches.
    by_picture = [outcomes[i].ai_score for i in range(5)]
    assert [o.ai_score for o in outcomes[5:10]] == by_picture
