"""Queue names: what a process needs to send work, with no other import."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Queues:
    """The intake queue, and one queue per detector (``detect.<name>``)."""

    intake: str = "intake"
    detect_prefix: str = "detect."
    consumers_prefix: str = "synthsentry.consumers."

    def detect(self, detector: str) -> str:
        return f"{self.detect_prefix}{detector}"

    def consumers(self, queue: str) -> str:
        """The broker key (a Redis sorted set) naming the workers that consume ``queue``, each
        scored with the time of its last heartbeat."""
        return f"{self.consumers_prefix}{queue}"


QUEUES = Queues()
