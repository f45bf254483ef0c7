"""Queue names: what a process needs to send work, with no other import."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Queues:
    """The intake queue, and one queue per detector (``detect.<name>``); and their bulk
    twins (``bulk.intake``, ``bulk.detect.<name>``) for low-priority work (batch re-scans,
    back-fills), which a worker serves only when its upload queues are empty."""

    intake: str = "intake"
    detect_prefix: str = "detect."
    bulk_prefix: str = "bulk."
    consumers_prefix: str = "synthsentry.consumers."

    def detect(self, detector: str, *, bulk: bool = False) -> str:
        name = f"{self.detect_prefix}{detector}"
        return f"{self.bulk_prefix}{name}" if bulk else name

    def intake_queue(self, *, bulk: bool = False) -> str:
        return f"{self.bulk_prefix}{self.intake}" if bulk else self.intake

    def consumers(self, queue: str) -> str:
        """The broker key (a Redis sorted set) naming the workers that consume ``queue``, each
        scored with the time of its last heartbeat."""
        return f"{self.consumers_prefix}{queue}"


QUEUES = Queues()
