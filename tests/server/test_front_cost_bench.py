"""``bench.front_shed_cost`` runs every row on the real app: the refusals answer their statuses and a request
served by the instant engine answers 200 with the PNG (``measure`` asserts each status), the door being the
cheapest answer."""

from __future__ import annotations

import pytest

from bench import front_shed_cost

pytestmark = pytest.mark.timeout(180)


def test_every_row_answers_its_status_and_the_door_is_cheapest() -> None:
    rows = front_shed_cost.main(["--quick"])["rows"]
    names = [r["answered at"] for r in rows]
    assert names == [
        "door (503, body unread)",
        "admission (503, body parsed and validated)",
        "validation (422)",
        "served (200, an instant engine)",
    ]
    door = rows[0]["min_us"]  # the fastest round of each: robust to a noisy neighbour
    assert all(r["min_us"] > door for r in rows[1:])
