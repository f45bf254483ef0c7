"""The moderators' pages under ``/review``: sign-in, the queue, a case, its pictures, and
the moderator's own settings. Each page calls the review service (``workers.review``), the
same functions as ``/v1/reviews`` and the CLI; the handlers are plain functions, run in a
thread, because the service works on the database synchronously.

    GET  /review/login                    the sign-in form (paste a moderator's or admin's token)
    POST /review/login                    token -> session cookie
    POST /review/logout                   ends the session
    GET  /review                          the queue: counts, filters, a page of cases
    POST /review/next                     claim the next case -> its page
    GET  /review/cases/{id}               a case: evidence, history; the decision form to its holder
    GET  /review/cases/{id}/thumbnail     a small JPEG (any moderator)
    GET  /review/cases/{id}/image         the display JPEG (the lease holder, admins)
    POST /review/cases/{id}/claim         claim this case
    POST /review/cases/{id}/renew         extend the lease (htmx, every minute): a fragment
    POST /review/cases/{id}/release       give it back
    POST /review/cases/{id}/decision      decide it (AI-generated, Human-made, Unsure)
    GET  /review/settings                 the moderator's defaults
    POST /review/settings
"""

from __future__ import annotations

import logging
import math
from datetime import timedelta
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Path, Query, Request, Response
from fastapi.responses import HTMLResponse

from api.context import ApiContext, ContextDep
from api.dashboard.present import present
from api.dashboard.render import (
    DECISION_LABELS,
    LOGIN_PATH,
    QUEUE_PATH,
    PageError,
    PageRoute,
    duration,
    page,
    render_text,
    see_other,
    with_flash,
)
from api.dashboard.security import (
    check_csrf,
    clear_login_csrf_cookie,
    login_csrf_value,
    set_login_csrf_cookie,
)
from api.dashboard.session import (
    Viewer,
    clear_session_cookie,
    credential_of,
    current_user,
    is_safe_next,
    reviewer_of,
    set_session_cookie,
)
from api.guards import storable_text, unstorable
from db.models import ReviewDecision, ReviewState, as_utc, utcnow
from db.repository import QueueFilter
from db.session import transaction
from workers import dashboard_sessions, review
from workers.dashboard_sessions import DashboardUser
from workers.review_media import MediaUnavailable

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/review",
    route_class=PageRoute,
    dependencies=[Depends(storable_text), Depends(check_csrf)],
    include_in_schema=False,
)

PER_PAGE = 25
MAX_NOTE = 2000
CaseId = Annotated[int, Path(ge=1, le=2**62)]
# Queue filters come from a GET form: an empty field is sent as "" and means "any".
FilterText = Annotated[str, Query(max_length=128)]


# --- sign-in ----------------------------------------------------------------------------


def _login_form(
    request: Request,
    context: ApiContext,
    *,
    status: int = 200,
    error: str | None = None,
    next_path: str = "",
) -> HTMLResponse:
    value = login_csrf_value(request)
    response = page(
        request,
        "login.html",
        status=status,
        error=error,
        login_csrf=value,
        next_path=next_path if is_safe_next(next_path) else "",
        shortcuts=False,
    )
    set_login_csrf_cookie(response, context, value)
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(
    request: Request, context: ContextDep, next: Annotated[str, Query(max_length=2000)] = ""
) -> Response:
    if current_user(request) is not None:
        return see_other(next if is_safe_next(next) else QUEUE_PATH)
    return _login_form(request, context, next_path=next)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    context: ContextDep,
    token: Annotated[str, Form(max_length=512)] = "",
    next: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    lifetime = timedelta(hours=context.session_hours)
    with transaction(context.session_factory) as session:
        earlier = credential_of(request)
        if earlier is not None and len(earlier) <= 256:
            dashboard_sessions.sign_out(session, earlier)
        new = dashboard_sessions.sign_in(session, token, lifetime=lifetime)
    if new is None:
        request.state.dashboard_user = None
        return _login_form(
            request,
            context,
            status=401,
            error="That token cannot sign in here. Paste a live moderator or admin token.",
            next_path=next,
        )
    response = see_other(next if is_safe_next(next) else QUEUE_PATH)
    set_session_cookie(response, context, new)
    clear_login_csrf_cookie(response, context)
    return response


