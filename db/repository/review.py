"""Review cases: one per flagged image, following the verdicts stored for it, and the
moderators' work on them (claims, decisions, the queue they pick from).

A case is opened by the first verdict that flags the image. A later verdict under the
active ensemble configuration that finds no indication, with every detector answering,
withdraws the case while nobody holds it and nobody has decided it yet; one that flags the
image again reopens it. A verdict without evidence (inconclusive, or a detector failed)
never withdraws a case, nor does one under a configuration that is not the active one (an
ad-hoc scan with its own threshold): they may only open cases. A claimed, escalated or
decided case keeps its state: the moderator's work is never taken away or undone by a
re-score.

Claims are leases: ``assignee`` holds the case until ``lease_expires_at``. Every change of
a case's state is a conditional UPDATE on the state it was read in (and, for a claim, on
its holder), so two moderators racing for one case never both win, on PostgreSQL and on
SQLite alike.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Select,
    Table,
    and_,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from db.models import (
    ApiToken,
    Detection,
    Ensemble,
    Image,
    ReviewCase,
    ReviewCaseSignal,
    ReviewDecision,
    ReviewDecisionRecord,
    ReviewState,
    Source,
    Verdict,
    VerdictLabel,
    utcnow,
)
from db.repository._sql import insert_ignore, insert_ignore_rows
from db.repository.audit import append_audit, append_audits

# The queue's order: each point of score moves a case this much earlier than the time it
# opened, so a 0.9 waits behind a 0.5 only if the 0.5 has waited ~10 hours longer. A case
# without a score (a refused file sent to review) ranks as an even chance.
SCORE_HOURS = 24.0
NO_SCORE = 0.5

# The states a moderator's claim may start from, and where an expired or released claim
# goes back to: a claimed open case is CLAIMED; an escalated case keeps its state while an
# admin holds it.
HELD_STATES = (ReviewState.CLAIMED, ReviewState.ESCALATED)


# A case sampled for a second review (reviews_required 2) waits for it in these states:
# meanwhile nobody may see the first decision or who made it.
BLIND_REVIEW_STATES = (ReviewState.OPEN, ReviewState.CLAIMED)


def in_blind_review(case: ReviewCase) -> bool:
    return case.reviews_required == 2 and case.state in BLIND_REVIEW_STATES


def queue_key(opened_at: datetime, score: float | None) -> datetime:
    return opened_at - timedelta(hours=(NO_SCORE if score is None else score) * SCORE_HOURS)


def case_for_image(session: Session, image_id: int) -> ReviewCase | None:
    return session.execute(
        select(ReviewCase).where(ReviewCase.image_id == image_id)
    ).scalar_one_or_none()


def cases_for_images(session: Session, image_ids: Iterable[int]) -> dict[int, ReviewCase]:
    """The review cases of several images in one query, by image id."""
    ids = sorted(set(image_ids))
    if not ids:
        return {}
    rows = session.execute(select(ReviewCase).where(ReviewCase.image_id.in_(ids))).scalars()
    return {case.image_id: case for case in rows}


def get_case(session: Session, case_id: int) -> ReviewCase | None:
    return session.get(ReviewCase, case_id)


def follow_verdict(
    session: Session, verdict: Verdict, *, actor: str, active: bool = True
) -> ReviewCase | None:
    """Bring the image's review case in line with ``verdict``, just stored or computed
    again; ``active``: the verdict is under the active ensemble configuration. Idempotent: a
    verdict the case already agrees with changes nothing."""
    if verdict.flagged:
        now = utcnow()
        opened = insert_ignore(session, ReviewCase, _new_case(verdict, now))
        case = _case(session, verdict.image_id)
        if opened:
            _set_signals(session, case, verdict)
            _audit(session, case, "review_case.opened", verdict, actor)
        elif _transition(
            session,
            case,
            ReviewState.WITHDRAWN,
            state=ReviewState.OPEN,
            verdict_id=verdict.id,
            opened_at=now,
            score=verdict.ai_score,
            queue_key=queue_key(now, verdict.ai_score),
            assignee=None,
            claimed_at=None,
            lease_expires_at=None,
        ):
            _set_signals(session, case, verdict)
            _audit(session, case, "review_case.reopened", verdict, actor)
        return case
    if not (active and _clears(verdict)):
        return case_for_image(session, verdict.image_id)
    existing = case_for_image(session, verdict.image_id)
    undecided = ~exists().where(ReviewDecisionRecord.case_id == ReviewCase.id)
    if existing is not None and _transition(
        session, existing, ReviewState.OPEN, undecided, state=ReviewState.WITHDRAWN
    ):
        _audit(session, existing, "review_case.withdrawn", verdict, actor)
    return existing


def follow_verdicts(
    session: Session, verdicts: Sequence[Verdict], *, actor: str, active: bool = True
) -> None:
    """``follow_verdict`` for several verdicts, in a few statements for the group: the
    images' cases are read at once, and the cases the group opens are inserted, given their
    signals and audited together. A verdict that may change an existing case (reopen or
    withdraw it) takes the one-at-a-time way."""
    unique = list({verdict.id: verdict for verdict in verdicts}.values())
    cases = cases_for_images(session, (verdict.image_id for verdict in unique))
    to_open: dict[int, Verdict] = {}
    one_by_one: list[Verdict] = []
    for verdict in unique:
        image_id = verdict.image_id
        if verdict.flagged and image_id not in cases and image_id not in to_open:
            to_open[image_id] = verdict
        elif (
            image_id in to_open  # a later verdict for an image whose case the group opens
            or verdict.flagged
            or (active and _clears(verdict) and image_id in cases)
        ):
            one_by_one.append(verdict)
    now = utcnow()
    opened = {
        image_id: case_id
        for case_id, image_id in insert_ignore_rows(
            session,
            ReviewCase,
            [_new_case(to_open[image_id], now) for image_id in sorted(to_open)],
            returning=(ReviewCase.id, ReviewCase.image_id),
        )
    }
    signals = _signals_of(session, [to_open[image_id] for image_id in opened])
    rows = [
        {"case_id": case_id, "kind": kind, "value": value}
        for image_id, case_id in sorted(opened.items())
        for kind, value in sorted(signals[image_id])
    ]
    if rows:
        session.execute(insert(_table(ReviewCaseSignal)), rows)
    append_audits(
        session,
        [
            _audit_event(case_id, "review_case.opened", to_open[image_id], actor)
            for image_id, case_id in sorted(opened.items())
        ],
    )
    # Opened meanwhile by a transaction that did not hold the image's lock: the usual way.
    missed = [verdict for image_id, verdict in to_open.items() if image_id not in opened]
    for verdict in missed + one_by_one:
        follow_verdict(session, verdict, actor=actor, active=active)


def _new_case(verdict: Verdict, now: datetime) -> dict[str, Any]:
    return {
        "verdict_id": verdict.id,
        "image_id": verdict.image_id,
        "state": ReviewState.OPEN,
        "opened_at": now,
        "score": verdict.ai_score,
        "queue_key": queue_key(now, verdict.ai_score),
    }


def _table(model: type[ReviewCaseSignal]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


# --- filters ----------------------------------------------------------------------------


def case_signals(session: Session, verdict: Verdict) -> set[tuple[str, str]]:
    """What the queue filters a case by: each detector whose score reached the verdict's
    threshold ("fired"), each provenance kind with a generative-AI finding, each kind of
    place the bytes came from."""
    return _signals_of(session, [verdict])[verdict.image_id]


def _signals_of(session: Session, verdicts: Sequence[Verdict]) -> dict[int, set[tuple[str, str]]]:
    """``case_signals`` of several verdicts (of distinct images) in two queries, by image."""
    signals: dict[int, set[tuple[str, str]]] = {verdict.image_id: set() for verdict in verdicts}
    if not signals:
        return signals
    for verdict in verdicts:
        threshold = 0.5
        if verdict.ensemble_id is not None:
            ensemble = session.get(Ensemble, verdict.ensemble_id)
            if ensemble is not None:
                threshold = float(ensemble.definition.get("threshold", threshold))
        for entry in verdict.detector_set.get("detectors", []):
            score = entry.get("score")
            if isinstance(score, int | float) and score >= threshold:
                signals[verdict.image_id].add(("detector", str(entry.get("name"))[:128]))
    image_ids = sorted(signals)
    evidence = session.execute(
        select(Detection.image_id, Detection.evidence).where(Detection.image_id.in_(image_ids))
    )
    for image_id, document in evidence:
        for item in document.get("items", []) or []:
            if isinstance(item, dict) and item.get("ai") and isinstance(item.get("kind"), str):
                signals[image_id].add(("provenance", item["kind"][:128]))
    kinds = session.execute(
        select(Source.image_id, Source.kind).where(Source.image_id.in_(image_ids)).distinct()
    )
    for image_id, kind in kinds:
        if image_id is not None:
            signals[image_id].add(("source", kind.value))
    return signals


def _set_signals(session: Session, case: ReviewCase, verdict: Verdict) -> None:
    session.execute(delete(ReviewCaseSignal).where(ReviewCaseSignal.case_id == case.id))
    for kind, value in sorted(case_signals(session, verdict)):
        session.add(ReviewCaseSignal(case_id=case.id, kind=kind, value=value))
    session.flush()


SIGNAL_KINDS = ("detector", "provenance", "source")

# The distinct values of one kind of signal, read from the (kind, value) index one value at
# a time (a "loose index scan"): as cheap with a million cases as with ten, where DISTINCT
# reads every row.
_VALUES_OF_KIND = text(
    """
    WITH RECURSIVE found(value) AS (
        SELECT min(value) FROM review_case_signals WHERE kind = :kind
        UNION ALL
        SELECT (
            SELECT min(s.value) FROM review_case_signals s
            WHERE s.kind = :kind AND s.value > found.value
        )
        FROM found WHERE found.value IS NOT NULL
    )
    SELECT value FROM found WHERE value IS NOT NULL
    """
)


def signal_values(session: Session) -> dict[str, list[str]]:
    """Every value each filter can take, for the queue's filter form."""
    values: dict[str, list[str]] = {}
    for kind in SIGNAL_KINDS:
        found = list(session.execute(_VALUES_OF_KIND, {"kind": kind}).scalars())
        if found:
            values[kind] = found
    return values


