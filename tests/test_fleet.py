"""The fleet's steps without Celery: real Postgres, a real S3-protocol server, real models
built from published-format checkpoints. Each step may run twice; results must not."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from db.models import Detection, ReviewCase, ReviewState, Source, SourceStatus, Verdict
from db.session import make_engine, make_sessionmaker
from workers import fleet
from workers.detectors.base import Detector, DetectorSpec
from workers.detectors.registry import BUILTIN_SPECS, build_detector
from workers.ensemble import EnsembleConfig
from workers.intake import IntakeLimits, decode
from workers.results import status_of

from badfiles import sample_picture
from checkpoints import SUMSUB_MOBILENET, write_sumsub_raw
from conftest import DatabaseFactory, s3_client
from fleet_processes import wait_for

BUCKET = "fleet-uploads"


@pytest.fixture(scope="module")
def database(committing_database: DatabaseFactory) -> str:
    return committing_database("fleet")


@pytest.fixture
def sessions(database: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database)
    with engine.begin() as connection:  # each test starts from empty tables
        connection.execute(
            sa.text(
                "TRUNCATE review_cases, verdicts, detections, detection_attempts, sources, "
                "images, dead_letters RESTART IDENTITY CASCADE"
            )
        )
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Detector]:
    """Two detectors in the Sumsub format with different weights, as two fleet queues."""
    folder = tmp_path_factory.mktemp("w")
    built = {}
    for seed, name in ((3, "sumsub-mj5"), (4, "sumsub-sd5")):
        weights = folder / f"{name}.pt"
        write_sumsub_raw(weights, SUMSUB_MOBILENET, seed=seed)
        built[name] = build_detector(
            BUILTIN_SPECS[name], device="cpu", resolve=lambda _u, _n, w=weights: w
        )
    return built


def _context(sessions: sessionmaker[Session], s3_endpoint: str, **kw: Any) -> fleet.FleetContext:
    client = s3_client(s3_endpoint)
    defaults: dict[str, Any] = {
        "session_factory": sessions,
        "s3": lambda: client,
        "limits": IntakeLimits(max_bytes=1 << 24, max_pixels=1 << 26, decode_timeout_s=10),
        "ensemble": EnsembleConfig(threshold=0.0),  # flag everything: review cases are visible
        "detectors": ["sumsub-mj5", "sumsub-sd5"],
    }
    defaults.update(kw)
    return fleet.FleetContext(**defaults)


def _upload(s3_endpoint: str, key: str, data: bytes) -> fleet.Upload:
    response = s3_client(s3_endpoint).put_object(Bucket=BUCKET, Key=key, Body=data)
    etag = response["ETag"].strip('"')
    return fleet.Upload(bucket=BUCKET, key=key, ref_key=f"{BUCKET}/{key}@etag:{etag}", etag=etag)


def _png(size: tuple[int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    sample_picture(size).save(buffer, "PNG")
    return buffer.getvalue()


def _taken_in(
    ctx: fleet.FleetContext, s3_endpoint: str, pictures: list[tuple[str, tuple[int, int]]]
) -> list[int]:
    """Upload a PNG of each size under its key and take it in; the image ids (one detector
    each to run)."""
    image_ids = []
    for key, size in pictures:
        source_id = fleet.record_upload(ctx, _upload(s3_endpoint, key, _png(size)))
        assert source_id is not None
        ((image_id, _),) = fleet.take_in(ctx, source_id)
        image_ids.append(image_id)
    return image_ids


def _waiting_for_locks(sessions: sessionmaker[Session]) -> int:
    """Connections to this database that wait for a lock someone else holds."""
    with sessions() as session:
        return int(
            session.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def _wait_for(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` (a lock wait or a queue, which nothing announces) for at most 10 s."""
    wait_for(check, timeout=10, what=what, interval=0.005)


def _count(sessions: sessionmaker[Session], model: type[Any]) -> int:
    with sessions() as session:
        return int(session.execute(sa.select(sa.func.count()).select_from(model)).scalar_one())


