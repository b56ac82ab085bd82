"""Which rows go in the next forward pass: step-level continuous batching policy (no torch here).

A request is an ``Entry`` of ``rows`` rows (num_images x 2 with classifier-free guidance) that needs
``total_steps`` forward passes. Entries share a forward pass only when their compatibility ``key`` (U-Net
identity, shape, dtype) is equal. Policy:

- Groups take turns: the next plan serves the group that has waited longest — the later of when it was
  last served and when its oldest entry arrived — so no group starves while another stays busy.
- Within a group, entries go in arrival order (oldest first) while their rows fit under ``max_rows``;
  the oldest always fits (``add`` rejects entries wider than ``max_rows``), so every entry progresses.
- An entry's rows are never split: its sampler steps all its images and both CFG halves together.
- Cancelled and expired entries leave at once, so the next plan does not carry them.

Admission (the queue bound, queue positions) is not decided here: the serving side owns it
(``server.lifecycle``). Not thread-safe: only the engine core's thread calls it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Entry:
    """One admitted request as the scheduler sees it."""

    id: str
    key: Hashable
    rows: int
    total_steps: int
    arrival: float
    deadline: float | None
    seq: int
    steps_done: int = 0
    started_at: float | None = None

    @property
    def started(self) -> bool:
        return self.started_at is not None


@dataclass(frozen=True)
class Plan:
    """The entries of one forward pass (all with the same key)."""

    number: int
    key: Hashable
    entries: tuple[Entry, ...]
    rows: int

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.entries]


@dataclass
class _Group:
    entries: dict[str, Entry] = field(default_factory=dict)  # insertion order = arrival order
    last_served: int | None = None


class Scheduler:
    """Continuous-batching policy over admitted entries; see the module docstring."""

    def __init__(
        self,
        max_rows: int,
        clock: Callable[[], float] = time.monotonic,
        history: int = 64,
    ) -> None:
        self.max_rows = max_rows
        self.clock = clock
        self._groups: dict[Hashable, _Group] = {}
        self._entries: dict[str, Entry] = {}
        self._tick = 0  # orders arrivals and plans on one logical clock
        self._plans = 0
        self._waiting = 0
        self.history: deque[Plan] = deque(maxlen=history)  # recent plans, newest last

    # -- admission and removal ---------------------------------------------------------------

    def add(
        self,
        entry_id: str,
        key: Hashable,
        rows: int,
        total_steps: int,
        timeout: float | None = None,
        deadline: float | None = None,
    ) -> Entry:
        """Admit a request; it expires ``timeout`` seconds from now, or at the clock's ``deadline``."""
        if rows < 1 or rows > self.max_rows:
            raise ValueError(f"rows={rows} must be in [1, {self.max_rows}]")
        if total_steps < 1:
            raise ValueError("total_steps must be >= 1")
        if entry_id in self._entries:
            raise ValueError(f"duplicate entry id {entry_id!r}")
        now = self.clock()
        self._tick += 1
        entry = Entry(
            id=entry_id,
            key=key,
            rows=rows,
            total_steps=total_steps,
            arrival=now,
            deadline=deadline if timeout is None else now + timeout,
            seq=self._tick,
        )
        self._entries[entry_id] = entry
        self._groups.setdefault(key, _Group()).entries[entry_id] = entry
        self._waiting += 1
        return entry

    def remove(self, entry_id: str) -> Entry | None:
        """Drop an entry (cancelled, failed or finished); returns it, or None when unknown."""
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return None
        group = self._groups[entry.key]
        del group.entries[entry_id]
        if not group.entries:
            del self._groups[entry.key]
        if not entry.started:
            self._waiting -= 1
        return entry

    cancel = remove

    def expire(self) -> list[Entry]:
        """Remove and return every entry whose deadline has passed."""
        now = self.clock()
        late = [e for e in self._entries.values() if e.deadline is not None and now >= e.deadline]
        for entry in late:
            self.remove(entry.id)
        return late

    # -- planning -----------------------------------------------------------------------------

    def schedule(self) -> Plan | None:
        """The next forward pass, or None when nothing is admitted."""
        if not self._groups:
            return None

        def priority(item: tuple[Hashable, _Group]) -> tuple[int, int]:
            group = item[1]
            oldest = next(iter(group.entries.values())).seq
            last = group.last_served if group.last_served is not None else -1
            return (max(last, oldest), oldest)

        key, group = min(self._groups.items(), key=priority)
        chosen: list[Entry] = []
        rows = 0
        for entry in group.entries.values():
            if rows + entry.rows <= self.max_rows:
                chosen.append(entry)
                rows += entry.rows
                if rows == self.max_rows:
                    break
        self._tick += 1
        group.last_served = self._tick
        now = self.clock()
        for entry in chosen:
            if entry.started_at is None:
                entry.started_at = now
                self._waiting -= 1
        self._plans += 1
        plan = Plan(number=self._plans, key=key, entries=tuple(chosen), rows=rows)
        self.history.append(plan)
        return plan

    def update(self, plan: Plan, finished: Iterable[str] = ()) -> list[Entry]:
        """Record that ``plan`` ran one step; remove and return the entries in ``finished``.

        Entries removed while the plan ran (cancelled, expired) are skipped.
        """
        for entry in plan.entries:
            if entry.id in self._entries:
                entry.steps_done += 1
        removed = (self.remove(entry_id) for entry_id in finished)
        return [e for e in removed if e is not None]

    # -- introspection ------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every admitted entry, oldest first."""
        return sorted(self._entries.values(), key=lambda e: e.seq)

    def get(self, entry_id: str) -> Entry | None:
        return self._entries.get(entry_id)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def waiting_count(self) -> int:
        """Admitted entries that have not been in any forward pass yet."""
        return self._waiting

    @property
    def running_count(self) -> int:
        return len(self._entries) - self._waiting

    @property
    def last_plan(self) -> Plan | None:
        return self.history[-1] if self.history else None