@router.post("/logout")
def logout(request: Request, context: ContextDep, user: Viewer) -> Response:
    credential = credential_of(request)
    if credential is not None:
        with transaction(context.session_factory) as session:
            dashboard_sessions.sign_out(session, credential)
    response = see_other(with_flash(LOGIN_PATH, "signed_out"))
    clear_session_cookie(response, context)
    return response


# --- the queue --------------------------------------------------------------------------


def _states(value: str) -> tuple[ReviewState, ...]:
    if value == "":
        return QueueFilter().states
    if value == "all":
        return tuple(ReviewState)
    try:
        return (ReviewState(value),)
    except ValueError:
        raise PageError(400, f"There is no state {value!r} to filter by.") from None


def _min_score(value: str) -> float | None:
    if value.strip() == "":
        return None
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    if not (0.0 <= score <= 1.0):
        raise PageError(400, "The minimum score is a number from 0 to 1.")
    return score


def _page_number(value: str) -> int:
    try:
        number = int(value or "1")
    except ValueError:
        number = 0
    if not 1 <= number <= 100_000:
        raise PageError(400, "The page number is a whole number from 1.")
    return number


@router.get("", response_class=HTMLResponse)
def queue(
    *,
    request: Request,
    context: ContextDep,
    user: Viewer,
    state: FilterText = "",
    min_score: FilterText = "",
    detector: FilterText = "",
    provenance: FilterText = "",
    source: FilterText = "",
    page_number: Annotated[str, Query(alias="page", max_length=8)] = "1",
) -> Response:
    filters = QueueFilter(
        states=_states(state),
        min_score=_min_score(min_score),
        detector=detector or None,
        provenance=provenance or None,
        source=source or None,
    )
    number = _page_number(page_number)
    result = review.queue(context.session_factory, filters, page=number, per_page=PER_PAGE)
    pages = max(1, math.ceil(result.total / PER_PAGE))
    kept = {
        "state": state,
        "min_score": min_score,
        "detector": detector,
        "provenance": provenance,
        "source": source,
    }
    kept = {k: v for k, v in kept.items() if v}

    def page_link(n: int) -> str:
        return f"{QUEUE_PATH}?{urlencode({**kept, 'page': str(n)})}"

    return page(
        request,
        "queue.html",
        result=result,
        counts=[
            (s.value, result.counts.get(s, 0), f"{QUEUE_PATH}?{urlencode({'state': s.value})}")
            for s in ReviewState
        ],
        filters=kept,
        state_choices=[s.value for s in ReviewState],
        values=result.filter_values,
        number=number,
        pages=pages,
        prev_link=page_link(number - 1) if number > 1 else None,
        next_link=page_link(number + 1) if number < pages else None,
        per_page=PER_PAGE,
    )


@router.post("/next")
def claim_next(context: ContextDep, user: Viewer) -> Response:
    claim = review.claim_next(context.session_factory, reviewer_of(user), context.review_policy)
    if claim is None:
        return see_other(with_flash(QUEUE_PATH, "nothing"))
    return see_other(f"{QUEUE_PATH}/cases/{claim.case_id}")


# --- a case -----------------------------------------------------------------------------


def _case_url(case_id: int) -> str:
    return f"{QUEUE_PATH}/cases/{case_id}"


def _claimable(view: review.CaseView, user: DashboardUser) -> bool:
    """Whether to offer a Claim button (the service has the last word)."""
    case = view.case
    if view.held_by_viewer:
        return False
    expires = case.lease_expires_at
    someone_holds = case.assignee is not None and expires is not None and as_utc(expires) > utcnow()
    if case.state == ReviewState.OPEN:
        return True
    if case.state == ReviewState.ESCALATED:
        return user.is_admin and not someone_holds
    return case.state == ReviewState.CLAIMED and not someone_holds


@router.get("/cases/{case_id}", response_class=HTMLResponse)
def case_page(case_id: CaseId, request: Request, context: ContextDep, user: Viewer) -> Response:
    view = review.case_view(
        context.session_factory, case_id, reviewer_of(user), context.review_policy
    )
    return page(
        request,
        "case.html",
        view=view,
        shown=present(view),
        claimable=_claimable(view, user),
        may_see_image=view.held_by_viewer or user.is_admin,
        lease_left=duration(view.lease_seconds_left)
        if view.held_by_viewer and view.lease_seconds_left is not None
        else None,
        decisions=[(d.value, label) for d, label in DECISION_LABELS.items()],
        media_configured=context.media is not None,
    )


