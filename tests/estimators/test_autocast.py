"""Estimators give the same answer inside ``torch.autocast(bfloat16)`` as outside: their products
and their own linear algebra run in the operator's dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlab as cl


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g))
    return model, data


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(3)


ESTIMATES = {
    "eigsh": lambda H, m, d: cl.eigsh(H, k=2, tol=1e-4, generator=gen()).values,
    "eigsh-dense": lambda H, m, d: (
        cl.eigsh((H.to_dense() + H.to_dense().T) / 2, k=2, tol=1e-4, generator=gen()).values
    ),
    "trace": lambda H, m, d: cl.trace(H, num_matvecs=12, generator=gen()).value,
    "diagonal": lambda H, m, d: cl.diagonal(H, num_matvecs=6, generator=gen()).value,
    "spectral_density": lambda H, m, d: (
        cl.spectral_density(H, num_probes=2, lanczos_steps=8, generator=gen()).density
    ),
    "layer_sensitivity": lambda H, m, d: torch.tensor(
        [
            [r["trace"], r["top_eigenvalue"]]
            for r in cl.layer_sensitivity(
                m, nn.CrossEntropyLoss(), d, num_matvecs=6, eig_tol=1e-4, generator=gen()
            ).rows()
        ]
    ),
}


@pytest.mark.parametrize("name", list(ESTIMATES))
def test_estimates_inside_bfloat16_autocast_equal_those_outside(name):
    model, data = problem()
    H = cl.HessianOperator(model, nn.CrossEntropyLoss(), data)
    want = ESTIMATES[name](H, model, data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ESTIMATES[name](H, model, data)
        assert torch.is_autocast_enabled("cpu")
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
