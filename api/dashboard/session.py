"""Who is signed in to the review pages, and who may open each of them.

The browser holds ``ss_session=<public id>.<secret>`` (``workers.dashboard_sessions``): an
HttpOnly cookie for the whole site, SameSite=Lax, Secure outside development. Every request
reads the session with its token, so a sign-out or a revoked token takes effect at once.

Each page declares who may open it in its signature, as the API's endpoints do:
``Viewer`` (a moderator or an admin) or ``AdminViewer``. Without a live session a GET is
sent to the sign-in form and anything else is refused with 401; a signed-in moderator on
an admin page gets 403.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import Depends, Request, Response

from api.context import ApiContext
from api.dashboard.render import LOGIN_PATH, PageError, PageRedirect
from db.models import TokenRole
from workers import dashboard_sessions
from workers.dashboard_sessions import DashboardUser, NewSession
from workers.review import Reviewer

SESSION_COOKIE = "ss_session"


def cookie_name(context: ApiContext, name: str) -> str:
    """``name`` as the dashboard's cookies are named: with Secure cookies it carries the
    __Host- prefix, so the browser takes the cookie only from this host, over HTTPS, for
    the whole site, and a page on a sibling subdomain cannot plant one."""
    return f"__Host-{name}" if context.secure_cookies else name


def session_cookie_name(context: ApiContext) -> str:
    return cookie_name(context, SESSION_COOKIE)


_LOOKED_UP = "dashboard_user_looked_up"


def credential_of(request: Request) -> str | None:
    value = request.cookies.get(session_cookie_name(request.app.state.context))
    return value if value else None


def current_user(request: Request) -> DashboardUser | None:
    """The signed-in user of this request, read once per request (it does database work:
    call it from a thread, or from a plain ``def`` dependency)."""
    if getattr(request.state, _LOOKED_UP, False):
        user = getattr(request.state, "dashboard_user", None)
        return user if isinstance(user, DashboardUser) else None
    credential = credential_of(request)
    user = None
    if credential is not None and len(credential) <= 256:
        with request.app.state.session_factory() as session:
            user = dashboard_sessions.resume(session, credential)
    request.state.dashboard_user = user
    setattr(request.state, _LOOKED_UP, True)
    return user


def is_safe_next(target: str) -> bool:
    """Whether ``target`` is a dashboard path of this site to return to after signing in
    (never another site: ``//host`` and ``/\\host`` are refused)."""
    if not target.startswith(("/review", "/admin")) or target.startswith(LOGIN_PATH):
        return False
    return "\\" not in target and "//" not in target and target.isprintable()


def login_url(request: Request) -> str:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"{LOGIN_PATH}?{urlencode({'next': target})}" if is_safe_next(target) else LOGIN_PATH


class SignedIn:
    """A dependency that answers with the signed-in user when their role is one of
    ``roles`` (see the module's description for the refusals)."""

    def __init__(self, *roles: TokenRole) -> None:
        self.roles = frozenset(roles)

    def __call__(self, request: Request) -> DashboardUser:
        user = current_user(request)
        if user is None:
            if request.method in ("GET", "HEAD"):
                raise PageRedirect(login_url(request))
            raise PageError(401, "You are not signed in (or your sign-in ended): sign in again.")
        if user.role not in self.roles:
            raise PageError(403, "This page is for admins; your token is a moderator's.")
        return user


Viewer = Annotated[DashboardUser, Depends(SignedIn(TokenRole.MODERATOR, TokenRole.ADMIN))]
AdminViewer = Annotated[DashboardUser, Depends(SignedIn(TokenRole.ADMIN))]


def reviewer_of(user: DashboardUser) -> Reviewer:
    return Reviewer(actor=user.actor, is_admin=user.is_admin)


def set_session_cookie(response: Response, context: ApiContext, new: NewSession) -> None:
    response.set_cookie(
        session_cookie_name(context),
        new.credential,
        max_age=int(context.session_hours * 3600),
        path="/",
        secure=context.secure_cookies,
        httponly=True,
        samesite="lax",
    )


def clear_session_cookie(response: Response, context: ApiContext) -> None:
    response.delete_cookie(
        session_cookie_name(context),
        path="/",
        secure=context.secure_cookies,
        httponly=True,
        samesite="lax",
    )
