"""The moderator review dashboard: server-rendered pages over the review service.

    /review/...          the moderators' pages (``api.dashboard.pages``)
    /admin/...           the admins' pages (``api.dashboard.admin``)
    /review/static/...   htmx (vendored), the pages' script and styles

Signing in exchanges a moderator's or an admin's API token for a session cookie
(``api.dashboard.session``); every page names who may open it; every unsafe request is
checked for CSRF and every answer carries a strict Content-Security-Policy
(``api.dashboard.security``). The pages are not part of the OpenAPI schema: they are for
people, and ``/v1/reviews`` is the same service for programs.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.dashboard import admin, pages
from api.dashboard.render import STATIC_DIR, STATIC_PREFIX
from api.dashboard.security import SecurityHeaders

ROUTERS = (pages.router, admin.router)


def install(app: FastAPI) -> None:
    """Serve the dashboard from ``app``: its static files, its pages, and its headers."""
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="dashboard-static")
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(SecurityHeaders)
