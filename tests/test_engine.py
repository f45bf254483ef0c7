"""The batching engine: staged preprocessing + batched forward agree with the detector's own
one-image path, failures stay with their image, and batches form by size or by time."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from workers.detectors.base import Detector
from workers.detectors.registry import BUILTIN_SPECS, build_detector
from workers.engine import (
    RECENT_BATCHES,
    BatchStats,
    DetectorResult,
    MicroBatcher,
    collect_batches,
    is_staged,
    prepare,
    run_detector,
)

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
    for result, reference in zip(batched, single, strict=True):
        assert result.error is None and result.output is not None
        assert result.latency_ms is not None
        assert result.output.score == pytest.approx(reference.score, abs=1e-4)
    scores = [r.output.score for r in batched if r.output is not None]
    assert max(scores) - min(scores) > 1e-3, "distinct images must get distinct scores"


def test_preprocessing_failure_stays_with_its_image(mj5: Detector) -> None:
    images = _images()[:3]
    prepared = [prepare(image, b"", [mj5]) for image in images]
    prepared[1].tensors.clear()
    prepared[1].errors["sumsub-mj5"] = "ValueError: cannot preprocess"
    results = run_detector(mj5, prepared, max_batch=8)
    assert [r.error for r in results] == [None, "ValueError: cannot preprocess", None]
    assert results[0].output is not None and results[2].output is not None


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
    # The window is never waited out (the producer ends the stream): only a producer stalled
    # for a minute would split the batch.
    batches = list(collect_batches(source, max_batch=16, max_wait_s=60.0))
    thread.join()
    assert batches == [[1, 2, 3]]


def _submit_together(batcher: MicroBatcher[int, int], items: list[int]) -> list[int]:
    """Submit ``items`` from one thread each, as a threads-pool worker's tasks do."""
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(batcher, items))


def test_batcher_fills_batches_from_many_threads() -> None:
    seen: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        seen.append(list(items))
        return [item * 10 for item in items]

    batcher = MicroBatcher(run, max_batch=4, max_wait_s=120.0)
    started = time.monotonic()
    # Each caller gets its own result back, whatever batch it travelled in.
    assert _submit_together(batcher, list(range(8))) == [i * 10 for i in range(8)]
    assert time.monotonic() - started < 60  # full batches close at once, not at the window
    batcher.close()
    # Eight callers at once, batches of four: full batches, not a long wait for more.
    assert sorted(len(batch) for batch in seen) == [4, 4]
    assert sorted(i for batch in seen for i in batch) == list(range(8))


def test_batcher_lone_item_waits_only_the_window() -> None:
    batcher = MicroBatcher(lambda items: items, max_batch=32, max_wait_s=0.05)
    started = time.monotonic()
    assert batcher(5) == 5
    # The slack covers a loaded machine; a 32-batch would never fill.
    assert time.monotonic() - started < 2.0
    batcher.close()
    assert list(batcher.stats.recent) == [1]


def test_batch_stats_stay_bounded_in_a_long_lived_worker() -> None:
    stats = BatchStats()
    for i in range(4 * RECENT_BATCHES):
        stats.add(1 + i % 2)
    assert len(stats.recent) == RECENT_BATCHES
    assert (stats.batches, stats.items, stats.largest) == (
        4 * RECENT_BATCHES,
        6 * RECENT_BATCHES,
        2,
    )
    assert stats.mean == pytest.approx(1.5)


def test_batcher_reports_every_batch_to_its_observer() -> None:
    seen: list[tuple[str, int]] = []

    class Recorder:
        def batch_ran(
            self,
            batcher: str,
            size: int,
            seconds: float,
            *,
            detector: str = "",
            device: str = "cpu",
        ) -> None:
            assert seconds >= 0
            seen.append((batcher, size))

    batcher = MicroBatcher(
        lambda items: items, max_batch=4, max_wait_s=0.0, name="probe", observer=Recorder()
    )
    assert batcher(7) == 7
    batcher.close()
    assert seen == [("probe", 1)]


def test_batcher_waits_for_announced_callers_and_no_one_else() -> None:
    """A window of 120 s that is never waited out: the batch closes once every announced
    caller has submitted or left."""
    batcher = MicroBatcher(lambda items: items, max_batch=32, max_wait_s=120.0, announced=True)
    started = time.monotonic()
    with batcher.expecting() as submit:  # a lone upload waits for no one
        assert submit(1).result(10) == 1
    assert time.monotonic() - started < 30

    both_announced = threading.Barrier(2)

    def caller(item: int, decode_s: float) -> int:
        with batcher.expecting() as submit:
            both_announced.wait(60)
            time.sleep(decode_s)  # fetching and decoding its image
            return int(submit(item).result(10))

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(caller, [2, 3], [0.0, 0.3])) == [2, 3]
    assert time.monotonic() - started < 30
    # The quick caller's item waited for the slow one's: one batch of two.
    assert list(batcher.stats.recent) == [1, 2]

    def leaves_without_submitting() -> None:
        with batcher.expecting():
            both_announced.wait(60)
            time.sleep(0.3)  # its image turned out to be unreadable

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        leaving = pool.submit(leaves_without_submitting)
        assert pool.submit(caller, 4, 0.0).result(10) == 4
        leaving.result(10)
    assert time.monotonic() - started < 30
    batcher.close()
    assert list(batcher.stats.recent) == [1, 2, 1]


