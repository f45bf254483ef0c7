"""Human review: the one service behind the review API, the dashboard's pages and the CLI.

A moderator works one case at a time. Claiming a case is a lease (``ReviewPolicy.lease``),
renewed while the case page is open; a lease that runs out returns the case to the queue
(``expire_leases``, run before every read of the queue and every claim, and by the
fleet's reconciler). "Next" claims the first open case in priority order that the
moderator may take; two moderators racing for it never get the same one. Only the holder
of a live lease may decide (409 otherwise).

A decision of ``unsure`` escalates the case to the admins; an admin's decision on an
escalated case is final. A share of cases (``second_review_share``) is sent, after the
first decision, to a second moderator who does not see the first: agreeing decisions are
final, disagreeing ones go to the admins, and the pairs measure agreement between
moderators. A final decision is stored, audited and queued for the platforms' callbacks in
one transaction. Every claim, release, expiry, decision and escalation is an audit row.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import (
    AuditEvent,
    Detection,
    ReviewCase,
    ReviewDecision,
    ReviewDecisionRecord,
    ReviewState,
    Source,
    Verdict,
    as_utc,
    utcnow,
)
from db.repository import QueueFilter, QueueRow
from db.session import transaction
from workers import callbacks, metrics
from workers.refusals import Refused

AUDIT_SUBJECT = "review_case"
INDICATION_NOT_PROOF = (
    "Detector scores and provenance signals are an indication, not proof: the decision is "
    "yours. Missing provenance metadata says nothing about where a picture came from."
)


metrics.initialise(metrics.REVIEW_DECISIONS, (decision.value for decision in ReviewDecision))

# The states of a case somebody still has to finish (the backlog's gauge, by state).
UNFINISHED_STATES = (ReviewState.OPEN, ReviewState.CLAIMED, ReviewState.ESCALATED)


class ReviewRefused(Refused):
    """A review action that cannot be carried out (see ``workers.refusals``)."""


DecisionRefused = ReviewRefused


@dataclass(frozen=True)
class Reviewer:
    """Who acts: ``actor`` as audited (``token:<public id>``), and whether an admin."""

    actor: str
    is_admin: bool = False


@dataclass(frozen=True)
class ReviewPolicy:
    active_ensemble: str
    lease: timedelta = timedelta(minutes=10)
    second_review_share: float = 0.0  # of first decisions sent to a second moderator


@dataclass(frozen=True)
class Claim:
    case_id: int
    sha256: str
    state: ReviewState
    lease_expires_at: datetime


@dataclass(frozen=True)
class Decided:
    case_id: int
    sha256: str
    decision: ReviewDecision
    decided_from: ReviewState  # claimed or escalated
    state: ReviewState  # decided, escalated, or open again for a second moderator
    decided_at: str
    callbacks: int  # platform callbacks queued (a final decision only)


# --- leases -----------------------------------------------------------------------------


def expire_leases(session_factory: sessionmaker[Session], *, now: datetime | None = None) -> int:
    """Return every case whose lease ran out to the queue it came from; audited. Returns
    how many."""
    now = now or utcnow()
    expired = 0
    while True:
        with transaction(session_factory) as session:
            lapsed = _drop_lapsed(session, now)
        metrics.REVIEW_LEASE_EXPIRIES.inc(lapsed)
        expired += lapsed
        if lapsed < EXPIRY_PAGE:
            return expired


EXPIRY_PAGE = 100


def _drop_lapsed(session: Session, now: datetime, holder: str | None = None) -> int:
    dropped = 0
    for case in repository.expired_leases(session, now, holder=holder, limit=EXPIRY_PAGE):
        was, until, from_state = case.assignee, case.lease_expires_at, case.state.value
        assert was is not None
        if repository.drop_lease(session, case, holder=was, lapsed_at=now):
            dropped += 1
            _audit(
                session,
                case,
                "system",
                "review_case.lease_expired",
                holder=was,
                lease_expires_at=until.isoformat() if until else None,
                from_state=from_state,
                to_state=case.state.value,
            )
    return dropped


def _take(session: Session, case: ReviewCase, reviewer: Reviewer, policy: ReviewPolicy) -> bool:
    """Take ``case`` for the reviewer; False when somebody else got it first. Raises 409
    when the reviewer holds another case: one job at a time, which the database enforces
    (a lapsed lease of theirs that no expiry pass has returned yet is returned here)."""
    for _ in range(2):
        now = utcnow()
        outcome = repository.take_lease(
            session, case, reviewer.actor, now=now, until=now + policy.lease
        )
        if outcome is not repository.Lease.BUSY:
            return outcome is repository.Lease.TAKEN
        held = repository.held_by(session, reviewer.actor, now)
        if held is not None:
            raise ReviewRefused(
                409, "holding-another", f"you hold case {held.id}; decide or release it first"
            )
        metrics.REVIEW_LEASE_EXPIRIES.inc(_drop_lapsed(session, now, holder=reviewer.actor))
    raise ReviewRefused(409, "holding-another", "you hold another case; reload and try again")


def claim_next(
    session_factory: sessionmaker[Session],
    reviewer: Reviewer,
    policy: ReviewPolicy,
    *,
    skip: Iterable[int] = (),
) -> Claim | None:
    """Claim the first open case in priority order (``skip``: cases the moderator just
    passed on). A moderator already holding a case gets that case back: one job at a
    time, even when two of their requests race. None when the queue has nothing for them."""
    expire_leases(session_factory)
    with transaction(session_factory) as session:
        held = repository.held_by(session, reviewer.actor, utcnow())
        if held is not None:
            return _claim_of(session, held)
        passed = set(skip)
        while case := repository.next_candidate(session, reviewer.actor, exclude=passed):
            passed.add(case.id)
            try:
                taken = _take(session, case, reviewer, policy)
            except ReviewRefused:
                # A request of theirs racing this one took a case first: that is their job.
                held = repository.held_by(session, reviewer.actor, utcnow())
                if held is None:
                    raise
                return _claim_of(session, held)
            if taken:
                _audit(
                    session,
                    case,
                    reviewer.actor,
                    "review_case.claimed",
                    via="next",
                    from_state="open",
                )
                return _claim_of(session, case)
        # Nothing left to take; a request of theirs racing this one may have taken the last.
        held = repository.held_by(session, reviewer.actor, utcnow())
        return _claim_of(session, held) if held is not None else None


def claim(
    session_factory: sessionmaker[Session],
    case_id: int,
    reviewer: Reviewer,
    policy: ReviewPolicy,
) -> Claim:
    """Claim one case (or renew the caller's own claim on it). Refused with 409 when
    another moderator holds it, when the caller holds another case, and when it is not
    waiting for review; an escalated case only by an admin (403)."""
    expire_leases(session_factory)
    now = utcnow()
    with transaction(session_factory) as session:
        case = _locked_case(session, case_id)
        if case.assignee == reviewer.actor and _live(case, now):
            if not repository.renew_lease(
                session, case, reviewer.actor, now=now, until=now + policy.lease
            ):
                raise ReviewRefused(409, "lease-lost", "you no longer hold this case")
            return _claim_of(session, case)
        if case.state == ReviewState.ESCALATED and not reviewer.is_admin:
            raise ReviewRefused(403, "forbidden", "an escalated case is decided by an admin")
        if case.state not in (ReviewState.OPEN, *repository.HELD_STATES):
            raise ReviewRefused(
                409, "not-in-review", f"the case is {case.state.value}; nothing to claim"
            )
        if case.assignee is not None and _live(case, now):
            raise ReviewRefused(409, "claimed", "another moderator holds this case")
        if _decided_by(session, case, reviewer.actor) and case.state != ReviewState.ESCALATED:
            raise ReviewRefused(
                409, "second-review", "you decided this case; a second moderator reviews it"
            )
        from_state = case.state.value
        if not _take(session, case, reviewer, policy):
            session.refresh(case)
            if case.assignee == reviewer.actor and _live(case, utcnow()):
                # Their own request racing this one (a double click) took it first.
                return _claim_of(session, case)
            raise ReviewRefused(409, "claimed", "another moderator took this case just now")
        _audit(
            session, case, reviewer.actor, "review_case.claimed", via="claim", from_state=from_state
        )
        return _claim_of(session, case)


def renew(
    session_factory: sessionmaker[Session],
    case_id: int,
    reviewer: Reviewer,
    policy: ReviewPolicy,
) -> Claim:
    """Extend the caller's lease (the case page does, while it is open). 409 when the
    lease is lost: it ran out and the case went back, or somebody else has it now."""
    now = utcnow()
    with transaction(session_factory) as session:
        case = _locked_case(session, case_id)
        if not repository.renew_lease(
            session, case, reviewer.actor, now=now, until=now + policy.lease
        ):
            raise ReviewRefused(409, "lease-lost", "you no longer hold this case")
        return _claim_of(session, case)


def release(session_factory: sessionmaker[Session], case_id: int, reviewer: Reviewer) -> None:
    """Give a held case back to the queue without deciding it; audited."""
    now = utcnow()
    with transaction(session_factory) as session:
        case = _locked_case(session, case_id)
        if not (case.assignee == reviewer.actor and _live(case, now)):
            raise ReviewRefused(409, "not-holder", "you do not hold this case")
        from_state = case.state.value
        if repository.drop_lease(session, case, holder=reviewer.actor):
            _audit(
                session,
                case,
                reviewer.actor,
                "review_case.released",
                from_state=from_state,
                to_state=case.state,
            )


# --- decisions --------------------------------------------------------------------------


def decide(
    session_factory: sessionmaker[Session],
    case_id: int,
    decision: ReviewDecision,
    note: str | None,
    *,
    reviewer: Reviewer,
    policy: ReviewPolicy,
    rng: random.Random | None = None,
) -> Decided:
    """Decide a case the caller holds a live lease on (409 otherwise). See the module's
    docstring for where the case goes; the note stays with us (audited, never sent to
    platforms)."""
    now = utcnow()
    with transaction(session_factory) as session:
        case = _locked_case(session, case_id)
        # First: verdicts that move cases take the same lock, so none lands in between.
        image = repository.lock_image(session, case.image_id)
        if not (case.assignee == reviewer.actor and _live(case, now)):
            if case.state in (ReviewState.DECIDED, ReviewState.WITHDRAWN):
                detail = f"the case is {case.state.value}; nothing to decide"
                raise ReviewRefused(409, "not-in-review", detail)
            raise ReviewRefused(
                409, "not-holder", "claim the case first: only its holder may decide it"
            )
        decided_from = case.state
        earlier = [d for d in repository.decisions_of_case(session, case.id)]
        current = repository.current_verdict(
            session, case.image_id, ensemble_version=policy.active_ensemble
        )
        first_round = decided_from == ReviewState.CLAIMED and not earlier
        blind = decided_from == ReviewState.CLAIMED and case.reviews_required == 2 and bool(earlier)
        repository.record_decision(
            session,
            case,
            actor=reviewer.actor,
            decision=decision,
            note=note,
            verdict_id=current.id if current is not None else case.verdict_id,
            blind=blind,
            now=now,
        )
        details: dict[str, Any] = {
            "from_state": decided_from.value,
            "decision": decision.value,
            "note": note,
        }
        state, why, agreed = _where_next(
            decided_from,
            decision,
            first=earlier[0].decision if blind else None,
            sampled=first_round and _sampled(policy.second_review_share, rng),
        )
        details["to_state"] = state.value
        if why:
            details["why"] = why
        if agreed is not None:
            details["agrees_with_first"] = agreed
        values: dict[str, Any] = {"state": state}
        if state == ReviewState.DECIDED:
            values.update(decision=decision, note=note, decided_at=now, lease_expires_at=None)
        else:
            values.update(assignee=None, claimed_at=None, lease_expires_at=None)
        if state == ReviewState.OPEN:
            values["reviews_required"] = 2
        if not repository.move_held_case(session, case, reviewer.actor, now=now, **values):
            raise ReviewRefused(409, "not-holder", "the lease ran out before the decision")
        _audit(session, case, reviewer.actor, "review_case.decided", **details)
        queued = 0
        if state == ReviewState.ESCALATED:
            _audit(
                session,
                case,
                reviewer.actor,
                "review_case.escalated",
                why=why,
                from_state=decided_from,
                to_state=state,
            )
        elif state == ReviewState.OPEN:
            _audit(
                session,
                case,
                reviewer.actor,
                "review_case.second_review",
                from_state=decided_from,
                to_state=state,
            )
        else:
            queued = callbacks.enqueue_review_decided(
                session,
                image.id,
                decision=decision.value,
                decided_at=now,
                actor=reviewer.actor,
                active_ensemble=policy.active_ensemble,
            )
        decided = Decided(
            case_id=case.id,
            sha256=image.sha256,
            decision=decision,
            decided_from=decided_from,
            state=state,
            decided_at=now.isoformat(),
            callbacks=queued,
        )
    metrics.REVIEW_DECISIONS.labels(decision.value).inc()  # stored: the transaction committed
    return decided


def _where_next(
    decided_from: ReviewState,
    decision: ReviewDecision,
    *,
    first: ReviewDecision | None,
    sampled: bool,
) -> tuple[ReviewState, str | None, bool | None]:
    """Where a decided case goes: (its state, why, whether it agrees with the first
    decision of a blind second review)."""
    if decided_from == ReviewState.ESCALATED:
        return ReviewState.DECIDED, None, None  # an admin's ruling is final
    if decision == ReviewDecision.UNSURE:
        return ReviewState.ESCALATED, "unsure", None
    if first is not None:
        if first == decision:
            return ReviewState.DECIDED, None, True
        return ReviewState.ESCALATED, "the two moderators disagree", False
    if sampled:
        return ReviewState.OPEN, "sampled for a blind second review", None
    return ReviewState.DECIDED, None, None


def _sampled(share: float, rng: random.Random | None) -> bool:
    if share <= 0:
        return False
    return (rng or _SYSTEM_RANDOM).random() < share


_SYSTEM_RANDOM = random.SystemRandom()


def case_id_for_sha256(session_factory: sessionmaker[Session], sha256: str) -> int:
    with session_factory() as session:
        image = repository.image_by_sha256(session, sha256)
        case = repository.case_for_image(session, image.id) if image is not None else None
        if case is None:
            raise ReviewRefused(404, "not-found", "no review case for an image with this sha256")
        return case.id


@dataclass(frozen=True)
class CasePicture:
    """Which image a case shows, and whether the viewer holds its live lease (the full
    picture is shown to the holder and to admins; a thumbnail to any moderator)."""

    case_id: int
    image_id: int
    sha256: str
    held_by_viewer: bool


def case_picture(
    session_factory: sessionmaker[Session], case_id: int, reviewer: Reviewer
) -> CasePicture:
    now = utcnow()
    with session_factory() as session:
        case = _locked_case(session, case_id)
        image = repository.get_image(session, case.image_id)
        assert image is not None
        return CasePicture(
            case_id=case.id,
            image_id=image.id,
            sha256=image.sha256,
            held_by_viewer=case.assignee == reviewer.actor and _live(case, now),
        )


# --- reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QueuePage:
    rows: list[QueueRow]
    total: int
    counts: dict[ReviewState, int]
    live_claims: int
    filter_values: dict[str, list[str]]
    actor_names: dict[str, str] = field(default_factory=dict)  # token:<id> -> its name


def queue(
    session_factory: sessionmaker[Session],
    filters: QueueFilter,
    *,
    page: int = 1,
    per_page: int = 25,
) -> QueuePage:
    """One page of the queue in priority order, with the counts of cases per state."""
    expire_leases(session_factory)
    with session_factory() as session:
        counts = repository.state_counts(session)
        # Filtered by state alone, the counts per state already say how many match.
        by_state = filters.by_state_only
        rows, total = repository.queue_page(
            session,
            filters,
            offset=(max(page, 1) - 1) * per_page,
            limit=per_page,
            count=not by_state,
        )
        if by_state:
            total = sum(counts[state] for state in set(filters.states))
        return QueuePage(
            rows=rows,
            total=total,
            counts=counts,
            live_claims=counts[ReviewState.CLAIMED],
            filter_values=repository.signal_values(session),
            actor_names=repository.actor_names(session, (r.assignee or "" for r in rows)),
        )


@dataclass(frozen=True)
class DetectorEvidence:
    name: str
    version: str
    weights_sha256: str | None
    score: float | None
    error: str | None
    summary: str | None
    findings: list[dict[str, Any]]
    problems: list[str]


@dataclass(frozen=True)
class CaseView:
    case: ReviewCase
    sha256: str
    size_bytes: int
    format: str | None
    opened_by: Verdict
    current: Verdict | None
    detectors: list[DetectorEvidence]
    sources: list[Source]
    decisions: list[ReviewDecisionRecord]
    history: list[AuditEvent]
    held_by_viewer: bool
    blind: bool  # earlier decisions of this case are hidden from the viewer
    notice: str = INDICATION_NOT_PROOF
    lease_seconds_left: float | None = None
    hidden_decisions: int = 0
    actor_names: dict[str, str] = field(default_factory=dict)  # token:<id> -> its name


def case_view(
    session_factory: sessionmaker[Session],
    case_id: int,
    reviewer: Reviewer,
    policy: ReviewPolicy,
) -> CaseView:
    """Everything the case page shows: the evidence, where the bytes were seen, earlier
    decisions (hidden from everyone while a blind second review is open) and the case's
    history."""
    now = utcnow()
    with session_factory() as session:
        case = repository.get_case(session, case_id)
        if case is None:
            raise ReviewRefused(404, "not-found", "no such review case")
        image = repository.get_image(session, case.image_id)
        assert image is not None
        pair = repository.with_verdicts(
            session, case.image_id, ensemble_version=policy.active_ensemble
        )
        assert pair is not None
        decisions = list(repository.decisions_of_case(session, case.id))
        # While the second review is open nobody, admins included, sees the first decision
        # or who made it: whoever looks may be the one asked to review it next.
        blind = repository.in_blind_review(case)
        history = list(repository.audit_trail(session, AUDIT_SUBJECT, [case.id]))
        deciders = {d.actor for d in decisions} if blind else set()
        if blind:
            history = [_redacted(event, deciders) for event in history]
        actors = [case.assignee or "", *(e.actor for e in history)]
        if not blind:
            actors += [d.actor for d in decisions]
        names = repository.actor_names(session, actors)
        detections = list(repository.detections_for_image(session, case.image_id))
        sources = list(repository.sources_for_image(session, case.image_id))
        session.expunge_all()
    shown = [] if blind else decisions
    return CaseView(
        case=case,
        sha256=image.sha256,
        size_bytes=image.size_bytes,
        format=image.format,
        opened_by=pair.opened_by,
        current=pair.current,
        detectors=_evidence(detections, pair.current or pair.opened_by),
        sources=sources,
        decisions=shown,
        history=history,
        held_by_viewer=case.assignee == reviewer.actor and _live(case, now),
        blind=blind,
        lease_seconds_left=(as_utc(case.lease_expires_at) - now).total_seconds()
        if case.lease_expires_at is not None and case.assignee == reviewer.actor
        else None,
        hidden_decisions=len(decisions) - len(shown),
        actor_names=names,
    )


def _evidence(rows: list[Detection], verdict: Verdict) -> list[DetectorEvidence]:
    """Of the image's detections, each detector's answer that ``verdict`` combined (its
    name and version), or the newest answer of a detector the verdict did not name."""
    wanted = {d.get("name"): d.get("version") for d in verdict.detector_set.get("detectors", [])}
    chosen: dict[str, Detection] = {}
    for row in sorted(rows, key=lambda d: d.id):
        if wanted.get(row.detector_name) in (None, row.detector_version) or (
            row.detector_name not in chosen
        ):
            chosen[row.detector_name] = row
    return [
        DetectorEvidence(
            name=d.detector_name,
            version=d.detector_version,
            weights_sha256=d.weights_sha256,
            score=d.score,
            error=d.error,
            summary=d.evidence.get("summary") if isinstance(d.evidence, dict) else None,
            findings=[i for i in d.evidence.get("items", []) if isinstance(i, dict)],
            problems=[str(e) for e in d.evidence.get("errors", [])],
        )
        for d in sorted(chosen.values(), key=lambda d: d.detector_name)
    ]


HIDDEN = "(hidden during a blind second review)"


def _redacted(event: AuditEvent, deciders: set[str]) -> AuditEvent:
    """``event`` as the case page shows it during a blind second review: who decided, and
    what, is hidden."""
    actor = HIDDEN if event.actor in deciders else event.actor
    details = event.details
    if event.action == "review_case.decided":
        details = {k: v for k, v in details.items() if k == "from_state"}
    if actor == event.actor and details is event.details:
        return event
    return AuditEvent(
        id=event.id,
        at=event.at,
        actor=actor,
        action=event.action,
        subject_type=event.subject_type,
        subject_id=event.subject_id,
        details=details,
    )


# --- reports and labelled examples -----------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    cases: int  # decided independently by two moderators
    agreed: int

    @property
    def share(self) -> float | None:
        return self.agreed / self.cases if self.cases else None


def backlog(
    session_factory: sessionmaker[Session], *, now: datetime | None = None
) -> metrics.ReviewBacklog:
    """The cases somebody still has to finish, by state, and how long the oldest open one
    has waited (the review gauges the reconciler exports)."""
    now = now or utcnow()
    with session_factory() as session:
        counts, oldest = repository.backlog_counts(session, UNFINISHED_STATES)
    age = None if oldest is None else max(0.0, (now - as_utc(oldest)).total_seconds())
    return metrics.ReviewBacklog(
        cases={state.value: count for state, count in counts.items()}, oldest_open_age_s=age
    )


def agreement(session_factory: sessionmaker[Session]) -> Agreement:
    with session_factory() as session:
        pairs = repository.double_reviews(session)
    return Agreement(cases=len(pairs), agreed=sum(1 for _, a, b in pairs if a == b))


def moderator_tallies(session_factory: sessionmaker[Session]) -> list[repository.ModeratorTally]:
    with session_factory() as session:
        return repository.decision_tallies(session)


@dataclass(frozen=True)
class LabelledExample:
    """A decided case as a labelled example for calibration: the bytes (sha256), where they
    were seen, the scores and versions the deciding moderator was shown, and the label."""

    sha256: str
    label: ReviewDecision
    decided_at: str
    decided_by: str
    ensemble_version: str | None
    ai_score: float | None
    detectors: list[dict[str, Any]]  # name, version, score (at decision time)
    sources: list[str]

    def as_row(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "label": self.label.value,
            "decided_at": self.decided_at,
            "decided_by": self.decided_by,
            "ensemble_version": self.ensemble_version,
            "ai_score": self.ai_score,
            "detectors": self.detectors,
            "sources": self.sources,
        }


def labelled_examples(
    session_factory: sessionmaker[Session], *, page_size: int = 500
) -> Iterator[LabelledExample]:
    """Every decided case, oldest first, read a page at a time."""
    after = 0
    while True:
        with session_factory() as session:
            rows = repository.decided_cases(session, after_id=after, limit=page_size)
            if not rows:
                return
            examples = []
            for case, image, record in rows:
                after = case.id
                verdict_id = record.verdict_id if record is not None else case.verdict_id
                verdict = session.get(Verdict, verdict_id) if verdict_id is not None else None
                places = [_place(s) for s in repository.sources_for_image(session, image.id)]
                assert case.decision is not None
                examples.append(
                    LabelledExample(
                        sha256=image.sha256,
                        label=case.decision,
                        decided_at=as_utc(case.decided_at or case.opened_at).isoformat(),
                        decided_by=record.actor if record is not None else case.assignee or "",
                        ensemble_version=verdict.ensemble_version if verdict else None,
                        ai_score=verdict.ai_score if verdict else None,
                        detectors=[
                            {
                                "name": d.get("name"),
                                "version": d.get("version"),
                                "score": d.get("score"),
                            }
                            for d in (verdict.detector_set.get("detectors", []) if verdict else [])
                        ],
                        sources=places,
                    )
                )
        yield from examples


def _place(source: Source) -> str:
    if source.bucket and source.object_key:
        return f"s3://{source.bucket}/{source.object_key}"
    return source.local_path or source.ref_key


# --- helpers ----------------------------------------------------------------------------


def _live(case: ReviewCase, now: datetime) -> bool:
    return (
        case.state in repository.HELD_STATES
        and case.assignee is not None
        and case.lease_expires_at is not None
        and as_utc(case.lease_expires_at) > now
    )


def _locked_case(session: Session, case_id: int) -> ReviewCase:
    case = repository.get_case(session, case_id)
    if case is None:
        raise ReviewRefused(404, "not-found", "no such review case")
    return case


def _decided_by(session: Session, case: ReviewCase, actor: str) -> bool:
    return any(d.actor == actor for d in repository.decisions_of_case(session, case.id))


def _claim_of(session: Session, case: ReviewCase) -> Claim:
    image = repository.get_image(session, case.image_id)
    assert image is not None and case.lease_expires_at is not None
    return Claim(
        case_id=case.id,
        sha256=image.sha256,
        state=case.state,
        lease_expires_at=as_utc(case.lease_expires_at),
    )


def _audit(session: Session, case: ReviewCase, actor: str, action: str, **details: Any) -> None:
    repository.append_audit(
        session,
        actor=actor,
        action=action,
        subject_type=AUDIT_SUBJECT,
        subject_id=case.id,
        details={k: (v.value if isinstance(v, ReviewState) else v) for k, v in details.items()},
    )
