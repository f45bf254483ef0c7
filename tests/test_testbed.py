"""The test bed itself: real servers, one database per worker, every test rolled back."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import port_for
import pytest
import redis
import sqlalchemy
from sqlalchemy import Column, Integer, MetaData, Table, Text, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from synthsentry.settings import get_settings

import servers

pytest_plugins = ["pytester"]

TESTS_DIR = Path(__file__).resolve().parent


def expected_worker_id() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "master")


def test_postgres_url_is_a_real_postgresql_database_of_this_worker(postgres_url: str) -> None:
    engine = sqlalchemy.create_engine(postgres_url, poolclass=NullPool)
    with engine.connect() as conn:
        version = conn.scalar(text("SELECT version()"))
        database = conn.scalar(text("SELECT current_database()"))
    assert version.startswith("PostgreSQL ")
    assert database.endswith(f"_{expected_worker_id()}")


def test_redis_url_is_a_real_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert client.ping() is True
        client.set("testbed:probe", "stored")
        assert client.get("testbed:probe") == "stored"
    finally:
        client.delete("testbed:probe")
        client.close()


@pytest.fixture(scope="module")
def probe_table(pg_engine: sqlalchemy.Engine) -> Iterator[Table]:
    """A real, committed table of our own (the schema proper belongs to the migrations).

    Module-scoped and dropped afterwards so no other test module sees a table the migrations
    do not define. Before dropping it, check that no test's rows survived.
    """
    table = Table(
        "testbed_probe",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("note", Text, nullable=False),
    )
    table.create(pg_engine)
    yield table
    with pg_engine.connect() as conn:
        surviving = conn.scalar(select(func.count()).select_from(table))
    table.drop(pg_engine)
    assert surviving == 0, f"{surviving} row(s) committed through db_session outlived their test"


# Two runs of one test: under xdist they may land on different workers, so each run also
# checks from a second connection, and probe_table's teardown checks what is left at the end.
@pytest.mark.parametrize("run", [1, 2])
def test_rows_committed_through_db_session_do_not_outlive_the_test(
    db_session: Session, probe_table: Table, pg_engine: sqlalchemy.Engine, run: int
) -> None:
    count = select(func.count()).select_from(probe_table)
    assert db_session.scalar(count) == 0

    db_session.execute(insert(probe_table).values(note=f"run {run}"))
    db_session.commit()

    assert db_session.scalar(count) == 1
    with pg_engine.connect() as other:
        assert other.scalar(count) == 0, "commit() reached the database: the outer transaction"


def test_sqlite_url_is_a_new_file_in_tmp_path(sqlite_url: str, tmp_path: Path) -> None:
    database = tmp_path / "synthsentry.db"
    assert sqlite_url == f"sqlite:///{database}"
    assert not database.exists()


def test_isolated_settings_ignore_the_outer_environment(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    monkeypatch.setenv("SYNTHSENTRY_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("SYNTHSENTRY_DATABASE_URL", "postgresql+psycopg2://elsewhere/db")
    configure = request.getfixturevalue("isolated_settings")

    settings = configure()
    assert settings.log_level == "INFO"
    assert settings.data_dir == tmp_path / "data"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'data' / 'synthsentry.db'}"

    configured = configure(database_url="postgresql+psycopg2://postgres@db.example/synthsentry")
    assert get_settings() is configured
    assert (
        configured.resolved_database_url == "postgresql+psycopg2://postgres@db.example/synthsentry"
    )


def accepts_connections(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.integration
def test_throwaway_postgres_starts_serves_and_leaves_nothing_behind() -> None:
    server = servers.start_postgres()
    try:
        engine = sqlalchemy.create_engine(server.url, poolclass=NullPool)
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT version()")).startswith("PostgreSQL ")
            assert conn.scalar(text("SHOW fsync")) == "off"
            assert conn.scalar(text("SHOW listen_addresses")) == "127.0.0.1"
            socket_dir = Path(str(conn.scalar(text("SHOW unix_socket_directories"))))
        assert socket_dir.is_relative_to(server.base_dir)
        assert (socket_dir / f".s.PGSQL.{server.port}").exists()
        data_owner = (server.base_dir / "data").stat().st_uid
        if os.geteuid() == 0:
            assert data_owner != 0, "PostgreSQL refuses root; the server must run unprivileged"
        else:
            assert data_owner == os.geteuid()
    finally:
        server.stop()
    assert not server.executor.running()
    assert not accepts_connections(server.port)
    assert not server.base_dir.exists()


@pytest.mark.integration
def test_postgres_on_a_port_another_server_holds_raises_and_leaves_nothing() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken_port = blocker.getsockname()[1]
        with pytest.raises(servers.ServerStartError, match="Address already in use") as excinfo:
            servers.start_postgres(port=taken_port)
    assert excinfo.value.port_in_use
    log_path = re.search(r"Log \((.+?)\)", str(excinfo.value))
    assert log_path is not None
    assert not Path(log_path.group(1)).parent.exists(), "the failed server's directory remains"


@pytest.mark.integration
def test_a_picked_port_taken_before_postgres_binds_it_is_retried_with_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bound, not listening: nothing answers on the port, so postgres itself fails to bind."""
    pick = port_for.select_random
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        taken_port = blocker.getsockname()[1]
        picks = [taken_port]
        monkeypatch.setattr(
            port_for, "select_random", lambda *args, **kwargs: picks.pop() if picks else pick()
        )
        with servers.start_postgres() as server:
            assert not picks, "start_postgres did not try the taken port first"
            assert server.port != taken_port
            engine = sqlalchemy.create_engine(server.url, poolclass=NullPool)
            with engine.connect() as conn:
                assert conn.scalar(text("SHOW port")) == str(server.port)