def test_batcher_runs_suspects_alone_after_the_others() -> None:
    order: list[list[str]] = []
    release = threading.Event()

    def run(items: list[str]) -> list[str]:
        release.wait(5)
        order.append(list(items))
        return items

    batcher = MicroBatcher(run, max_batch=8, max_wait_s=60.0)  # closes when full
    futures = [batcher.submit("a"), batcher.submit("s1", alone=True), batcher.submit("b")]
    futures += [batcher.submit("s2", alone=True)] + [batcher.submit(x) for x in "cdef"]
    release.set()
    assert [f.result(10) for f in futures] == ["a", "s1", "b", "s2", "c", "d", "e", "f"]
    batcher.close()
    assert order == [["a", "b", "c", "d", "e", "f"], ["s1"], ["s2"]]


def test_batcher_failure_reaches_every_caller_of_that_batch_only() -> None:
    def run(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky batch")
        return items

    # Batches close when full: the window only matters to a caller stalled for a minute.
    batcher = MicroBatcher(run, max_batch=2, max_wait_s=60.0)
    bad = [batcher.submit(13), batcher.submit(1)]
    good = [batcher.submit(2), batcher.submit(3)]
    for future in bad:
        with pytest.raises(ValueError, match="unlucky batch"):
            future.result(10)
    assert [f.result(10) for f in good] == [2, 3]
    # A run that returns the wrong number of results is an error, not a silent mismatch.
    short = MicroBatcher(lambda items: items[:1], max_batch=2, max_wait_s=60.0)
    pair = [short.submit(1), short.submit(2)]
    with pytest.raises(RuntimeError, match="1 results for a batch of 2"):
        pair[1].result(10)
    batcher.close()
    short.close()


def test_batcher_watchdog_reports_a_hung_batch() -> None:
    stuck: list[float] = []
    hang = threading.Event()

    def run(items: list[int]) -> list[int]:
        hang.wait(30)
        return items

    # One second: the hung batch is reported after it, and the quick batch below (three
    # hand-offs between threads) has all of it to finish in, even on a loaded machine.
    batcher = MicroBatcher(run, max_batch=1, max_wait_s=0.0, watchdog_s=1.0, on_stuck=stuck.append)
    future = batcher.submit(1)
    wait_until = time.monotonic() + 30
    while not stuck and time.monotonic() < wait_until:
        time.sleep(0.01)
    assert stuck and stuck[0] >= 1.0
    hang.set()
    assert future.result(10) == 1
    # A batch that finishes in time reports nothing: its timer is cancelled before its
    # caller hears, so by now it has either fired or never will.
    assert batcher(2) == 2
    assert len(stuck) == 1
    batcher.close()


def test_batched_forward_matches_one_image_at_a_time(mj5: Detector) -> None:
    """The batcher with the real engine: scores do not depend on batch company."""
    batcher = MicroBatcher(
        lambda items: run_detector(mj5, items, max_batch=len(items)), max_batch=5, max_wait_s=60.0
    )
    images = _images()
    prepared = threading.Barrier(len(images), timeout=60)

    def submit(image: Image.Image) -> DetectorResult:
        staged = prepare(image, b"", [mj5])
        prepared.wait()  # however the threads are scheduled, all five meet the window
        return batcher(staged)

    with ThreadPoolExecutor(len(images)) as pool:
        batched = list(pool.map(submit, images))
    batcher.close()
    assert list(batcher.stats.recent) == [5]
    for result, image in zip(batched, images, strict=True):
        (reference,) = mj5.detect_batch([image], [b""])
        assert result.error is None and result.output is not None
        assert result.output.score == pytest.approx(reference.score, abs=1e-4)


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


def test_batcher_watchdog_covers_a_stage_that_hangs() -> None:
    """Staging copies a batch to the device and may decode it there: a wedged copy or
    decode is reported like a wedged model, so that the worker exits instead of hanging."""
    from workers.engine import RunSteps

    stuck: list[float] = []
    hang = threading.Event()

    class HangingStage(RunSteps[int, int]):
        def stage(self, items: list[int]) -> list[int]:
            hang.wait(10)
            return items

    batcher = MicroBatcher(
        steps=HangingStage(lambda items: items),
        max_batch=1,
        max_wait_s=0.0,
        watchdog_s=0.1,
        on_stuck=stuck.append,
    )
    future = batcher.submit(1)
    deadline = time.monotonic() + 10
    while not stuck and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stuck and stuck[0] >= 0.1, "a hung stage was never reported"
    hang.set()
    assert future.result(10) == 1
    batcher.close()
