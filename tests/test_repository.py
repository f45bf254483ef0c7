"""Idempotent writes on real Postgres: whatever is repeated, one row results."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from db import repository
from db.models import (
    AuditEvent,
    Detection,
    Image,
    ReviewCase,
    ReviewState,
    Source,
    SourceKind,
    SourceStatus,
    Verdict,
    VerdictLabel,
)


def _image(session: Session, sha: str = "a" * 64) -> Image:
    return repository.get_or_create_image(
        session, repository.ImageFacts(sha256=sha, size_bytes=10, format="PNG", width=2, height=3)
    )


def test_same_bytes_are_one_image(db_session: Session) -> None:
    first = _image(db_session)
    again = _image(db_session)
    assert first.id == again.id
    assert repository.count_rows(db_session, Image) == 1
    assert repository.image_by_sha256(db_session, "a" * 64) is not None


def test_each_source_is_recorded_once_and_seen_again(db_session: Session) -> None:
    image = _image(db_session)
    ref = repository.SourceRef(SourceKind.CLI, "/a.png@" + "a" * 64, local_path="/a.png")
    other = repository.SourceRef(SourceKind.CLI, "/b.png@" + "a" * 64, local_path="/b.png")
    source, created = repository.record_source(db_session, ref, image.id)
    again, created_again = repository.record_source(db_session, ref, image.id)
    second, _ = repository.record_source(db_session, other, image.id)
    assert created and not created_again
    assert source.id == again.id
    assert again.seen_count == 2
    assert second.id != source.id
    assert [s.local_path for s in repository.sources_for_image(db_session, image.id)] == [
        "/a.png",
        "/b.png",
    ]


def test_rejection_is_recorded_on_the_source(db_session: Session) -> None:
    ref = repository.SourceRef(SourceKind.CLI, "/gone.png@unread", local_path="/gone.png")
    source, _ = repository.record_source(db_session, ref, None)
    repository.mark_source_rejected(db_session, source, "missing", "the file vanished")
    row = db_session.get(Source, source.id)
    assert row is not None
    assert row.status == SourceStatus.REJECTED
    assert (row.reject_reason, row.reject_message) == ("missing", "the file vanished")


def _record(score: float | None, error: str | None = None) -> repository.DetectionRecord:
    return repository.DetectionRecord(
        detector_name="det",
        detector_version="1+oabc+w0123",
        weights_sha256="0123" * 16,
        score=score,
        evidence={"p_ai": score},
        latency_ms=1.5,
        error=error,
    )


def test_detection_is_stored_once_per_version(db_session: Session) -> None:
    image = _image(db_session)
    first = repository.save_detection(db_session, image.id, _record(0.7))
    second = repository.save_detection(db_session, image.id, _record(0.1))
    assert first.id == second.id
    assert second.score == 0.7  # the first answer for a version is the record
    assert repository.count_rows(db_session, Detection) == 1
    reusable = repository.reusable_detections(db_session, image.id, {"det": "1+oabc+w0123"})
    assert set(reusable) == {"det"}
    assert repository.reusable_detections(db_session, image.id, {"det": "2"}) == {}


def test_stored_failure_is_not_reused_and_is_replaced_by_an_answer(db_session: Session) -> None:
    image = _image(db_session)
    failed = repository.save_detection(db_session, image.id, _record(None, "RuntimeError: OOM"))
    assert repository.reusable_detections(db_session, image.id, {"det": "1+oabc+w0123"}) == {}
    answered = repository.save_detection(db_session, image.id, _record(0.4))
    assert answered.id == failed.id
    assert (answered.score, answered.error) == (0.4, None)


def _verdict(flagged: bool, digest: str = "d" * 64) -> repository.VerdictRecord:
    return repository.VerdictRecord(
        ensemble_version="v0",
        detector_set_digest=digest,
        detector_set={"detectors": []},
        ai_score=0.9 if flagged else 0.1,
        label=VerdictLabel.LIKELY_AI if flagged else VerdictLabel.NO_INDICATION,
        flagged=flagged,
        reason="because",
    )


def test_flagged_verdict_opens_one_review_case_with_audit(db_session: Session) -> None:
    image = _image(db_session)
    verdict, created = repository.save_verdict(db_session, image.id, _verdict(True), actor="t")
    again, created_again = repository.save_verdict(db_session, image.id, _verdict(True), actor="t")
    assert created and not created_again and verdict.id == again.id
    assert repository.count_rows(db_session, Verdict) == 1
    assert repository.count_rows(db_session, ReviewCase) == 1
    case = db_session.query(ReviewCase).one()
    assert case.state == ReviewState.OPEN and case.image_id == image.id
    actions = [e.action for e in db_session.query(AuditEvent).order_by(AuditEvent.id)]
    assert actions == ["verdict.created", "review_case.opened"]


def test_unflagged_verdict_opens_no_case(db_session: Session) -> None:
    image = _image(db_session)
    repository.save_verdict(db_session, image.id, _verdict(False), actor="t")
    assert repository.count_rows(db_session, ReviewCase) == 0
    latest = repository.latest_verdict(db_session, image.id)
    assert latest is not None and latest.label == VerdictLabel.NO_INDICATION


@pytest.mark.parametrize("commit", [True, False])
def test_each_test_starts_empty_even_after_commit(db_session: Session, commit: bool) -> None:
    # Runs twice; the second run would see the first one's row if rollback did not isolate.
    assert repository.count_rows(db_session, Image) == 0
    _image(db_session)
    if commit:
        db_session.commit()
    assert repository.count_rows(db_session, Image) == 1
