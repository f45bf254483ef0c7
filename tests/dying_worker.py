"""``python tests/dying_worker.py WIDTH ARGS...``: the synthsentry CLI, in a process whose
model call SIGKILLs the process whenever an image ``WIDTH`` pixels wide reaches it.

A fault point the tests control: the kill comes after the delivery's attempt was counted
and before any result is stored, every time, as an image that crashes its decoder or
exhausts memory would. The prefork pool's children inherit the patched call.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(width: int, argv: Sequence[str]) -> int:
    from synthsentry.cli import main as cli
    from workers import fleet
    from workers.detectors.base import Detector
    from workers.engine import DetectorResult, Prepared

    real = fleet.run_detector

    def run_detector(
        detector: Detector, items: Sequence[Prepared], *, max_batch: int
    ) -> list[DetectorResult]:
        if any(item.image.width == width for item in items):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(detector, items, max_batch=max_batch)

    fleet.run_detector = run_detector  # type: ignore[assignment]
    return cli(list(argv))


if __name__ == "__main__":
    raise SystemExit(main(int(sys.argv[1]), sys.argv[2:]))
