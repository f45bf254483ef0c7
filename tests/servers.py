"""Where the test suite's servers come from, and a throwaway PostgreSQL.

When ``SYNTHSENTRY_TEST_DATABASE_URL`` / ``SYNTHSENTRY_TEST_REDIS_URL`` name servers someone else
runs, conftest uses those. Otherwise Redis comes from pytest-redis (its ``redis_proc`` fixture)
and PostgreSQL from ``start_postgres()`` here; databases are made and dropped by
pytest-postgresql's ``DatabaseJanitor`` either way.

Why PostgreSQL does not come from pytest-postgresql as well: its executor runs ``pg_ctl``
(initdb, start, status, stop) as the current user and has no setting for another one, and
``pg_ctl`` refuses root ("pg_ctl: cannot be run as root"), which is how CI runs the tests. Tried:
it runs only behind a shell script written at run time that re-executes ``pg_ctl`` under
``setpriv``, in a data directory made and chowned here (its fixture's are in pytest's basetemp,
which only root may enter), so the account, directory and port handling below stays and the
shim comes on top. Instead ``postgres`` runs here in the foreground under mirakuru (the
executor both plugins build on), as an unprivileged account when we are root.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import port_for
import psycopg
import redis
from mirakuru import AlreadyRunning, ProcessExitedWithError, TCPExecutor, TimeoutExpired
from pytest_postgresql.janitor import DatabaseJanitor
from sqlalchemy.engine import make_url

DATABASE_URL_ENV = "SYNTHSENTRY_TEST_DATABASE_URL"
REDIS_URL_ENV = "SYNTHSENTRY_TEST_REDIS_URL"

POSTGRES_INSTALL_ROOT = Path("/usr/lib/postgresql")  # Debian/Ubuntu: <root>/<version>/bin
POSTGRES_SUPERUSER = "postgres"
# Accounts a root test process hands the PostgreSQL server to, in order of preference.
UNPRIVILEGED_ACCOUNTS = ("postgres", "nobody")

READY_TIMEOUT_SECONDS = 30
# How long creating a database keeps retrying a server that refuses connections (one that is
# still starting); an unreachable server fails after this.
CONNECT_TIMEOUT_SECONDS = 5
# A port picked as free can be taken by another process before the server binds it; only that
# failure is retried, with a newly picked port.
PORT_ATTEMPTS = 3
LOG_TAIL_LINES = 40

POSTGRES_HINT = (
    "PostgreSQL server binaries (initdb, postgres) were not found on PATH or under "
    f"{POSTGRES_INSTALL_ROOT}/*/bin. Install them (Debian/Ubuntu: `apt-get install postgresql`; "
    "Fedora: `dnf install postgresql-server`; macOS: `brew install postgresql@16`) or point "
    f"the tests at a running server: {DATABASE_URL_ENV}="
    "postgresql+psycopg2://postgres@127.0.0.1:5432/test (the user needs CREATEDB)."
)
REDIS_HINT = (
    "redis-server was not found on PATH. Install it (Debian/Ubuntu: `apt-get install "
    "redis-server`; Fedora: `dnf install redis`; macOS: `brew install redis`) or point the "
    f"tests at a running server: {REDIS_URL_ENV}=redis://127.0.0.1:6379/0."
)


class ServerUnavailableError(RuntimeError):
    """No server binary is installed (and no URL of a running server was given)."""


class ServerStartError(RuntimeError):
    """A server binary was found but the server did not become ready."""

    def __init__(self, message: str, *, port_in_use: bool = False) -> None:
        super().__init__(message)
        self.port_in_use = port_in_use


@dataclass(frozen=True)
class PostgresBinaries:
    initdb: Path
    postgres: Path


class PostgresExecutor(TCPExecutor):
    """``postgres`` in the foreground, started once it answers: it opens its port before it
    accepts sessions ("the database system is starting up")."""

    def after_start_check(self) -> bool:
        try:
            psycopg.connect(
                host=self.host,
                port=self.port,
                user=POSTGRES_SUPERUSER,
                dbname="postgres",
                connect_timeout=2,
            ).close()
        except psycopg.OperationalError:
            return False
        return True


@dataclass(eq=False)
class ThrowawayPostgres:
    """A running server and the temporary directory that holds all of its state."""

    executor: PostgresExecutor
    base_dir: Path

    @property
    def port(self) -> int:
        return self.executor.port

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{POSTGRES_SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        """Stop the server and delete its directory; safe to call more than once."""
        atexit.unregister(self.stop)
        try:
            self.executor.stop()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def find_postgres_binaries(
    path: str | None = None, search_dirs: Iterable[Path] | None = None
) -> PostgresBinaries:
    """``initdb`` and ``postgres`` from PATH, else from the newest ``/usr/lib/postgresql/*/bin``.

    ``path`` replaces $PATH and ``search_dirs`` the versioned install directories (tests pass
    empty ones to reach the not-installed error).
    """
    initdb, postgres = shutil.which("initdb", path=path), shutil.which("postgres", path=path)
    if initdb and postgres:
        return PostgresBinaries(initdb=Path(initdb), postgres=Path(postgres))
    for directory in _versioned_postgres_dirs() if search_dirs is None else search_dirs:
        binaries = PostgresBinaries(initdb=directory / "initdb", postgres=directory / "postgres")
        if _is_executable(binaries.initdb) and _is_executable(binaries.postgres):
            return binaries
    raise ServerUnavailableError(POSTGRES_HINT)


def find_redis_server(path: str | None = None) -> Path:
    found = shutil.which("redis-server", path=path)
    if found is None:
        raise ServerUnavailableError(REDIS_HINT)
    return Path(found)


def start_postgres(
    binaries: PostgresBinaries | None = None, port: int | None = None
) -> ThrowawayPostgres:
    """initdb a cluster in a new temporary directory and run it; ``url`` names the ``postgres`` DB.

    Layout of the directory: ``data/`` (the cluster), ``sock/`` (the unix socket, so nothing
    is written to /var/run/postgresql), ``server.log``.
    """
    binaries = binaries or find_postgres_binaries()
    account = _unprivileged_account()
    run_as: dict[str, Any] = (
        {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}
    )
    base_dir = Path(tempfile.mkdtemp(prefix="synthsentry-pg-"))
    data_dir, socket_dir, log_path = base_dir / "data", base_dir / "sock", base_dir / "server.log"
    try:
        socket_dir.mkdir()
        if account is not None:
            for owned in (base_dir, socket_dir):
                os.chown(owned, account.pw_uid, account.pw_gid)
        initdb = subprocess.run(
            [
                str(binaries.initdb),
                f"--pgdata={data_dir}",
                f"--username={POSTGRES_SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            cwd=base_dir,
            capture_output=True,
            timeout=120,
            check=False,
            **run_as,
        )
        if initdb.returncode != 0:
            output = (initdb.stdout + initdb.stderr).decode(errors="replace")
            raise ServerStartError(
                f"initdb ({binaries.initdb}) failed with exit code {initdb.returncode}:\n"
                + "\n".join(output.splitlines()[-LOG_TAIL_LINES:])
            )
        for attempt in range(1, PORT_ATTEMPTS + 1):
            chosen_port = port if port is not None else port_for.select_random()
            with log_path.open("wb") as log:
                executor = PostgresExecutor(
                    [
                        str(binaries.postgres),
                        "-D",
                        str(data_dir),
                        "-p",
                        str(chosen_port),
                        "-k",
                        str(socket_dir),
                        "-c",
                        "listen_addresses=127.0.0.1",
                        # Durability is worthless for a database that is deleted after the run.
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                    ],
                    host="127.0.0.1",
                    port=chosen_port,
                    cwd=str(base_dir),
                    timeout=READY_TIMEOUT_SECONDS,
                    sleep=0.05,
                    # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, exit promptly.
                    stop_signal=signal.SIGINT,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    popen_kwargs=run_as,
                )
                try:
                    executor.start()
                except (AlreadyRunning, ProcessExitedWithError, TimeoutExpired) as exc:
                    error = _start_error(exc, chosen_port, log_path)
                    if error.port_in_use and port is None and attempt < PORT_ATTEMPTS:
                        continue
                    raise error from exc
                except BaseException:  # e.g. Ctrl-C while waiting: leave no process behind
                    executor.kill()
                    raise
            server = ThrowawayPostgres(executor=executor, base_dir=base_dir)
            # Backstop for the pytest finalizers (a teardown that never ran): stop it at exit.
            atexit.register(server.stop)
            return server
        raise AssertionError("unreachable: the last attempt returns or raises")
    except BaseException:
        shutil.rmtree(base_dir, ignore_errors=True)
        raise


@contextmanager
def start_redis() -> Iterator[str]:
    """A throwaway redis-server on a free port, with a data folder of its own, for scripts
    outside pytest (the benchmarks); yields its URL (database 0) and stops it on exit. The
    same executor pytest-redis gives the tests."""
    from pytest_redis.executor import RedisExecutor

    with tempfile.TemporaryDirectory(prefix="synthsentry-redis-") as folder:
        executor = RedisExecutor(
            str(find_redis_server()),
            databases=4,
            redis_timeout=0,
            loglevel="warning",
            host="127.0.0.1",
            port=port_for.select_random(),
            datadir=Path(folder),
        )
        executor.start()
        try:
            yield f"redis://127.0.0.1:{executor.port}/0"
        finally:
            executor.stop()


@contextmanager
def start_s3() -> Iterator[str]:
    """A real S3-protocol server over HTTP on loopback (moto's server, any credentials);
    yields its endpoint and stops it on exit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def recreate_database(server_url: str, name: str) -> str:
    """Create an empty database ``name`` on the server of ``server_url``; return its URL.

    A database of that name left behind by an interrupted run is dropped first.
    """
    janitor = _janitor(server_url, name)
    janitor.drop()
    janitor.init()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    """Drop ``name`` if it exists, first ending sessions that code under test left open."""
    _janitor(server_url, name).drop()


def redis_url_for_db(base_url: str, offset: int) -> str:
    """The URL of DB ``<base db> + offset`` on the server of ``base_url``.

    Raises ServerStartError if the server has fewer databases (``databases`` setting).
    """
    parts = urlsplit(base_url)
    base_db = int(parts.path.strip("/") or 0)
    db = base_db + offset
    client = redis.Redis.from_url(base_url, decode_responses=True)
    try:
        try:
            configured = client.config_get("databases").get("databases")
        except redis.ResponseError:  # CONFIG is disabled on some managed servers
            configured = None
        databases = int(configured) if configured is not None else 16
    finally:
        client.close()
    if db >= databases:
        raise ServerStartError(
            f"{base_url} has {databases} databases; this worker needs DB {db}. Run fewer "
            "xdist workers, raise the server's `databases` setting, or unset "
            f"{REDIS_URL_ENV} to let each worker start its own redis-server."
        )
    return urlunsplit(parts._replace(path=f"/{db}"))


def _janitor(server_url: str, name: str) -> DatabaseJanitor:
    """pytest-postgresql's janitor for database ``name``; it works from the URL's database.

    Empty user or host leave the choice to libpq (current user, unix socket), as the URL does.
    """
    url = make_url(server_url)
    return DatabaseJanitor(
        user=url.username or "",
        host=url.host or "",
        port=url.port or 5432,
        password=url.password,
        dbname=name,
        maintenance_dbname=url.database or "postgres",
        connection_timeout=CONNECT_TIMEOUT_SECONDS,
    )


def _start_error(exc: Exception, port: int, log_path: Path) -> ServerStartError:
    tail = _tail(log_path, LOG_TAIL_LINES)
    if isinstance(exc, AlreadyRunning):
        what = "was not started: another process listens on it (Address already in use)"
    elif isinstance(exc, TimeoutExpired):
        what = f"did not accept connections within {READY_TIMEOUT_SECONDS} s"
    else:
        what = f"exited before accepting connections ({exc})"
    return ServerStartError(
        f"postgresql on port {port} {what}. Log ({log_path}), last lines:\n{tail}",
        port_in_use=isinstance(exc, AlreadyRunning) or "Address already in use" in tail,
    )


def _unprivileged_account() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as, or None to run it as ourselves.

    PostgreSQL refuses to start as root ('"root" execution of the PostgreSQL server is not
    permitted'), and containers and CI often run the tests as root. Then initdb and the
    server run as an unprivileged account (Popen's ``user=``/``group=``, no helper binary),
    which owns the temporary directory they write to.
    """
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_ACCOUNTS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServerUnavailableError(
        "The tests run as root and PostgreSQL refuses to; none of the accounts "
        f"{', '.join(UNPRIVILEGED_ACCOUNTS)} exists to run it as. Run the tests as a normal "
        f"user, create one of those accounts, or set {DATABASE_URL_ENV}."
    )


def _versioned_postgres_dirs() -> list[Path]:
    def version(bin_dir: Path) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in bin_dir.parent.name.split("."))
        except ValueError:
            return (0,)

    return sorted(POSTGRES_INSTALL_ROOT.glob("*/bin"), key=version, reverse=True)


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"
