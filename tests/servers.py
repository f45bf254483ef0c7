"""Throwaway PostgreSQL and Redis servers for the test suite.

The suite runs against real servers. When ``SYNTHSENTRY_TEST_DATABASE_URL`` /
``SYNTHSENTRY_TEST_REDIS_URL`` name servers someone else runs, conftest uses those; otherwise
it calls ``start_postgres()`` / ``start_redis()`` here, which run the installed binaries in a
temporary directory on a free port of 127.0.0.1 and remove everything again on ``stop()``.

PostgreSQL is run as ``postgres`` itself rather than through ``pg_ctl``: the test process then
holds the postmaster's pid, so stopping it is one signal and one ``wait()``, with no pid file or
daemonized process to chase.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import sqlalchemy
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

DATABASE_URL_ENV = "SYNTHSENTRY_TEST_DATABASE_URL"
REDIS_URL_ENV = "SYNTHSENTRY_TEST_REDIS_URL"

POSTGRES_INSTALL_ROOT = Path("/usr/lib/postgresql")  # Debian/Ubuntu: <root>/<version>/bin
POSTGRES_SUPERUSER = "postgres"
# Accounts a root test process hands the PostgreSQL server to, in order of preference.
UNPRIVILEGED_ACCOUNTS = ("postgres", "nobody")

READY_TIMEOUT_SECONDS = 30.0
READY_POLL_SECONDS = 0.05
STOP_TIMEOUT_SECONDS = 15.0
# A port picked as free can be taken by another process (another xdist worker) before the
# server binds it; only that specific failure is retried, with a newly picked port.
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


@dataclass(eq=False)
class RunningServer:
    """A server process this test process started, and the directory that holds its state."""

    kind: str
    url: str
    port: int
    base_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    stop_signal: signal.Signals

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    def stop(self) -> None:
        """Stop the server and delete its directory; safe to call more than once."""
        self.stop_process()
        if self.base_dir.exists():
            shutil.rmtree(self.base_dir)

    def stop_process(self) -> None:
        """Stop the process only; the directory stays (a retry on another port reuses it)."""
        _RUNNING.discard(self)
        if self.process.poll() is None:
            # The server's own shutdown signal first: it then releases its shared memory.
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# Backstop for the pytest finalizers: a server is never left running after the interpreter
# exits normally, even if a fixture's teardown never ran.
_RUNNING: set[RunningServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_postgres(
    binaries: PostgresBinaries | None = None, port: int | None = None
) -> RunningServer:
    """initdb a cluster in a new temporary directory and run it; ``url`` names the ``postgres`` DB.

    Layout of the directory: ``data/`` (the cluster), ``sock/`` (the unix socket, so nothing
    is written to /var/run/postgresql), ``server.log``.
    """
    binaries = binaries or find_postgres_binaries()
    account = _unprivileged_account()
    base_dir = Path(tempfile.mkdtemp(prefix="synthsentry-pg-"))
    try:
        data_dir, socket_dir, log_path = (
            base_dir / "data",
            base_dir / "sock",
            base_dir / "server.log",
        )
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
            **_run_as_kwargs(account),
        )
        if initdb.returncode != 0:
            output = (initdb.stdout + initdb.stderr).decode(errors="replace")
            raise ServerStartError(
                f"initdb ({binaries.initdb}) failed with exit code {initdb.returncode}:\n"
                + "\n".join(output.splitlines()[-LOG_TAIL_LINES:])
            )

        def argv(chosen_port: int) -> list[str]:
            return [
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
            ]

        def url(chosen_port: int) -> str:
            return f"postgresql+psycopg2://{POSTGRES_SUPERUSER}@127.0.0.1:{chosen_port}/postgres"

        def probe(chosen_port: int) -> None:
            engine = sqlalchemy.create_engine(
                url(chosen_port), poolclass=NullPool, connect_args={"connect_timeout": 2}
            )
            try:
                engine.connect().close()
            finally:
                engine.dispose()

        return _launch(
            kind="postgresql",
            argv=argv,
            url=url,
            probe=probe,
            transient_errors=(sqlalchemy.exc.OperationalError,),
            port=port,
            base_dir=base_dir,
            log_path=log_path,
            # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, exit promptly.
            stop_signal=signal.SIGINT,
            account=account,
        )
    except BaseException:
        shutil.rmtree(base_dir, ignore_errors=True)
        raise


def start_redis(redis_server: Path | None = None, port: int | None = None) -> RunningServer:
    """Run a memory-only redis-server in a new temporary directory; ``url`` names DB 0."""
    redis_server = redis_server or find_redis_server()
    base_dir = Path(tempfile.mkdtemp(prefix="synthsentry-redis-"))
    try:

        def argv(chosen_port: int) -> list[str]:
            return [
                str(redis_server),
                "--port",
                str(chosen_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(base_dir),
            ]

        def probe(chosen_port: int) -> None:
            client = redis.Redis(
                host="127.0.0.1",
                port=chosen_port,
                socket_connect_timeout=2,
                socket_timeout=2,
                retry=Retry(NoBackoff(), 0),  # the readiness loop is the retry
            )
            try:
                client.ping()
            finally:
                client.close()

        return _launch(
            kind="redis",
            argv=argv,
            url=lambda chosen_port: f"redis://127.0.0.1:{chosen_port}/0",
            probe=probe,
            transient_errors=(redis.ConnectionError, redis.TimeoutError),
            port=port,
            base_dir=base_dir,
            log_path=base_dir / "server.log",
            stop_signal=signal.SIGTERM,
            account=None,
        )
    except BaseException:
        shutil.rmtree(base_dir, ignore_errors=True)
        raise


def recreate_database(server_url: str, name: str) -> str:
    """Create an empty database ``name`` on the server of ``server_url``; return its URL.

    A database of that name left behind by an interrupted run is dropped first.
    """
    drop_database(server_url, name)
    with _admin_connection(server_url) as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {_quote(conn, name)}")
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    """Drop ``name`` if it exists, first ending sessions that code under test left open."""
    with _admin_connection(server_url) as conn:
        conn.execute(
            sqlalchemy.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {_quote(conn, name)}")


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


def _launch(
    *,
    kind: str,
    argv: Callable[[int], list[str]],
    url: Callable[[int], str],
    probe: Callable[[int], None],
    transient_errors: tuple[type[Exception], ...],
    port: int | None,
    base_dir: Path,
    log_path: Path,
    stop_signal: signal.Signals,
    account: pwd.struct_passwd | None,
) -> RunningServer:
    for attempt in range(1, PORT_ATTEMPTS + 1):
        chosen_port = port if port is not None else free_port()
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv(chosen_port),
                cwd=base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C in the terminal reaches pytest, whose teardown
                # stops the server, instead of killing the server under running tests.
                start_new_session=True,
                **_run_as_kwargs(account),
            )
        server = RunningServer(
            kind=kind,
            url=url(chosen_port),
            port=chosen_port,
            base_dir=base_dir,
            log_path=log_path,
            process=process,
            stop_signal=stop_signal,
        )
        _RUNNING.add(server)
        try:
            _wait_until_ready(server, probe, transient_errors)
        except ServerStartError as exc:
            server.stop_process()
            if exc.port_in_use and port is None and attempt < PORT_ATTEMPTS:
                continue
            raise
        except BaseException:  # e.g. Ctrl-C while waiting: do not leave the process behind
            server.stop_process()
            raise
        return server
    raise AssertionError("unreachable: the last attempt returns or raises")


def _wait_until_ready(
    server: RunningServer,
    probe: Callable[[int], None],
    transient_errors: tuple[type[Exception], ...],
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    last_error: Exception | None = None
    while True:
        exit_code = server.process.poll()
        if exit_code is not None:
            tail = server.log_tail()
            raise ServerStartError(
                f"{server.kind} on port {server.port} exited with code {exit_code} before "
                f"accepting connections. Log ({server.log_path}), last lines:\n{tail}",
                port_in_use="Address already in use" in tail,
            )
        try:
            probe(server.port)
        except transient_errors as exc:
            last_error = exc
        else:
            return
        # A probe can block up to its own timeout; re-check the process before giving up.
        if time.monotonic() >= deadline and server.process.poll() is None:
            raise ServerStartError(
                f"{server.kind} on port {server.port} did not accept connections within "
                f"{READY_TIMEOUT_SECONDS:.0f} s (last error: {last_error}). "
                f"Log ({server.log_path}), last lines:\n{server.log_tail()}"
            )
        time.sleep(READY_POLL_SECONDS)


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


def _run_as_kwargs(account: pwd.struct_passwd | None) -> dict[str, Any]:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _admin_connection(server_url: str) -> sqlalchemy.Connection:
    # CREATE/DROP DATABASE cannot run inside a transaction block.
    engine = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    return engine.connect()


def _quote(conn: sqlalchemy.Connection, identifier: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(identifier)


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
