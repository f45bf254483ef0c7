"""Signed callbacks (the service: ``workers.callbacks``; the same as ``synthsentry
callbacks``). A platform token sees and asks again for its own deliveries only; an admin
token sees every delivery and keeps each platform token's allowed callback hosts.

    GET  /v1/callbacks/deliveries?state=&limit=       deliveries, newest first
    GET  /v1/callbacks/deliveries/{id}                one, with its attempts
    POST /v1/callbacks/deliveries/{id}/redeliver      send it again (202)
    POST /v1/callbacks/secret                         a new signing secret, shown once
    GET  /v1/tokens/{public_id}/callback-hosts        a token's allowed hosts (admin)
    PUT  /v1/tokens/{public_id}/callback-hosts        replace them (admin)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from api.auth import AdminToken, Authenticator, PlatformOrAdmin, SessionDep
from api.context import ContextDep
from api.problems import Problem
from db.models import ApiToken, DeliveryState, TokenRole
from workers import callbacks
from workers.callbacks.service import MAX_HOSTS

router = APIRouter(tags=["callbacks"])

PlatformToken = Annotated[ApiToken, Depends(Authenticator(TokenRole.PLATFORM))]
DeliveryId = Annotated[str, Path(min_length=1, max_length=40)]
TokenId = Annotated[str, Path(min_length=1, max_length=32)]


class DeliveryOut(BaseModel):
    id: str = Field(description="the webhook-id header of every attempt")
    token: str = Field(description="the public id of the token the scan was submitted with")
    event_type: str
    scan_id: str | None
    url: str
    state: DeliveryState
    attempts: int
    created_at: str
    next_attempt_at: str | None = Field(description="pending deliveries: the next attempt")
    finished_at: str | None
    last_status: int | None
    last_error: str | None
    endpoint_disabled: bool = Field(description="the URL answered 410 Gone; nothing is sent")


class AttemptOut(BaseModel):
    at: str
    status_code: int | None
    error: str | None
    duration_ms: float | None


class DeliveryDetailOut(DeliveryOut):
    attempt_log: list[AttemptOut]


class SecretOut(BaseModel):
    secret: str = Field(description="the new signing secret: shown this once, never again")
    previous_secret_expires_at: str | None = Field(
        description="until when the previous secret still signs beside the new one"
    )


class HostsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hosts: list[str] = Field(max_length=MAX_HOSTS)


class HostsOut(BaseModel):
    token: str
    hosts: list[str]


def _actor(caller: ApiToken) -> str:
    return f"token:{caller.public_id}"


def _own(caller: ApiToken) -> int | None:
    """Whose deliveries the caller may see: a platform its own, an admin everyone's."""
    return caller.id if caller.role == TokenRole.PLATFORM else None


def _out(info: callbacks.DeliveryInfo) -> DeliveryOut:
    return DeliveryOut(**vars(info))


@router.get("/v1/callbacks/deliveries", response_model=list[DeliveryOut])
def list_deliveries(
    session: SessionDep,
    caller: PlatformOrAdmin,
    state: DeliveryState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    token: Annotated[
        str | None, Query(max_length=32, description="admin: one token's deliveries")
    ] = None,
) -> list[DeliveryOut]:
    token_id = _own(caller)
    if token is not None:
        if token_id is not None and token != caller.public_id:
            raise Problem(403, "forbidden", "a platform token sees only its own deliveries")
        try:
            token_id = callbacks.find_token(session, token).id
        except callbacks.CallbackNotFound as exc:
            raise Problem(404, "not-found", str(exc)) from exc
    found = callbacks.list_deliveries(session, token_id=token_id, state=state, limit=limit)
    return [_out(info) for info in found]


@router.get("/v1/callbacks/deliveries/{delivery_id}", response_model=DeliveryDetailOut)
def get_delivery(
    delivery_id: DeliveryId, session: SessionDep, caller: PlatformOrAdmin
) -> DeliveryDetailOut:
    try:
        detail = callbacks.delivery_detail(session, delivery_id, token_id=_own(caller))
    except callbacks.CallbackNotFound as exc:
        raise Problem(404, "not-found", str(exc)) from exc
    return DeliveryDetailOut(
        **vars(detail.delivery), attempt_log=[AttemptOut(**vars(a)) for a in detail.attempts]
    )


@router.post(
    "/v1/callbacks/deliveries/{delivery_id}/redeliver",
    status_code=202,
    response_model=DeliveryOut,
)
def redeliver(delivery_id: DeliveryId, session: SessionDep, caller: PlatformOrAdmin) -> DeliveryOut:
    try:
        info = callbacks.redeliver(
            session, delivery_id, token_id=_own(caller), actor=_actor(caller)
        )
    except callbacks.CallbackNotFound as exc:
        raise Problem(404, "not-found", str(exc)) from exc
    return _out(info)


@router.post("/v1/callbacks/secret", status_code=201, response_model=SecretOut)
def rotate_secret(session: SessionDep, caller: PlatformToken, context: ContextDep) -> SecretOut:
    try:
        rotated = callbacks.rotate_secret(
            session, caller, context.callbacks.box, actor=_actor(caller)
        )
    except callbacks.CallbacksUnavailable as exc:
        raise Problem(503, "callbacks-unavailable", str(exc)) from exc
    expires = rotated.previous_expires_at
    return SecretOut(
        secret=rotated.secret,
        previous_secret_expires_at=expires.isoformat() if expires is not None else None,
    )


@router.get("/v1/tokens/{public_id}/callback-hosts", response_model=HostsOut)
def get_callback_hosts(public_id: TokenId, session: SessionDep, caller: AdminToken) -> HostsOut:
    try:
        hosts = callbacks.list_hosts(session, public_id)
    except callbacks.CallbackNotFound as exc:
        raise Problem(404, "not-found", str(exc)) from exc
    return HostsOut(token=public_id, hosts=hosts)


@router.put("/v1/tokens/{public_id}/callback-hosts", response_model=HostsOut)
def put_callback_hosts(
    public_id: TokenId, body: HostsIn, session: SessionDep, caller: AdminToken
) -> HostsOut:
    try:
        token = callbacks.find_token(session, public_id)
        hosts = callbacks.replace_hosts(session, token, body.hosts, actor=_actor(caller))
    except callbacks.CallbackNotFound as exc:
        raise Problem(404, "not-found", str(exc)) from exc
    except callbacks.CallbackRefused as exc:
        raise Problem(400, "invalid-callback-hosts", str(exc)) from exc
    return HostsOut(token=public_id, hosts=hosts)
