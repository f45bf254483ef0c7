"""One thread that does, for many caller threads, work that is cheaper done for several
items at once (one database transaction for all of them)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class _Call(Generic[T, R]):
    item: T
    answer: Future[R]


class GroupedCalls(Generic[T, R]):
    """Runs ``run(items) -> results`` (one result per item, in order) on its own thread for
    the calls waiting when it is free: those that arrived while it ran the previous group.
    A caller waits only for its own group, so a lone call is run at once, and a burst of
    calls costs one run per group instead of one per call.

    If a group's run fails, its items are run again one at a time, so that an item that
    cannot be handled fails its own call only. Should the thread ever stop, every call
    still waiting fails, and so does every later one: no caller waits for ever."""

    def __init__(self, run: Callable[[Sequence[T]], Sequence[R]], *, name: str) -> None:
        self._run_group = run
        self.name = name
        self._queue: queue.SimpleQueue[_Call[T, R] | None] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()  # nothing is queued behind the closing sentinel
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __call__(self, item: T) -> R:
        """``item``'s result, once the group it joined has run (or the error it raised)."""
        call: _Call[T, R] = _Call(item, Future())
        with self._closing:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            self._queue.put(call)
        return call.answer.result()

    @property
    def waiting(self) -> int:
        """Calls made and not yet taken into a group."""
        return self._queue.qsize()

    def close(self) -> None:
        """Run what was handed in, then stop (after the last call began)."""
        with self._closing:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        try:
            ended = False
            while not ended and (first := self._queue.get()) is not None:
                group = [first]
                while True:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        ended = True
                        break
                    group.append(more)
                self._answer(group)
                del group, first
        finally:
            with self._closing:
                self._closed = True
            while True:  # only if the thread stopped early: nobody else will take these
                try:
                    left = self._queue.get_nowait()
                except queue.Empty:
                    break
                if left is not None:
                    left.answer.set_exception(RuntimeError(f"{self.name} stopped"))

    def _answer(self, group: list[_Call[T, R]]) -> None:
        try:
            results = self._run_group([call.item for call in group])
            if len(results) != len(group):
                raise RuntimeError(f"{len(results)} results for a group of {len(group)}")
        except Exception as exc:
            if len(group) == 1:
                group[0].answer.set_exception(exc)
                return
            log.warning(
                "a group could not be handled together; handling its items one by one",
                exc_info=True,
                extra={"group_of": self.name, "group": len(group)},
            )
            for call in group:
                self._answer([call])
            return
        except BaseException as exc:  # the thread is going: its callers hear why
            for call in group:
                if not call.answer.done():
                    call.answer.set_exception(exc)
            raise
        for call, result in zip(group, results, strict=True):
            call.answer.set_result(result)
