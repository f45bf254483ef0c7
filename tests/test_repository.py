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
    repository.mark_source_rejected(db_session, source.id, "missing", "the file vanished")
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


ENSEMBLE = repository.EnsembleRecord(
    version="weighted-mean@0123456789abcdef", digest="e" * 64, definition={"threshold": 0.5}
)


def _verdict(
    flagged: bool, digest: str = "d" * 64, ensemble: repository.EnsembleRecord = ENSEMBLE
) -> repository.VerdictRecord:
    return repository.VerdictRecord(
        ensemble=ensemble,
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


def _other_ensemble(name: str) -> repository.EnsembleRecord:
    digest = (name * 64)[:64]
    return repository.EnsembleRecord(f"weighted-mean@{digest[:16]}", digest, {"name": name})


def _case_state(session: Session) -> tuple[ReviewState, int]:
    case = session.query(ReviewCase).one()
    session.refresh(case)
    return case.state, case.verdict_id


def test_a_verdict_that_no_longer_flags_withdraws_the_open_case_and_a_new_flag_reopens_it(
    db_session: Session,
) -> None:
    image = _image(db_session)
    first, _ = repository.save_verdict(db_session, image.id, _verdict(True), actor="t")
    cleared, _ = repository.save_verdict(
        db_session, image.id, _verdict(False, ensemble=_other_ensemble("b")), actor="t"
    )
    assert _case_state(db_session) == (ReviewState.WITHDRAWN, first.id)
    again, created = repository.save_verdict(
        db_session, image.id, _verdict(True, ensemble=_other_ensemble("c")), actor="t"
    )
    assert created and _case_state(db_session) == (ReviewState.OPEN, again.id)
    # Back to the first configuration: its stored verdict is current again, and the case
    # follows it without a new verdict row.
    repository.save_verdict(
        db_session, image.id, _verdict(False, ensemble=_other_ensemble("b")), actor="t"
    )
    back, created_back = repository.save_verdict(db_session, image.id, _verdict(True), actor="t")
    assert back.id == first.id and not created_back
    assert _case_state(db_session) == (ReviewState.OPEN, first.id)
    assert repository.count_rows(db_session, Verdict) == 3
    actions = [
        e.action
        for e in db_session.query(AuditEvent).order_by(AuditEvent.id)
        if e.subject_type == "review_case"
    ]
    assert actions == [
        "review_case.opened",
        "review_case.withdrawn",
        "review_case.reopened",
        "review_case.withdrawn",
        "review_case.reopened",
    ]
    assert cleared.ensemble_version == _other_ensemble("b").version


@pytest.mark.parametrize("state", [ReviewState.CLAIMED, ReviewState.DECIDED])
def test_a_held_or_decided_case_keeps_its_state_when_the_verdict_changes(
    db_session: Session, state: ReviewState
) -> None:
    image = _image(db_session)
    repository.save_verdict(db_session, image.id, _verdict(True), actor="t")
    case = db_session.query(ReviewCase).one()
    case.state = state
    db_session.flush()
    repository.save_verdict(
        db_session, image.id, _verdict(False, ensemble=_other_ensemble("b")), actor="t"
    )
    assert _case_state(db_session)[0] == state


def test_the_case_shows_the_verdict_that_opened_it_and_the_current_one(
    db_session: Session,
) -> None:
    image = _image(db_session)
    opened, _ = repository.save_verdict(db_session, image.id, _verdict(True), actor="t")
    case = db_session.query(ReviewCase).one()
    case.state = ReviewState.CLAIMED  # a moderator holds it while the configuration changes
    db_session.flush()
    other = _other_ensemble("b")
    now, _ = repository.save_verdict(
        db_session, image.id, _verdict(False, ensemble=other), actor="t"
    )
    found = repository.with_verdicts(db_session, image.id, ensemble_version=other.version)
    assert found is not None and found.verdicts_differ
    assert (found.opened_by.id, found.current and found.current.id) == (opened.id, now.id)
    under_first = repository.with_verdicts(db_session, image.id, ensemble_version=ENSEMBLE.version)
    assert under_first is not None and not under_first.verdicts_differ
    never = repository.with_verdicts(db_session, image.id, ensemble_version="weighted-mean@none")
    assert never is not None and never.current is None


def test_an_ensemble_configuration_is_stored_once(db_session: Session) -> None:
    first = repository.register_ensemble(db_session, ENSEMBLE)
    again = repository.register_ensemble(db_session, ENSEMBLE)
    assert first.id == again.id and first.definition == {"threshold": 0.5}
    clash = repository.EnsembleRecord(ENSEMBLE.version, "f" * 64, {"threshold": 0.6})
    with pytest.raises(repository.EnsembleVersionClash):
        repository.register_ensemble(db_session, clash)


@pytest.mark.parametrize("commit", [True, False])
def test_each_test_starts_empty_even_after_commit(db_session: Session, commit: bool) -> None:
    # Runs twice; the second run would see the first one's row if rollback did not isolate.
    assert repository.count_rows(db_session, Image) == 0
    _image(db_session)
    if commit:
        db_session.commit()
    assert repository.count_rows(db_session, Image) == 1
