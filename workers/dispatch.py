"""How recorded work reaches whatever runs it: the fleet's queues (``tasks.submit``), or
the embedded mode's in-process worker (``workers.embedded``). Services record their work in
the database first and dispatch it after the commit; a dispatch that is lost (a broker
down, a process killed) leaves the work pending in the database, where a sweep finds it
(``synthsentry reconcile``, or the embedded worker's own)."""

from __future__ import annotations

from typing import Protocol


class Dispatcher(Protocol):
    def intake(self, source_id: int, *, bulk: bool = False) -> None:
        """Take in a recorded upload; ``bulk``: low priority, after every upload waiting."""
        ...

    def detect(self, image_id: int, detector: str, *, bulk: bool = False) -> None:
        """Run one detector on a stored image."""
        ...


class LeftForSweep:
    """A dispatcher for a process that runs no work and has no broker (the CLI beside an
    embedded ``synthsentry serve``): the work stays pending in the database, where the
    embedded worker's sweep finds it."""

    def intake(self, source_id: int, *, bulk: bool = False) -> None:
        return None

    def detect(self, image_id: int, detector: str, *, bulk: bool = False) -> None:
        return None
