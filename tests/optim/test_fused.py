"""The ``fused=True`` paths: each kernel equals the single-tensor reference (float64, run eagerly),
the flags are validated, and one small compiled smoke test."""

import pytest
import torch

import curvlab.optim._fused as fused_mod
from curvlab.errors import NonFiniteError, ParameterError
from curvlab.optim import ADOPT, FRUGAL, AdaHessian, DoG, LDoG, Sophia
from curvlab.optim._validation import _gemv_sum


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setattr(fused_mod, "EAGER", True)


def _run(cls, kwargs, steps=5, seed=0):
    """Parameters and state after ``steps`` steps on fixed gradients (mixed shapes, one late)."""
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))
        for s in [(5, 3), (7,), (2, 2, 2)]
    ]
    opt = cls(params, **kwargs)
    for t in range(steps):
        for i, p in enumerate(params):
            if i == 2 and t < 2:  # a parameter whose gradient appears later: mixed steps
                p.grad = None
                continue
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
    return params, opt


@pytest.mark.parametrize(
    "hyper",
    [
        {},
        {"weight_decay": 0.1, "decouple": True, "maximize": True},
        {"weight_decay": 0.1, "clip_exponent": None},
    ],
)
def test_adopt_fused_equals_single_tensor_float64(eager, hyper):
    ref, opt_ref = _run(ADOPT, {"lr": 0.1, "foreach": False, **hyper})
    got, opt_got = _run(ADOPT, {"lr": 0.1, "fused": True, **hyper})
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_ref.state[a][key], opt_got.state[b][key])


def test_adopt_fused_complex_equals_single_tensor(eager):
    def run(**kw):
        g = torch.Generator().manual_seed(1)
        p = torch.nn.Parameter(torch.randn(4, dtype=torch.complex128, generator=g))
        opt = ADOPT([p], lr=0.1, **kw)
        for _ in range(3):
            p.grad = torch.randn(4, dtype=torch.complex128, generator=g)
            opt.step()
        return p

    torch.testing.assert_close(run(foreach=False), run(fused=True), rtol=1e-13, atol=1e-14)


def test_fused_and_foreach_together_are_rejected():
    with pytest.raises(ParameterError, match="pick one"):
        ADOPT([torch.nn.Parameter(torch.zeros(2))], fused=True, foreach=True)


@pytest.mark.slow
def test_compiled_adopt_kernel_smoke():
    # the one compiled test (~10-30 s on CPU: inductor builds a C++ kernel); float32
    ref, _ = _run(ADOPT, {"lr": 0.1, "foreach": False}, steps=3)
    got, _ = _run(ADOPT, {"lr": 0.1, "fused": True}, steps=3)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [DoG, LDoG])
@pytest.mark.parametrize("hyper", [{}, {"weight_decay": 0.1, "init_eta": 1e-3}])
def test_dog_fused_equals_single_tensor_float64(eager, cls, hyper):
    ref, opt_ref = _run(cls, {"foreach": False, **hyper})
    got, opt_got = _run(cls, {"fused": True, **hyper})
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
        for key in ("rbar", "G", "step"):
            torch.testing.assert_close(opt_ref.state[a][key], opt_got.state[b][key])


