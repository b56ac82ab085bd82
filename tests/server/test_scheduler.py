"""Scheduler policy with a fake clock: grouping, caps, fairness, cancellation, deadlines."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.scheduler import Scheduler


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(max_rows: int = 8) -> tuple[Scheduler, FakeClock]:
    clock = FakeClock()
    return Scheduler(max_rows=max_rows, clock=clock), clock


def run_to_completion(s: Scheduler, limit: int = 1000) -> list[list[str]]:
    """Drive the scheduler like the engine does; returns the ids of every plan."""
    plans = []
    for _ in range(limit):
        plan = s.schedule()
        if plan is None:
            return plans
        plans.append(plan.ids)
        finished = [e.id for e in plan.entries if e.steps_done + 1 >= e.total_steps]
        s.update(plan, finished)
    raise AssertionError("did not finish")


def test_no_torch_import() -> None:
    code = "import sys, server.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_groups_never_mix_and_rows_are_capped() -> None:
    s, _ = make(max_rows=8)
    for i in range(6):
        s.add(f"a{i}", key="A", rows=2, total_steps=3)
    s.add("b0", key="B", rows=4, total_steps=3)
    for _ in range(12):
        plan = s.schedule()
        if plan is None:
            break
        keys = {e.key for e in plan.entries}
        assert len(keys) == 1
        assert plan.rows == sum(e.rows for e in plan.entries) <= 8
        s.update(plan, [e.id for e in plan.entries if e.steps_done + 1 >= e.total_steps])


def test_requests_are_never_split() -> None:
    s, _ = make(max_rows=8)
    s.add("big", key="A", rows=6, total_steps=2)
    s.add("mid", key="A", rows=4, total_steps=2)
    s.add("small", key="A", rows=2, total_steps=2)
    plan = s.schedule()
    # oldest first; "mid" does not fit beside "big" and is skipped whole, "small" fills the gap.
    assert plan.ids == ["big", "small"]
    assert plan.rows == 8


def test_wider_than_cap_is_rejected() -> None:
    s, _ = make(max_rows=8)
    with pytest.raises(ValueError):
        s.add("x", key="A", rows=9, total_steps=1)


def test_step_level_joining() -> None:
    s, _ = make(max_rows=8)
    s.add("a", key="A", rows=2, total_steps=3)
    p1 = s.schedule()
    s.update(p1)
    s.add("b", key="A", rows=2, total_steps=3)  # joins at the next step, not after "a" finishes
    p2 = s.schedule()
    assert p2.ids == ["a", "b"]
    s.update(p2)
    p3 = s.schedule()
    s.update(p3, ["a"])
    assert s.schedule().ids == ["b"]


def test_oldest_first_and_groups_take_turns() -> None:
    s, _ = make(max_rows=4)
    s.add("a0", key="A", rows=4, total_steps=5)
    s.add("b0", key="B", rows=4, total_steps=5)
    s.add("a1", key="A", rows=4, total_steps=5)
    plans = run_to_completion(s)
    # A's oldest goes first, then B gets a turn rather than waiting for all of A.
    assert plans[0] == ["a0"]
    assert plans[1] == ["b0"]
    # B is served every other plan while A has work: no starvation.
    b_plans = [i for i, ids in enumerate(plans) if ids == ["b0"]]
    assert b_plans == [1, 3, 5, 7, 9]
    assert sum(len(ids) for ids in plans) == 15


def test_busy_group_does_not_starve_a_newcomer() -> None:
    s, _ = make(max_rows=2)
    for i in range(20):
        s.add(f"a{i}", key="A", rows=2, total_steps=50)
    for _ in range(5):
        s.update(s.schedule())
    s.add("late", key="B", rows=1, total_steps=1)
    waited = 0
    while True:
        plan = s.schedule()
        if "late" in plan.ids:
            break
        s.update(plan)
        waited += 1
    assert waited <= 1


def test_cancel_frees_rows_for_the_next_plan() -> None:
    s, _ = make(max_rows=8)
    for i in range(4):
        s.add(f"r{i}", key="A", rows=2, total_steps=10)
    plan = s.schedule()
    assert plan.ids == ["r0", "r1", "r2", "r3"]
    s.cancel("r1")  # while the plan runs
    s.update(plan)
    nxt = s.schedule()
    assert "r1" not in nxt.ids and nxt.rows == 6
    assert s.get("r1") is None


def test_deadline_expiry() -> None:
    s, clock = make(max_rows=8)
    s.add("short", key="A", rows=2, total_steps=100, timeout=1.0)
    s.add("long", key="A", rows=2, total_steps=100, timeout=10.0)
    s.update(s.schedule())
    clock.now = 1.5
    expired = s.expire()
    assert [e.id for e in expired] == ["short"]
    assert s.schedule().ids == ["long"]


def test_waiting_and_running_counts() -> None:
    s, _ = make(max_rows=2)
    s.add("a", key="A", rows=2, total_steps=5)
    s.add("b", key="A", rows=2, total_steps=5)
    assert s.waiting_count == 2 and s.running_count == 0
    s.update(s.schedule())  # "a" starts
    assert s.waiting_count == 1 and s.running_count == 1
    s.cancel("b")
    assert s.waiting_count == 0 and len(s) == 1


def test_absolute_deadline() -> None:
    s, clock = make()
    s.add("a", key="A", rows=1, total_steps=5, deadline=2.0)
    clock.now = 1.9
    assert s.expire() == []
    clock.now = 2.0
    assert [e.id for e in s.expire()] == ["a"]


def test_every_request_gets_exactly_its_steps() -> None:
    s, _ = make(max_rows=6)
    want = {}
    for i in range(10):
        steps = 3 + (i * 7) % 11
        s.add(f"r{i}", key="AB"[i % 2], rows=1 + i % 3, total_steps=steps)
        want[f"r{i}"] = steps
    plans = run_to_completion(s)
    got: dict[str, int] = {}
    for ids in plans:
        for i in ids:
            got[i] = got.get(i, 0) + 1
    assert got == want
    # Batching: far fewer plans than the sum of steps.
    assert len(plans) < sum(want.values())
