"""The review service on real Postgres: claim leases under concurrency, expiry, who may
decide, escalation, the blind second review and agreement, the labelled examples."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import (
    AuditEvent,
    ReviewCase,
    ReviewDecision,
    ReviewState,
    SourceKind,
    VerdictLabel,
    utcnow,
)
from db.repository import QueueFilter
from db.session import transaction
from workers import review

from conftest import DatabaseFactory, emptied_sessions

ENSEMBLE = repository.EnsembleRecord(
    "weighted-mean@" + "e" * 16, "e" * 64, {"rule": "weighted-mean", "threshold": 0.5}
)
POLICY = review.ReviewPolicy(active_ensemble=ENSEMBLE.version)
ANNA = review.Reviewer("token:anna")
BORIS = review.Reviewer("token:boris")
ADMIN = review.Reviewer("token:root", is_admin=True)
AI, HUMAN, UNSURE = (
    ReviewDecision.AI_GENERATED,
    ReviewDecision.NOT_AI_GENERATED,
    ReviewDecision.UNSURE,
)


@pytest.fixture(scope="module")
def review_database(committing_database: DatabaseFactory) -> str:
    return committing_database("review_service")


@pytest.fixture
def sessions(review_database: str) -> Iterator[sessionmaker[Session]]:
    yield from emptied_sessions(review_database)


def flag(
    sessions: sessionmaker[Session],
    n: int,
    *,
    score: float = 0.9,
    detectors: tuple[str, ...] = ("mj5",),
    source: SourceKind = SourceKind.CLI,
) -> list[int]:
    """``n`` flagged images with a review case each; returns the case ids."""
    ids = []
    with transaction(sessions) as session:
        ensemble = repository.register_ensemble(session, ENSEMBLE)
        for _ in range(n):
            sha = f"{random.getrandbits(256):064x}"
            image = repository.get_or_create_image(
                session, repository.ImageFacts(sha256=sha, size_bytes=10, format="PNG")
            )
            ref = repository.SourceRef(source, f"/x/{sha}.png@{sha}", local_path=f"/x/{sha}.png")
            repository.record_source(session, ref, image.id)
            record = repository.VerdictRecord(
                ensemble_id=ensemble.id,
                ensemble_version=ensemble.version,
                detector_set_digest=sha,
                detector_set={
                    "detectors": [
                        {"name": d, "version": "1", "score": score, "failed": False}
                        for d in detectors
                    ]
                },
                ai_score=score,
                label=VerdictLabel.LIKELY_AI,
                flagged=True,
                reason=f"ai_score {score:.2f} is at or above the review threshold 0.50",
            )
            repository.save_verdict(session, image.id, record, actor="t")
            case = repository.case_for_image(session, image.id)
            assert case is not None
            ids.append(case.id)
    return ids


def actions(sessions: sessionmaker[Session], case_id: int) -> list[str]:
    with sessions() as session:
        return [e.action for e in repository.audit_trail(session, "review_case", [case_id])]


def test_two_moderators_racing_for_next_never_get_the_same_case(
    sessions: sessionmaker[Session],
) -> None:
    cases = flag(sessions, 30)
    moderators = [review.Reviewer(f"token:m{i}") for i in range(6)]
    got: dict[str, list[int]] = {m.actor: [] for m in moderators}
    start = threading.Barrier(len(moderators))
    errors: list[BaseException] = []

    def work(reviewer: review.Reviewer) -> None:
        try:
            start.wait()
            while True:
                claim = review.claim_next(sessions, reviewer, POLICY)
                if claim is None:
                    return
                got[reviewer.actor].append(claim.case_id)
                review.decide(sessions, claim.case_id, AI, None, reviewer=reviewer, policy=POLICY)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(m,)) for m in moderators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    taken = [case for cases_of in got.values() for case in cases_of]
    assert sorted(taken) == sorted(cases), "every case claimed exactly once"
    assert sum(1 for ids in got.values() if ids) > 1, "the work was shared"
    with sessions() as session:
        decided = session.execute(select(ReviewCase.state)).scalars().all()
    assert set(decided) == {ReviewState.DECIDED}


def test_next_orders_by_score_and_age_and_gives_one_job_at_a_time(
    sessions: sessionmaker[Session],
) -> None:
    low, high = flag(sessions, 1, score=0.55)[0], flag(sessions, 1, score=0.95)[0]
    first = review.claim_next(sessions, ANNA, POLICY)
    assert first is not None and first.case_id == high
    again = review.claim_next(sessions, ANNA, POLICY)
    assert again is not None and again.case_id == high, "a held case is handed back"
    second = review.claim_next(sessions, BORIS, POLICY)
    assert second is not None and second.case_id == low
    with pytest.raises(review.ReviewRefused) as refused:
        review.claim(sessions, low, ANNA, POLICY)
    assert refused.value.status == 409 and refused.value.kind == "claimed"


def test_only_the_holder_of_a_live_lease_may_decide(sessions: sessionmaker[Session]) -> None:
    (case,) = flag(sessions, 1)
    with pytest.raises(review.ReviewRefused) as unclaimed:
        review.decide(sessions, case, AI, None, reviewer=ANNA, policy=POLICY)
    assert unclaimed.value.status == 409
    review.claim(sessions, case, ANNA, POLICY)
    with pytest.raises(review.ReviewRefused) as other:
        review.decide(sessions, case, HUMAN, None, reviewer=BORIS, policy=POLICY)
    assert other.value.status == 409 and other.value.kind == "not-holder"
    decided = review.decide(sessions, case, AI, "looks generated", reviewer=ANNA, policy=POLICY)
    assert decided.state == ReviewState.DECIDED and decided.decided_from == ReviewState.CLAIMED
    with pytest.raises(review.ReviewRefused) as twice:
        review.decide(sessions, case, AI, None, reviewer=ANNA, policy=POLICY)
    assert twice.value.kind == "not-in-review"
    assert actions(sessions, case) == [
        "review_case.opened",
        "review_case.claimed",
        "review_case.decided",
    ]


def test_an_abandoned_lease_returns_the_case_to_the_queue_audited(
    sessions: sessionmaker[Session],
) -> None:
    (case,) = flag(sessions, 1)
    short = review.ReviewPolicy(active_ensemble=ENSEMBLE.version, lease=timedelta(seconds=30))
    review.claim(sessions, case, ANNA, short)
    assert review.claim_next(sessions, BORIS, short) is None
    # The lease runs out: expiry is judged against the time it is given.
    assert review.expire_leases(sessions, now=utcnow() + timedelta(seconds=31)) == 1
    with sessions() as session:
        row = session.get(ReviewCase, case)
        assert row is not None and row.state == ReviewState.OPEN and row.assignee is None
        expired = session.execute(
            select(AuditEvent).where(AuditEvent.action == "review_case.lease_expired")
        ).scalar_one()
    assert expired.details["holder"] == ANNA.actor
    taken = review.claim_next(sessions, BORIS, short)
    assert taken is not None and taken.case_id == case
    with pytest.raises(review.ReviewRefused) as lost:
        review.renew(sessions, case, ANNA, short)
    assert lost.value.kind == "lease-lost"


def test_release_gives_the_case_back_and_renew_extends(sessions: sessionmaker[Session]) -> None:
    (case,) = flag(sessions, 1)
    first = review.claim(sessions, case, ANNA, POLICY)
    renewed = review.renew(sessions, case, ANNA, POLICY)
    assert renewed.lease_expires_at >= first.lease_expires_at
    with pytest.raises(review.ReviewRefused):
        review.release(sessions, case, BORIS)
    review.release(sessions, case, ANNA)
    taken = review.claim_next(sessions, BORIS, POLICY)
    assert taken is not None and taken.case_id == case
    assert "review_case.released" in actions(sessions, case)


def test_unsure_escalates_to_the_admins(sessions: sessionmaker[Session]) -> None:
    (case,) = flag(sessions, 1)
    review.claim(sessions, case, ANNA, POLICY)
    decided = review.decide(sessions, case, UNSURE, "cannot tell", reviewer=ANNA, policy=POLICY)
    assert decided.state == ReviewState.ESCALATED and decided.callbacks == 0
    assert review.claim_next(sessions, BORIS, POLICY) is None, "not in the moderators' queue"
    with pytest.raises(review.ReviewRefused) as moderator:
        review.claim(sessions, case, BORIS, POLICY)
    assert moderator.value.status == 403
    review.claim(sessions, case, ADMIN, POLICY)
    final = review.decide(sessions, case, HUMAN, None, reviewer=ADMIN, policy=POLICY)
    assert final.state == ReviewState.DECIDED and final.decided_from == ReviewState.ESCALATED
    assert actions(sessions, case)[-3:] == [
        "review_case.escalated",
        "review_case.claimed",
        "review_case.decided",
    ]


def test_blind_second_review_agreement_and_disagreement(sessions: sessionmaker[Session]) -> None:
    agree, disagree = flag(sessions, 2)
    always = review.ReviewPolicy(active_ensemble=ENSEMBLE.version, second_review_share=1.0)
    for case, second in ((agree, AI), (disagree, HUMAN)):
        review.claim(sessions, case, ANNA, always)
        first = review.decide(sessions, case, AI, "first", reviewer=ANNA, policy=always)
        assert first.state == ReviewState.OPEN and first.callbacks == 0
        with pytest.raises(review.ReviewRefused) as own:
            review.claim(sessions, case, ANNA, always)
        assert own.value.kind == "second-review"
        review.claim(sessions, case, BORIS, always)
        view = review.case_view(sessions, case, BORIS, always)
        assert view.blind and view.decisions == [] and view.hidden_decisions == 1
        assert all("first" not in str(e.details) for e in view.history)
        result = review.decide(sessions, case, second, None, reviewer=BORIS, policy=always)
        expected = ReviewState.DECIDED if second == AI else ReviewState.ESCALATED
        assert result.state == expected
    assert review.agreement(sessions) == review.Agreement(cases=2, agreed=1)
    tallies = {t.actor: t.total for t in review.moderator_tallies(sessions)}
    assert tallies == {ANNA.actor: 2, BORIS.actor: 2}
    admin_view = review.case_view(sessions, disagree, ADMIN, always)
    assert [d.decision for d in admin_view.decisions] == [AI, HUMAN]


def test_a_case_in_second_review_is_not_withdrawn_by_a_rescore(
    sessions: sessionmaker[Session],
) -> None:
    (case,) = flag(sessions, 1)
    always = review.ReviewPolicy(active_ensemble=ENSEMBLE.version, second_review_share=1.0)
    review.claim(sessions, case, ANNA, always)
    review.decide(sessions, case, AI, None, reviewer=ANNA, policy=always)
    with transaction(sessions) as session:
        row = session.get(ReviewCase, case)
        assert row is not None
        ensemble = repository.register_ensemble(session, ENSEMBLE)
        clean = repository.VerdictRecord(
            ensemble_id=ensemble.id,
            ensemble_version=ensemble.version,
            detector_set_digest="c" * 64,
            detector_set={"detectors": [{"name": "mj5", "version": "2", "score": 0.1}]},
            ai_score=0.1,
            label=VerdictLabel.NO_INDICATION,
            flagged=False,
            reason="below",
        )
        repository.save_verdict(session, row.image_id, clean, actor="t")
    with sessions() as session:
        row = session.get(ReviewCase, case)
        assert row is not None and row.state == ReviewState.OPEN


def test_queue_filters_order_and_counts(sessions: sessionmaker[Session]) -> None:
    mj = flag(sessions, 3, score=0.7, detectors=("mj5",))
    cf = flag(sessions, 2, score=0.95, detectors=("cf",), source=SourceKind.HOOK)
    page = review.queue(sessions, QueueFilter(), page=1, per_page=2)
    assert page.total == 5 and [r.case_id for r in page.rows] == cf
    assert page.counts[ReviewState.OPEN] == 5
    assert page.filter_values["detector"] == ["cf", "mj5"]
    only_mj = review.queue(sessions, QueueFilter(detector="mj5"), page=1, per_page=10)
    assert sorted(r.case_id for r in only_mj.rows) == sorted(mj)
    hooks = review.queue(sessions, QueueFilter(source="hook", min_score=0.9), page=1, per_page=10)
    assert sorted(r.case_id for r in hooks.rows) == sorted(cf)
    second_page = review.queue(sessions, QueueFilter(), page=3, per_page=2)
    assert len(second_page.rows) == 1


def test_labelled_examples_carry_what_the_moderator_saw(sessions: sessionmaker[Session]) -> None:
    (case,) = flag(sessions, 1, score=0.8, detectors=("mj5", "cf"))
    flag(sessions, 1)  # undecided: not an example
    review.claim(sessions, case, ANNA, POLICY)
    review.decide(sessions, case, AI, None, reviewer=ANNA, policy=POLICY)
    (example,) = review.labelled_examples(sessions)
    row = example.as_row()
    assert row["label"] == "ai_generated" and row["decided_by"] == ANNA.actor
    assert row["ai_score"] == 0.8 and row["ensemble_version"] == ENSEMBLE.version
    assert row["detectors"] == [
        {"name": "mj5", "version": "1", "score": 0.8},
        {"name": "cf", "version": "1", "score": 0.8},
    ]
    assert len(row["sources"]) == 1 and row["sources"][0].startswith("/x/")
    assert len(row["sha256"]) == 64


def test_one_moderator_racing_themselves_still_holds_one_case(
    sessions: sessionmaker[Session],
) -> None:
    """Two tabs, a double key press, a client retrying: one job at a time all the same."""
    cases = flag(sessions, 6)
    start = threading.Barrier(4)
    claims: list[int] = []
    refusals: list[str] = []

    def next_case() -> None:
        start.wait()
        claim = review.claim_next(sessions, ANNA, POLICY)
        assert claim is not None
        claims.append(claim.case_id)

    def this_case(case_id: int) -> None:
        start.wait()
        try:
            claims.append(review.claim(sessions, case_id, ANNA, POLICY).case_id)
        except review.ReviewRefused as exc:
            refusals.append(exc.kind)

    for work in ([next_case] * 4, [lambda c=c: this_case(c) for c in cases[:4]]):
        claims.clear()
        threads = [threading.Thread(target=w) for w in work]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with sessions() as session:
            held = session.execute(
                select(ReviewCase.id).where(ReviewCase.assignee == ANNA.actor)
            ).all()
        assert len(held) == 1, "one held case"
        assert set(claims) == {held[0][0]}, "every answer names the case she holds"
    assert refusals and set(refusals) == {"holding-another"}


def test_a_lapsed_claim_of_ones_own_does_not_block_the_next(
    sessions: sessionmaker[Session],
) -> None:
    first, _ = flag(sessions, 2)
    short = review.ReviewPolicy(active_ensemble=ENSEMBLE.version, lease=timedelta(seconds=30))
    review.claim(sessions, first, ANNA, short)
    with transaction(sessions) as session:  # the lease ran out; no expiry pass ran yet
        row = session.get(ReviewCase, first)
        assert row is not None
        row.lease_expires_at = utcnow() - timedelta(seconds=1)
    with transaction(sessions) as session:
        row = session.get(ReviewCase, first)
        assert row is not None
        other = session.execute(select(ReviewCase).where(ReviewCase.id != first)).scalar_one()
        # Claimed directly (no expiry pass first): the lapsed claim is returned on the way.
        taken = review._take(session, other, ANNA, short)
    assert taken
    assert "review_case.lease_expired" in actions(sessions, first)


def test_an_expiry_pass_never_takes_back_a_claim_made_after_it_looked(
    sessions: sessionmaker[Session],
) -> None:
    (case,) = flag(sessions, 1)
    short = review.ReviewPolicy(active_ensemble=ENSEMBLE.version, lease=timedelta(seconds=30))
    review.claim(sessions, case, ANNA, short)
    later = utcnow() + timedelta(seconds=31)
    with transaction(sessions) as session:
        (seen,) = repository.expired_leases(session, later)
        session.expunge(seen)
    review.expire_leases(sessions, now=later)
    review.claim(sessions, case, BORIS, POLICY)  # Boris takes it in between
    with transaction(sessions) as session:
        stale = session.merge(seen, load=False)
        assert not repository.drop_lease(session, stale, holder=ANNA.actor, lapsed_at=later)
    with sessions() as session:
        row = session.get(ReviewCase, case)
        assert row is not None and row.assignee == BORIS.actor


def test_the_second_review_is_blind_for_admins_too(sessions: sessionmaker[Session]) -> None:
    (case,) = flag(sessions, 1)
    always = review.ReviewPolicy(active_ensemble=ENSEMBLE.version, second_review_share=1.0)
    review.claim(sessions, case, ANNA, always)
    review.decide(sessions, case, AI, "my first note", reviewer=ANNA, policy=always)
    taken = review.claim_next(sessions, ADMIN, always)
    assert taken is not None and taken.case_id == case
    view = review.case_view(sessions, case, ADMIN, always)
    assert view.blind and view.decisions == []
    shown = " ".join(f"{e.actor} {e.details}" for e in view.history)
    assert ANNA.actor not in shown and "my first note" not in shown
    assert ANNA.actor not in view.actor_names
    review.decide(sessions, case, AI, None, reviewer=ADMIN, policy=always)
    assert review.agreement(sessions) == review.Agreement(cases=1, agreed=1)


def test_moderators_pressing_next_together_each_get_a_case_while_any_is_open(
    sessions: sessionmaker[Session],
) -> None:
    """Taking one case never hides the others from a moderator asking at the same moment."""
    cases = flag(sessions, 3)
    moderators = [review.Reviewer(f"token:t{i}") for i in range(3)]
    start = threading.Barrier(3)
    got: dict[str, int | None] = {}

    def next_case(reviewer: review.Reviewer) -> None:
        start.wait()
        claim = review.claim_next(sessions, reviewer, POLICY)
        got[reviewer.actor] = claim.case_id if claim is not None else None

    threads = [threading.Thread(target=next_case, args=(m,)) for m in moderators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(c for c in got.values() if c is not None) == sorted(cases)


def test_the_queue_on_the_embedded_sqlite_database(sqlite_url: str) -> None:
    """The same queries on SQLite (the embedded defaults): order across states, pages,
    filter values."""
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker

    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    lite = make_sessionmaker(engine)
    low = flag(lite, 2, score=0.6, detectors=("mj5",))
    high = flag(lite, 2, score=0.95, detectors=("cf",), source=SourceKind.HOOK)
    claimed = review.claim_next(lite, ANNA, POLICY)
    assert claimed is not None and claimed.case_id == high[0]
    page = review.queue(lite, QueueFilter(), page=1, per_page=3)
    assert [r.case_id for r in page.rows] == [*high, low[0]]
    assert [r.state for r in page.rows][:2] == [ReviewState.CLAIMED, ReviewState.OPEN]
    assert [r.case_id for r in review.queue(lite, QueueFilter(), page=2, per_page=3).rows] == [
        low[1]
    ]
    assert page.filter_values == {
        "detector": ["cf", "mj5"],
        "source": ["cli", "hook"],
    }
    engine.dispose()


def test_on_sqlite_a_claim_is_part_of_its_transaction_and_one_job_holds(
    sqlite_url: str,
) -> None:
    """pysqlite commits when a SAVEPOINT that opened the transaction is released: a claim
    must not be committed before the rest of its transaction (its audit row)."""
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker

    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    lite = make_sessionmaker(engine)
    first, second = flag(lite, 2)
    now = utcnow()
    with pytest.raises(RuntimeError), transaction(lite) as session:
        case = session.get(ReviewCase, first)
        assert case is not None
        taken = repository.take_lease(session, case, ANNA.actor, now=now, until=now + POLICY.lease)
        assert taken is repository.Lease.TAKEN
        raise RuntimeError("the audit row could not be written")
    with lite() as session:
        row = session.get(ReviewCase, first)
        assert row is not None and row.state == ReviewState.OPEN and row.assignee is None
    review.claim(lite, first, ANNA, POLICY)
    with transaction(lite) as session:
        other = session.get(ReviewCase, second)
        assert other is not None
        busy = repository.take_lease(session, other, ANNA.actor, now=now, until=now + POLICY.lease)
    assert busy is repository.Lease.BUSY
    with pytest.raises(review.ReviewRefused) as refused:
        review.claim(lite, second, ANNA, POLICY)
    assert refused.value.kind == "holding-another"
    engine.dispose()


def test_tallies_wait_until_a_blind_second_review_is_over(
    sessions: sessionmaker[Session],
) -> None:
    (case,) = flag(sessions, 1)
    always = review.ReviewPolicy(active_ensemble=ENSEMBLE.version, second_review_share=1.0)
    review.claim(sessions, case, ANNA, always)
    review.decide(sessions, case, HUMAN, None, reviewer=ANNA, policy=always)
    assert review.moderator_tallies(sessions) == [], "an admin may be the second reviewer"
    review.claim(sessions, case, BORIS, always)
    review.decide(sessions, case, HUMAN, None, reviewer=BORIS, policy=always)
    assert {t.actor: t.total for t in review.moderator_tallies(sessions)} == {
        ANNA.actor: 1,
        BORIS.actor: 1,
    }
