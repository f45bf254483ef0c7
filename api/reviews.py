"""``/v1/reviews``: the review queue for moderators' own tools (the service:
``workers.review``; the dashboard's pages call the same functions). A case is named by its
image's sha256 (one case per image). A moderator claims a case (a lease, renewed by
claiming it again), decides it while holding it, or releases it; a decision on a case one
does not hold is refused with 409."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.auth import Authenticator
from api.context import ApiContext, ContextDep
from api.problems import Problem
from db.models import ApiToken, ReviewDecision, ReviewState, TokenRole
from db.repository import HELD_STATES, QueueFilter
from workers import review

router = APIRouter(prefix="/v1/reviews", tags=["review"])
T = TypeVar("T")

ModeratorOrAdmin = Annotated[ApiToken, Depends(Authenticator(TokenRole.MODERATOR, TokenRole.ADMIN))]
Sha256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]


def reviewer_of(token: ApiToken) -> review.Reviewer:
    return review.Reviewer(actor=f"token:{token.public_id}", is_admin=token.role == TokenRole.ADMIN)


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: ReviewDecision = Field(description="ai_generated, not_ai_generated or unsure")
    note: str | None = Field(
        None, max_length=2000, description="for other moderators; never sent to platforms"
    )


class DecisionOut(BaseModel):
    sha256: str
    decision: ReviewDecision
    decided_from: ReviewState
    state: ReviewState = Field(
        description="decided; escalated (unsure, or a blind second review disagreed: an "
        "admin decides); open (sent to a second moderator)"
    )
    decided_at: str
    callbacks: int = Field(description="platform callbacks queued for this decision")


class ClaimOut(BaseModel):
    sha256: str
    state: ReviewState
    lease_expires_at: datetime = Field(description="claim the case again before this to keep it")


class QueueItem(BaseModel):
    sha256: str
    state: ReviewState
    score: float | None
    opened_at: datetime
    claimed: bool
    second_review: bool
    signals: dict[str, list[str]] = Field(
        description="detectors that fired, provenance kinds found, kinds of source"
    )


class QueueOut(BaseModel):
    items: list[QueueItem]
    total: int
    page: int
    counts: dict[str, int]


async def _call(work: Callable[[], T]) -> T:
    try:
        return await run_in_threadpool(work)
    except review.ReviewRefused as exc:
        raise Problem(exc.status, exc.kind, exc.detail) from exc


def _claim_out(claim: review.Claim) -> ClaimOut:
    return ClaimOut(sha256=claim.sha256, state=claim.state, lease_expires_at=claim.lease_expires_at)


@router.get("", response_model=QueueOut, summary="The review queue, in priority order")
async def list_queue(
    *,
    context: ContextDep,
    caller: ModeratorOrAdmin,
    state: Annotated[list[ReviewState] | None, Query()] = None,
    min_score: Annotated[float | None, Query(ge=0, le=1)] = None,
    detector: Annotated[str | None, Query(max_length=128)] = None,
    provenance: Annotated[str | None, Query(max_length=128)] = None,
    source: Annotated[str | None, Query(max_length=128)] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=200)] = 50,
) -> QueueOut:
    filters = QueueFilter(
        states=tuple(state) if state else QueueFilter().states,
        min_score=min_score,
        detector=detector,
        provenance=provenance,
        source=source,
    )
    result = await _call(
        lambda: review.queue(context.session_factory, filters, page=page, per_page=per_page)
    )
    return QueueOut(
        items=[
            QueueItem(
                sha256=row.sha256,
                state=row.state,
                score=row.score,
                opened_at=row.opened_at,
                claimed=row.state in HELD_STATES and row.assignee is not None,
                second_review=row.reviews_required == 2,
                signals={
                    kind: [v for k, v in row.signals if k == kind]
                    for kind in ("detector", "provenance", "source")
                },
            )
            for row in result.rows
        ],
        total=result.total,
        page=page,
        counts={state.value: n for state, n in result.counts.items()},
    )


@router.post(
    "/next",
    response_model=ClaimOut,
    responses={204: {"description": "nothing in the queue for this moderator"}},
    summary="Claim the next case (or get back the one you hold)",
)
async def claim_next(context: ContextDep, caller: ModeratorOrAdmin) -> ClaimOut | Response:
    claim = await _call(
        lambda: review.claim_next(
            context.session_factory, reviewer_of(caller), context.review_policy
        )
    )
    return Response(status_code=204) if claim is None else _claim_out(claim)


def _case_id(context: ApiContext, sha256: str) -> int:
    return review.case_id_for_sha256(context.session_factory, sha256)


@router.post("/{sha256}/claim", response_model=ClaimOut, summary="Claim a case, or renew a claim")
async def claim(sha256: Sha256, context: ContextDep, caller: ModeratorOrAdmin) -> ClaimOut:
    result = await _call(
        lambda: review.claim(
            context.session_factory,
            _case_id(context, sha256),
            reviewer_of(caller),
            context.review_policy,
        )
    )
    return _claim_out(result)


@router.post("/{sha256}/release", status_code=204, summary="Give a claimed case back")
async def release(sha256: Sha256, context: ContextDep, caller: ModeratorOrAdmin) -> Response:
    await _call(
        lambda: review.release(
            context.session_factory, _case_id(context, sha256), reviewer_of(caller)
        )
    )
    return Response(status_code=204)


@router.post("/{sha256}/decision", response_model=DecisionOut, summary="Decide a claimed case")
async def decide(
    sha256: Sha256, body: DecisionIn, context: ContextDep, caller: ModeratorOrAdmin
) -> DecisionOut:
    decided = await _call(
        lambda: review.decide(
            context.session_factory,
            _case_id(context, sha256),
            body.decision,
            body.note,
            reviewer=reviewer_of(caller),
            policy=context.review_policy,
        )
    )
    return DecisionOut(
        sha256=decided.sha256,
        decision=decided.decision,
        decided_from=decided.decided_from,
        state=decided.state,
        decided_at=decided.decided_at,
        callbacks=decided.callbacks,
    )
