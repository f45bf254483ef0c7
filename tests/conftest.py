"""Shared fixtures: real PostgreSQL and Redis, one database of each per xdist worker.

Servers: ``SYNTHSENTRY_TEST_DATABASE_URL`` / ``SYNTHSENTRY_TEST_REDIS_URL`` when set (a server
someone else runs); otherwise each pytest process (each xdist worker) starts its own throwaway
servers from the installed binaries, PostgreSQL through tests/servers.py and Redis through
pytest-redis's ``redis_proc``, and stops them at the end of the session. Neither available: the
tests that need them fail with what to install; they are never skipped.

Databases: each worker gets ``<dbname>_<worker id>`` (``synthsentry_test_gw0``, ...) created
empty at the start of the session and dropped at its end, and Redis DB ``<db> + <worker number>``
on an external Redis (DB 0 of its own server otherwise), flushed at start and end.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import sqlalchemy
from pytest_redis.executor import RedisExecutor
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker as sessionmaker_type

from synthsentry.settings import Settings, get_settings

# tests/ is not a package: pytest puts it on sys.path, so its helper modules import by name.
import servers

# Fixtures that need a server; tests using any of them carry the `integration` marker, so
# `-m "not integration"` is an explicit way to leave them out (they are never skipped).
INTEGRATION_FIXTURES = frozenset(
    {"postgres_url", "migrated_postgres_url", "pg_engine", "db_session", "redis_url"}
)
THROWAWAY_DATABASE_PREFIX = "synthsentry_test"

# moto's server logs every request through werkzeug, whose handler keeps the stream that
# was stderr when it first logged: once pytest has closed that capture, each request of a
# later test printed a logging error. Requests are not what a failing test needs to show.
logging.getLogger("werkzeug").setLevel(logging.WARNING)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def worker_id() -> str:
    """``gw0``, ``gw1``, ... under pytest-xdist; ``master`` otherwise."""
    return os.environ.get("PYTEST_XDIST_WORKER", "master")


def worker_number() -> int:
    match = re.fullmatch(r"gw(\d+)", worker_id())
    return int(match.group(1)) if match else 0


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """URL of a PostgreSQL server (any database on it) this session may create databases on."""
    external = os.environ.get(servers.DATABASE_URL_ENV)
    if external:
        yield external
        return
    try:
        server = servers.start_postgres()
    except servers.ServerUnavailableError as exc:
        pytest.fail(str(exc), pytrace=False)
    with server:
        yield server.url


@pytest.fixture(scope="session")
def redis_server_url(request: pytest.FixtureRequest) -> str:
    """URL of a Redis server for this session: external as given, or a throwaway one."""
    external = os.environ.get(servers.REDIS_URL_ENV)
    if external:
        return external
    try:
        servers.find_redis_server()
    except servers.ServerUnavailableError as exc:
        pytest.fail(str(exc), pytrace=False)
    # pytest-redis's own fixture: a free port per xdist worker, stopped at the end of the session.
    executor: RedisExecutor = request.getfixturevalue("redis_proc")
    url = f"redis://{executor.host}:{executor.port}/0"
    client = redis.Redis.from_url(url)
    try:
        # Settings its command line cannot give: memory only (without a schedule it passes no
        # --save, so redis-server snapshots on its default one) and no idle timeout (it
        # passes 15 s; 0 is taken as "not set").
        client.config_set("save", "")
        client.config_set("timeout", 0)
    finally:
        client.close()
    return url


@pytest.fixture(scope="session")
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """URL of this worker's own database, empty when created (not migrated).

    It is the same database ``migrated_postgres_url`` migrates: once that fixture has run in
    this worker, the database holds the schema.
    """
    external = os.environ.get(servers.DATABASE_URL_ENV)
    base = make_url(external).database if external else None
    name = f"{base or THROWAWAY_DATABASE_PREFIX}_{worker_id()}"
    try:
        url = servers.recreate_database(postgres_server_url, name)
    except (psycopg.Error, TimeoutError) as exc:
        pytest.fail(
            f"Could not create database {name!r} on {servers.DATABASE_URL_ENV} server "
            f"({make_url(postgres_server_url)!r}); it must be reachable and the user needs "
            f"CREATEDB: {exc.__cause__ or exc}",
            pytrace=False,
        )
    yield url
    servers.drop_database(postgres_server_url, name)


DatabaseFactory = Callable[..., str]


@pytest.fixture(scope="session")
def committing_database(postgres_server_url: str) -> Iterator[DatabaseFactory]:
    """For code under test that commits (the CLI, fleet processes): ``make(purpose)`` gives a
    fresh database of its own per purpose and xdist worker, migrated unless
    ``migrated=False``, and drops them all at the end of the session."""
    created: list[str] = []

    def make(purpose: str, *, migrated: bool = True) -> str:
        from db.migrate import upgrade

        name = f"synthsentry_{purpose}_{worker_id()}"
        url = servers.recreate_database(postgres_server_url, name)
        if migrated:
            upgrade(url)
        created.append(name)
        return url

    yield make
    for name in dict.fromkeys(created):
        servers.drop_database(postgres_server_url, name)


@pytest.fixture(scope="session")
def migrated_postgres_url(postgres_url: str) -> str:
    """``postgres_url`` with all migrations applied (``db.migrate.upgrade``)."""
    from db.migrate import upgrade

    upgrade(postgres_url)
    return postgres_url


@pytest.fixture(scope="session")
def pg_engine(migrated_postgres_url: str) -> Iterator[sqlalchemy.Engine]:
    engine = sqlalchemy.create_engine(migrated_postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db_session(pg_engine: sqlalchemy.Engine) -> Iterator[Session]:
    """A session whose every change, committed or not, is rolled back after the test.

    The connection's outer transaction is never committed; the session works in SAVEPOINTs
    inside it, so ``session.commit()`` in code under test releases a savepoint instead.
    """
    with pg_engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        try:
            yield session
        finally:
            session.close()
            outer.rollback()


@pytest.fixture(scope="session")
def redis_url(redis_server_url: str) -> Iterator[str]:
    """URL of this worker's Redis DB, empty at the start of the session."""
    if os.environ.get(servers.REDIS_URL_ENV):
        try:
            url = servers.redis_url_for_db(redis_server_url, worker_number())
        except (servers.ServerStartError, redis.ConnectionError) as exc:
            pytest.fail(f"{servers.REDIS_URL_ENV}={redis_server_url}: {exc}", pytrace=False)
    else:
        url = redis_server_url
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        yield url
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a SQLite file in this test's tmp_path (created on first connect)."""
    return f"sqlite:///{tmp_path / 'synthsentry.db'}"


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[SettingsFactory]:
    """Settings read from an environment this test controls.

    ``SYNTHSENTRY_*`` variables from the outer environment are removed (not the ``_TEST_``
    server URLs) and ``SYNTHSENTRY_DATA_DIR`` points at ``tmp_path / "data"``. Returns
    ``configure(**fields)``: sets ``SYNTHSENTRY_<FIELD>`` for each keyword (e.g.
    ``configure(database_url=postgres_url)``) and returns the fresh ``get_settings()``, which
    any code under test that calls ``get_settings()`` sees too.
    """
    for name in list(os.environ):
        if name.startswith("SYNTHSENTRY_") and not name.startswith("SYNTHSENTRY_TEST_"):
            monkeypatch.delenv(name)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setenv("SYNTHSENTRY_DATA_DIR", str(data_dir))
    get_settings.cache_clear()

    def configure(**fields: str | Path) -> Settings:
        for field, value in fields.items():
            monkeypatch.setenv(f"SYNTHSENTRY_{field.upper()}", str(value))
        get_settings.cache_clear()
        return get_settings()

    yield configure
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The shared image corpus, ``../shared/corpus`` beside the checkout."""
    path = Path(__file__).resolve().parents[2] / "shared" / "corpus"
    if not path.is_dir():
        pytest.skip(
            f"../shared/corpus not found beside the checkout ({path}); it holds the test "
            "images (see its README.md and MANIFEST.tsv) and is not part of the repository."
        )
    return path


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the test S3 server (moto accepts any credentials)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-protocol server over HTTP on loopback (moto's server), for this session."""
    with servers.start_s3() as endpoint:
        yield endpoint


def empty_tables(engine: sqlalchemy.Engine) -> None:
    """Empty every table of a committing database (the migrations' bookkeeping aside), so a
    test starts from a clean slate; a new table is never left out."""
    with engine.begin() as connection:
        tables = sorted(set(sqlalchemy.inspect(connection).get_table_names()) - {"alembic_version"})
        connection.execute(
            sqlalchemy.text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        )


def emptied_sessions(url: str) -> Iterator[sessionmaker_type[Session]]:
    """Sessions on the committing database ``url``, every table emptied first
    (``empty_tables``); the engine is disposed afterwards."""
    from db.session import make_engine, make_sessionmaker

    engine = make_engine(url)
    empty_tables(engine)
    yield make_sessionmaker(engine)
    engine.dispose()
