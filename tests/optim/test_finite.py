"""The sum pre-check in front of check_finite_grads: same verdicts, culprit named by fallback."""

from __future__ import annotations

import pytest
import torch

from curvlab.errors import NonFiniteError
from curvlab.optim._finite import finite_grads_or_policy


def _groups(*grads: torch.Tensor, policy: str = "raise") -> list[dict]:
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        ps.append(p)
    return [{"params": ps, "on_nonfinite": policy}]


def test_finite_overflowing_sum_is_not_a_false_alarm() -> None:
    big = torch.full((4,), 3e38)  # finite entries whose sum overflows float32
    assert finite_grads_or_policy(_groups(big, torch.ones(2)), step=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_entry_raises_naming_the_parameter(bad: float) -> None:
    g = torch.ones(3)
    g[1] = bad
    with pytest.raises(NonFiniteError, match=r"at step 7: parameter 1 of param group 0"):
        finite_grads_or_policy(_groups(torch.ones(2), g), step=7)


def test_opposite_infinities_are_caught_and_skip_policy_counts() -> None:
    g = torch.tensor([float("inf"), -float("inf")])
    groups = _groups(g, policy="skip")
    assert not finite_grads_or_policy(groups, step=1)
    assert groups[0]["nonfinite_skips"] == 1
    assert finite_grads_or_policy(_groups(g, policy="ignore"), step=1)
