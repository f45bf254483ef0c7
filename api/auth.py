"""Who may call an endpoint: a bearer token (``workers.tokens``) with one of the endpoint's
roles, declared in its signature as a typed dependency, so a reader sees who may call it
without reading its body and a test can walk every route and check that each names one.

401 when there is no token or it is not a live one (malformed, unknown, wrong secret and
revoked are answered alike), 403 when the token is live but its role is not allowed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.problems import Problem
from db.models import ApiToken, TokenRole
from workers import tokens

_bearer = HTTPBearer(auto_error=False, description="an API token: `sst_<id>_<secret>`")


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request: committed when the handler returns and before the
    answer is sent (``scope="function"``; FastAPI's default would commit after it, so a
    client could be told of a token or a secret that a failed commit never stored), rolled
    back if it raises."""
    with request.app.state.session_factory() as session, session.begin():
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


class Authenticator:
    """A dependency that answers with the caller's token when its role is one of ``roles``."""

    def __init__(self, *roles: TokenRole) -> None:
        self.roles = frozenset(roles)

    def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> ApiToken:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Problem(401, "unauthenticated", "an API token is required", challenge)
        # A session of its own, closed before the handler runs: a handler that waits (a
        # scan's ?wait) holds no database connection while it does.
        with request.app.state.session_factory() as session:
            token = tokens.authenticate(session, credentials.credentials)
            if token is not None:
                session.expunge(token)
        if token is None:
            raise Problem(401, "unauthenticated", "the API token is not valid", challenge)
        if token.role not in self.roles:
            allowed = ", ".join(sorted(role.value for role in self.roles))
            raise Problem(
                403, "forbidden", f"a {token.role.value} token may not do this (needs {allowed})"
            )
        return token


AdminToken = Annotated[ApiToken, Depends(Authenticator(TokenRole.ADMIN))]
PlatformOrAdmin = Annotated[ApiToken, Depends(Authenticator(TokenRole.PLATFORM, TokenRole.ADMIN))]
