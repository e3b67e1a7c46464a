"""accelerate: Sophia (G, H) and AdaHessian in an accelerate loop with attach_curvature."""

from __future__ import annotations

import copy

import pytest

from curvlab.integrations import attach_curvature
from tests.integrations._common import (
    OPTIMIZERS,
    REFRESH_STEPS,
    Recorder,
    assert_same_trajectory,
    closure_trajectory,
)
from tests.integrations._hf import batches, lm_forward, tiny_gpt2, token_data

accelerate = pytest.importorskip("accelerate", reason="accelerate is an optional dependency")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_attach_curvature_trajectory_equals_closure_loop(name):
    """Key correctness test: the accelerate loop is the closure-contract run, step for step."""
    pytest.importorskip("transformers", reason="transformers is an optional dependency")
    model = tiny_gpt2()
    data = batches(token_data())
    want = closure_trajectory(copy.deepcopy(model), name, data, lm_forward)
    opt = OPTIMIZERS[name](model.parameters())
    rec = Recorder(opt)
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, opt)
    handle = attach_curvature(model, opt)
    for batch in data:
        loss, _ = lm_forward(model, batch)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    handle.remove()
    assert rec.refreshes == REFRESH_STEPS
    assert rec.curvature_after_first > 0
    assert_same_trajectory(rec.params, want, atol=1e-12)


def test_gradient_accumulation_estimates_on_the_first_micro_batch():
    pytest.importorskip("transformers", reason="transformers is an optional dependency")
    model = tiny_gpt2()
    opt = OPTIMIZERS["SophiaH"](model.parameters())
    rec = Recorder(opt)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = accelerator.prepare(model, opt)
    with attach_curvature(model, opt):
        for batch in batches(token_data()) * 2:
            with accelerator.accumulate(model):
                loss, _ = lm_forward(model, batch)
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
    assert rec.refreshes == REFRESH_STEPS  # 10 micro-batches, 5 steps, one estimate per refresh
