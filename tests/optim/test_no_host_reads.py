"""No host read of a device tensor inside an optimizer step (the CPU stand-in for CUDA's
``torch.cuda.set_sync_debug_mode("error")``).

On the ``meta`` device a tensor has a shape and no values: anything that reads a value back to
the host (``.item()``, ``float(t)``, ``.tolist()``, a copy to the CPU) raises. A step that runs
on meta parameters therefore makes no device-to-host synchronisation on CUDA either. The
non-finite policies ``"raise"`` and ``"skip"`` read one number per step by design (documented
in :mod:`curvlab.optim._validation`); ``"ignore"`` reads none, so the steps run under it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from curvlab.optim import create

# name, keyword arguments, whether step() takes the loss closure ("logits": (loss, logits))
SYNC_FREE: list[tuple[str, dict[str, Any], bool]] = [
    ("adopt", {}, False),
    ("adopt", {"foreach": False}, False),
    ("dog", {}, False),
    ("ldog", {}, False),
    ("dog", {"weight_decay": 1e-2, "init_eta": 1e-3}, False),
    ("frugal", {}, False),
    ("mfac", {}, False),
    ("adahessian", {}, True),
    ("adahessian", {"foreach": False}, True),
    ("sophia", {"estimator": "hutchinson"}, True),
    ("sophia", {}, "logits"),  # SophiaG: labels sampled from the logits
]


def _meta_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to("meta")
    X = torch.empty(8, 3, device="meta")
    y = torch.empty(8, dtype=torch.long, device="meta")
    return model, X, y


@pytest.mark.parametrize(("name", "kwargs", "closure"), SYNC_FREE, ids=lambda v: str(v))
def test_steps_read_nothing_back_to_the_host(name, kwargs, closure):
    model, X, y = _meta_problem()
    opt = create(name, model.parameters(), on_nonfinite="ignore", **kwargs)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(4):  # the first step (state created) and the ones after it
        opt.zero_grad()
        if closure == "logits":
            opt.step(lambda: (loss_fn(out := model(X), y), out))
        elif closure:
            opt.step(lambda: loss_fn(model(X), y))
        else:
            loss_fn(model(X), y).backward()
            opt.step()
    assert all(p.device.type == "meta" for p in model.parameters())


def test_the_default_policy_reads_one_number():
    # "raise" must see the gradients before the first write: one number comes back per step
    model, X, y = _meta_problem()
    opt = create("adopt", model.parameters())
    nn.CrossEntropyLoss()(model(X), y).backward()
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        opt.step()