# --- the queue --------------------------------------------------------------------------


_S = TypeVar("_S", bound=Select[*tuple[Any, ...]])


@dataclass(frozen=True)
class QueueFilter:
    states: tuple[ReviewState, ...] = (ReviewState.OPEN, ReviewState.CLAIMED)
    min_score: float | None = None
    detector: str | None = None
    provenance: str | None = None
    source: str | None = None

    @property
    def by_state_only(self) -> bool:
        return self.min_score is None and not (self.detector or self.provenance or self.source)


@dataclass(frozen=True)
class QueueRow:
    case_id: int
    sha256: str
    state: ReviewState
    score: float | None
    opened_at: datetime
    queue_key: datetime
    assignee: str | None
    lease_expires_at: datetime | None
    reviews_required: int
    decision: ReviewDecision | None
    signals: tuple[tuple[str, str], ...] = field(default=())


def _filtered(
    statement: _S, filters: QueueFilter, states: tuple[ReviewState, ...] | None = None
) -> _S:
    statement = statement.where(ReviewCase.state.in_(states or filters.states))
    if filters.min_score is not None:
        statement = statement.where(ReviewCase.score >= filters.min_score)
    for kind, value in (
        ("detector", filters.detector),
        ("provenance", filters.provenance),
        ("source", filters.source),
    ):
        if value:
            statement = statement.where(
                exists().where(
                    ReviewCaseSignal.case_id == ReviewCase.id,
                    ReviewCaseSignal.kind == kind,
                    ReviewCaseSignal.value == value,
                )
            )
    return statement


