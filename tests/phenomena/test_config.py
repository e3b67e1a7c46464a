"""The shared checks of :class:`~curvlab.phenomena._common.PhenomenonConfig`."""

import math

import pytest

from curvlab.errors import InvalidArgumentError
from curvlab.phenomena import (
    CompressionConfig,
    DeepLinearConfig,
    GFSConfig,
    MatrixSensingConfig,
    NeuralCollapseConfig,
    SubspaceConfig,
)
from curvlab.phenomena.index import PHENOMENA, quick_config


@pytest.mark.parametrize("name", list(PHENOMENA))
def test_defaults_and_quick_sizes_pass(name):
    PHENOMENA[name][1]()
    quick_config(name)


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (
            lambda: DeepLinearConfig(eta=math.inf),
            r"DeepLinearConfig\.eta must be > 0 and finite, got inf",
        ),
        (
            lambda: DeepLinearConfig(steps=-3),
            r"DeepLinearConfig\.steps must be > 0 and finite, got -3",
        ),
        (lambda: DeepLinearConfig(seed=-1), r"DeepLinearConfig\.seed must be >= 0 and finite"),
        (lambda: NeuralCollapseConfig(lr=math.nan), r"NeuralCollapseConfig\.lr must be > 0"),
        (
            lambda: NeuralCollapseConfig(momentum=-0.1),
            r"NeuralCollapseConfig\.momentum must be >= 0",
        ),
        (
            lambda: DeepLinearConfig(singular_values=(2.0, 0.0)),
            r"DeepLinearConfig\.singular_values\[1\] must be > 0 and finite, got 0\.0",
        ),
        (lambda: CompressionConfig(hidden=(64, 0)), r"CompressionConfig\.hidden\[1\] must be > 0"),
    ],
)
def test_numeric_fields_are_checked(build, fragment):
    with pytest.raises(InvalidArgumentError, match=fragment):
        build()


def test_exceptions_and_non_numbers_are_left_alone():
    assert NeuralCollapseConfig(momentum=0.0, weight_decay=0.0, seed=0).momentum == 0.0
    assert SubspaceConfig(warmup=0).warmup == 0
    assert GFSConfig(w0=(-1.0, -2.0)).w0 == (-1.0, -2.0)  # any signs, positive product
    assert CompressionConfig(sparsities=(0.0, 0.5)).sparsities == (0.0, 0.5)
    assert MatrixSensingConfig(symmetric_scaledgd=False).symmetric_scaledgd is False


def test_seed_is_keyword_only():
    # SeededConfig's seed comes first among the fields but not among the positional arguments
    cfg = DeepLinearConfig(6, (3.0, 1.0), seed=4)
    assert (cfg.dim, cfg.singular_values, cfg.seed) == (6, (3.0, 1.0), 4)
    with pytest.raises(TypeError, match="positional"):
        DeepLinearConfig(6, (3.0, 1.0), 64, 0.01, 2000, 1e-3, 1e-3, 4)
