"""The admins' pages under ``/admin``: the escalated cases waiting for them, how the
moderators decide and agree, API tokens, and the labelled examples as a download.

    GET  /admin                           escalated cases, decisions per moderator, agreement
    GET  /admin/tokens                    every token (never a secret), and the form for a new one
    POST /admin/tokens                    make a token: the page shows it this once
    POST /admin/tokens/{public_id}/revoke revoke one (its dashboard sign-ins end with it)
    GET  /admin/export.csv                the labelled examples, streamed
    GET  /admin/export.jsonl

Tokens are made and revoked through ``workers.tokens`` (audited there), as by
``/v1/tokens`` and ``synthsentry tokens``; the export writes through
``workers.review_export``, as ``synthsentry review export`` does.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Path, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse

from api.context import ContextDep
from api.dashboard.render import PageError, PageRoute, page, see_other, with_flash
from api.dashboard.security import check_csrf
from api.dashboard.session import AdminViewer
from api.guards import storable_text, unstorable
from db.models import ReviewDecision, ReviewState, TokenRole
from db.repository import QueueFilter
from db.session import transaction
from workers import review, review_export, tokens
from workers.tokens import IssuedToken

router = APIRouter(
    prefix="/admin",
    route_class=PageRoute,
    dependencies=[Depends(storable_text), Depends(check_csrf)],
    include_in_schema=False,
)

ESCALATED_SHOWN = 100


@router.get("", response_class=HTMLResponse)
def overview(request: Request, context: ContextDep, user: AdminViewer) -> Response:
    escalated = review.queue(
        context.session_factory,
        QueueFilter(states=(ReviewState.ESCALATED,)),
        per_page=ESCALATED_SHOWN,
    )
    return page(
        request,
        "admin/index.html",
        escalated=escalated,
        agreement=review.agreement(context.session_factory),
        tallies=review.moderator_tallies(context.session_factory),
        decisions=list(ReviewDecision),
    )


def _tokens_page(
    request: Request,
    context: ContextDep,
    *,
    issued: IssuedToken | None = None,
    error: str | None = None,
    status: int = 200,
) -> Response:
    with context.session_factory() as session:
        listed = tokens.list_tokens(session)
    return page(
        request,
        "admin/tokens.html",
        status=status,
        tokens=listed,
        issued=issued,
        error=error,
        roles=[role.value for role in TokenRole],
    )


@router.get("/tokens", response_class=HTMLResponse)
def token_list(request: Request, context: ContextDep, user: AdminViewer) -> Response:
    return _tokens_page(request, context)


@router.post("/tokens", response_class=HTMLResponse)
def create_token(
    *,
    request: Request,
    context: ContextDep,
    user: AdminViewer,
    role: Annotated[TokenRole, Form()],
    name: Annotated[str, Form(max_length=255)],
    callback_hosts: Annotated[str, Form(max_length=4000)] = "",
) -> Response:
    hosts = [h.strip() for h in callback_hosts.replace(",", " ").split() if h.strip()]
    if unstorable(name) or any(unstorable(h) for h in hosts):
        raise PageError(400, "The name or a host holds a character that cannot be stored.")
    try:
        with transaction(context.session_factory) as session:
            issued = tokens.issue_token(
                session,
                role=role,
                name=name,
                actor=user.actor,
                secret_box=context.callbacks.box,
                callback_hosts=hosts,
            )
    except tokens.TokenError as exc:
        return _tokens_page(request, context, error=str(exc), status=400)
    return _tokens_page(request, context, issued=issued, status=201)


@router.post("/tokens/{public_id}/revoke")
def revoke_token(
    public_id: Annotated[str, Path(max_length=32)], context: ContextDep, user: AdminViewer
) -> Response:
    try:
        with transaction(context.session_factory) as session:
            tokens.revoke(session, public_id, actor=user.actor)
    except tokens.TokenError as exc:
        raise PageError(404, "There is no such token.") from exc
    return see_other(with_flash("/admin/tokens", "token_revoked"))


def _export(context: ContextDep, fmt: review_export.ExportFormat) -> Response:
    lines = review_export.export_lines(review.labelled_examples(context.session_factory), fmt)
    return StreamingResponse(
        lines,
        media_type=review_export.MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="labelled-examples.{fmt}"'},
    )


@router.get("/export.csv")
def export_csv(context: ContextDep, user: AdminViewer) -> Response:
    return _export(context, "csv")


@router.get("/export.jsonl")
def export_jsonl(context: ContextDep, user: AdminViewer) -> Response:
    return _export(context, "jsonl")
