"""The engine protocol: every message type round-trips through a real pipe, and the rows of a plan."""

from __future__ import annotations

import dataclasses
import inspect
import multiprocessing

import numpy as np
import pytest

from server import messages
from server.messages import (
    PROTOCOL_VERSION,
    AddRequest,
    CancelRequest,
    EngineOutputs,
    Failed,
    Finished,
    LoadFailed,
    Preview,
    Progress,
    Ready,
    Sampled,
    Shutdown,
    Started,
    StepStats,
    Stopped,
)
from server.request import ResolvedRequest, needs_guidance, rows_for
from server.rows import RowLayout


def _request() -> ResolvedRequest:
    return ResolvedRequest(
        model="m", prompt="a red bag", negative_prompt=None, class_label=None,
        control=np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), control_scale=0.5,
        num_inference_steps=7, sampler="dpmpp_2m", guidance_scale=3.0, seed=2**32 - 1, num_images=2,
        width=4, height=4, guided=True,
    )  # fmt: skip


IMAGES = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
SAMPLES = [
    AddRequest("gen-1", _request(), created=12.5, timeout=30.0, progress=True, preview_every=3),
    CancelRequest("gen-1"),
    Shutdown("server is shutting down"),
    Stopped(),
    Ready(PROTOCOL_VERSION, {"device": "cpu"}),
    LoadFailed("FileNotFoundError: no model folder"),
    EngineOutputs(
        events=[
            Started("a", 1.0),
            Progress("a", 3, 20),
            Preview("a", 3, 20, IMAGES),
            Sampled("a"),
            Finished("a", IMAGES),
            Failed("b", 500, "internal error (error id x)", "x"),
        ],
        steps=[StepStats(0.004, 0.005, 6, 8, (("m", 6),))],
        faults=1,
        nonfinite=(("m", 1),),
        gpu_bytes=1e9,
    ),
]


def _equal(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            _equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))  # type: ignore[arg-type]
    return a == b


def test_every_message_type_round_trips_through_a_pipe() -> None:
    sent_types = {type(m) for m in SAMPLES} | {type(e) for e in SAMPLES[-1].events}  # type: ignore[union-attr]
    sent_types |= {StepStats}
    declared = {
        obj for _, obj in inspect.getmembers(messages, inspect.isclass)
        if dataclasses.is_dataclass(obj) and obj.__module__ == messages.__name__
    }  # fmt: skip
    assert declared == sent_types, f"messages without a round-trip sample: {declared - sent_types}"
    ours, theirs = multiprocessing.Pipe()
    for message in SAMPLES:
        ours.send(message)
        back = theirs.recv()
        assert _equal(message, back), message
    ours.close()
    theirs.close()


def test_outputs_are_falsy_only_when_empty() -> None:
    assert not EngineOutputs()
    assert EngineOutputs(faults=1) and EngineOutputs(gpu_bytes=0.0) and EngineOutputs(events=[Sampled("a")])


class _Req:
    def __init__(self, n: int, guided: bool, scale: float = 2.0, control: bool = False) -> None:
        self.num_images, self.guided, self.guidance_scale, self.has_control = n, guided, scale, control


def test_row_layout_of_a_mixed_plan() -> None:
    # A: 2 images guided (scale 2), B: 1 image unguided with control, C: 1 image guided (scale 5).
    layout = RowLayout.build([_Req(2, True), _Req(1, False, control=True), _Req(1, True, 5.0)])
    assert layout.row_image == (0, 1, 0, 1, 2, 3, 3)
    assert layout.cond_row == (0, 1, 4, 5) and layout.uncond_row == (2, 3, 4, 6)
    assert layout.guidance == (2.0, 2.0, 1.0, 5.0)
    assert layout.image_bounds == (0, 2, 3, 4) and layout.row_bounds == (0, 4, 5, 7)
    assert layout.control_rows == (False,) * 4 + (True,) + (False,) * 2
    assert layout.guided and layout.any_control and not layout.all_control
    assert layout.num_rows == 7 == sum(rows_for(r, g) for r, g in ((2, True), (1, False), (1, True)))
    assert layout.gather_index() == [*layout.row_image, *layout.cond_row, *layout.uncond_row]


def test_row_layout_unguided_is_identity() -> None:
    layout = RowLayout.build([_Req(2, False), _Req(1, False)])
    assert layout.row_image == layout.cond_row == layout.uncond_row == (0, 1, 2)
    assert not layout.guided and not layout.any_control


@pytest.mark.parametrize(
    ("scale", "has_null", "guided"),
    [(1.0, True, False), (1.0, False, False), (3.0, True, True), (3.0, False, False)],
)
def test_guidance_rule(scale: float, has_null: bool, guided: bool) -> None:
    assert needs_guidance(scale, has_null) is guided
