"""Memory that does not grow: what the estimators hand to the operator, checked at the operator."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from curvlab.estimators import eigsh, trace
from curvlab.estimators._common import default_chunk_size
from curvlab.operators.base import LinearOperator

trace_module = importlib.import_module(
    "curvlab.estimators.trace"
)  # the package's trace is the function


class _Recording(LinearOperator):
    """``diag(d)``, recording the columns and the storage (bytes) of every input it is given."""

    is_symmetric = True

    def __init__(self, d: torch.Tensor) -> None:
        super().__init__((d.shape[0],) * 2, d.dtype, d.device)
        self.d = d
        self.columns: list[int] = []
        self.storage: list[int] = []

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.columns.append(V.shape[1])
        self.storage.append(V.untyped_storage().nbytes())
        return self.d[:, None] * V


def test_the_lanczos_basis_is_allocated_as_it_grows():
    n = 2000
    op = _Recording(torch.linspace(1.0, 2.0, n, dtype=torch.float64))
    eigsh(op, k=1, max_matvecs=7, generator=torch.Generator().manual_seed(0))
    # the basis rows are views of the basis: its storage is 8 rows, not max_basis + 1 = 31
    assert max(op.storage) <= 8 * n * 8


def test_the_default_chunk_follows_the_parameter_count():
    assert default_chunk_size(10_000) == 8
    assert default_chunk_size(1 << 19) == 4
    assert default_chunk_size(5_000_000) == 1


def test_hutchinson_streams_one_probe_at_a_time_at_millions_of_parameters():
    n = (1 << 21) + 1
    op = _Recording(torch.ones(n))
    est = trace(op, 3, method="hutchinson", generator=torch.Generator().manual_seed(0))
    assert op.columns == [1, 1, 1]
    assert max(op.storage) <= 4 * n  # one probe, no copy of a block
    assert float(est.value) == pytest.approx(n)  # diagonal: exact with Rademacher probes


def test_hutchpp_streams_its_sketch_in_chunks():
    n = 300
    op = _Recording(torch.linspace(0.0, 1.0, n, dtype=torch.float64) ** 4)
    trace(op, 60, chunk_size=4, generator=torch.Generator().manual_seed(0))
    assert max(op.columns) <= 4
    assert max(op.storage) <= 20 * n * 8  # the sketch (m/3 = 20 rows) is the largest input


def test_a_capped_hutchpp_sketch_stays_unbiased(monkeypatch):
    g = torch.Generator().manual_seed(1)
    M = torch.randn(40, 40, generator=g, dtype=torch.float64)
    A = M @ M.T / 40 + torch.diag(torch.linspace(0, 5, 40, dtype=torch.float64))
    monkeypatch.setattr(trace_module, "SKETCH_BYTES", 3 * 40 * 8)  # 3 sketch vectors
    assert trace_module.max_sketch(40, torch.float64) == 3
    runs = torch.stack(
        [trace(A, 30, generator=torch.Generator().manual_seed(s)).value for s in range(200)]
    )
    se = float(runs.std()) / math.sqrt(len(runs))
    assert abs(float(runs.mean()) - float(A.trace())) <= 4 * se
