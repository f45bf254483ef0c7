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


def _other_ensemble(name: str) -> repository.EnsembleRecord:
    digest = (name * 64)[:64]
    return repository.EnsembleRecord(f"weighted-mean@{digest[:16]}", digest, {"name": name})


def _save(
    session: Session,
    image_id: int,
    label: VerdictLabel,
    *,
    ensemble: repository.EnsembleRecord = ENSEMBLE,
    failed: bool = False,
    active: bool = True,
) -> tuple[Verdict, bool]:
    """Store a verdict with ``label`` under ``ensemble`` (registered first, as pipelines do);
    ``failed``: one of its detectors failed."""
    registered = repository.register_ensemble(session, ensemble)
    flagged = label == VerdictLabel.LIKELY_AI
    record = repository.VerdictRecord(
        ensemble_id=registered.id,
        ensemble_version=registered.version,
        detector_set_digest=("f" if failed else "d") * 64,
        detector_set={"detectors": [{"name": "det", "version": "1", "failed": failed}]},
        ai_score=None if label == VerdictLabel.INCONCLUSIVE else (0.9 if flagged else 0.1),
        label=label,
        flagged=flagged,
        reason="because",
    )
    return repository.save_verdict(session, image_id, record, actor="t", active=active)


AI, CLEAN, NOTHING = VerdictLabel.LIKELY_AI, VerdictLabel.NO_INDICATION, VerdictLabel.INCONCLUSIVE


def test_flagged_verdict_opens_one_review_case_with_audit(db_session: Session) -> None:
    image = _image(db_session)
    verdict, created = _save(db_session, image.id, AI)
    again, created_again = _save(db_session, image.id, AI)
    assert created and not created_again and verdict.id == again.id
    assert verdict.ensemble_id is not None
    assert repository.count_rows(db_session, Verdict) == 1
    assert repository.count_rows(db_session, ReviewCase) == 1
    case = db_session.query(ReviewCase).one()
    assert case.state == ReviewState.OPEN and case.image_id == image.id
    actions = [e.action for e in db_session.query(AuditEvent).order_by(AuditEvent.id)]
    assert actions == ["verdict.created", "review_case.opened"]


def test_unflagged_verdict_opens_no_case(db_session: Session) -> None:
    image = _image(db_session)
    _save(db_session, image.id, CLEAN)
    assert repository.count_rows(db_session, ReviewCase) == 0
    latest = repository.latest_verdict(db_session, image.id)
    assert latest is not None and latest.label == VerdictLabel.NO_INDICATION


def _case_state(session: Session) -> tuple[ReviewState, int]:
    case = session.query(ReviewCase).one()
    session.refresh(case)
    return case.state, case.verdict_id


def _case_actions(session: Session) -> list[str]:
    return [
        e.action
        for e in session.query(AuditEvent).order_by(AuditEvent.id)
        if e.subject_type == "review_case"
    ]


def test_a_verdict_that_no_longer_flags_withdraws_the_open_case_and_a_new_flag_reopens_it(
    db_session: Session,
) -> None:
    image = _image(db_session)
    first, _ = _save(db_session, image.id, AI)
    cleared, _ = _save(db_session, image.id, CLEAN, ensemble=_other_ensemble("b"))
    assert _case_state(db_session) == (ReviewState.WITHDRAWN, first.id)
    again, created = _save(db_session, image.id, AI, ensemble=_other_ensemble("c"))
    assert created and _case_state(db_session) == (ReviewState.OPEN, again.id)
    # Back to the first configuration: its stored verdict is current again, and the case
    # follows it without a new verdict row.
    _save(db_session, image.id, CLEAN, ensemble=_other_ensemble("b"))
    back, created_back = _save(db_session, image.id, AI)
    assert back.id == first.id and not created_back
    assert _case_state(db_session) == (ReviewState.OPEN, first.id)
    assert repository.count_rows(db_session, Verdict) == 3
    assert _case_actions(db_session) == [
        "review_case.opened",
        "review_case.withdrawn",
        "review_case.reopened",
        "review_case.withdrawn",
        "review_case.reopened",
    ]
    assert cleared.ensemble_version == _other_ensemble("b").version


@pytest.mark.parametrize(
    ("label", "failed", "active"),
    [(NOTHING, False, True), (CLEAN, True, True), (CLEAN, False, False)],
    ids=["inconclusive", "a-detector-failed", "not-the-active-config"],
)
def test_missing_evidence_or_an_ad_hoc_config_never_withdraws_a_case(
    db_session: Session, label: VerdictLabel, failed: bool, active: bool
) -> None:
    """A re-score with no weights on the machine, broken new weights or a deleted object
    says nothing about the image; an ad-hoc scan's threshold is not the platform's."""
    image = _image(db_session)
    first, _ = _save(db_session, image.id, AI)
    _save(db_session, image.id, label, ensemble=_other_ensemble("b"), failed=failed, active=active)
    assert _case_state(db_session) == (ReviewState.OPEN, first.id)
    assert _case_actions(db_session) == ["review_case.opened"]


def test_an_ad_hoc_config_may_still_open_a_case(db_session: Session) -> None:
    image = _image(db_session)
    flagged, _ = _save(db_session, image.id, AI, active=False)
    assert _case_state(db_session) == (ReviewState.OPEN, flagged.id)


@pytest.mark.parametrize("state", [ReviewState.CLAIMED, ReviewState.DECIDED])
def test_a_held_or_decided_case_keeps_its_state_when_the_verdict_changes(
    db_session: Session, state: ReviewState
) -> None:
    image = _image(db_session)
    _save(db_session, image.id, AI)
    case = db_session.query(ReviewCase).one()
    case.state = state
    db_session.flush()
    _save(db_session, image.id, CLEAN, ensemble=_other_ensemble("b"))
    assert _case_state(db_session)[0] == state


def test_the_case_shows_the_verdict_that_opened_it_and_the_current_one(
    db_session: Session,
) -> None:
    image = _image(db_session)
    opened, _ = _save(db_session, image.id, AI)
    case = db_session.query(ReviewCase).one()
    case.state = ReviewState.CLAIMED  # a moderator holds it while the configuration changes
    db_session.flush()
    other = _other_ensemble("b")
    now, _ = _save(db_session, image.id, CLEAN, ensemble=other)
    found = repository.with_verdicts(db_session, image.id, ensemble_version=other.version)
    assert found is not None and found.current is not None
    assert (found.opened_by.id, found.current.id) == (opened.id, now.id)
    first = repository.with_verdicts(db_session, image.id, ensemble_version=ENSEMBLE.version)
    assert first is not None and first.current is not None and first.current.id == opened.id
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
