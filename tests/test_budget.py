"""The intake memory budget: admission in the order reservations asked, an image larger than
the budget admitted alone, and a close that frees every waiter."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from workers.budget import BudgetClosed, MemoryBudget, Reservation


def _in_thread(target: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(target())
        except BudgetClosed as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_an_image_larger_than_the_budget_is_admitted_alone() -> None:
    budget = MemoryBudget(10)
    big = budget.reserve(100)  # nothing else held: admitted
    assert budget.held == 100
    budget.release(big)
    small = budget.reserve(4)
    waiter, outcome = _in_thread(lambda: budget.reserve(100))
    budget.wait_until(lambda: budget.asking == 1)  # it waits: 4 are held
    assert budget.held == 4
    budget.release(small)
    waiter.join(10)
    assert isinstance(outcome[0], Reservation) and budget.held == 100


def test_closing_frees_every_waiter_and_refuses_new_reservations() -> None:
    budget = MemoryBudget(10)
    budget.reserve(10)
    for_memory, memory_outcome = _in_thread(lambda: budget.reserve(5))
    budget.wait_until(lambda: budget.asking == 1)
    for_turn, turn_outcome = _in_thread(lambda: budget.reserve(5))
    budget.wait_until(lambda: budget.asking == 2)  # one waits for memory, one for its turn
    budget.close()
    for_memory.join(10)
    for_turn.join(10)
    assert isinstance(memory_outcome[0], BudgetClosed)
    assert isinstance(turn_outcome[0], BudgetClosed)
    with pytest.raises(BudgetClosed):
        budget.reserve(1)


def test_a_budget_must_hold_something() -> None:
    with pytest.raises(ValueError, match="positive"):
        MemoryBudget(0)


def test_reservations_are_admitted_in_the_order_they_asked() -> None:
    """A large image that does not fit yet is not passed over by a small one asking after
    it, although the small one would fit: a busy worker cannot starve it."""
    budget = MemoryBudget(10)
    held = budget.reserve(5)
    order: list[str] = []

    def take(name: str, nbytes: int) -> Reservation:
        reservation = budget.reserve(nbytes)
        order.append(name)
        return reservation

    large, _ = _in_thread(lambda: take("large", 8))
    budget.wait_until(lambda: budget.asking == 1)
    small, _ = _in_thread(lambda: take("small", 2))
    budget.wait_until(lambda: budget.asking == 2)  # 5 + 2 fits, yet the small one waits
    assert order == []
    budget.release(held)
    large.join(10)
    small.join(10)
    assert order == ["large", "small"] and budget.held == 10
