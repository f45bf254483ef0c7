"""The embedded mode's worker: its sweep runs on time whatever the traffic."""

from __future__ import annotations

import time
from pathlib import Path

from db import migrate
from db.session import make_engine, make_sessionmaker
from workers.embedded import EmbeddedWorker

from apitest import build_test_api


def test_the_sweep_runs_on_time_while_work_keeps_arriving(tmp_path: Path, sqlite_url: str) -> None:
    """Re-scan counts, work left by other processes and failed work are found by the sweep,
    so it must not wait for a quiet moment that steady traffic never gives."""
    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    built = build_test_api(make_sessionmaker(engine), tmp_path)
    assert built.worker is not None
    sweeps: list[int] = []  # the uploads waiting at each sweep
    worker = EmbeddedWorker(
        built.worker.ctx,
        built.worker._detector,
        queue_size=10_000,
        sweep_every_s=0.2,
        sweepers=[lambda: sweeps.append(worker._uploads.qsize())],
    )
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while len(sweeps) < 5:
            assert time.monotonic() < deadline, f"{len(sweeps)} sweeps in 20 s of traffic"
            # Work that ends at once (no such upload): the worker is never idle, and its
            # queue never fills (a full queue would sweep early for another reason).
            if worker._uploads.qsize() < 20:
                for _ in range(50):
                    worker.intake(10**9)
    finally:
        worker.stop()
        engine.dispose()
    assert any(sweeps), f"no sweep came while work was waiting: {sweeps}"