def _picture(context: ApiContext, case_id: int, user: DashboardUser, *, full: bool) -> Response:
    picture = review.case_picture(context.session_factory, case_id, reviewer_of(user))
    if full and not (picture.held_by_viewer or user.is_admin):
        raise PageError(403, "The full picture is shown to the moderator holding the case.")
    if context.media is None:
        raise PageError(404, "This server shows no pictures (no picture cache is configured).")
    try:
        if full:
            data = context.media.display(picture.image_id, picture.sha256)
        else:
            data = context.media.thumbnail(picture.image_id, picture.sha256)
    except MediaUnavailable as exc:
        raise PageError(503 if exc.transient else 404, exc.reason) from exc
    # Never kept by the browser: a released case's picture must not come back from the
    # cache of a shared machine (the server keeps its own cache of renders).
    return Response(
        data,
        media_type="image/jpeg",
        headers={"Cache-Control": "no-store", "Content-Disposition": "inline"},
    )


@router.get("/cases/{case_id}/thumbnail")
def thumbnail(case_id: CaseId, context: ContextDep, user: Viewer) -> Response:
    return _picture(context, case_id, user, full=False)


@router.get("/cases/{case_id}/image")
def image(case_id: CaseId, context: ContextDep, user: Viewer) -> Response:
    return _picture(context, case_id, user, full=True)


@router.post("/cases/{case_id}/claim")
def claim(case_id: CaseId, context: ContextDep, user: Viewer) -> Response:
    review.claim(context.session_factory, case_id, reviewer_of(user), context.review_policy)
    return see_other(with_flash(_case_url(case_id), "claimed"))


@router.post("/cases/{case_id}/renew", response_class=HTMLResponse)
def renew(case_id: CaseId, request: Request, context: ContextDep, user: Viewer) -> Response:
    """A fragment for the case page's lease line: the time left, or why the lease is lost
    (409, which the page's htmx settings swap in)."""
    try:
        held = review.renew(
            context.session_factory, case_id, reviewer_of(user), context.review_policy
        )
    except review.ReviewRefused as exc:
        text = render_text(request, "lease.html", lost=True, detail=exc.detail, left=None)
        return HTMLResponse(text, status_code=exc.status)
    left = duration((held.lease_expires_at - utcnow()).total_seconds())
    return HTMLResponse(render_text(request, "lease.html", lost=False, detail=None, left=left))


@router.post("/cases/{case_id}/release")
def release(case_id: CaseId, context: ContextDep, user: Viewer) -> Response:
    review.release(context.session_factory, case_id, reviewer_of(user))
    return see_other(with_flash(QUEUE_PATH, "released"))


_AFTER_DECISION = {
    ReviewState.DECIDED: "decided",
    ReviewState.ESCALATED: "escalated",
    ReviewState.OPEN: "second_review",
}


@router.post("/cases/{case_id}/decision")
def decide(
    case_id: CaseId,
    context: ContextDep,
    user: Viewer,
    decision: Annotated[ReviewDecision, Form()],
    note: Annotated[str, Form(max_length=MAX_NOTE)] = "",
) -> Response:
    if unstorable(note):
        raise PageError(400, "The note holds a character that cannot be stored.")
    decided = review.decide(
        context.session_factory,
        case_id,
        decision,
        note.strip() or None,
        reviewer=reviewer_of(user),
        policy=context.review_policy,
    )
    return see_other(with_flash(_case_url(case_id), _AFTER_DECISION[decided.state]))


# --- settings ---------------------------------------------------------------------------


@router.get("/settings", response_class=HTMLResponse)
def settings_page(request: Request, user: Viewer) -> Response:
    return page(request, "settings.html")


@router.post("/settings")
def save_settings(
    context: ContextDep,
    user: Viewer,
    blur_images: Annotated[str, Form(max_length=8)] = "",
) -> Response:
    with transaction(context.session_factory) as session:
        dashboard_sessions.set_blur_default(session, user, blur_images == "on")
    return see_other(with_flash(f"{QUEUE_PATH}/settings", "settings_saved"))
