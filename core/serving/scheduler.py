"""Who joins the running batch at the next step: a pure decision over the waiting line, tested without a model.

The rules, in arrival order (the README's promise):
- An exclusive job (load, save, push, compare, quality, the fast-path toggle) runs alone: once it reaches
  the head of the line, no chat behind it joins, the batch drains, and the job runs. So the owner's
  jobs are never starved by a stream of chats, and chats sent after a load are answered by the new model.
- A chat joins while the batch has room (`max_batch`), unless its visitor already has
  `max_per_visitor` requests running; it then waits without holding up the chats behind it.
- The owner (visitor None) has no per-visitor cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Waiting:
    exclusive: bool
    visitor: str | None = None  # None: the owner, or a job with no visitor cap


@dataclass(frozen=True)
class Decision:
    admit: tuple[int, ...] = ()  # indices into the waiting line: these chats join the batch now
    exclusive: int | None = None  # index of the exclusive job to run now (only when the batch is empty)


def decide(waiting: Sequence[Waiting], running: Sequence[str | None], max_batch: int,
           max_per_visitor: int) -> Decision:
    if not running and waiting and waiting[0].exclusive:
        return Decision(exclusive=0)
    admitted: list[int] = []
    counts: dict[str, int] = {}
    for visitor in running:
        if visitor is not None:
            counts[visitor] = counts.get(visitor, 0) + 1
    for index, item in enumerate(waiting):
        if item.exclusive or len(running) + len(admitted) >= max_batch:
            break
        if item.visitor is not None and max_per_visitor and counts.get(item.visitor, 0) >= max_per_visitor:
            continue
        admitted.append(index)
        if item.visitor is not None:
            counts[item.visitor] = counts.get(item.visitor, 0) + 1
    return Decision(admit=tuple(admitted))


def ahead(waiting: Sequence[Waiting], index: int, running: int, max_batch: int, exclusive_running: bool) -> int:
    """How many requests a waiting one waits for, roughly: those before it in line, plus what runs when it cannot join
    (an exclusive job, or a full batch)."""
    before = index + (1 if exclusive_running else 0)
    if running >= max_batch:
        before += 1
    return before
