"""Every bad input to an estimator or an operator wrapper: a specific CurvlabError with a message
that says what to do (one table: input -> class -> message fragment)."""

from __future__ import annotations

import math

import pytest
import torch

from curvlab import diagonal, eigsh, power_iteration, spectral_density, trace
from curvlab.errors import (
    CurvlabError,
    DTypeError,
    InvalidArgumentError,
    NoExactDiagonalError,
    UnknownOptionError,
)
from curvlab.estimators import sample_probes
from curvlab.operators import DenseOperator

A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
OP = DenseOperator(A)

CASES = {
    "eigsh tol=0": (lambda: eigsh(A, tol=0), InvalidArgumentError, "tol must be finite and > 0"),
    "eigsh tol<0": (lambda: eigsh(A, tol=-1e-3), InvalidArgumentError, "tol must be finite"),
    "eigsh tol=nan": (lambda: eigsh(A, tol=math.nan), InvalidArgumentError, "got nan"),
    "eigsh tol=inf": (lambda: eigsh(A, tol=math.inf), InvalidArgumentError, "got inf"),
    "eigsh tol='x'": (lambda: eigsh(A, tol="x"), InvalidArgumentError, "a positive number"),
    "eigsh max_matvecs=0": (
        lambda: eigsh(A, max_matvecs=0),
        InvalidArgumentError,
        "max_matvecs must be >= 1",
    ),
    "eigsh max_iter=-3": (
        lambda: eigsh(A, max_iter=-3),
        InvalidArgumentError,
        "max_matvecs must be >= 1",
    ),
    "eigsh max_iter and max_matvecs": (
        lambda: eigsh(A, max_matvecs=5, max_iter=6),
        InvalidArgumentError,
        "disagree; pass one",
    ),
    "eigsh max_basis=0": (
        lambda: eigsh(A, max_basis=0),
        InvalidArgumentError,
        "max_basis must be >= 1",
    ),
    "eigsh max_basis too small": (
        lambda: eigsh(A, k=3, max_basis=3),
        InvalidArgumentError,
        "use at least k + 2",
    ),
    "eigsh k=2.0": (lambda: eigsh(A, k=2.0), InvalidArgumentError, "k must be an integer >= 1"),
    "eigsh k=True": (lambda: eigsh(A, k=True), InvalidArgumentError, "k must be an integer"),
    "eigsh k=0": (lambda: eigsh(A, k=0), InvalidArgumentError, "k must be >= 1"),
    "eigsh k>n": (lambda: eigsh(A, k=11), InvalidArgumentError, "pass k <= n"),
    "eigsh which": (lambda: eigsh(A, which="LR"), UnknownOptionError, "use one of 'LA'"),
    "eigsh integer matrix": (
        lambda: eigsh(torch.eye(3, dtype=torch.int64)),
        DTypeError,
        "floating-point dtype",
    ),
    "eigsh a list": (
        lambda: eigsh([[1.0, 0.0], [0.0, 1.0]]),
        InvalidArgumentError,
        "expected a curvlab LinearOperator",
    ),
    "power_iteration tol=0": (
        lambda: power_iteration(A, tol=0),
        InvalidArgumentError,
        "tol must be finite",
    ),
    "power_iteration k=2.0": (
        lambda: power_iteration(A, k=2.0),
        InvalidArgumentError,
        "k must be an integer",
    ),
    "power_iteration max_matvecs=0": (
        lambda: power_iteration(A, max_matvecs=0),
        InvalidArgumentError,
        "max_matvecs must be >= 1",
    ),
    "trace num_matvecs=0": (
        lambda: trace(A, num_matvecs=0),
        InvalidArgumentError,
        "num_matvecs must be >= 1",
    ),
    "trace num_matvecs=2.5": (
        lambda: trace(A, num_matvecs=2.5),
        InvalidArgumentError,
        "num_matvecs must be an integer",
    ),
    "trace hutch++ num_matvecs=2": (
        lambda: trace(A, num_matvecs=2),
        InvalidArgumentError,
        "or method='hutchinson'",
    ),
    "trace method typo": (
        lambda: trace(A, method="hutchinsn"),
        UnknownOptionError,
        "Did you mean 'hutchinson'?",
    ),
    "trace method unknown": (
        lambda: trace(A, method="lanczos"),
        UnknownOptionError,
        "unknown trace method 'lanczos'; use one of 'hutch++'",
    ),
    "trace probes typo": (
        lambda: trace(A, probes="rademacer"),
        UnknownOptionError,
        "Did you mean 'rademacher'?",
    ),
    "trace chunk_size=0": (
        lambda: trace(A, chunk_size=0),
        InvalidArgumentError,
        "chunk_size must be >= 1",
    ),
    "trace chunk_size<0": (
        lambda: trace(A, method="hutchinson", chunk_size=-4),
        InvalidArgumentError,
        "chunk_size must be >= 1",
    ),
    "trace rtol=0": (
        lambda: trace(A, method="hutchinson", rtol=0.0),
        InvalidArgumentError,
        "rtol must be finite and > 0",
    ),
    "trace blocks='module' on a matrix": (
        lambda: trace(A, blocks="module"),
        InvalidArgumentError,
        "pass a mapping of block name",
    ),
    "trace exact of a product": (
        lambda: (OP @ OP).exact_diagonal(),
        NoExactDiagonalError,
        "use method='hutchinson'",
    ),
    "diagonal method typo": (
        lambda: diagonal(A, method="exakt"),
        UnknownOptionError,
        "Did you mean 'exact'?",
    ),
    "diagonal num_matvecs=0": (
        lambda: diagonal(A, num_matvecs=0),
        InvalidArgumentError,
        "num_matvecs must be >= 1",
    ),
    "diagonal chunk_size=0": (
        lambda: diagonal(A, chunk_size=0),
        InvalidArgumentError,
        "chunk_size must be >= 1",
    ),
    "diagonal probes": (
        lambda: diagonal(A, probes="sobol"),
        UnknownOptionError,
        "unknown probe kind 'sobol'",
    ),
    "spectral_density num_probes=0": (
        lambda: spectral_density(A, num_probes=0),
        InvalidArgumentError,
        "num_probes must be >= 1",
    ),
    "spectral_density lanczos_steps=0": (
        lambda: spectral_density(A, lanczos_steps=0),
        InvalidArgumentError,
        "lanczos_steps must be >= 1",
    ),
    "spectral_density grid_size=0": (
        lambda: spectral_density(A, grid_size=0),
        InvalidArgumentError,
        "grid_size must be >= 1",
    ),
    "spectral_density sigma=0": (
        lambda: spectral_density(A, sigma=0.0),
        InvalidArgumentError,
        "sigma must be finite and > 0",
    ),
    "spectral_density probes": (
        lambda: spectral_density(A, probes="gauss"),
        UnknownOptionError,
        "Did you mean 'gaussian'?",
    ),
    "sample_probes kind": (
        lambda: sample_probes(3, 2, kind="sobol"),
        UnknownOptionError,
        "use one of 'rademacher', 'gaussian'",
    ),
    "to_dense chunk_size=0": (
        lambda: (2.0 * OP).to_dense(chunk_size=0),
        InvalidArgumentError,
        "chunk_size must be >= 1",
    ),
    "operator + number": (lambda: OP + 1.0, InvalidArgumentError, "wrap a matrix with"),
    "operator * operator": (lambda: OP * OP, InvalidArgumentError, "use A @ B"),
    "operator * vector": (lambda: OP * torch.ones(3), InvalidArgumentError, "by a number"),
    "integer DenseOperator": (
        lambda: DenseOperator(torch.eye(3, dtype=torch.int32)),
        DTypeError,
        "A.double()",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_specific_error_that_says_what_to_do(case):
    call, cls, fragment = CASES[case]
    with pytest.raises(cls, match=fragment_pattern(fragment)) as info:
        call()
    assert isinstance(info.value, CurvlabError)


def fragment_pattern(fragment: str) -> str:
    import re

    return re.escape(fragment)


def test_operators_scale_by_any_real_scalar():
    import numpy as np

    for c in (2, 2.0, np.float32(2.0), np.int64(2), torch.tensor(2.0)):
        torch.testing.assert_close((OP * c).to_dense(), 2.0 * A)
