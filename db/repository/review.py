"""Review cases: one per flagged image, following the verdicts stored for it.

A case is opened by the first verdict that flags the image. A later verdict under the
active ensemble configuration that finds no indication, with every detector answering,
withdraws the case while nobody holds it; one that flags the image again reopens it. A
verdict without evidence (inconclusive, or a detector failed) never withdraws a case, nor
does one under a configuration that is not the active one (an ad-hoc scan with its own
threshold): they may only open cases. A claimed or decided case keeps its state: the
moderator's work is never taken away or undone by a re-score.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import ReviewCase, ReviewDecision, ReviewState, Verdict, VerdictLabel, utcnow
from db.repository._sql import insert_ignore
from db.repository.audit import append_audit


def case_for_image(session: Session, image_id: int) -> ReviewCase | None:
    return session.execute(
        select(ReviewCase).where(ReviewCase.image_id == image_id)
    ).scalar_one_or_none()


def follow_verdict(
    session: Session, verdict: Verdict, *, actor: str, active: bool = True
) -> ReviewCase | None:
    """Bring the image's review case in line with ``verdict``, just stored or computed
    again; ``active``: the verdict is under the active ensemble configuration. Idempotent: a
    verdict the case already agrees with changes nothing."""
    if verdict.flagged:
        opened = insert_ignore(
            session,
            ReviewCase,
            {
                "verdict_id": verdict.id,
                "image_id": verdict.image_id,
                "state": ReviewState.OPEN,
                "opened_at": utcnow(),
            },
        )
        case = _case(session, verdict.image_id)
        if opened:
            _audit(session, case, "review_case.opened", verdict, actor)
        elif _transition(
            session,
            case,
            ReviewState.WITHDRAWN,
            state=ReviewState.OPEN,
            verdict_id=verdict.id,
            opened_at=utcnow(),
            assignee=None,
            claimed_at=None,
        ):
            _audit(session, case, "review_case.reopened", verdict, actor)
        return case
    if not (active and _clears(verdict)):
        return case_for_image(session, verdict.image_id)
    existing = case_for_image(session, verdict.image_id)
    if existing is not None and _transition(
        session, existing, ReviewState.OPEN, state=ReviewState.WITHDRAWN
    ):
        _audit(session, existing, "review_case.withdrawn", verdict, actor)
    return existing


def decide_case(
    session: Session,
    case: ReviewCase,
    decision: ReviewDecision,
    note: str | None,
    *,
    actor: str,
) -> ReviewState | None:
    """Record a moderator's decision on a case that is open or claimed; returns the state
    it was decided from, or None when the case was not in review (withdrawn, or decided
    already: a concurrent decision wins). Audited."""
    for expected in (ReviewState.OPEN, ReviewState.CLAIMED):
        if _transition(
            session,
            case,
            expected,
            state=ReviewState.DECIDED,
            decision=decision,
            note=note,
            decided_at=utcnow(),
            assignee=actor,
        ):
            append_audit(
                session,
                actor=actor,
                action="review_case.decided",
                subject_type="review_case",
                subject_id=case.id,
                details={"from_state": expected.value, "decision": decision.value, "note": note},
            )
            return expected
    return None


def _clears(verdict: Verdict) -> bool:
    """Whether the verdict is evidence that the image needs no review: every detector
    answered and the ensemble found no indication. Missing evidence clears nothing."""
    detectors = verdict.detector_set.get("detectors", [])
    return verdict.label == VerdictLabel.NO_INDICATION and not any(
        d.get("failed") for d in detectors
    )


def _case(session: Session, image_id: int) -> ReviewCase:
    case = case_for_image(session, image_id)
    assert case is not None
    return case


def _transition(
    session: Session, case: ReviewCase, expected: ReviewState, **values: object
) -> bool:
    """Change the case only if it is still in the ``expected`` state (a concurrent claim or
    decision wins); True if changed."""
    result = session.execute(
        update(ReviewCase)
        .where(ReviewCase.id == case.id, ReviewCase.state == expected)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    changed = bool(getattr(result, "rowcount", 0))
    if changed:
        session.refresh(case)
    return changed


def _audit(session: Session, case: ReviewCase, action: str, verdict: Verdict, actor: str) -> None:
    append_audit(
        session,
        actor=actor,
        action=action,
        subject_type="review_case",
        subject_id=case.id,
        details={
            "verdict_id": verdict.id,
            "ensemble_version": verdict.ensemble_version,
            "flagged": verdict.flagged,
            "reason": verdict.reason,
        },
    )
