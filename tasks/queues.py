"""Queue names: what a process needs to send work, with no other import."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Queues:
    """The intake queue, and one queue per detector (``detect.<name>``)."""

    intake: str = "intake"
    detect_prefix: str = "detect."

    def detect(self, detector: str) -> str:
        return f"{self.detect_prefix}{detector}"


QUEUES = Queues()