def test_upload_to_verdict_once_whatever_is_repeated(
    sessions: sessionmaker[Session], s3_endpoint: str, bucket: str, models: dict[str, Detector]
) -> None:
    ctx = _context(sessions, s3_endpoint)
    upload = _upload(s3_endpoint, "a b/one.png", _png((120, 90)))
    source_id = fleet.record_upload(ctx, upload)
    assert source_id is not None
    # A retry of the same event while it is pending queues nothing: the first message is
    # on its way, and the reconciler resends work that stays pending too long.
    assert fleet.record_upload(ctx, upload) is None
    work = fleet.take_in(ctx, source_id)
    assert sorted(name for _, name in work) == ["sumsub-mj5", "sumsub-sd5"]
    assert fleet.take_in(ctx, source_id) == work  # a redelivered intake changes nothing
    (image_id, _), _ = work
    assert fleet.detect(ctx, models["sumsub-mj5"], image_id, message_id="a") is None  # waiting
    verdict = fleet.detect(ctx, models["sumsub-sd5"], image_id, message_id="b")
    assert verdict is not None and verdict.flagged
    # Redelivered detector tasks find their work done and conclude to the same verdict.
    again = fleet.detect(ctx, models["sumsub-sd5"], image_id, message_id="c")
    assert again is not None and again.id == verdict.id
    assert (_count(sessions, Detection), _count(sessions, Verdict)) == (2, 1)
    assert _count(sessions, ReviewCase) == 1
    # Every decode reserved its image from the process's budget and gave it back.
    assert ctx.memory.held == 0 and ctx.memory.peak > 0
    assert fleet.record_upload(ctx, upload) is None  # a duplicate event of a finished scan
    with sessions() as session:
        (outcome,) = status_of(session, BUCKET, "a b/one.png", active_ensemble=ctx.ensemble.version)
    assert outcome.status == "scored" and outcome.flagged
    assert {d.name for d in outcome.detectors} == {"sumsub-mj5", "sumsub-sd5"}


def test_a_rescan_under_a_changed_ensemble_stores_a_new_verdict_the_case_follows(
    sessions: sessionmaker[Session], s3_endpoint: str, bucket: str, models: dict[str, Detector]
) -> None:
    """The same bytes uploaded again after the threshold changed: every detection is reused,
    the verdict under the new configuration is stored, and the open case is withdrawn; both
    verdicts stay visible beside the case."""
    flagging = _context(sessions, s3_endpoint)  # threshold 0: everything is flagged
    data = _png((90, 60))
    first = fleet.record_upload(flagging, _upload(s3_endpoint, "again/1.png", data))
    assert first is not None
    for image_id, name in fleet.take_in(flagging, first):
        opened = fleet.detect(flagging, models[name], image_id, message_id=name)
    assert opened is not None and opened.flagged

    strict = _context(sessions, s3_endpoint, ensemble=EnsembleConfig(threshold=1.0))
    second = fleet.record_upload(strict, _upload(s3_endpoint, "again/2.png", data))
    assert second is not None
    assert fleet.take_in(strict, second) == []  # every detection reused: concluded at intake
    # The same bytes again under the same configuration: concluded again, stored once.
    third = fleet.record_upload(strict, _upload(s3_endpoint, "again/3.png", data))
    assert third is not None and fleet.take_in(strict, third) == []
    assert (_count(sessions, Detection), _count(sessions, Verdict)) == (2, 2)
    with sessions() as session:
        (outcome,) = status_of(
            session, BUCKET, "again/2.png", active_ensemble=strict.ensemble.version
        )
        (earlier,) = status_of(
            session, BUCKET, "again/1.png", active_ensemble=flagging.ensemble.version
        )
    assert not outcome.flagged and outcome.ensemble_version == strict.ensemble.version
    assert outcome.review is not None and outcome.review.state == ReviewState.WITHDRAWN
    assert outcome.review.opened_by.id == opened.id and outcome.review.opened_by.flagged
    assert outcome.review.current is not None and not outcome.review.current.flagged
    # Read under the first configuration, the image's current verdict is still the first.
    assert earlier.flagged and earlier.review is not None
    assert earlier.review.current is not None and earlier.review.current.id == opened.id


