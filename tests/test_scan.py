"""The scan pipeline in-process: files that change under it, detectors that fail."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from db import migrate, repository
from db.models import AuditEvent, Detection, ReviewCase, ReviewState, Source, SourceStatus, Verdict
from db.session import make_engine, make_sessionmaker
from workers.detectors.base import Detector, DetectorOutput, DetectorSpec
from workers.detectors.registry import BUILTIN_SPECS, build_detector
from workers.ensemble import Calibration, EnsembleConfig
from workers.intake import IntakeLimits
from workers.scan import Scanner, iter_image_paths

from badfiles import sample_picture
from checkpoints import SUMSUB_MOBILENET, write_sumsub_raw

LIMITS = IntakeLimits(max_bytes=10 * 1024 * 1024, max_pixels=10_000_000, decode_timeout_s=10.0)


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def mj5(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    weights = tmp_path_factory.mktemp("w") / "mj5.pt"
    write_sumsub_raw(weights, SUMSUB_MOBILENET, seed=3)
    return build_detector(
        BUILTIN_SPECS["sumsub-mj5"], device="cpu", resolve=lambda _uri, _name: weights
    )


def _pictures(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"p{i}.png"
        sample_picture((64 + 8 * i, 48)).save(path)
        paths.append(path)
    return paths


def test_file_deleted_after_listing_is_rejected_as_missing(
    tmp_path: Path, sessions: sessionmaker[Session], mj5: Detector
) -> None:
    paths = _pictures(tmp_path / "in", 3)

    def listing() -> Iterator[Path]:
        # The second file disappears after the folder was listed, before it is read.
        yield paths[0]
        paths[1].unlink()
        yield paths[1]
        yield paths[2]

    scanner = Scanner([mj5], sessions, LIMITS, EnsembleConfig(), batch_size=8)
    outcomes = list(scanner.scan(listing()))
    assert [o.status for o in outcomes] == ["scored", "rejected", "scored"]
    assert outcomes[1].reason == "missing"
    with sessions() as session:
        # Sources are stored as files finish intake, not in input order.
        statuses = {s.local_path: s.status for s in session.query(Source)}
    assert [statuses[str(p.absolute())] for p in paths] == [
        SourceStatus.SCORED,
        SourceStatus.REJECTED,
        SourceStatus.SCORED,
    ]


@dataclass
class Wrapped:
    """A real detector, seen through a wrapper that changes what ``detect_batch`` does."""

    inner: Detector

    @property
    def spec(self) -> DetectorSpec:
        return self.inner.spec

    @property
    def version(self) -> str:
        return self.inner.version

    @property
    def weights_sha256(self) -> str | None:
        return self.inner.weights_sha256


@dataclass
class FailsOnWideImages(Wrapped):
    """Raises for images wider than ``limit`` pixels, the way a model can fail on one input
    (out of memory, a bad tensor shape)."""

    limit: int
    fail: bool = True

    def detect_batch(
        self, images: Sequence[Image.Image], raw: Sequence[bytes]
    ) -> list[DetectorOutput]:
        if self.fail and any(image.width > self.limit for image in images):
            raise RuntimeError("simulated out-of-memory on a wide image")
        return self.inner.detect_batch(images, raw)


def test_one_failing_image_does_not_cost_the_others_their_scores(
    tmp_path: Path, sessions: sessionmaker[Session], mj5: Detector
) -> None:
    paths = _pictures(tmp_path / "in", 4)  # widths 64, 72, 80, 88
    flaky = FailsOnWideImages(mj5, limit=85)
    scanner = Scanner([flaky], sessions, LIMITS, EnsembleConfig(), batch_size=4)
    outcomes = list(scanner.scan(paths))
    errors = [o.detectors[0].error for o in outcomes]
    assert errors[:3] == [None, None, None]
    assert errors[3] is not None and "simulated out-of-memory" in errors[3]
    assert all(o.ai_score is not None for o in outcomes[:3])
    assert outcomes[3].verdict == "inconclusive" and outcomes[3].ai_score is None
    assert "sumsub-mj5" in str(outcomes[3].verdict_reason)

    # Next run: the failure is not reused; the detector runs again and its answer replaces it.
    flaky.fail = False
    again = list(Scanner([flaky], sessions, LIMITS, EnsembleConfig()).scan(paths))
    assert [o.detectors[0].reused for o in again] == [True, True, True, False]
    assert again[3].detectors[0].error is None and again[3].ai_score is not None
    with sessions() as session:
        assert repository.count_rows(session, Detection) == 4


def test_flagged_images_open_one_review_case_each(
    tmp_path: Path, sessions: sessionmaker[Session], mj5: Detector
) -> None:
    paths = _pictures(tmp_path / "in", 3)

    def scan(threshold: float) -> list[bool]:
        config = EnsembleConfig(threshold=threshold)
        return [o.flagged for o in Scanner([mj5], sessions, LIMITS, config).scan(paths)]

    def cases() -> int:
        with sessions() as session:
            return repository.count_rows(session, ReviewCase)

    scores = [o.ai_score for o in Scanner([mj5], sessions, LIMITS, EnsembleConfig(1.0)).scan(paths)]
    assert all(s is not None for s in scores)
    assert cases() == 0
    # A threshold between the scores flags two of the three images.
    assert scan(sorted(s for s in scores if s is not None)[1]).count(True) == 2
    assert cases() == 2
    # Flagging all three again (another threshold, so new verdicts) queues only the third.
    assert scan(0.0) == [True, True, True]
    assert cases() == 3


@dataclass
class FixedScore:
    """A detector that answers the same score for every image (no model needed)."""

    name: str
    score: float

    @property
    def spec(self) -> DetectorSpec:
        return DetectorSpec(self.name, "timm", "1")

    @property
    def version(self) -> str:
        return "1"

    @property
    def weights_sha256(self) -> str | None:
        return None

    def detect_batch(
        self, images: Sequence[Image.Image], raw: Sequence[bytes]
    ) -> list[DetectorOutput]:
        return [DetectorOutput(self.score, {"fixed": True}) for _ in images]


def test_a_changed_ensemble_is_a_new_verdict_and_the_review_case_follows_it(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    """Weights, calibrations and the threshold decide a verdict: changing any of them stores
    a new verdict (the detections are reused), and the review case follows the newest one;
    re-running an unchanged configuration adds nothing."""
    (path,) = _pictures(tmp_path / "in", 1)
    detectors = [FixedScore("low", 0.2), FixedScore("high", 0.9)]

    def scan(config: EnsembleConfig) -> tuple[bool, dict[str, int], ReviewState, int]:
        (outcome,) = Scanner(detectors, sessions, LIMITS, config).scan([path])
        assert outcome.ensemble_version == config.version
        with sessions() as session:
            counts = {
                model.__tablename__: repository.count_rows(session, model)
                for model in (Detection, Verdict, ReviewCase, AuditEvent)
            }
            case = session.query(ReviewCase).one()
            opened_by = case.verdict_id
            state = case.state
        assert outcome.review is not None and outcome.review.state == state
        return outcome.flagged, counts, state, opened_by

    base = EnsembleConfig(threshold=0.5)  # (0.2 + 0.9) / 2 = 0.55
    flagged, counts, state, first = scan(base)
    assert flagged and state == ReviewState.OPEN
    assert (counts["detections"], counts["verdicts"], counts["review_cases"]) == (2, 1, 1)
    assert scan(base) == (flagged, counts, state, first), "an unchanged config adds nothing"

    lighter = EnsembleConfig(threshold=0.5, weights={"high": 0.25})  # 0.425 / 1.25 = 0.34
    flagged, counts, state, opened_by = scan(lighter)
    assert not flagged and state == ReviewState.WITHDRAWN and opened_by == first
    assert (counts["detections"], counts["verdicts"]) == (2, 2)

    # low calibrated to sigmoid(logit(0.2) + 3) = 0.834: (0.834 + 0.225) / 1.25 = 0.85
    calibrated = EnsembleConfig(
        threshold=0.5, weights={"high": 0.25}, calibrations={"low": Calibration(a=1.0, b=3.0)}
    )
    flagged, counts, state, reopened_by = scan(calibrated)
    assert flagged and state == ReviewState.OPEN and reopened_by != first
    assert (counts["detections"], counts["verdicts"]) == (2, 3)

    stricter = EnsembleConfig(
        threshold=0.9, weights={"high": 0.25}, calibrations={"low": Calibration(a=1.0, b=3.0)}
    )
    flagged, counts, state, _ = scan(stricter)
    assert not flagged and state == ReviewState.WITHDRAWN
    assert (counts["detections"], counts["verdicts"], counts["review_cases"]) == (2, 4, 1)


def test_iter_image_paths_walks_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for rel in ("b.png", "a/c.png", "a/.hidden.png", ".git/x.png", "a/d/e.jpg"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_paths([tmp_path])]
    assert found == ["b.png", "a/c.png", "a/d/e.jpg"]


def test_walk_does_not_follow_folder_links(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "link.png").symlink_to(tmp_path / "a" / "x.png")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_image_paths([tmp_path])]
    # The link to a file is a file; the link to a folder (a loop here) is listed as an
    # entry, not walked: the scan reports it as an unreadable file.
    assert found == ["link.png", "a/loop", "a/x.png"]


@dataclass
class RecordsBatches(Wrapped):
    """Records the size of every batch the detector is given."""

    sizes: list[int]

    def detect_batch(
        self, images: Sequence[Image.Image], raw: Sequence[bytes]
    ) -> list[DetectorOutput]:
        self.sizes.append(len(images))
        return self.inner.detect_batch(images, raw)


@pytest.mark.parametrize("images_that_fit", [100, 2, 0])
def test_the_memory_budget_bounds_the_images_held_and_loses_none(
    tmp_path: Path, sessions: sessionmaker[Session], mj5: Detector, images_that_fit: int
) -> None:
    """However little memory the budget allows, every file gets its result, in input
    order; no more than the budget is held at once, and with room for none, each image is
    admitted alone (one at a time, never none)."""
    from workers.budget import image_cost

    paths = _pictures(tmp_path / "in", 7)
    largest = max(image_cost(64 + 8 * i, 48, p.stat().st_size) for i, p in enumerate(paths))
    budget = max(1, images_that_fit * largest)
    recorder = RecordsBatches(mj5, [])
    scanner = Scanner(
        [recorder], sessions, LIMITS, EnsembleConfig(), batch_size=16, memory_budget=budget
    )
    outcomes = list(scanner.scan(paths))
    assert [o.path for o in outcomes] == [str(p) for p in paths]
    assert all(o.status == SourceStatus.SCORED for o in outcomes)
    assert sum(recorder.sizes) == 7  # each image seen once
    assert scanner.peak_reserved > 0
    if images_that_fit == 0:
        assert scanner.peak_reserved <= largest
    else:
        assert scanner.peak_reserved <= budget


def test_an_abandoned_scan_stops_its_intake_threads(
    tmp_path: Path, sessions: sessionmaker[Session], mj5: Detector
) -> None:
    """A reader that stops reading (``scan --json | head``), an error or Ctrl-C closes the
    scan while files decoded ahead hold the memory others wait for: nothing may hang."""
    import threading

    paths = _pictures(tmp_path / "in", 6)
    scanner = Scanner([mj5], sessions, LIMITS, EnsembleConfig(), batch_size=4, memory_budget=1)
    outcomes = scanner.scan(paths)
    assert next(outcomes).status == SourceStatus.SCORED
    closing = threading.Thread(target=outcomes.close, daemon=True)
    closing.start()
    closing.join(60)
    assert not closing.is_alive(), "closing the scan waited for memory nobody would free"


def test_a_refusal_does_not_hide_the_score_the_same_bytes_earned(
    tmp_path: Path, sessions: sessionmaker[Session], mj5: Detector
) -> None:
    """The same bytes scored once, then refused under a lower pixel limit (a refusal that
    can vary): no "not scored" verdict is stored over the score; bytes never scored get one."""
    ensemble = EnsembleConfig(review_unscored=frozenset({"too_many_pixels"}))
    (scored,) = _pictures(tmp_path / "first", 1)
    copy = tmp_path / "copy.png"
    copy.write_bytes(scored.read_bytes())
    (first,) = Scanner([mj5], sessions, LIMITS, ensemble).scan([scored])
    assert first.status == SourceStatus.SCORED
    tight = IntakeLimits(max_bytes=LIMITS.max_bytes, max_pixels=100, decode_timeout_s=10.0)
    fresh = tmp_path / "fresh.png"
    sample_picture((33, 33)).save(fresh)
    refused, unscored = Scanner([mj5], sessions, tight, ensemble).scan([copy, fresh])
    assert (refused.status, refused.reason) == (SourceStatus.REJECTED, "too_many_pixels")
    assert refused.verdict == "not_scored" and not refused.flagged
    assert unscored.verdict == "not_scored" and unscored.flagged  # sent to review
    with sessions() as session:
        labels = sorted(v.label.value for v in session.query(Verdict))
    assert labels == [first.verdict, "not_scored"]


def test_in_one_group_a_refused_copy_does_not_hide_the_score_of_its_bytes(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    """Two files with the same bytes reach the store thread together, the first refused (a
    refusal that can vary: a decode timeout under load), the second scored: the scored
    verdict is stored first, so the refusal stores no "not scored" verdict over it and the
    review case is the score's, whatever the order of the files."""
    from db.session import transaction
    from workers import scoring
    from workers.engine import DetectorResult
    from workers.intake import Rejected, RejectReason
    from workers.scan import _Item

    (picture,) = _pictures(tmp_path, 1)
    data = picture.read_bytes()
    detector = FixedScore("fixed", 0.9)
    ensemble = EnsembleConfig(review_unscored=frozenset({"decode_timeout"}))
    scanner = Scanner([detector], sessions, LIMITS, ensemble)
    scanner._ensemble_id = scoring.register_ensemble(sessions, ensemble)
    timeout = Rejected(RejectReason.DECODE_TIMEOUT, "decoding took too long")
    refused = _Item(0, tmp_path / "copy.png", scoring.Intake.refused(timeout, data))
    scored = _Item(1, picture, scoring.take_in(lambda: data, LIMITS))
    with transaction(sessions) as session:
        scanner._register(session, [refused, scored])
    assert refused.image_id == scored.image_id is not None
    scored.fresh = {"fixed": DetectorResult(output=DetectorOutput(0.9), latency_ms=1.0)}
    with transaction(sessions) as session:
        first, second = scanner._conclude(session, [refused, scored])
    assert (first.status, first.reason) == (SourceStatus.REJECTED, "decode_timeout")
    assert second.status == SourceStatus.SCORED and second.flagged
    assert first.review is not None and first.review.opened_by.label.value == "likely_ai"
    with sessions() as session:
        assert [v.label.value for v in session.query(Verdict)] == ["likely_ai"]
        case = session.query(ReviewCase).one()
        assert case.score == 0.9
