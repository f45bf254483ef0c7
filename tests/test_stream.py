"""The streaming scan: results in input order whatever order they finish in, a bounded
amount of work in flight whatever the reader's pace, a failing image or batch inside the
stream recorded as that image's failure, and a stop (Ctrl-C) that ends cleanly and keeps
what was stored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from db import migrate, repository
from db.models import Detection, Source, SourceStatus
from db.session import make_engine, make_sessionmaker
from workers.detectors.base import Detector, DetectorOutput, DetectorSpec
from workers.detectors.registry import BUILTIN_SPECS, build_detector
from workers.engine import is_pipelined, is_staged
from workers.ensemble import EnsembleConfig
from workers.intake import IntakeLimits
from workers.scan import Scanner

from badfiles import sample_picture
from checkpoints import SUMSUB_MOBILENET, write_sumsub_raw
from fleet_processes import wait_for

LIMITS = IntakeLimits(max_bytes=1 << 24, max_pixels=1 << 24, decode_timeout_s=10)


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def mj5_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = tmp_path_factory.mktemp("w") / "mj5.pt"
    write_sumsub_raw(weights, SUMSUB_MOBILENET, seed=3)
    return weights


@pytest.fixture(scope="module")
def mj5(mj5_weights: Path) -> Detector:
    return build_detector(
        BUILTIN_SPECS["sumsub-mj5"], device="cpu", resolve=lambda _u, _n: mj5_weights
    )


def _pictures(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        sample_picture((64 + i, 48 + i % 7)).save(path)  # every file distinct
        paths.append(path)
    return paths


@dataclass
class Staged:
    """A real model detector seen through a wrapper with the engine's staged interface
    (``preprocess`` / ``forward``) and a hook on each batch."""

    inner: Any
    on_batch: Any = None
    batches: list[int] = field(default_factory=list)

    @property
    def spec(self) -> DetectorSpec:
        spec: DetectorSpec = self.inner.spec
        return spec

    @property
    def version(self) -> str:
        version: str = self.inner.version
        return version

    @property
    def weights_sha256(self) -> str | None:
        digest: str | None = self.inner.weights_sha256
        return digest

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        tensor: torch.Tensor = self.inner.preprocess(image)
        return tensor

    def forward(self, batch: torch.Tensor) -> list[DetectorOutput]:
        self.batches.append(batch.shape[0])
        if self.on_batch is not None:
            self.on_batch(batch)
        outputs: list[DetectorOutput] = self.inner.forward(batch)
        return outputs

    def detect_batch(
        self, images: Sequence[Image.Image], raw: Sequence[bytes]
    ) -> list[DetectorOutput]:
        return self.forward(torch.stack([self.preprocess(image) for image in images]))


def test_the_real_model_detector_runs_in_pipelined_steps(mj5: Detector) -> None:
    assert is_pipelined(mj5)
    wrapped = Staged(mj5)
    assert is_staged(wrapped) and not is_pipelined(wrapped)  # type: ignore[arg-type]


@dataclass
class HoldsTheFirst:
    """A model-free detector (decoded images in) that holds the first file's answer until
    ``others`` detections of other files are stored (``stored`` counts them)."""

    inner: Any
    others: int
    stored: Callable[[], int]

    spec = Staged.spec
    version = Staged.version
    weights_sha256 = Staged.weights_sha256

    def detect_batch(
        self, images: Sequence[Image.Image], raw: Sequence[bytes]
    ) -> list[DetectorOutput]:
        if images[0].size == (64, 48):  # the first file (see _pictures)
            wait_for(
                lambda: self.stored() >= self.others,
                timeout=30,
                what=f"{self.others} other files' detections to be stored",
                interval=0.01,
            )
        outputs: list[DetectorOutput] = self.inner.detect_batch(images, raw)
        return outputs


def test_results_come_in_input_order_whatever_order_they_finish_in(
    tmp_path: Path, sessions: sessionmaker[Session], mj5: Detector
) -> None:
    """The first file's detection finishes after many later files' (they are stored
    first); its result still comes first, and every file gets the score it gets alone."""
    paths = _pictures(tmp_path / "in", 12)

    def detections_stored() -> int:
        with sessions() as session:
            return session.query(Detection).count()

    holding = HoldsTheFirst(mj5, others=6, stored=detections_stored)
    scanner = Scanner([holding], sessions, LIMITS, EnsembleConfig(), decode_threads=2)
    outcomes = list(scanner.scan(paths))
    assert [o.path for o in outcomes] == [str(p) for p in paths]
    with sessions() as session:
        stored = sorted(session.query(Detection), key=lambda row: row.id)
        first_image = session.query(Source).filter_by(local_path=str(paths[0].absolute())).one()
        position = [row.image_id for row in stored].index(first_image.image_id)
    # The setup held (the first file's detection was stored after six later ones), so the
    # input order of the results above is the engine's doing.
    assert position >= 6, "the first file's detection was not stored after later ones"
    alone = {
        o.path: o.ai_score for o in Scanner([mj5], sessions, LIMITS, EnsembleConfig()).scan(paths)
    }
    assert all(o.ai_score == pytest.approx(alone[o.path], abs=1e-5) for o in outcomes)


def test_a_slow_reader_holds_at_most_the_window(
    tmp_path: Path, sessions: sessionmaker[Session], mj5: Detector
) -> None:
    """Backpressure: however slowly results are read, no more than ``window`` files are
    taken from the listing ahead of the reader, so memory does not grow with the input."""
    paths = _pictures(tmp_path / "in", 40)
    pulled = 0

    def listing() -> Iterator[Path]:
        nonlocal pulled
        for path in paths:
            pulled += 1
            yield path

    scanner = Scanner([mj5], sessions, LIMITS, EnsembleConfig(), batch_size=4, window=6)
    read = 0
    ahead = []
    for outcome in scanner.scan(listing()):
        read += 1
        ahead.append(pulled - read)
        assert outcome.status == "scored"
    assert read == 40
    assert max(ahead) <= 6
    assert max(ahead) >= 5, "the stream should use its window, not crawl one file at a time"


def test_a_failing_batch_costs_only_the_image_that_fails(
    tmp_path: Path, sessions: sessionmaker[Session], mj5: Detector
) -> None:
    """A batch whose forward pass raises is retried image by image: the one image that
    makes the model fail is recorded as failed; the others in its batch are scored."""
    paths = _pictures(tmp_path / "in", 10)
    poisoned = paths[6]
    Image.new("RGB", (80, 60), (255, 255, 255)).save(poisoned)  # a blank, white picture

    def refuse_white(batch: torch.Tensor) -> None:
        blank = batch.flatten(1).std(dim=1) < 1e-6  # one colour everywhere
        if bool(blank.any()):
            raise RuntimeError("simulated device error on one input")

    failing = Staged(mj5, on_batch=refuse_white)
    scanner = Scanner([failing], sessions, LIMITS, EnsembleConfig(), batch_size=8)
    outcomes = list(scanner.scan(paths))
    errors = [o.detectors[0].error for o in outcomes]
    assert errors[6] is not None and "simulated device error" in errors[6]
    assert errors[:6] + errors[7:] == [None] * 9
    assert all(o.ai_score is not None for i, o in enumerate(outcomes) if i != 6)
    assert any(size > 1 for size in failing.batches), "the failure happened inside a batch"
    with sessions() as session:
        assert repository.count_rows(session, Detection) == 10


def _engine_threads() -> set[str]:
    prefixes = ("intake", "detect_", "batcher-", "scan-store")
    return {t.name for t in threading.enumerate() if t.name.startswith(prefixes)}


def test_stopping_a_scan_ends_its_threads_and_keeps_what_was_stored(
    tmp_path: Path, sessions: sessionmaker[Session], mj5: Detector
) -> None:
    paths = _pictures(tmp_path / "in", 30)
    before = _engine_threads()
    outcomes = Scanner([mj5], sessions, LIMITS, EnsembleConfig(), batch_size=4).scan(paths)
    with pytest.raises(KeyboardInterrupt):
        for n, _ in enumerate(outcomes):
            if n == 2:
                raise KeyboardInterrupt
    outcomes.close()
    assert _engine_threads() <= before, "a stopped scan left threads behind"
    with sessions() as session:
        scored = {s.local_path for s in session.query(Source) if s.status == SourceStatus.SCORED}
    assert {str(p.absolute()) for p in paths[:3]} <= scored
    # A second scan completes the rest and reuses what the first one stored.
    again = list(Scanner([mj5], sessions, LIMITS, EnsembleConfig(), batch_size=4).scan(paths))
    assert all(o.status == "scored" for o in again)
    assert all(o.detectors[0].reused for o in again[:3])
    with sessions() as session:
        assert repository.count_rows(session, Detection) == 30


def test_ctrl_c_ends_the_scan_command_cleanly(tmp_path: Path, mj5_weights: Path) -> None:
    """SIGINT while a scan streams: the command exits 130 without a traceback, the
    results it printed are stored, and scanning again completes the rest."""
    paths = _pictures(tmp_path / "in", 120)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    env.update(SYNTHSENTRY_DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1")
    command = [
        sys.executable,
        "-m",
        "synthsentry.cli",
        "scan",
        str(tmp_path / "in"),
        "--json",
        "--detector",
        f"sumsub-mj5={mj5_weights}",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    first = json.loads(process.stdout.readline())
    process.send_signal(signal.SIGINT)
    # Read on through the same buffered reader (communicate() would skip what it holds);
    # the little the command logs fits the stderr pipe meanwhile.
    assert process.stderr is not None
    rest = process.stdout.read()
    errors = process.stderr.read()
    assert process.wait(timeout=120) == 130, errors
    assert "Traceback" not in errors
    printed = [first] + [json.loads(line) for line in rest.splitlines()]
    assert 1 <= len(printed) < len(paths), "the stop should come before the end"
    again = subprocess.run(
        command, check=False, capture_output=True, text=True, env=env, timeout=600
    )
    assert again.returncode == 0, again.stderr
    lines = [json.loads(line) for line in again.stdout.splitlines()]
    assert len(lines) == len(paths) and all(line["status"] == "scored" for line in lines)
    reused = {line["path"] for line in lines if line["detectors"][0]["reused"]}
    assert {line["path"] for line in printed} <= reused


def _mj5_with(mj5_weights: Path, fast_decode: str) -> Detector:
    spec = BUILTIN_SPECS["sumsub-mj5"]
    options = {**spec.options, "fast_decode": fast_decode}
    return build_detector(
        DetectorSpec(
            name=spec.name,
            family=spec.family,
            version=spec.version,
            weights=spec.weights,
            options=options,
        ),
        device="cpu",
        resolve=lambda _u, _n: mj5_weights,
    )


def _photos(folder: Path) -> list[Path]:
    """Two large JPEGs (worth decoding small for a 224 px model) and a PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate([(1600, 1200), (1200, 1800)]):
        path = folder / f"photo-{i}.jpg"
        sample_picture(size).save(path, quality=92)
        paths.append(path)
    png = folder / "graphic.png"
    sample_picture((300, 200)).save(png)
    return [*paths, png]


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torchvision")
@pytest.mark.parametrize("mode", ["draft", "gpu"])
def test_opted_in_fast_decoding_runs_through_the_stream(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    mj5: Detector,
    mj5_weights: Path,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A detector that opted into fast decoding gets its JPEGs decoded small in the scan
    (the draft size reaches the decoder; the gpu path decodes the bytes itself, here on the
    CPU), the image facts stay the file's, and the scores stay close to the exact path's."""
    from workers import scoring

    paths = _photos(tmp_path / "in")
    drafts: list[tuple[int, int] | None] = []
    real_decode = scoring.decode

    def spying_decode(data: bytes, limits: IntakeLimits, **kwargs: Any) -> Any:
        drafts.append(kwargs.get("draft"))
        return real_decode(data, limits, **kwargs)

    exact = {o.path: o for o in Scanner([mj5], sessions, LIMITS, EnsembleConfig()).scan(paths)}
    assert drafts == [], "the exact path never asked for a draft"
    monkeypatch.setattr(scoring, "decode", spying_decode)
    fast = _mj5_with(mj5_weights, mode)
    outcomes = list(Scanner([fast], sessions, LIMITS, EnsembleConfig()).scan(paths))
    assert drafts == [fast.decode_size] * 3  # type: ignore[attr-defined]
    for outcome in outcomes:
        assert outcome.status == "scored" and outcome.ai_score is not None
        reference = exact[outcome.path]
        assert outcome.image == reference.image  # the file's own facts, not the draft's
        assert outcome.ai_score == pytest.approx(reference.ai_score, abs=1e-2)
        assert outcome.detectors[0].version != reference.detectors[0].version


def test_files_waiting_for_the_model_hold_no_pixels(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    mj5: Detector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model slower than decoding makes files queue for it; what they hold there is their
    preprocessed input only. The decoded image and the file's bytes, whose memory the
    budget gave back, are not kept alive by the queue."""
    from workers import engine

    paths = _pictures(tmp_path / "in", 12)
    seen: list[tuple[bool, bool]] = []
    real_stage = engine.DetectorSteps.stage

    def stage(self: engine.DetectorSteps, items: list[engine.Prepared]) -> Any:
        seen.extend((item.image is None, item.raw == b"") for item in items)
        return real_stage(self, items)

    monkeypatch.setattr(engine.DetectorSteps, "stage", stage)
    slow = Staged(mj5, on_batch=lambda _batch: threading.Event().wait(0.05))
    outcomes = list(Scanner([slow], sessions, LIMITS, EnsembleConfig(), batch_size=4).scan(paths))
    assert all(o.status == "scored" for o in outcomes)
    assert len(seen) == 12 and all(no_image and no_bytes for no_image, no_bytes in seen)
