import math
import pickle

import numpy as np
import pytest
import torch

from curvlab.errors import EmptyDataError, ParameterError
from curvlab.schedules import (
    Cosine,
    LinearDecay,
    LinearWarmup,
    Refined,
    WarmupLinearDecay,
    refine_schedule,
)


def test_closed_forms():
    T, W = 10, 3
    assert [LinearDecay(T)(t) for t in range(T + 2)] == [1 - t / T for t in range(T + 1)] + [0.0]
    assert [LinearWarmup(W)(t) for t in range(5)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    wl = WarmupLinearDecay(W, T)
    assert [wl(t) for t in range(W)] == [(t + 1) / W for t in range(W)]
    assert [wl(t) for t in range(W, T + 1)] == [1 - (t - W) / (T - W) for t in range(W, T + 1)]
    c = Cosine(T, warmup=2, final=0.1)
    assert (
        c(0) == 0.5
        and c(2) == 1.0
        and c(T) == pytest.approx(0.1)
        and c(T + 5) == pytest.approx(0.1)
    )
    assert c(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_schedules_drive_lambda_lr_and_pickle():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupLinearDecay(2, 6))
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.5, 1.0, 0.5, 0.0])
    clone = pickle.loads(pickle.dumps(sched.state_dict()))
    assert clone["lr_lambdas"][0] == {"warmup": 2, "total": 6}


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LinearDecay(0), "total must be an integer >= 1"),
        (lambda: LinearWarmup(1.5), "warmup must be an integer"),
        (lambda: WarmupLinearDecay(5, 5), r"total \(5\) must exceed warmup \(5\)"),
        (lambda: Cosine(10, final=2.0), r"final must be in \[0, 1\]"),
        (lambda: refine_schedule([1.0, -1.0, 2.0]), "gradient norms must be > 0"),
        (lambda: refine_schedule([1.0, 2.0], power=0), "power must be > 0"),
        (lambda: refine_schedule([1.0, 2.0], smooth=1.0), r"smooth must be in \[0, 1\)"),
    ],
)
def test_errors(make, match):
    with pytest.raises(ParameterError, match=match):
        make()


def test_refine_needs_two_finite_norms():
    with pytest.raises(EmptyDataError, match="at least 2 finite"):
        refine_schedule([float("nan"), 1.0, float("inf")])
    with pytest.raises(EmptyDataError):
        Refined(())


@pytest.mark.parametrize("smooth", [0.0, 0.1])
@pytest.mark.parametrize("n", [7, 200, 12_000])
def test_constant_norms_give_linear_decay(n, smooth):
    s = refine_schedule(torch.full((n,), 3.0), smooth=smooth)
    assert s.dtype == torch.float64 and s.shape == (n,)
    torch.testing.assert_close(s, 1 - torch.arange(n, dtype=torch.float64) / (n - 1))


def test_refined_formula_without_smoothing_matches_hand_computation():
    norms = np.array([4.0, 2.0, 1.0, 1.0, 2.0, 1.0])
    w = norms**-2
    expected = np.array([w[t] * w[t + 1 :].sum() for t in range(5)] + [0.0])
    expected /= expected.max()
    got = refine_schedule(norms, smooth=0.0, resample=None).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-14)
    # l1 / Adam-type weights
    w1 = norms**-1
    e1 = np.array([w1[t] * w1[t + 1 :].sum() for t in range(5)] + [0.0])
    np.testing.assert_allclose(
        refine_schedule(norms, power=1, smooth=0, resample=None).numpy(), e1 / e1.max(), rtol=1e-14
    )


def test_large_early_norms_produce_a_warmup_and_resampling_to_num_steps():
    norms = np.concatenate([np.linspace(20.0, 1.0, 100), np.ones(900)])
    s = refine_schedule(norms, num_steps=50, smooth=0.0)
    assert s.shape == (50,) and s[-1] == 0 and s.max() == 1
    assert s[0] < 0.05 and int(s.argmax()) > 0  # warm-up emerged
    r = Refined.from_grad_norms(norms, num_steps=50, smooth=0.0)
    assert r(0) == s[0].item() and r(1000) == 0.0
    pickle.dumps(r)
