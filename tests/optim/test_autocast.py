"""Every registered optimizer steps inside ``torch.autocast``: the same update as outside.

The update math runs in the parameters' dtype; only the user's closure (the forward pass) is in
the autocast region's precision. Gradients are given, and curvature closures run outside the
region, so both runs see identical inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.optim import OPTIMIZERS, create

KWARGS = {"newton": {"damping": 1e-2}}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_inside_autocast_equals_step_outside(name: str) -> None:
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    models, opts = [], []
    for _ in range(2):
        torch.manual_seed(0)
        m = nn.Linear(6, 3)
        models.append(m)
        opts.append(create(name, m.parameters(), **KWARGS.get(name, {})))
    for _ in range(3):
        for inside, (m, opt) in enumerate(zip(models, opts)):
            if getattr(opt, "closure_mode", "backward") == "loss":
                out = m(x)  # the curvature optimizers differentiate this graph in step()
                loss = nn.functional.cross_entropy(out, y)

                def closure(loss=loss, out=out):
                    return loss, out

                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(inside)):
                    opt.step(closure)
            else:
                opt.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(inside)):
                    opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
