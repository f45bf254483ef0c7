"""How the review pages are drawn and how they fail: Jinja templates (autoescaped), the
fixed set of one-line messages a page may show after an action, and the route class that
turns every refusal on a dashboard route into a page rather than a JSON problem.

A message is named in the address (``?flash=decided``) and looked up here, so a link can
never make a page say something of its own choosing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from api.problems import Problem
from db.models import ReviewDecision, as_utc, utcnow
from workers.dashboard_sessions import DashboardUser
from workers.review import ReviewRefused

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
TEMPLATES_DIR = HERE / "templates"
STATIC_PREFIX = "/review/static"
LOGIN_PATH = "/review/login"
QUEUE_PATH = "/review"

# htmx's settings for every page: no inline styles or evaluated code (the CSP forbids
# both), and a 409 from the lease renewal is shown in place ("lease lost"), not dropped.
HTMX_CONFIG = json.dumps(
    {
        "includeIndicatorStyles": False,
        "allowEval": False,
        "allowScriptTags": False,
        "selfRequestsOnly": True,
        "responseHandling": [
            {"code": "204", "swap": False},
            {"code": "409", "swap": True, "error": False},
            {"code": "[23]..", "swap": True},
            {"code": "[45]..", "swap": False, "error": True},
            {"code": "...", "swap": False},
        ],
    },
    separators=(",", ":"),
)

DECISION_LABELS: Mapping[ReviewDecision, str] = {
    ReviewDecision.AI_GENERATED: "AI-generated",
    ReviewDecision.NOT_AI_GENERATED: "Human-made",
    ReviewDecision.UNSURE: "Unsure",
}

# Every message a page may show after an action: (kind, text); kind is ok or error.
FLASHES: Mapping[str, tuple[str, str]] = {
    "decided": ("ok", "Decision saved. The case is decided."),
    "escalated": ("ok", "Decision saved. The case goes to an admin to decide."),
    "second_review": ("ok", "Decision saved. A second moderator reviews the case blind."),
    "claimed": ("ok", "You hold this case now. Decide it or release it."),
    "released": ("ok", "Case released: it is back in the queue."),
    "nothing": ("ok", "Nothing to review right now: the queue has no case for you."),
    "settings_saved": ("ok", "Settings saved."),
    "token_revoked": ("ok", "Token revoked: it and its sign-ins no longer work."),
    "signed_out": ("ok", "You are signed out."),
}


class PageError(Exception):
    """A refusal shown as a page: ``status``, a short ``title`` and a sentence saying why."""

    def __init__(self, status: int, detail: str, *, title: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase


class PageRedirect(Exception):
    """Send the browser elsewhere (a GET that needs a sign-in goes to the sign-in form)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


def _static_versions() -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        for path in STATIC_DIR.iterdir()
        if path.is_file()
    }


def static_url(name: str) -> str:
    """A static file's address, versioned by its content so it may be cached for good."""
    version = _STATIC_VERSIONS.get(name)
    if version is None:
        raise ValueError(f"no static file {name!r}")
    return f"{STATIC_PREFIX}/{name}?v={version}"


def _when(moment: datetime | str | None) -> str:
    if moment is None:
        return "—"
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return as_utc(moment).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def duration(seconds: float) -> str:
    """A span of time for people: ``45 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{int(seconds)} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _waited(since: datetime) -> str:
    return duration((utcnow() - as_utc(since)).total_seconds())


def _score(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.2f}"


def _decision(value: ReviewDecision | str | None) -> str:
    if value is None:
        return "—"
    try:
        return DECISION_LABELS[ReviewDecision(value)]
    except ValueError:
        return str(value)


def _short(text: str | None, length: int = 12) -> str:
    return (text or "")[:length]


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=_when,
        waited=_waited,
        score=_score,
        decision=_decision,
        duration=duration,
        short=_short,
    )
    env.globals.update(static=static_url, htmx_config=HTMX_CONFIG, login_path=LOGIN_PATH)
    return env


_STATIC_VERSIONS = _static_versions()
ENV = _environment()


def flash_of(request: Request) -> tuple[str, str] | None:
    return FLASHES.get(request.query_params.get("flash", ""))


def with_flash(path: str, flash: str, **params: str) -> str:
    """``path`` with one of the fixed messages named (and ``params`` kept)."""
    if flash not in FLASHES:
        raise ValueError(f"no message {flash!r}")
    return f"{path}?{urlencode({**params, 'flash': flash})}"


def signed_in_user(request: Request) -> DashboardUser | None:
    """The user this request was found to be, if a dependency has looked already."""
    user = getattr(request.state, "dashboard_user", None)
    return user if isinstance(user, DashboardUser) else None


def render_text(request: Request, template: str, **context: Any) -> str:
    user = signed_in_user(request)
    values: dict[str, Any] = {
        "user": user,
        "flash": flash_of(request),
        "csrf_token": user.csrf_token if user is not None else "",
        "hx_headers": json.dumps({"X-CSRF-Token": user.csrf_token}) if user else "",
        "path": request.url.path,
        "shortcuts": True,
    }
    values.update(context)
    return ENV.get_template(template).render(values)


def page(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    """A whole page drawn from ``template``, with the signed-in user's header."""
    return HTMLResponse(render_text(request, template, **context), status_code=status)


def error_page(request: Request, status: int, detail: str, title: str | None = None) -> Response:
    return page(
        request,
        "error.html",
        status=status,
        title=title or HTTPStatus(status).phrase,
        status_code=status,
        detail=detail,
    )


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


class PageRoute(APIRoute):
    """A dashboard route: every refusal, from a dependency (sign-in, role, CSRF) or from
    the review service, is answered with a page saying why, never a JSON document."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except PageRedirect as exc:
                return see_other(exc.url)
            except PageError as exc:
                failure: tuple[int, str, str | None] = (exc.status, exc.detail, exc.title)
            except ReviewRefused as exc:
                failure = (exc.status, _sentence(exc.detail), None)
            except Problem as exc:
                failure = (exc.status, _sentence(exc.detail), None)
            except RequestValidationError:
                failure = (400, "The request does not fit this page: check the form.", None)
            except HTTPException as exc:
                failure = (exc.status_code, _sentence(str(exc.detail)), None)
            status, detail, title = failure
            return await run_in_threadpool(error_page, request, status, detail, title)

        return page_handler


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."