def test_missing_postgres_binaries_name_what_to_install() -> None:
    with pytest.raises(servers.ServerUnavailableError) as excinfo:
        servers.find_postgres_binaries(path="", search_dirs=[])
    assert "apt-get install postgresql" in str(excinfo.value)
    assert servers.DATABASE_URL_ENV in str(excinfo.value)


def test_missing_redis_server_names_what_to_install() -> None:
    with pytest.raises(servers.ServerUnavailableError) as excinfo:
        servers.find_redis_server(path="")
    assert "apt-get install redis-server" in str(excinfo.value)
    assert servers.REDIS_URL_ENV in str(excinfo.value)


@pytest.mark.integration
def test_postgres_binaries_are_found_in_versioned_dirs_off_path(tmp_path: Path) -> None:
    installed = servers.find_postgres_binaries()
    bin_dir = tmp_path / "15" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "initdb").symlink_to(installed.initdb)
    (bin_dir / "postgres").symlink_to(installed.postgres)

    found = servers.find_postgres_binaries(path="", search_dirs=[tmp_path / "absent", bin_dir])

    assert found == servers.PostgresBinaries(bin_dir / "initdb", bin_dir / "postgres")


def copy_test_bed(pytester: pytest.Pytester, conftest_suffix: str = "") -> None:
    shutil.copy(TESTS_DIR / "servers.py", pytester.path)
    pytester.makeconftest((TESTS_DIR / "conftest.py").read_text() + conftest_suffix)


def test_tests_needing_absent_servers_fail_rather_than_skip(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine with neither binaries nor URLs gets errors naming what to install."""
    # Hide the versioned install directories as well as PATH.
    copy_test_bed(pytester, '\nservers.POSTGRES_INSTALL_ROOT = Path("/nonexistent/postgresql")\n')
    pytester.makepyfile(
        test_needs_servers="""
        def test_needs_postgres(postgres_url):
            pass

        def test_needs_redis(redis_url):
            pass
        """
    )
    empty_bin = pytester.mkdir("empty-bin")
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.delenv(servers.DATABASE_URL_ENV, raising=False)
    monkeypatch.delenv(servers.REDIS_URL_ENV, raising=False)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")

    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        ["*apt-get install postgresql*", "*apt-get install redis-server*"], consecutive=False
    )


@pytest.mark.integration
def test_throwaway_servers_of_a_session_are_gone_after_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No URLs: the session gets a PostgreSQL and a memory-only Redis, stopped at its end."""
    copy_test_bed(pytester)
    pytester.makepyfile(
        test_records_servers="""
        import json
        import os
        from pathlib import Path

        import redis
        import sqlalchemy

        def test_record(postgres_url, redis_url):
            client = redis.Redis.from_url(redis_url, decode_responses=True)
            redis_config = {**client.config_get("save"), **client.config_get("timeout")}
            client.close()
            engine = sqlalchemy.create_engine(postgres_url)
            with engine.connect() as conn:
                data_dir = conn.exec_driver_sql("SHOW data_directory").scalar()
            engine.dispose()
            record = {
                "postgres_url": postgres_url,
                "data_dir": data_dir,
                "redis_url": redis_url,
                "redis_config": redis_config,
            }
            Path(os.environ["RECORD"]).write_text(json.dumps(record))
        """
    )
    record_path = pytester.path / "record.json"
    monkeypatch.setenv("RECORD", str(record_path))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # when this test runs under xdist
    monkeypatch.delenv(servers.DATABASE_URL_ENV, raising=False)
    monkeypatch.delenv(servers.REDIS_URL_ENV, raising=False)
    # pytest-redis puts redis-server's unix socket in the basetemp, and a socket path has at
    # most 107 bytes: pytester's own basetemp, nested in ours, is too deep.
    basetemp = Path(tempfile.mkdtemp(prefix="testbed-"))
    try:
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "-p", "no:xdist", f"--basetemp={basetemp}"
        )
    finally:
        shutil.rmtree(basetemp, ignore_errors=True)

    result.assert_outcomes(passed=1)
    record = json.loads(record_path.read_text())
    postgres, redis_url = make_url(record["postgres_url"]), make_url(record["redis_url"])
    assert postgres.database == "synthsentry_test_master"
    assert record["redis_config"] == {"save": "", "timeout": "0"}
    assert postgres.port is not None and redis_url.port is not None
    assert not accepts_connections(postgres.port), "its PostgreSQL still runs"
    assert not accepts_connections(redis_url.port), "its Redis still runs"
    assert not Path(record["data_dir"]).parent.exists(), "its PostgreSQL directory remains"
