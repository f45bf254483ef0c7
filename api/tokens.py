"""``/v1/tokens``: operators make, list and revoke API tokens (the same service as
``synthsentry tokens``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from api.auth import AdminToken, SessionDep
from api.context import ContextDep
from api.problems import Problem
from db.models import TokenRole
from workers import tokens

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: TokenRole
    name: str = Field(min_length=1, max_length=255, description="who or what uses it")
    callback_hosts: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="platform tokens: hosts its callbacks may go to",
    )


class IssuedTokenOut(BaseModel):
    token: str = Field(description="the credential: shown this once, never again")
    public_id: str
    name: str
    role: TokenRole
    callback_secret: str | None = Field(
        description="platform tokens: the callback signing secret (Standard Webhooks), shown "
        "this once, never again"
    )
    callback_hosts: list[str]


class TokenOut(BaseModel):
    public_id: str
    name: str
    role: TokenRole
    created_by: str
    created_at: str
    revoked_at: str | None


def _actor(caller: AdminToken) -> str:
    return f"token:{caller.public_id}"


@router.post("", status_code=201, response_model=IssuedTokenOut)
def create_token(
    body: TokenRequest, session: SessionDep, caller: AdminToken, context: ContextDep
) -> IssuedTokenOut:
    try:
        issued = tokens.issue_token(
            session,
            role=body.role,
            name=body.name,
            actor=_actor(caller),
            secret_box=context.callbacks.box,
            callback_hosts=body.callback_hosts,
        )
    except tokens.TokenError as exc:
        raise Problem(400, "invalid-token-request", str(exc)) from exc
    return IssuedTokenOut(
        token=issued.token,
        public_id=issued.public_id,
        name=issued.name,
        role=issued.role,
        callback_secret=issued.callback_secret,
        callback_hosts=list(issued.callback_hosts),
    )


@router.get("", response_model=list[TokenOut])
def list_tokens(session: SessionDep, caller: AdminToken) -> list[TokenOut]:
    return [TokenOut(**vars(info)) for info in tokens.list_tokens(session)]


@router.delete("/{public_id}", status_code=204)
def revoke_token(
    public_id: Annotated[str, Path(max_length=32)], session: SessionDep, caller: AdminToken
) -> Response:
    try:
        tokens.revoke(session, public_id, actor=_actor(caller))
    except tokens.TokenError as exc:
        raise Problem(404, "not-found", str(exc)) from exc
    return Response(status_code=204)
