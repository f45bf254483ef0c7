"""Requests generated from the API's own OpenAPI schema (schemathesis, property-based): valid
and invalid bodies, parameters and headers for every operation, with a live admin token
and with none. Whatever arrives, the answer is never a server error."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from db.models import TokenRole
from db.session import make_engine, make_sessionmaker, transaction
from synthsentry.cli.serve import BuiltApi
from workers import tokens

from apitest import build_test_api
from conftest import DatabaseFactory


@pytest.fixture(scope="module")
def sessions(committing_database: DatabaseFactory) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(committing_database("api_schema"))
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def built(
    sessions: sessionmaker[Session], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BuiltApi]:
    built = build_test_api(sessions, Path(tmp_path_factory.mktemp("schema")))
    built.start()  # the embedded worker runs what gets submitted
    yield built
    built.stop()


@pytest.fixture(scope="module")
def bearers(sessions: sessionmaker[Session], built: BuiltApi) -> dict[TokenRole, dict[str, str]]:
    """A live token of every role (the platform's with a signing secret, so that rotating
    it and submitting callbacks reach their handlers)."""
    found = {}
    with transaction(sessions) as session:
        for role in TokenRole:
            issued = tokens.issue_token(
                session,
                role=role,
                name=f"schema-{role.value}",
                actor="test",
                secret_box=built.context.callbacks.box if role == TokenRole.PLATFORM else None,
                callback_hosts=["hooks.example.com"] if role == TokenRole.PLATFORM else (),
            )
            found[role] = {"Authorization": f"Bearer {issued.token}"}
    return found


@pytest.fixture(scope="module")
def api_schema(built: BuiltApi) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(built.context))


def _each_operation(schema: Any, *, examples: int, check: Callable[[Any], None]) -> int:
    """Run ``check`` on generated cases of every operation (schemathesis's strategies under
    Hypothesis, the whole schema in one test); returns how many operations were run."""
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            check(case)

        run()
    return operations


@pytest.mark.parametrize("role", list(TokenRole))
def test_no_request_gets_a_server_error(
    api_schema: Any, bearers: dict[TokenRole, dict[str, str]], role: TokenRole
) -> None:
    headers = bearers[role]
    ran = _each_operation(
        api_schema,
        examples=25 if role == TokenRole.ADMIN else 12,
        check=lambda case: case.call_and_validate(headers=headers, checks=[not_a_server_error]),
    )
    assert ran >= 15  # every route of the schema, not a few


def test_no_unauthenticated_request_gets_a_server_error(api_schema: Any) -> None:
    def check(case: Any) -> None:
        response = case.call()
        assert response.status_code < 500, (case.method, case.path, response.status_code)

    _each_operation(api_schema, examples=8, check=check)
