"""What keeps the review pages safe in a browser: the headers on every answer, and the
CSRF check on every request that changes something.

Headers (``SecurityHeaders``, a pure ASGI middleware over ``/review`` and ``/admin``): a
Content-Security-Policy that allows only this origin's scripts, styles and images and no
inline code (the templates carry none), no framing, no referrer, no MIME sniffing, and no
caching of pages (a shared machine's back button must not show a case). Static files are
cached for good under their versioned address; pictures never (the server caches renders).

CSRF (``check_csrf``, one dependency on both dashboard routers, so no form can forget it):
every unsafe request is refused when the browser says it comes from another site
(``Sec-Fetch-Site: cross-site``, or an ``Origin`` naming another host), then must carry
the session's CSRF token, an HMAC of the session's secret (``workers.dashboard_sessions``)
as the form field ``csrf_token`` or the header ``X-CSRF-Token`` (htmx sends it from the
body's ``hx-headers``). The sign-in form, which comes before any session, is a
double-submit instead: a random value in a short-lived cookie and the same value in the
form, so another site cannot sign a browser in to an account of its choosing.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.context import ApiContext
from api.dashboard.render import LOGIN_PATH, STATIC_PREFIX, PageError
from api.dashboard.session import cookie_name, current_user

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
DASHBOARD_PREFIXES = ("/review", "/admin")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
LOGIN_CSRF_COOKIE = "ss_login_csrf"


def login_csrf_cookie_name(context: ApiContext) -> str:
    return cookie_name(context, LOGIN_CSRF_COOKIE)


_LOGIN_CSRF_MAX_AGE = 3600
_LOGIN_CSRF_BYTES = 32


def is_dashboard_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in DASHBOARD_PREFIXES)


class SecurityHeaders:
    """Adds the dashboard's headers to every answer under its prefixes, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_dashboard_path(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if "cache-control" not in headers:
                    headers["Cache-Control"] = _cache_control(scope)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _cache_control(scope: Scope) -> str:
    if scope["path"].startswith(STATIC_PREFIX + "/"):
        versioned = b"v=" in scope.get("query_string", b"")
        return "public, max-age=31536000, immutable" if versioned else "no-cache"
    return "no-store"


# --- CSRF -------------------------------------------------------------------------------


def _same(presented: str | None, expected: str) -> bool:
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def refuse_cross_site(request: Request) -> None:
    """403 when the browser says the request was made by a page of another site."""
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        raise PageError(403, "Refused: this request was sent by a page of another site.")
    origin = request.headers.get("origin")
    # "null" tells nothing: under ``Referrer-Policy: no-referrer`` browsers send it for this
    # site's own forms too. Sec-Fetch-Site above and the CSRF token decide those.
    if origin is None or origin == "null":
        return
    host = request.headers.get("host", "").lower()
    if urlsplit(origin).netloc.lower() != host:
        raise PageError(403, "Refused: this request came from another origin than this site.")


async def _form_field(request: Request, name: str) -> str | None:
    form = await request.form()  # cached on the request: the handler reads the same form
    value = form.get(name)
    return value if isinstance(value, str) else None


async def check_csrf(request: Request) -> None:
    """The dashboard routers' dependency (see the module's description)."""
    if request.method in SAFE_METHODS:
        return
    refuse_cross_site(request)
    if request.url.path == LOGIN_PATH:
        if not _same(
            await _form_field(request, CSRF_FIELD),
            request.cookies.get(login_csrf_cookie_name(request.app.state.context), ""),
        ):
            raise PageError(
                403,
                "The sign-in form expired or was not sent from this site: open the sign-in "
                "page again and paste your token there.",
            )
        return
    user = await run_in_threadpool(current_user, request)
    if user is None:
        raise PageError(401, "You are not signed in (or your sign-in ended): sign in again.")
    presented = request.headers.get(CSRF_HEADER)
    if presented is None:
        presented = await _form_field(request, CSRF_FIELD)
    if not _same(presented, user.csrf_token):
        raise PageError(
            403,
            "Refused: the form's security token is missing or does not belong to your "
            "sign-in. Reload the page and try again.",
        )


def login_csrf_value(request: Request) -> str:
    """The sign-in form's double-submit value: the browser's own when it has a well-formed
    one (several open tabs keep working), a fresh one otherwise."""
    value = request.cookies.get(login_csrf_cookie_name(request.app.state.context), "")
    if len(value) == 43 and value.isascii() and value.replace("-", "").replace("_", "").isalnum():
        return value
    return secrets.token_urlsafe(_LOGIN_CSRF_BYTES)


def set_login_csrf_cookie(response: Response, context: ApiContext, value: str) -> None:
    response.set_cookie(
        login_csrf_cookie_name(context),
        value,
        max_age=_LOGIN_CSRF_MAX_AGE,
        path="/",  # the __Host- prefix asks for the whole site
        secure=context.secure_cookies,
        httponly=True,
        samesite="strict",
    )


def clear_login_csrf_cookie(response: Response, context: ApiContext) -> None:
    response.delete_cookie(
        login_csrf_cookie_name(context),
        path="/",
        secure=context.secure_cookies,
        httponly=True,
        samesite="strict",
    )
