"""Start and stop fleet processes (`synthsentry worker ...`, `synthsentry ingest ...`) for
tests that need real processes, real signals and a real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import servers

if TYPE_CHECKING:
    import redis

T = TypeVar("T")


CLI = [sys.executable, "-m", "synthsentry.cli"]


class FleetProcess:
    """``command`` + ``args`` in their own process group, output appended to
    ``<log_dir>/<name>.log``; ``command`` is the synthsentry CLI unless given."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        log_dir: Path,
        command: list[str] | None = None,
    ) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.command = command or CLI
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> FleetProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.command, *self.args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def children(self) -> list[int]:
        """Pool processes of a prefork worker (where the tasks and the model run)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except FileNotFoundError:
            return []

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group, as the OOM killer or a node loss would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def batch_sizes(self) -> list[int]:
        """Sizes of the forward batches this process logged (``batch ran`` lines)."""
        sizes = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"batch ran"' in line:
                sizes.append(int(json.loads(line[line.index("{") :])["batch_size"]))
        return sizes

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@contextmanager
def running(*processes: FleetProcess) -> Iterator[tuple[FleetProcess, ...]]:
    for process in processes:
        process.start()
    try:
        yield processes
    finally:
        for process in processes:
            process.stop()


def wait_for(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    processes: tuple[FleetProcess, ...] = (),
    interval: float = 0.5,
) -> T:
    """Poll ``check`` until it returns something truthy; fail with the processes' logs."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            logs = "\n\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in processes)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(interval)


def stop_holding_work(
    pid: int,
    holding: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    processes: tuple[FleetProcess, ...] = (),
) -> T:
    """SIGSTOP ``pid`` at a moment when ``holding`` says it holds work, asked again once it
    is stopped: a process that finished its work between the two questions is let go and
    caught later. So a test that kills the process kills it holding work, however late
    the test itself got to run. Returns what ``holding`` said of the stopped process."""

    def caught() -> T | None:
        if not holding():
            return None
        os.kill(pid, signal.SIGSTOP)
        try:
            held = holding()
        except BaseException:
            os.kill(pid, signal.SIGCONT)
            raise
        if not held:
            os.kill(pid, signal.SIGCONT)
        return held

    return wait_for(caught, timeout=timeout, what=what, processes=processes, interval=0.005)


def fleet_env(
    tmp_path: Path,
    *,
    database: str,
    redis_url: str,
    s3_endpoint: str,
    model: bool = True,
    **settings: str,
) -> dict[str, str]:
    """The environment of a fleet process in tests: this test's database, broker and S3
    server, an emptied broker DB, plus ``settings`` as SYNTHSENTRY_<NAME> variables; with
    ``model``, a sumsub-mj5 detector built from a published-format checkpoint (random
    weights). No metrics server unless asked for (``--metrics-port``, or a
    ``metrics_port`` setting): the processes of parallel tests would share one port."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SYNTHSENTRY_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        SYNTHSENTRY_METRICS_PORT="0",
        SYNTHSENTRY_DATA_DIR=str(tmp_path / "data"),
        SYNTHSENTRY_DATABASE_URL=database,
        SYNTHSENTRY_BROKER_URL=redis_url,
        SYNTHSENTRY_S3_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        HF_HUB_OFFLINE="1",
    )
    if model:
        from checkpoints import SUMSUB_MOBILENET, write_sumsub_raw

        weights = tmp_path / "mj5.pt"
        write_sumsub_raw(weights, SUMSUB_MOBILENET, seed=3)
        config = tmp_path / "detectors.toml"
        config.write_text(
            f'[detectors.sumsub-mj5]\nfamily = "sumsub"\nweights = "{weights}"\n'
            f'[detectors.sumsub-mj5.options]\nbackbone = "{SUMSUB_MOBILENET}"\nai_index = 1\n',
            encoding="utf-8",
        )
        env["SYNTHSENTRY_DETECTOR_CONFIG"] = str(config)
    env.update({f"SYNTHSENTRY_{name.upper()}": value for name, value in settings.items()})
    return env


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``synthsentry ARGS`` as its own process in ``env``, run to the end."""
    return subprocess.run(
        [sys.executable, "-m", "synthsentry.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class PersistentRedis:
    """A redis-server as a broker should run: append-only file on, fsync on every write, so
    a restart keeps the queued messages. Restartable on the same port (pytest-redis's
    executor); ``kill`` ends it with SIGKILL, as the OOM killer or a node loss would."""

    def __init__(self, folder: Path) -> None:
        import port_for
        from pytest_redis.executor import RedisExecutor

        self.executor = RedisExecutor(
            str(servers.find_redis_server()),
            databases=16,
            redis_timeout=0,
            loglevel="notice",
            host="127.0.0.1",
            port=port_for.select_random(),
            datadir=folder,
            appendonly="yes",
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.executor.port}/0"

    def client(self) -> redis.Redis:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> None:
        client = self.client()
        self.executor.start()
        # Its port opens before the append-only file is loaded (LOADING errors until then).
        wait_for(lambda: _pings(client), timeout=20, what="redis to accept connections")
        # Not among the executor's options: each write on disk before it is acknowledged, no
        # RDB snapshots, and refuse writes when full rather than evict queued messages.
        client.config_set("appendfsync", "always")
        client.config_set("save", "")
        client.config_set("maxmemory-policy", "noeviction")
        client.close()

    def stop(self) -> None:
        self.executor.stop()

    def kill(self) -> None:
        """SIGKILL the redis-server process: no shutdown, nothing written beyond what it had
        written; ``start`` runs it again on the same port and append-only file."""
        assert self.executor.running(), "redis-server is not running"
        # The executor runs redis-server in a session of its own: the group is that process.
        self.executor.kill(sig=signal.SIGKILL)


def _pings(client: redis.Redis) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
