"""No host read of a device tensor inside an optimizer step (the CPU stand-in for CUDA's
``torch.cuda.set_sync_debug_mode("error")``).

On the ``meta`` device a tensor has a shape and no values: anything that reads a value back to
the host (``.item()``, ``float(t)``, ``.tolist()``, a copy to the CPU) raises. A step that runs
on meta parameters therefore makes no device-to-host synchronisation on CUDA either. The
non-finite policies ``"raise"`` and ``"skip"`` read one number per step by design (documented
in :mod:`curvlab.optim._validation`); ``"ignore"`` reads none, so the steps run under it.
A coin of the PSGD fits is drawn on the host from a generator's seed and offset; the last tests
check that draw with a stand-in for a CUDA generator.
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
    # the first step's automatic scale, the update coin, the balancing and U/V coins
    ("psgd_kron", {"preconditioner_update_probability": 0.5}, False),
    ("psgd_kron", {"fit": "hvp"}, True),
    ("psgd_lra", {}, False),
    ("psgd_lra", {"fit": "hvp"}, True),
    ("psgd_xmat", {}, False),
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
    for _ in range(12):  # the first step (state created) and enough after it for every coin
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


class _DeviceGenerator:
    """A stand-in for a CUDA generator: seed and Philox offset on the host, no values to read."""

    device = torch.device("cuda")

    def __init__(self, seed: int) -> None:
        self.seed, self.offset = seed, 0

    def initial_seed(self) -> int:
        return self.seed

    def get_offset(self) -> int:
        return self.offset

    def set_offset(self, offset: int) -> None:
        self.offset = offset


def test_a_device_generators_coin_is_drawn_on_the_host_and_follows_its_stream():
    from curvlab.optim._psgd import host_uniform

    gen = _DeviceGenerator(7)
    first, second = host_uniform(gen), host_uniform(gen)  # type: ignore[arg-type]
    assert gen.offset == 8 and first != second  # the offset moves past each draw
    gen.offset = 0
    assert host_uniform(gen) == first  # a function of (seed, offset): reproducible
    assert host_uniform(_DeviceGenerator(8)) != first  # another seed, another coin
    # uniform on [0, 1): the mean of n draws is within 5 sigma of 1/2 (sigma = sqrt(1/12n))
    n = 4000
    draws = [host_uniform(gen) for _ in range(n)]  # type: ignore[arg-type]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert abs(sum(draws) / n - 0.5) < 5 * (1 / (12 * n)) ** 0.5


def test_a_cpu_generators_coin_is_its_own_next_draw():
    from curvlab.optim._psgd import host_uniform

    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert host_uniform(a) == torch.rand([], generator=b).item()