def _run_closure(cls, kwargs, steps=4):
    """A tiny float64 MLP trained by ``step(closure)``: parameters and state after ``steps``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    model = model.double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,))
    opt = cls(model.parameters(), seed=3, **kwargs)

    def closure():
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits, y), logits

    for _ in range(steps):
        opt.step(closure)
    return list(model.parameters()), opt


def _assert_same(run, cls, kwargs, keys):
    ref, opt_ref = run(cls, {"foreach": False, **kwargs})
    got, opt_got = run(cls, {"fused": True, **kwargs})
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
        for key in keys:
            if key in opt_ref.state[a]:
                torch.testing.assert_close(opt_ref.state[a][key], opt_got.state[b][key])


@pytest.mark.parametrize(
    "hyper",
    [
        {"update_period": 2},
        {"estimator": "hutchinson", "update_period": 1, "weight_decay": 0.0, "maximize": True},
    ],
)
def test_sophia_fused_equals_single_tensor_float64(eager, hyper):
    # lr large enough that some ratios are clipped and others are not
    _assert_same(_run_closure, Sophia, {"lr": 0.05, "rho": 0.5, **hyper}, _SOPHIA_KEYS)


@pytest.mark.parametrize(
    "hyper",
    [{}, {"hessian_power": 0.5, "weight_decay": 0.1, "update_period": 2, "maximize": True}],
)
def test_adahessian_fused_equals_single_tensor_float64(eager, hyper):
    _assert_same(_run_closure, AdaHessian, {"lr": 0.05, **hyper}, _ADAHESSIAN_KEYS)


@pytest.mark.parametrize(
    "hyper",
    [
        {"density": 0.5, "update_gap": 2},  # blocks: one of two split tensors state-full
        {"density": 0.5, "update_gap": 3, "projection": "columns", "weight_decay": 0.0},
        {"density": 0.5, "projection": "rows", "inactive_update_rule": "sgd", "split": True},
        {"density": 0.5, "inactive_update_rule": "no", "inactive_lr_scale": 0.5},
    ],
)
def test_frugal_fused_equals_single_tensor_float64(eager, hyper):
    _assert_same(_run, FRUGAL, {"lr": 0.1, **hyper}, ("exp_avg", "exp_avg_sq", "step"))


_SOPHIA_KEYS = ("exp_avg", "hessian", "step")
_ADAHESSIAN_KEYS = ("exp_avg", "exp_hessian_diag_sq", "step", "hessian_step")


@pytest.mark.parametrize("cls", [Sophia, AdaHessian, FRUGAL])
def test_fused_and_foreach_together_are_rejected_everywhere(cls):
    with pytest.raises(ParameterError, match="pick one"):
        cls([torch.nn.Parameter(torch.zeros(2))], fused=True, foreach=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("run", "cls", "kwargs"),
    [
        (_run_closure, Sophia, {"lr": 0.05, "rho": 0.5, "update_period": 2}),
        (_run_closure, AdaHessian, {"lr": 0.05, "hessian_power": 0.5}),
        (_run, FRUGAL, {"lr": 0.1, "density": 0.5, "update_gap": 2}),
    ],
)
def test_compiled_kernels_smoke(run, cls, kwargs):
    # the compiled kernels (~10-30 s each on CPU: inductor builds C++), float64
    ref, _ = run(cls, {"foreach": False, **kwargs})
    got, _ = run(cls, {"fused": True, **kwargs})
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_foreach_buckets_in_power_of_two_runs_and_keeps_row_order(eager):
    # 21 rows: 19 float64 with two hyper-parameter values, 1 float32, 1 of size 1
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(3 + i, generator=g, dtype=torch.float64) for i in range(19)]
    xs += [torch.randn(4, generator=g), torch.randn(1, generator=g, dtype=torch.float64)]
    scales = [2.0 if i % 5 else 3.0 for i in range(len(xs))]
    lengths = []

    def kernel(ts, scale):
        lengths.append(len(ts))
        return [t.sum() * scale for t in ts]

    got = fused_mod.fused_foreach(kernel, [((x,), (s,)) for x, s in zip(xs, scales)])
    assert [float(v) for v in got] == [float(x.sum() * s) for x, s in zip(xs, scales)]
    # float64 non-scalar rows: 15 with 2.0 (8+4+2+1), 4 with 3.0 (4); then 1 and 1
    assert sorted(lengths) == sorted([8, 4, 2, 1, 4, 1, 1])
    assert max(lengths) <= fused_mod.MAX_BUCKET


def _fused_adopt_after(grads, policy):
    """A float32 fused ADOPT after one finite step, then ``step()`` on ``grads``: (opt, params,
    copies of params and state before that step)."""
    params = [torch.nn.Parameter(torch.ones(g.shape)) for g in grads]
    opt = ADOPT(params, lr=0.1, fused=True, on_nonfinite=policy)
    for p in params:
        p.grad = torch.full(p.shape, 0.5)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    return opt, params, before, state


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "pair"])
def test_fused_check_leaves_params_and_state_untouched(eager, policy, bad):
    # 2085 entries: a matrix-vector head of 2 rows of 1024 and a tail of 37; bad in either part
    for where in (3, 1500, 2080):
        g = torch.randn(2085, generator=torch.Generator().manual_seed(5))
        if bad == "pair":  # +inf and -inf in one sum: NaN, still caught
            g[where], g[0] = float("inf"), -float("inf")
        else:
            g[where] = bad
        opt, params, before, state = _fused_adopt_after([torch.randn(4), g], policy)
        if policy == "raise":
            with pytest.raises(NonFiniteError, match="parameter 1 of param group 0"):
                opt.step()
        else:
            opt.step()
            assert opt.param_groups[0]["nonfinite_skips"] == 1
        for p, b, st in zip(params, before, state):
            assert torch.equal(p, b)
            for k, v in st.items():
                assert torch.equal(opt.state[p][k], v)


def test_fused_check_finite_overflow_still_steps(eager):
    # finite entries whose float32 sum overflows to inf: the exact per-tensor check lets it pass
    opt, params, before, _ = _fused_adopt_after([torch.full((2100,), 3e38)], "raise")
    opt.step()
    assert not torch.equal(params[0], before[0])


def test_fused_check_sees_nan_in_the_imaginary_part(eager):
    p = torch.nn.Parameter(torch.zeros(1100, dtype=torch.complex64))
    opt = ADOPT([p], fused=True)
    p.grad = torch.ones(1100, dtype=torch.complex64)
    p.grad[700] = complex(0, float("nan"))
    with pytest.raises(NonFiniteError, match="1 NaN"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_fused_check_gemv_sum_equals_the_sum(dtype):
    # float32/float64: rows of 1024 times ones plus a tail; float16 and non-contiguous: sums
    g = torch.Generator().manual_seed(6)
    grads = [torch.randn(3000, generator=g).to(dtype), torch.randn(7, 5, generator=g).to(dtype).t()]
    want = sum(float(t.double().sum()) for t in grads)
    assert float(_gemv_sum(grads)) == pytest.approx(want, rel=1e-5, abs=1e-3)
