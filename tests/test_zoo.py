"""curvlab.zoo: problems built from a seed, without touching the caller's random stream."""

from __future__ import annotations

import torch

from curvlab.phenomena.mup import MuPConfig, _final_loss
from curvlab.zoo import ZOO


def test_a_zoo_problem_is_seeded_and_leaves_the_global_generator_alone() -> None:
    recipe = ZOO["digits-mlp"]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = recipe(seed=5, train_steps=2)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream continues untouched
    b = recipe(seed=5, train_steps=2)
    c = recipe(seed=6, train_steps=2)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.model.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_the_mup_sweep_point_leaves_the_global_generator_alone() -> None:
    cfg = MuPConfig.quick()
    x, y = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 10
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    first = _final_loss("mup", 32, 2.0**-8, x, y, cfg)
    assert torch.equal(torch.rand(3), expected_next)
    assert _final_loss("mup", 32, 2.0**-8, x, y, cfg) == first
