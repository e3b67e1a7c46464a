"""Tests of the shared plumbing of the curvature optimizers: the closure contract (_closure.py) and
the helpers they take from _validation.py (curvature non-finite policy, step count, generator)."""

from __future__ import annotations

import copy

import pytest
import torch

from curvlab.errors import ClosureRequiredError, NonFiniteError, ParameterError, StateDictError
from curvlab.estimators import GNBEstimator, HutchinsonEstimator
from curvlab.optim import AdaHessian, Sophia
from curvlab.optim._closure import closure_grads, resolve_estimator
from curvlab.optim._validation import (
    check_finite_curvature,
    probe_generator,
    steps_taken,
)


# --- the closure contract ---------------------------------------------------------------------
def test_closure_grads_rejects_freed_graph_and_graphless_loss() -> None:
    x = torch.ones(2, requires_grad=True)
    loss = (x**2).sum()
    loss.backward()
    with pytest.raises(ClosureRequiredError, match=r"WITHOUT calling loss\.backward"):
        closure_grads(lambda: loss, [x], "Opt", None)
    with pytest.raises(ClosureRequiredError, match="no autograd graph"):
        closure_grads(lambda: torch.tensor(1.0), [x], "Opt", None)
    with pytest.raises(ClosureRequiredError, match=r"Opt\.step\(\) needs a closure"):
        closure_grads(None, [x], "Opt", None)


def test_closure_grads_keeps_the_graph_only_for_an_estimator() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    _, _, plain = closure_grads(lambda: (x**3).sum(), [x], "Opt", None)
    _, _, kept = closure_grads(lambda: (x**3).sum(), [x], "Opt", HutchinsonEstimator())
    assert plain[0] is not None and plain[0].grad_fn is None
    assert kept[0] is not None and kept[0].grad_fn is not None
    assert torch.equal(x.grad, torch.tensor([3.0, 12.0])) and x.grad.grad_fn is None


def test_resolve_estimator_names() -> None:
    builtin = {"gnb": GNBEstimator(), "hutchinson": HutchinsonEstimator()}
    gaussian = GNBEstimator(likelihood="gaussian")
    assert resolve_estimator("gnb", builtin, "'gnb'") == ("gnb", builtin["gnb"])
    assert resolve_estimator(gaussian, builtin, "'gnb'") == ("gnb", gaussian)
    assert resolve_estimator(print, builtin, "'gnb'")[0] == "custom"
    with pytest.raises(ParameterError, match=r"estimator must be 'gnb' or a callable, got 'x'"):
        resolve_estimator("x", builtin, "'gnb'")


# --- one non-finite policy, for the curvature estimate too ----------------------------------------
def test_curvature_check_false_alarm_is_cleared_by_the_exact_scan() -> None:
    """A norm that overflows to inf on finite values is a false alarm: the exact scan clears it
    (no error); a real NaN is named with the step; 'ignore' groups are not checked."""
    p = torch.nn.Parameter(torch.zeros(4))
    groups = [{"params": [p], "on_nonfinite": "raise"}]
    huge = torch.full((4,), 3e38)
    assert check_finite_curvature(groups, [p], [huge], step=1)
    huge[1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"curvature estimate at step 7: parameter 0 of param"):
        check_finite_curvature(groups, [p], [huge], step=lambda: 7)
    groups[0]["on_nonfinite"] = "ignore"
    assert check_finite_curvature(groups, [p], [huge])
    groups[0]["on_nonfinite"] = "skip"
    assert not check_finite_curvature(groups, [p], [huge, None][:1])
    assert groups[0]["nonfinite_skips"] == 1


def test_steps_taken_is_the_largest_step_count() -> None:
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = AdaHessian([x], seed=0)
    assert steps_taken(opt) == 0
    for _ in range(3):
        opt.step(lambda: (x**2).sum())
    assert steps_taken(opt) == 3


# --- random generators: explicit seed, saved and restored ------------------------------------------
def test_probe_generator_seed_and_errors() -> None:
    assert probe_generator(seed=5).initial_seed() == 5
    gen = torch.Generator()
    assert probe_generator(generator=gen) is gen
    torch.manual_seed(11)
    a = probe_generator().initial_seed()
    torch.manual_seed(11)
    assert probe_generator().initial_seed() == a
    with pytest.raises(ParameterError, match="pass seed= or generator=, not both"):
        probe_generator(seed=1, generator=gen)
    with pytest.raises(ParameterError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        probe_generator(seed=-1)
    with pytest.raises(ParameterError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        probe_generator(seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"generator must be a torch\.Generator"):
        probe_generator(generator=3)  # type: ignore[arg-type]


def test_generator_entry_without_its_state_is_refused() -> None:
    x = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = Sophia([x], estimator="hutchinson", seed=0)
    sd = copy.deepcopy(opt.state_dict())
    sd["curvlab"] = {}
    with pytest.raises(StateDictError, match="lacks the 'generator_state' tensor"):
        opt.load_state_dict(sd)
