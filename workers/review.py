"""Moderators' decisions on review cases: the one service behind every way a decision is
made (the review API today; the dashboard's pages call the same function). A decision is
stored, audited and queued for the platforms' callbacks in one transaction: a platform is
told exactly the decisions that were stored."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import ReviewDecision, ReviewState
from db.session import transaction
from workers import callbacks
from workers.refusals import Refused


class DecisionRefused(Refused):
    """A decision that cannot be stored (see ``workers.refusals``)."""


@dataclass(frozen=True)
class Decided:
    sha256: str
    decision: ReviewDecision
    decided_from: ReviewState  # open or claimed
    decided_at: str
    callbacks: int  # platform callbacks queued


def decide(
    session_factory: sessionmaker[Session],
    sha256: str,
    decision: ReviewDecision,
    note: str | None,
    *,
    actor: str,
    active_ensemble: str,
) -> Decided:
    """Decide the review case of the image with these bytes. A case that is not in review
    (withdrawn, or decided already) is refused with 409; the note stays with us (it is
    audited, never sent to platforms)."""
    with transaction(session_factory) as session:
        image = repository.image_by_sha256(session, sha256)
        if image is not None:
            repository.lock_image(session, image.id)  # first: the verdicts that move cases wait
        case = repository.case_for_image(session, image.id) if image is not None else None
        if image is None or case is None:
            raise DecisionRefused(404, "not-found", "no review case for an image with this sha256")
        decided_from = repository.decide_case(session, case, decision, note, actor=actor)
        if decided_from is None:
            session.refresh(case)
            raise DecisionRefused(
                409, "not-in-review", f"the case is {case.state.value}; nothing to decide"
            )
        assert case.decided_at is not None
        queued = callbacks.enqueue_review_decided(
            session,
            image.id,
            decision=decision.value,
            decided_at=case.decided_at,
            actor=actor,
            active_ensemble=active_ensemble,
        )
        return Decided(
            sha256=sha256,
            decision=decision,
            decided_from=decided_from,
            decided_at=case.decided_at.isoformat(),
            callbacks=queued,
        )
