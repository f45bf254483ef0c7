"""``/v1/reviews``: moderators decide review cases (the service: ``workers.review``). A
case is named by its image's sha256 (one case per image); the decision is audited and sent
to every platform whose scan of these bytes asked for a callback."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.auth import Authenticator
from api.context import ContextDep
from api.problems import Problem
from db.models import ApiToken, ReviewDecision, ReviewState, TokenRole
from workers import review

router = APIRouter(prefix="/v1/reviews", tags=["review"])

ModeratorOrAdmin = Annotated[ApiToken, Depends(Authenticator(TokenRole.MODERATOR, TokenRole.ADMIN))]


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
    decided_at: str
    callbacks: int = Field(description="platform callbacks queued for this decision")


@router.post("/{sha256}/decision", response_model=DecisionOut, summary="Decide a review case")
async def decide(
    sha256: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")],
    body: DecisionIn,
    context: ContextDep,
    caller: ModeratorOrAdmin,
) -> DecisionOut:
    try:
        decided = await run_in_threadpool(
            lambda: review.decide(
                context.session_factory,
                sha256,
                body.decision,
                body.note,
                actor=f"token:{caller.public_id}",
                active_ensemble=context.active_ensemble,
            )
        )
    except review.DecisionRefused as exc:
        raise Problem(exc.status, exc.kind, exc.detail) from exc
    return DecisionOut(**vars(decided))