def queue_page(
    session: Session, filters: QueueFilter, *, offset: int, limit: int, count: bool = True
) -> tuple[list[QueueRow], int]:
    """One page of the queue in priority order (``queue_key``), and how many cases match
    (``count=False``: not counted, -1; a caller holding the counts per state knows it)."""
    total = (
        session.execute(
            _filtered(select(func.count()).select_from(ReviewCase), filters)
        ).scalar_one()
        if count
        else -1
    )
    # One index range per state, each cut at the page's end, then merged: Postgres would
    # otherwise sort every case in the states asked for to find the first few.
    if not filters.states:
        return [], 0
    # (Each range is wrapped in a SELECT of its own: SQLite allows no LIMIT on a member of
    # a UNION otherwise.)
    per_state = [
        select(ranged.c.id, ranged.c.queue_key)
        for ranged in (
            _filtered(select(ReviewCase.id, ReviewCase.queue_key), filters, (state,))
            .order_by(ReviewCase.queue_key, ReviewCase.id)
            .limit(offset + limit)
            .subquery()
            for state in dict.fromkeys(filters.states)
        )
    ]
    merged = union_all(*per_state).subquery()
    page = (
        select(merged.c.id)
        .order_by(merged.c.queue_key, merged.c.id)
        .offset(offset)
        .limit(limit)
        .subquery()
    )
    rows = session.execute(
        select(ReviewCase, Image.sha256)
        .join(page, page.c.id == ReviewCase.id)
        .join(Image, Image.id == ReviewCase.image_id)
        .order_by(ReviewCase.queue_key, ReviewCase.id)
    ).all()
    ids = [case.id for case, _ in rows]
    signals: dict[int, list[tuple[str, str]]] = {}
    if ids:
        for case_id, kind, value in session.execute(
            select(ReviewCaseSignal.case_id, ReviewCaseSignal.kind, ReviewCaseSignal.value)
            .where(ReviewCaseSignal.case_id.in_(ids))
            .order_by(ReviewCaseSignal.kind, ReviewCaseSignal.value)
        ):
            signals.setdefault(case_id, []).append((kind, value))
    return [
        QueueRow(
            case_id=case.id,
            sha256=sha256,
            state=case.state,
            score=case.score,
            opened_at=case.opened_at,
            queue_key=case.queue_key,
            assignee=case.assignee,
            lease_expires_at=case.lease_expires_at,
            reviews_required=case.reviews_required,
            decision=case.decision,
            signals=tuple(signals.get(case.id, ())),
        )
        for case, sha256 in rows
    ], int(total)


