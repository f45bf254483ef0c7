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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(width: int, argv: Sequence[str]) -> int:
    from synthsentry.cli import main as cli
    from workers import engine

    real = engine.DetectorSteps.launch

    def launch(self: engine.DetectorSteps, batch: Any) -> Any:
        # Every model call of the engine passes here, batched or not.
        if any(item.image is not None and item.image.width == width for item in batch.items):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, batch)

    engine.DetectorSteps.launch = launch  # type: ignore[method-assign]
    return cli(list(argv))


if __name__ == "__main__":
    raise SystemExit(main(int(sys.argv[1]), sys.argv[2:]))
