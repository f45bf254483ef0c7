"""A memory budget for intake: how many bytes of decoded pixels may be held at once.

A decoded image costs memory in proportion to its pixel count, not its file size (a 2 MB
PNG can be 100 Mpx); a scan that decodes ahead and a worker that holds several messages
at once would otherwise need memory in proportion to how many large images arrive
together. Every decode first reserves what the image will cost, from its declared size,
and gives it back once the image is scored and freed; a decode that does not fit waits.

One image larger than the whole budget is admitted when nothing else is held, so it runs
alone rather than never. Reservations are admitted in the order they asked, so a large
image is not passed over for ever by smaller ones arriving after it. A holder must give its
bytes back without waiting on anyone who waits for memory (a scan frees an image's pixels
once it is registered and preprocessed), or the two could wait for each other.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# Bytes held per pixel while an image is decoded and prepared: the decoder's buffer (up to
# 4 bytes for RGBA or CMYK), the RGB copy the detectors read (3), with room for the
# orientation and resize copies. Measured figures are in docs/performance.md.
BYTES_PER_PIXEL = 8
# 2 GiB: twenty 12-megapixel photos, or two images at the default 100 Mpx limit, at once.
DEFAULT_MEMORY_BUDGET = 2 * 1024**3


def image_cost(width: int, height: int, file_bytes: int) -> int:
    """What decoding and holding one image costs, in bytes: its pixels and its file."""
    return width * height * BYTES_PER_PIXEL + file_bytes


class BudgetClosed(RuntimeError):
    """The budget's owner stopped (a scan abandoned or failed): no more reservations."""


@dataclass
class Reservation:
    """Bytes held for one image; give them back with :meth:`MemoryBudget.release`."""

    nbytes: int = 0


@contextlib.contextmanager
def reserving(budget: MemoryBudget) -> Iterator[Callable[[int, int, int], None]]:
    """An ``admit`` callback for ``decode`` that reserves the image from ``budget``, and
    gives back whatever it reserved when the block ends, however it ends."""
    held: list[Reservation] = []

    def admit(width: int, height: int, file_bytes: int) -> None:
        held.append(budget.reserve(image_cost(width, height, file_bytes)))

    try:
        yield admit
    finally:
        for reservation in held:
            budget.release(reservation)


class MemoryBudget:
    """At most ``capacity`` bytes reserved at once (see the module docstring)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"the intake memory budget must be positive, got {capacity}")
        self.capacity = capacity
        self._held = 0
        self._arrivals = 0  # reservations, numbered as they ask
        self._serving = 0  # ... and admitted in that order
        self._asking = 0  # reservations not yet admitted
        self._changed = threading.Condition()
        self._closed = False
        self.peak = 0  # the most bytes held at once, for benchmarks and logs

    @property
    def held(self) -> int:
        with self._changed:
            return self._held

    @property
    def asking(self) -> int:
        """Reservations asked for and not yet admitted (waiting for their turn or memory)."""
        with self._changed:
            return self._asking

    def reserve(self, nbytes: int) -> Reservation:
        """Wait for this reservation's turn (reservations are admitted in the order they
        asked), then until ``nbytes`` fit (or nothing is held), then hold them. Raises
        :class:`BudgetClosed` once the budget is closed, waiting or not."""
        with self._changed:
            self._asking += 1
            self._changed.notify_all()
            try:
                return self._admit(nbytes)
            finally:
                self._asking -= 1
                self._changed.notify_all()

    def _admit(self, nbytes: int) -> Reservation:
        with self._changed:
            arrival = self._arrivals
            self._arrivals += 1
            self._changed.wait_for(lambda: self._closed or self._serving == arrival)
            self._changed.wait_for(lambda: self._closed or self._fits(nbytes))
            if self._closed:
                raise BudgetClosed("the intake memory budget was closed")
            self._held += nbytes
            self.peak = max(self.peak, self._held)
            self._serving += 1
            self._changed.notify_all()
        return Reservation(nbytes)

    def close(self) -> None:
        """Wake every waiting reservation with :class:`BudgetClosed`, and refuse new ones:
        the owner stopped, and its threads must be able to finish."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def release(self, reservation: Reservation) -> None:
        with self._changed:
            self._held -= reservation.nbytes
            reservation.nbytes = 0
            self._changed.notify_all()

    def wait_until(self, ready: Callable[[], bool]) -> None:
        """Block until ``ready()`` holds; it is checked whenever the budget changes."""
        with self._changed:
            self._changed.wait_for(ready)

    def _fits(self, nbytes: int) -> bool:
        return self._held == 0 or self._held + nbytes <= self.capacity