def state_counts(session: Session) -> dict[ReviewState, int]:
    rows = session.execute(select(ReviewCase.state, func.count()).group_by(ReviewCase.state))
    counts = dict.fromkeys(ReviewState, 0)
    counts.update({state: int(n) for state, n in rows})
    return counts


def backlog_counts(
    session: Session, states: Sequence[ReviewState]
) -> tuple[dict[ReviewState, int], datetime | None]:
    """How many cases are in each of ``states`` (unfinished ones: a range of the (state,
    opened_at) index, never the decided history), and when the oldest open case opened."""
    rows = session.execute(
        select(ReviewCase.state, func.count())
        .where(ReviewCase.state.in_(states))
        .group_by(ReviewCase.state)
    )
    counts = dict.fromkeys(states, 0)
    counts.update({state: int(n) for state, n in rows})
    oldest = session.scalar(
        select(func.min(ReviewCase.opened_at)).where(ReviewCase.state == ReviewState.OPEN)
    )
    return counts, oldest


# --- leases -----------------------------------------------------------------------------


def _live(now: datetime) -> Any:
    return and_(ReviewCase.assignee.is_not(None), ReviewCase.lease_expires_at > now)


def held_by(session: Session, actor: str, now: datetime) -> ReviewCase | None:
    """The case ``actor`` holds a live lease on, if any (one job per moderator)."""
    return (
        session.execute(
            select(ReviewCase)
            .where(ReviewCase.assignee == actor, ReviewCase.state.in_(HELD_STATES), _live(now))
            .order_by(ReviewCase.id)
            .limit(1)
        )
        .scalars()
        .first()
    )