def test_concurrent_last_detections_store_one_verdict(
    sessions: sessionmaker[Session], s3_endpoint: str, bucket: str, models: dict[str, Detector]
) -> None:
    ctx = _context(sessions, s3_endpoint)
    source_id = fleet.record_upload(ctx, _upload(s3_endpoint, "race.png", _png((80, 80))))
    assert source_id is not None
    work = fleet.take_in(ctx, source_id)
    barrier = threading.Barrier(len(work))
    verdicts: list[Any] = []

    def run(image_id: int, name: str) -> None:
        barrier.wait()
        verdicts.append(fleet.detect(ctx, models[name], image_id, message_id=name))

    threads = [threading.Thread(target=run, args=item) for item in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    concluded = [v for v in verdicts if v is not None]
    assert len(concluded) >= 1
    assert _count(sessions, Verdict) == 1
    assert _count(sessions, ReviewCase) == 1


def test_same_bytes_uploaded_twice_reuse_the_results(
    sessions: sessionmaker[Session], s3_endpoint: str, bucket: str, models: dict[str, Detector]
) -> None:
    ctx = _context(sessions, s3_endpoint)
    data = _png((64, 100))
    first = fleet.record_upload(ctx, _upload(s3_endpoint, "first.png", data))
    assert first is not None
    for image_id, name in fleet.take_in(ctx, first):
        fleet.detect(ctx, models[name], image_id, message_id=name)
    second = fleet.record_upload(ctx, _upload(s3_endpoint, "copy/second.png", data))
    assert second is not None and second != first
    assert fleet.take_in(ctx, second) == []  # every detector's result is reused
    with sessions() as session:
        statuses = [s.status for s in session.query(Source).order_by(Source.id)]
    assert statuses == [SourceStatus.SCORED, SourceStatus.SCORED]
    assert (_count(sessions, Detection), _count(sessions, Verdict)) == (2, 1)


def test_object_deleted_before_intake_is_rejected_missing(
    sessions: sessionmaker[Session], s3_endpoint: str, bucket: str
) -> None:
    ctx = _context(sessions, s3_endpoint)
    upload = _upload(s3_endpoint, "gone.png", _png((50, 50)))
    source_id = fleet.record_upload(ctx, upload)
    assert source_id is not None
    s3_client(s3_endpoint).delete_object(Bucket=BUCKET, Key="gone.png")
    assert fleet.take_in(ctx, source_id) == []
    with sessions() as session:
        source = session.get(Source, source_id)
        assert source is not None
        assert (source.status, source.reject_reason) == (SourceStatus.REJECTED, "missing")
        (outcome,) = status_of(session, BUCKET, "gone.png", active_ensemble="any")
    assert outcome.status == "rejected" and outcome.reason == "missing"


def test_bad_upload_is_rejected_with_its_reason(
    sessions: sessionmaker[Session], s3_endpoint: str, bucket: str
) -> None:
    ctx = _context(sessions, s3_endpoint)
    source_id = fleet.record_upload(ctx, _upload(s3_endpoint, "notes.jpg", b"just text"))
    assert source_id is not None
    assert fleet.take_in(ctx, source_id) == []
    with sessions() as session:
        source = session.get(Source, source_id)
        assert source is not None and source.reject_reason == "not_an_image"
        assert source.image_id is not None  # the refused bytes keep their identity


class _KillsItsWorker:
    """A detector whose every delivery dies before storing a result, as a poison image
    that crashes its worker would (simulated by an exception that escapes the task)."""

    def __init__(self, spec: DetectorSpec) -> None:
        self.spec = spec
        self.version = "1"
        self.weights_sha256 = None
        self.calls = 0

    def detect_batch(self, images: Any, raw: Any) -> Any:
        self.calls += 1
        raise SystemExit("worker died")


def test_poison_message_stops_after_bounded_attempts(
    sessions: sessionmaker[Session], s3_endpoint: str, bucket: str, models: dict[str, Detector]
) -> None:
    ctx = _context(sessions, s3_endpoint, detectors=["sumsub-mj5", "poison"], max_attempts=2)
    poison = _KillsItsWorker(DetectorSpec("poison", "timm", "1"))
    source_id = fleet.record_upload(ctx, _upload(s3_endpoint, "poison.png", _png((70, 70))))
    assert source_id is not None
    work = dict((name, image_id) for image_id, name in fleet.take_in(ctx, source_id))
    fleet.detect(ctx, models["sumsub-mj5"], work["sumsub-mj5"], message_id="mj5")
    for _ in range(2):  # each delivery dies; the attempt was counted before the model ran
        with pytest.raises(SystemExit):
            fleet.detect(ctx, poison, work["poison"], message_id="p")
    verdict = fleet.detect(ctx, poison, work["poison"], message_id="p")  # third: give up
    assert poison.calls == 2
    assert verdict is not None
    with sessions() as session:
        row = session.query(Detection).filter_by(detector_name="poison").one()
        assert row.score is None and row.error is not None and "gave up after 2" in row.error
    assert "poison failed" in verdict.reason


def test_copies_of_work_in_flight_do_not_use_up_its_attempts(
    sessions: sessionmaker[Session], s3_endpoint: str, bucket: str, models: dict[str, Detector]
) -> None:
    """The reconciler may send the same work again while the first message still waits for
    a slow worker: each copy counts its own deliveries, so none of them gives up."""
    from db.models import DetectionAttempt

    ctx = _context(sessions, s3_endpoint, detectors=["sumsub-mj5"], max_attempts=1)
    source_id = fleet.record_upload(ctx, _upload(s3_endpoint, "copies.png", _png((66, 66))))
    assert source_id is not None
    ((image_id, _),) = fleet.take_in(ctx, source_id)
    with sessions.begin() as session:  # three copies delivered, still in flight elsewhere
        for message_id in ("copy-1", "copy-2", "copy-3"):
            session.add(
                DetectionAttempt(
                    image_id=image_id,
                    detector_name="sumsub-mj5",
                    message_id=message_id,
                    attempts=1,
                )
            )
    verdict = fleet.detect(ctx, models["sumsub-mj5"], image_id, message_id="copy-4")
    assert verdict is not None
    with sessions() as session:
        (row,) = session.query(Detection).all()
    assert row.error is None and row.score is not None
    # A copy delivered after the work was done finds it done and adds no verdict.
    again = fleet.detect(ctx, models["sumsub-mj5"], image_id, message_id="copy-1")
    assert again is not None and again.id == verdict.id
    assert _count(sessions, Verdict) == 1


class AllArrive:
    """A pace for decoding that lets no thread through until ``parties`` have arrived."""

    def __init__(self, parties: int) -> None:
        self._barrier = threading.Barrier(parties, timeout=60)

    def __enter__(self) -> None:
        self._barrier.wait()

    def __exit__(self, *exc: object) -> None:
        return None


def test_batched_detection_shares_forward_passes_and_isolates_redeliveries(
    sessions: sessionmaker[Session], s3_endpoint: str, bucket: str, models: dict[str, Detector]
) -> None:
    """Messages handled by one thread each (a threads-pool worker) meet in one batch; their
    stored scores equal the unbatched ones; a redelivered message runs alone."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from db.models import DetectionAttempt

    mj5 = models["sumsub-mj5"]
    ctx = _context(sessions, s3_endpoint, detectors=["sumsub-mj5"])
    image_ids = _taken_in(ctx, s3_endpoint, [(f"b/{i}.png", (80 + i, 64)) for i in range(6)])
    # The last image was delivered once before, to a worker that died holding it.
    suspect = image_ids[-1]
    with sessions.begin() as session:
        session.add(
            DetectionAttempt(
                image_id=suspect, detector_name="sumsub-mj5", message_id="lost", attempts=1
            )
        )
    # Every thread is announced before any submits: none may start decoding until all six
    # have come that far (however the machine schedules them). The two-minute window is
    # never waited out: the batch closes once no announced thread is still preparing.
    batching = replace(
        fleet.Batching.for_detector(mj5, max_batch=8, max_wait_s=120.0),
        decoding=AllArrive(len(image_ids)),
    )
    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        verdicts = list(
            pool.map(
                lambda i: fleet.detect(ctx, mj5, i, message_id=f"m{i}", batching=batching),
                image_ids,
            )
        )
    batching.close()
    assert time.monotonic() - started < 60  # no batch waited out its window
    assert all(v is not None for v in verdicts)
    # Five fresh messages in one forward pass; the suspect in a batch of its own.
    assert sorted(batching.batcher.stats.recent) == [1, 5]
    with sessions() as session:
        rows = {d.image_id: d for d in session.query(Detection)}
        attempts: dict[int, int] = {}
        for row in session.query(DetectionAttempt):
            attempts[row.image_id] = attempts.get(row.image_id, 0) + row.attempts
    assert attempts == {i: (2 if i == suspect else 1) for i in image_ids}
    for i, image_id in enumerate(image_ids):
        data = _png((80 + i, 64))
        (reference,) = mj5.detect_batch([decode(data, ctx.limits).image], [data])
        assert rows[image_id].error is None
        assert rows[image_id].score == pytest.approx(reference.score, abs=1e-4)
    assert (_count(sessions, Verdict), _count(sessions, ReviewCase)) == (6, 6)


def test_answers_stored_together_and_one_that_cannot_be_stored_fails_alone(
    sessions: sessionmaker[Session],
    s3_endpoint: str,
    bucket: str,
    models: dict[str, Detector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The batching worker's writer stores the answers waiting for it in one transaction,
    each image getting its own verdict; when that fails, it stores them one by one, so an
    answer that cannot be stored (its image is gone) fails its own message only. After
    close, a store is refused rather than left waiting."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from sqlalchemy.exc import IntegrityError

    from db import repository
    from workers.detectors.base import DetectorOutput
    from workers.engine import DetectorResult

    mj5 = models["sumsub-mj5"]
    ctx = _context(sessions, s3_endpoint, detectors=["sumsub-mj5"])
    image_ids = _taken_in(ctx, s3_endpoint, [(f"w/{i}.png", (90 + i, 70)) for i in range(5)])
    gone = max(image_ids) + 1000
    scores = {image_id: 0.1 + 0.2 * n for n, image_id in enumerate(image_ids)}
    writer = fleet.store_writer(ctx, mj5)
    pool = ThreadPoolExecutor(4)

    def held_up(first: int, then: list[int]) -> dict[int, Future[Verdict | None]]:
        """``first`` is taken alone and waits for its row lock; ``then`` queue up behind it
        and are taken as one group once the lock is released."""

        def store(image_id: int) -> Future[Verdict | None]:
            answer = DetectorResult(DetectorOutput(scores.get(image_id, 0.5)), latency_ms=2.0)
            return pool.submit(writer, (image_id, answer))

        with sessions() as held, held.begin():
            repository.lock_image(held, first)
            stored = {first: store(first)}
            _wait_for(lambda: _waiting_for_locks(sessions) == 1, "the writer to wait on ``first``")
            stored.update((image_id, store(image_id)) for image_id in then)
            _wait_for(lambda: writer.waiting == len(then), f"{len(then)} calls at the writer")
        return stored

    try:
        together = held_up(image_ids[0], image_ids[1:3])
        verdicts = {i: f.result(timeout=30) for i, f in together.items()}
        assert not [r for r in caplog.records if "handled together" in r.getMessage()]
        apart = held_up(image_ids[3], [image_ids[4], gone])
        with pytest.raises(IntegrityError):
            apart.pop(gone).result(timeout=30)
        verdicts.update((i, f.result(timeout=30)) for i, f in apart.items())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a failure above must not hang here
        writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer((image_ids[0], DetectorResult.failed("late")))
    assert any("handled together" in r.getMessage() for r in caplog.records)
    assert {i: v.image_id if v else None for i, v in verdicts.items()} == {i: i for i in image_ids}
    with sessions() as session:
        rows = {d.image_id: d for d in session.query(Detection)}
        statuses = {s.image_id: s.status for s in session.query(Source)}
    assert {i: rows[i].score for i in rows} == pytest.approx(scores)
    # Saved in one statement, the group's rows share their time; the others each have their own.
    assert rows[image_ids[1]].created_at == rows[image_ids[2]].created_at
    assert len({rows[i].created_at for i in (image_ids[0], image_ids[1], image_ids[4])}) == 3
    assert statuses == dict.fromkeys(image_ids, SourceStatus.SCORED)
    assert (_count(sessions, Verdict), _count(sessions, ReviewCase)) == (5, 5)


def test_deliveries_that_arrive_together_are_counted_together(
    sessions: sessionmaker[Session],
    s3_endpoint: str,
    bucket: str,
    models: dict[str, Detector],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The batching worker's delivery desk counts the messages waiting for it in one
    transaction; a message whose work was delivered before, and a second message for an
    image in the same group, are suspects (not counted there); when a message names an
    image that does not exist, the others are counted one by one and it fails alone."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from db.models import DetectionAttempt

    mj5 = models["sumsub-mj5"]
    ctx = _context(sessions, s3_endpoint, detectors=["sumsub-mj5"])
    done, one, two, three, before = _taken_in(
        ctx, s3_endpoint, [(f"d/{i}.png", (70 + i, 60)) for i in range(5)]
    )
    gone = before + 1000
    fleet.detect(ctx, mj5, done, message_id="scan")  # its detection is stored
    with sessions.begin() as session:
        # ``done`` as if scored by a scan (no delivery counted); ``before`` delivered once,
        # to a worker that died holding it.
        session.query(DetectionAttempt).delete()
        session.add(
            DetectionAttempt(
                image_id=before, detector_name="sumsub-mj5", message_id="lost", attempts=1
            )
        )
    desk = fleet.delivery_desk(ctx, mj5)
    pool = ThreadPoolExecutor(8)

    def held_up(first: tuple[int, str], then: list[tuple[int, str]]) -> dict[Any, Future[Any]]:
        """``first`` is taken alone and waits for the table; ``then`` queue up behind it,
        in this order (which of two messages for one image is counted depends on it), and
        are taken as one group once the table is free."""
        with sessions() as held, held.begin():
            held.execute(sa.text("LOCK TABLE detection_attempts IN ACCESS EXCLUSIVE MODE"))
            answers = {first: pool.submit(desk, first)}
            _wait_for(lambda: _waiting_for_locks(sessions) == 1, "the desk to wait on the table")
            for queued, message in enumerate(then, start=1):
                answers[message] = pool.submit(desk, message)
                _wait_for(lambda n=queued: desk.waiting == n, f"{queued} messages at the desk")
        return answers

    try:
        together = held_up((done, "first"), [(one, "a"), (two, "b"), (before, "c"), (one, "d")])
        found = {m: f.result(timeout=30) for m, f in together.items()}
        assert not [r for r in caplog.records if "handled together" in r.getMessage()]
        apart = held_up((done, "second"), [(three, "e"), (gone, "f")])
        with pytest.raises(LookupError, match=f"no image {gone}"):
            apart.pop((gone, "f")).result(timeout=30)
        found.update((m, f.result(timeout=30)) for m, f in apart.items())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a failure above must not hang here
        desk.close()
    assert any("handled together" in r.getMessage() for r in caplog.records)
    suspects = {(before, "c"), (one, "d"), (done, "second")}
    assert {m for m, d in found.items() if d is None} == suspects
    assert {m: (d.attempts, d.done) for m, d in found.items() if d is not None} == {
        (done, "first"): (1, True),
        (one, "a"): (1, False),
        (two, "b"): (1, False),
        (three, "e"): (1, False),
    }
    assert [o.key for o in found[(one, "a")].objects] == ["d/1.png"]
    with sessions() as session:
        rows = {
            (r.image_id, r.message_id): r.updated_at
            for r in session.query(DetectionAttempt).filter(DetectionAttempt.message_id != "lost")
        }
    assert set(rows) == {(done, "first"), (one, "a"), (two, "b"), (three, "e")}
    # Counted in one statement, the group's rows share their time.
    assert rows[(one, "a")] == rows[(two, "b")] != rows[(done, "first")]


class _Busy:
    """Every queue still holds messages."""

    def intake_waiting(self) -> bool:
        return True

    def detection_waiting(self, detector: str) -> bool:
        return True


def test_lost_messages_are_sent_again_when_due(
    sessions: sessionmaker[Session], s3_endpoint: str, bucket: str, models: dict[str, Detector]
) -> None:
    """Postgres, not the broker, says what is owed: uploads still pending after the delay get
    their missing messages again, with a doubling delay between tries."""
    from datetime import timedelta

    from db.models import utcnow

    ctx = _context(sessions, s3_endpoint)
    lost_intake = fleet.record_upload(ctx, _upload(s3_endpoint, "lost/intake.png", _png((70, 50))))
    half_done = fleet.record_upload(ctx, _upload(s3_endpoint, "lost/detect.png", _png((50, 70))))
    finished = fleet.record_upload(ctx, _upload(s3_endpoint, "lost/none.png", _png((60, 60))))
    assert lost_intake and half_done and finished
    ((image_id, _), _) = fleet.take_in(ctx, half_done)
    fleet.detect(ctx, models["sumsub-mj5"], image_id, message_id="a")  # sd5's was lost
    for done_image, name in fleet.take_in(ctx, finished):
        fleet.detect(ctx, models[name], done_image, message_id=name)

    assert fleet.resend_stalled(ctx, after_s=60) == fleet.Resend([], [])  # not due yet
    later = utcnow() + timedelta(seconds=61)
    # While the queues still hold messages, the work is most likely waiting its turn.
    assert fleet.resend_stalled(ctx, after_s=60, now=later, backlog=_Busy()) == fleet.Resend([], [])
    work = fleet.resend_stalled(ctx, after_s=60, now=later)
    assert work == fleet.Resend(intake=[lost_intake], detect=[(image_id, "sumsub-sd5")])
    # Checked again only after twice the delay, then four times.
    assert fleet.resend_stalled(ctx, after_s=60, now=later + timedelta(seconds=119)).intake == []
    again = fleet.resend_stalled(ctx, after_s=60, now=later + timedelta(seconds=121))
    assert again == work
    with sessions() as session:
        source = session.get(Source, lost_intake)
        assert source is not None and source.resend_count == 2

    # Doing the resent work (twice, as duplicates would) finishes both uploads once.
    for _ in range(2):
        for name, new_image in ((n, i) for i, n in fleet.take_in(ctx, lost_intake)):
            fleet.detect(ctx, models[name], new_image, message_id=name)
        fleet.detect(ctx, models["sumsub-sd5"], image_id, message_id="b")
    assert fleet.resend_stalled(ctx, after_s=60, now=later + timedelta(days=1)) == fleet.Resend(
        [], []
    )
    assert (_count(sessions, Verdict), _count(sessions, ReviewCase)) == (3, 3)
    with sessions() as session:
        statuses = {s.id: s.status for s in session.query(Source)}
    assert set(statuses.values()) == {SourceStatus.SCORED}
