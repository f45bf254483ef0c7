"""Every metric name the processes export, read from their own ``/metrics`` (for the tests
that check dashboards and alert rules against them).

Two real processes, on a SQLite file in a temporary folder, need nothing else running:

- ``synthsentry serve`` (the API, embedded mode) on its HTTP port;
- ``synthsentry reconcile`` on its metrics port: a long-running process's server, with
  every counter and histogram, ``synthsentry_worker_ready``, and the gauges only the
  reconciler exports. Its broker is unreachable, so those gauges are served without samples:
  their names (the ``# HELP``/``# TYPE`` lines) are what this reads.

Names are series names: a counter ``x`` gives ``x_total``, a histogram ``x_bucket``,
``x_sum`` and ``x_count``, a gauge its own name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CLI = [sys.executable, "-m", "synthsentry.cli"]
START_TIMEOUT_S = 120.0

# Every sample of an exposition, by (series name, its labels).
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(exposition: str) -> Samples:
    """Every sample of a Prometheus text exposition by (series name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series not exported yet (a counter never moved)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def counted(name: str, **labels: str) -> float:
    """A series' value in this process (the test's own), 0 when it has none yet."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def series_names(exposition: str) -> set[str]:
    """The series names of a Prometheus text exposition, expanded from each family's type
    (a family without samples still names its series)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif family.type == "summary":
            names.update({family.name, f"{family.name}_sum", f"{family.name}_count"})
        else:
            names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def scrape(url: str, *, timeout: float = START_TIMEOUT_S, process: subprocess.Popen[bytes]) -> str:
    """The text at ``url`` once it answers (the process is starting); fails with the
    process's output if it exits first or never answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return str(answer.read().decode())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    process.kill()
    output = process.communicate()[0].decode(errors="replace")
    raise AssertionError(f"{url} did not answer (exit {process.returncode}):\n{output[-4000:]}")


def _free_port() -> int:
    import port_for

    return int(port_for.select_random())


def exported_metric_names() -> set[str]:
    """Start the API and a reconciler (see the module), read their ``/metrics``, stop them,
    and return every series name they export."""
    with tempfile.TemporaryDirectory(prefix="synthsentry-metric-names-") as folder:
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("SYNTHSENTRY_") and name != "PROMETHEUS_MULTIPROC_DIR"
        }
        env.update(
            SYNTHSENTRY_DATA_DIR=str(Path(folder) / "data"),
            SYNTHSENTRY_BROKER_URL="redis://127.0.0.1:1/0",  # nothing listens there
            SYNTHSENTRY_LOG_LEVEL="WARNING",
        )
        api_port, metrics_port = _free_port(), _free_port()
        # The reconciler waits for the API to have made and migrated the SQLite file.
        api = subprocess.Popen(
            [*CLI, "serve", "--port", str(api_port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            api_text = scrape(f"http://127.0.0.1:{api_port}/metrics", process=api)
            reconciler = subprocess.Popen(
                [*CLI, "reconcile", "--every", "3600", "--metrics-port", str(metrics_port)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
                process_text = scrape(
                    f"http://127.0.0.1:{metrics_port}/metrics", process=reconciler
                )
            finally:
                _stop(reconciler)
        finally:
            _stop(api)
    return series_names(api_text) | series_names(process_text)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    if process.stdout is not None:
        process.stdout.close()