def expired_leases(
    session: Session, now: datetime, *, holder: str | None = None, limit: int = 100
) -> Sequence[ReviewCase]:
    """Cases whose holder's lease ran out (``holder``: only theirs), locked (others' expiry
    passes skip them)."""
    statement = (
        select(ReviewCase)
        .where(
            ReviewCase.state.in_(HELD_STATES),
            ReviewCase.assignee.is_not(None),
            ReviewCase.lease_expires_at <= now,
        )
        .order_by(ReviewCase.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if holder is not None:
        statement = statement.where(ReviewCase.assignee == holder)
    return session.execute(statement).scalars().all()


def next_candidate(
    session: Session, actor: str, *, exclude: Iterable[int] = ()
) -> ReviewCase | None:
    """The first open case in priority order that ``actor`` may take: never one they have
    decided already (a blind second review goes to somebody else), locked without waiting
    for a case another moderator is taking right now. One row at a time: a moderator
    locking several would hide them from everybody else meanwhile."""
    decided_by_actor = exists().where(
        ReviewDecisionRecord.case_id == ReviewCase.id, ReviewDecisionRecord.actor == actor
    )
    statement = (
        select(ReviewCase)
        .where(ReviewCase.state == ReviewState.OPEN, ~decided_by_actor)
        .order_by(ReviewCase.queue_key, ReviewCase.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    excluded = list(exclude)
    if excluded:
        statement = statement.where(ReviewCase.id.not_in(excluded))
    return session.execute(statement).scalars().first()


class Lease(enum.Enum):
    TAKEN = "taken"
    GONE = "gone"  # somebody else holds it, or the case moved on meanwhile
    BUSY = "busy"  # the moderator holds another case (the one-job index refused)


def take_lease(
    session: Session, case: ReviewCase, actor: str, *, now: datetime, until: datetime
) -> Lease:
    """Claim ``case`` for ``actor`` until ``until``: an open case becomes claimed; an
    escalated one stays escalated with a holder. Never a second held case for the same
    moderator, even from a request of theirs racing this one: the update itself requires
    that they hold no other case, and on PostgreSQL, where a concurrent transaction's claim
    is not visible to it, the one-job index refuses what the condition cannot see (under a
    SAVEPOINT, so the refusal leaves the transaction usable). SQLite has one writer at a
    time, so there the condition alone is atomic; and no SAVEPOINT is used there, since
    pysqlite would commit the claim when it is released."""
    other = aliased(ReviewCase)
    holds_no_other = ~exists().where(
        other.assignee == actor, other.state.in_(HELD_STATES), other.id != case.id
    )
    if session.get_bind().dialect.name == "sqlite":
        taken = _take(session, case, actor, holds_no_other, now=now, until=until)
    else:
        try:
            with session.begin_nested():
                taken = _take(session, case, actor, holds_no_other, now=now, until=until)
        except IntegrityError:
            return Lease.BUSY
    if taken:
        return Lease.TAKEN
    held_elsewhere = not session.execute(select(holds_no_other)).scalar_one()
    return Lease.BUSY if held_elsewhere else Lease.GONE


def _take(
    session: Session,
    case: ReviewCase,
    actor: str,
    *conditions: Any,
    now: datetime,
    until: datetime,
) -> bool:
    if case.state == ReviewState.OPEN:
        return _transition(
            session,
            case,
            ReviewState.OPEN,
            *conditions,
            state=ReviewState.CLAIMED,
            assignee=actor,
            claimed_at=now,
            lease_expires_at=until,
        )
    if case.state in HELD_STATES:
        free = or_(
            ReviewCase.assignee.is_(None),
            ReviewCase.assignee == actor,
            ReviewCase.lease_expires_at <= now,
        )
        return _transition(
            session,
            case,
            case.state,
            free,
            *conditions,
            assignee=actor,
            claimed_at=now,
            lease_expires_at=until,
        )
    return False


def renew_lease(
    session: Session, case: ReviewCase, actor: str, *, now: datetime, until: datetime
) -> bool:
    """Extend ``actor``'s live lease; False when they do not hold one on the case."""
    return _transition(
        session,
        case,
        case.state,
        ReviewCase.assignee == actor,
        ReviewCase.lease_expires_at > now,
        ReviewCase.state.in_(HELD_STATES),
        lease_expires_at=until,
    )


def drop_lease(
    session: Session, case: ReviewCase, *, holder: str, lapsed_at: datetime | None = None
) -> bool:
    """Give the case back to the queue it was taken from, if ``holder`` still holds it
    (``lapsed_at``: and only if their lease had run out by then, so an expiry pass never
    takes back a claim made after it looked). A claimed case is open again; an escalated
    one waits for an admin again."""
    if case.state not in HELD_STATES:
        return False
    conditions = [ReviewCase.assignee == holder]
    if lapsed_at is not None:
        conditions.append(ReviewCase.lease_expires_at <= lapsed_at)
    back = ReviewState.OPEN if case.state == ReviewState.CLAIMED else ReviewState.ESCALATED
    return _transition(
        session,
        case,
        case.state,
        *conditions,
        state=back,
        assignee=None,
        claimed_at=None,
        lease_expires_at=None,
    )


# --- decisions --------------------------------------------------------------------------


def decisions_of_case(session: Session, case_id: int) -> Sequence[ReviewDecisionRecord]:
    return (
        session.execute(
            select(ReviewDecisionRecord)
            .where(ReviewDecisionRecord.case_id == case_id)
            .order_by(ReviewDecisionRecord.id)
        )
        .scalars()
        .all()
    )


def record_decision(
    session: Session,
    case: ReviewCase,
    *,
    actor: str,
    decision: ReviewDecision,
    note: str | None,
    verdict_id: int | None,
    blind: bool,
    now: datetime,
) -> ReviewDecisionRecord:
    row = ReviewDecisionRecord(
        case_id=case.id,
        actor=actor,
        decision=decision,
        note=note,
        from_state=case.state.value,
        verdict_id=verdict_id,
        blind=blind,
        decided_at=now,
    )
    session.add(row)
    session.flush()
    return row


def move_held_case(
    session: Session, case: ReviewCase, actor: str, *, now: datetime, **values: object
) -> bool:
    """Change a case ``actor`` holds a live lease on (a decision); False when they do not
    hold it any more (it expired and somebody else took it, or it was decided)."""
    return _transition(
        session,
        case,
        case.state,
        ReviewCase.assignee == actor,
        ReviewCase.lease_expires_at > now,
        ReviewCase.state.in_(HELD_STATES),
        **values,
    )


@dataclass(frozen=True)
class ModeratorTally:
    actor: str
    name: str | None
    decisions: dict[ReviewDecision, int]
    total: int


def decision_tallies(session: Session) -> list[ModeratorTally]:
    """Decisions per moderator, with the token's name where the actor is a token."""
    # A first decision whose blind second review is still open is not counted yet: the
    # admin reading this page may be the one asked to review that case.
    in_blind_review = and_(
        ReviewCase.reviews_required == 2, ReviewCase.state.in_(BLIND_REVIEW_STATES)
    )
    rows = session.execute(
        select(ReviewDecisionRecord.actor, ReviewDecisionRecord.decision, func.count())
        .join(ReviewCase, ReviewCase.id == ReviewDecisionRecord.case_id)
        .where(~in_blind_review)
        .group_by(ReviewDecisionRecord.actor, ReviewDecisionRecord.decision)
        .order_by(ReviewDecisionRecord.actor)
    ).all()
    by_actor: dict[str, dict[ReviewDecision, int]] = {}
    for actor, decision, n in rows:
        by_actor.setdefault(actor, {})[decision] = int(n)
    names = actor_names(session, by_actor)
    return [
        ModeratorTally(
            actor=actor,
            name=names.get(actor),
            decisions=counts,
            total=sum(counts.values()),
        )
        for actor, counts in by_actor.items()
    ]


def actor_names(session: Session, actors: Iterable[str]) -> dict[str, str]:
    """The names of the tokens behind audited actors (``token:<public id>``)."""
    public_ids = {a.removeprefix("token:") for a in actors if a and a.startswith("token:")}
    if not public_ids:
        return {}
    rows = session.execute(
        select(ApiToken.public_id, ApiToken.name).where(ApiToken.public_id.in_(public_ids))
    )
    return {f"token:{public_id}": name for public_id, name in rows}


def double_reviews(session: Session) -> list[tuple[int, ReviewDecision, ReviewDecision]]:
    """Cases decided by two moderators independently (the blind second review): the case
    and the first two decisions that were not an admin's ruling on an escalation."""
    rows = session.execute(
        select(ReviewDecisionRecord.case_id, ReviewDecisionRecord.decision)
        .join(ReviewCase, ReviewCase.id == ReviewDecisionRecord.case_id)
        .where(
            ReviewCase.reviews_required == 2,
            ReviewDecisionRecord.from_state == ReviewState.CLAIMED.value,
        )
        .order_by(ReviewDecisionRecord.case_id, ReviewDecisionRecord.id)
    ).all()
    firsts: dict[int, list[ReviewDecision]] = {}
    for case_id, decision in rows:
        firsts.setdefault(case_id, []).append(decision)
    return [(case_id, d[0], d[1]) for case_id, d in firsts.items() if len(d) >= 2]


def decided_cases(session: Session, *, after_id: int = 0, limit: int = 500) -> Sequence[Any]:
    """Decided cases in id order after ``after_id``, with their image and the final
    decision's record (the verdict shown to the moderator who made it): the labelled
    examples, a page at a time."""
    final = (
        select(func.max(ReviewDecisionRecord.id))
        .where(ReviewDecisionRecord.case_id == ReviewCase.id)
        .correlate(ReviewCase)
        .scalar_subquery()
    )
    return session.execute(
        select(ReviewCase, Image, ReviewDecisionRecord)
        .join(Image, Image.id == ReviewCase.image_id)
        .outerjoin(ReviewDecisionRecord, ReviewDecisionRecord.id == final)
        .where(ReviewCase.state == ReviewState.DECIDED, ReviewCase.id > after_id)
        .order_by(ReviewCase.id)
        .limit(limit)
    ).all()


# --- helpers ----------------------------------------------------------------------------


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
    session: Session,
    case: ReviewCase,
    expected: ReviewState,
    *conditions: Any,
    **values: object,
) -> bool:
    """Change the case only if it is still in the ``expected`` state and meets
    ``conditions`` (a concurrent claim or decision wins); True if changed."""
    result = session.execute(
        update(ReviewCase)
        .where(ReviewCase.id == case.id, ReviewCase.state == expected, *conditions)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    changed = bool(getattr(result, "rowcount", 0))
    if changed:
        session.refresh(case)
    return changed


def _audit(session: Session, case: ReviewCase, action: str, verdict: Verdict, actor: str) -> None:
    append_audit(session, **_audit_event(case.id, action, verdict, actor))


def _audit_event(case_id: int, action: str, verdict: Verdict, actor: str) -> dict[str, Any]:
    return {
        "actor": actor,
        "action": action,
        "subject_type": "review_case",
        "subject_id": case_id,
        "details": {
            "verdict_id": verdict.id,
            "ensemble_version": verdict.ensemble_version,
            "flagged": verdict.flagged,
            "reason": verdict.reason,
        },
    }
