"""Tests of curvlab.optim.AdaHessian against the authors' rule (official code) and the paper."""

from __future__ import annotations

import copy
import gc
import math
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.errors import ClosureRequiredError, NonFiniteError, ParameterError
from curvlab.estimators.probes import rademacher_like
from curvlab.optim.adahessian import AdaHessian, adahessian

DT = torch.float64


def _convnet(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=DT))
    x = torch.randn(6, 1, 5, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    return model, x, y


def _loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda: F.cross_entropy(model(x), y)


# ----------------------------------------------------------------------- reference loop
def _reference_adahessian(model, x, y, *, steps, lr, betas, eps, wd, k, tau, seed):
    """The official image-classification rule (amirgholami/adahessian optim_adahessian.py) as
    plain torch: D = |H v| from a dense Hessian (v Rademacher, drawn like the optimizer's),
    averaged over dims (2, 3) for 4-D kernels; v_sq ← β2 v_sq + (1−β2) D²;
    p ← p − lr (m/bc1 / ((√v_sq)^k / (√bc2)^k + eps) + wd p). With tau > 1 (curvlab's extension)
    v_sq and its bias correction move only on refresh steps."""
    params = list(model.parameters())
    lrs, wds = ([v] * len(params) if isinstance(v, float) else v for v in (lr, wd))
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    n_h = 0
    history = []
    for t in range(1, steps + 1):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        if (t - 1) % tau == 0:
            z = rademacher_like(params, generator=gen)

            def f(flat, _sizes=sizes):
                ws = {n: c.view_as(p) for n, c, p in zip(names, flat.split(_sizes), params)}
                return F.cross_entropy(torch.func.functional_call(model, ws, (x,)), y)

            flat = torch.cat([p.detach().reshape(-1) for p in params])
            hess = torch.autograd.functional.hessian(f, flat)
            hz = (hess @ torch.cat([zz.reshape(-1) for zz in z])).split(sizes)
            for i, (hv, p) in enumerate(zip(hz, params)):
                d = hv.view_as(p).abs()
                if p.dim() == 4:
                    d = d.mean(dim=[2, 3], keepdim=True)
                v[i] = betas[1] * v[i] + (1 - betas[1]) * d * d
            n_h += 1
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                m[i] = betas[0] * m[i] + (1 - betas[0]) * g
                bc1, bc2 = 1 - betas[0] ** t, 1 - betas[1] ** n_h
                denom = (v[i].sqrt() ** k) / math.sqrt(bc2) ** k + eps
                p.copy_(p - lrs[i] * (m[i] / bc1 / denom + wds[i] * p))
        history.append(
            (
                [p.detach().clone() for p in params],
                [t.clone() for t in m],
                [t.clone() for t in v],
                n_h,
            )
        )
    return history


@pytest.mark.parametrize(
    "hp",
    [
        {"lr": 0.15, "betas": (0.9, 0.999), "eps": 1e-4, "wd": 0.0, "k": 1.0, "tau": 1},
        {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-3, "wd": 0.01, "k": 0.5, "tau": 2},
    ],
    ids=["official-defaults", "power-0.5-tau-2"],
)
@pytest.mark.parametrize("foreach", [True, False])
def test_matches_reference_loop_on_params_and_state(hp: dict, foreach: bool) -> None:
    model, x, y = _convnet(1)
    ref = copy.deepcopy(model)
    opt = AdaHessian(
        model.parameters(),
        lr=hp["lr"],
        betas=hp["betas"],
        eps=hp["eps"],
        weight_decay=hp["wd"],
        hessian_power=hp["k"],
        update_period=hp["tau"],
        foreach=foreach,
        generator=torch.Generator().manual_seed(7),
    )
    history = _reference_adahessian(ref, x, y, steps=5, seed=7, **hp)
    for t in range(5):
        opt.step(_loss_fn(model, x, y))
        ps, ms, vs, n_h = history[t]
        for p, rp, rm, rv in zip(model.parameters(), ps, ms, vs):
            st = opt.state[p]
            torch.testing.assert_close(p.detach(), rp, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(st["exp_avg"], rm, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(
                st["exp_hessian_diag_sq"], rv.expand_as(p), rtol=1e-10, atol=1e-15
            )
            assert int(st["step"]) == t + 1 and int(st["hessian_step"]) == n_h


def test_param_groups_follow_the_reference_per_group() -> None:
    """Two groups with their own lr and weight decay (one probe draw covers both)."""
    model, x, y = _convnet(4)
    ref = copy.deepcopy(model)
    opt = AdaHessian(
        [
            {"params": model[0].parameters()},
            {"params": model[3].parameters(), "lr": 0.02, "weight_decay": 0.0},
        ],
        lr=0.1,
        weight_decay=0.05,
        generator=torch.Generator().manual_seed(2),
    )
    history = _reference_adahessian(
        ref,
        x,
        y,
        steps=4,
        lr=[0.1, 0.1, 0.02, 0.02],
        betas=(0.9, 0.999),
        eps=1e-4,
        wd=[0.05, 0.05, 0.0, 0.0],
        k=1.0,
        tau=1,
        seed=2,
    )
    for t in range(4):
        opt.step(_loss_fn(model, x, y))
        for p, rp in zip(model.parameters(), history[t][0]):
            torch.testing.assert_close(p.detach(), rp, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------- closed form
def test_closed_form_on_diagonal_quadratic() -> None:
    """On f(x) = ½ xᵀDx every estimate is |D| exactly: v_t = (1−β2^t) D², the bias-corrected
    v̂ = D², so the first step is x0 − lr·D x0/(|D| + eps)."""
    d = torch.tensor([1.0, 4.0, 0.25, -9.0], dtype=DT)
    x0 = torch.tensor([0.3, -0.2, 1.0, 0.5], dtype=DT)
    x = nn.Parameter(x0.clone())
    b1, b2, lr, eps = 0.9, 0.999, 0.15, 1e-4
    opt = AdaHessian([x], lr=lr, betas=(b1, b2), eps=eps)
    f = lambda: 0.5 * (d * x * x).sum()  # noqa: E731
    opt.step(f)
    torch.testing.assert_close(x.detach(), x0 - lr * d * x0 / (d.abs() + eps), rtol=1e-14, atol=0)
    for t in range(2, 6):
        opt.step(f)
        torch.testing.assert_close(
            opt.state[x]["exp_hessian_diag_sq"], (1 - b2**t) * d * d, rtol=1e-13, atol=0
        )
    y = nn.Parameter(x0.clone())
    opt = AdaHessian([y], lr=lr, betas=(b1, b2), eps=eps, update_period=3)
    g = lambda: 0.5 * (d * y * y).sum()  # noqa: E731
    for _ in range(4):
        opt.step(g)
    assert int(opt.state[y]["hessian_step"]) == 2 and int(opt.state[y]["step"]) == 4
    torch.testing.assert_close(
        opt.state[y]["exp_hessian_diag_sq"], (1 - b2**2) * d * d, rtol=1e-13, atol=0
    )


def test_spatial_averaging_of_conv_kernels() -> None:
    """After one step v of a Conv2d/Conv1d kernel is constant over its spatial dims (the
    averaged |H z|), and not without averaging; Linear weights are never averaged."""
    model, x, y = _convnet(2)
    for averaging in (True, False):
        m = copy.deepcopy(model)
        opt = AdaHessian(
            m.parameters(), spatial_averaging=averaging, generator=torch.Generator().manual_seed(0)
        )
        opt.step(_loss_fn(m, x, y))
        v = opt.state[m[0].weight]["exp_hessian_diag_sq"]
        assert torch.equal(v, v[:, :, :1, :1].expand_as(v)) == averaging
        lin = opt.state[m[3].weight]["exp_hessian_diag_sq"]
        assert lin.std() > 0
    conv1 = nn.Conv1d(2, 3, 4).to(DT)
    xs = torch.randn(5, 2, 9, dtype=DT, generator=torch.Generator().manual_seed(1))
    opt = AdaHessian(conv1.parameters())
    opt.step(lambda: conv1(xs).tanh().pow(2).sum())
    v1 = opt.state[conv1.weight]["exp_hessian_diag_sq"]
    assert torch.equal(v1, v1[:, :, :1].expand_as(v1))


@pytest.mark.parametrize("kind", ["quadratic", pytest.param("rosenbrock", marks=pytest.mark.slow)])
def test_converges_on_quadratic_and_rosenbrock(kind: str) -> None:
    """Rosenbrock is slow for AdaHessian (its |diag H| is a poor preconditioner in the curved
    valley): Hessian power 0.5 and 5000 steps reach the contract's 1e-2 (about 5 s on a quiet
    core)."""
    if kind == "quadratic":
        a = torch.logspace(0, 1, 8, dtype=DT)
        xs = torch.linspace(-1, 1, 8, dtype=DT)
        x = nn.Parameter(torch.zeros(8, dtype=DT))
        f = lambda: 0.5 * (a * (x - xs) ** 2).sum()  # noqa: E731
        hp, steps, tol = {}, 300, 1e-4
    else:
        xs = torch.ones(2, dtype=DT)
        x = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=DT))
        f = lambda: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2  # noqa: E731
        hp, steps, tol = {"lr": 0.1, "hessian_power": 0.5}, 5000, 1e-2
    opt = AdaHessian([x], **hp, generator=torch.Generator().manual_seed(0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    for _ in range(steps):
        opt.step(f)
        sched.step()
    assert (x.detach() - xs).norm() < tol, x


# ----------------------------------------------------------------------- cadence and memory
@pytest.mark.parametrize("period", [1, 3])
def test_create_graph_only_on_refresh_steps(period: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = _convnet()
    opt = AdaHessian(model.parameters(), update_period=period)
    seen: list[bool] = []
    real = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        seen.append(bool(kwargs.get("create_graph")))
        return real(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    refreshed = []
    for t in range(1, 8):
        seen.clear()
        opt.step(_loss_fn(model, x, y))
        if seen[0]:
            refreshed.append(t)
            assert len(seen) == 2  # gradient with graph + one Hessian-vector product call
        else:
            assert seen == [False]
    assert refreshed == list(range(1, 8, period))


def test_memory_does_not_grow_over_200_steps() -> None:
    """An HVP every step, yet the graph dies with the step (a weak reference to an activation it
    saves is dead once step() returns, with the cyclic collector off) and live tensors stay flat."""
    model, x, y = _convnet()
    opt = AdaHessian(model.parameters())
    refs = []

    def closure():
        hidden = torch.tanh(model[0](x))
        refs.append(weakref.ref(hidden))
        return F.cross_entropy(model[3](model[2](hidden)), y)

    def live_tensors() -> int:
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    gc.collect()
    gc.disable()
    try:
        for t in range(200):
            opt.step(closure)
            assert refs[-1]() is None, f"step {t + 1} kept its graph alive"
            if t == 19:
                after_20 = live_tensors()
        after_200 = live_tensors()
    finally:
        gc.enable()
    assert after_200 == after_20
    for p in model.parameters():
        assert p.grad.grad_fn is None
        assert all(v.grad_fn is None for v in opt.state[p].values())


def test_param_first_seen_between_refreshes_gets_a_finite_step() -> None:
    """A parameter whose first gradient arrives on a non-refresh step has v = 0 and no Hessian
    step yet: its denominator is eps (no 0/0)."""
    a = nn.Parameter(torch.tensor([1.0], dtype=DT))
    b = nn.Parameter(torch.tensor([2.0], dtype=DT))
    opt = AdaHessian([a, b], lr=0.1, update_period=2)
    opt.step(lambda: (a**2).sum())
    opt.step(lambda: (a**2).sum() + (b**2).sum())
    assert int(opt.state[b]["hessian_step"]) == 0
    assert torch.isfinite(b).all() and b.item() != 2.0


# ----------------------------------------------------------------------- paths, maximize
@pytest.mark.parametrize("block", [None, 7], ids=["foreach-route", "blocked-route"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_foreach_equals_single_tensor_float64(
    block: int | None, contiguous: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit-equal on the CPU blocked path (several blocks per tensor with block=7, a partial last
    block) and on the _foreach path (taken when a tensor is not contiguous)."""
    if block is not None:
        monkeypatch.setattr("curvlab.optim._scratch.BLOCK", block)
        monkeypatch.setattr("curvlab.optim._scratch.BLOCK_MIN", 6)
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 1, 3, 3)]
    mk = lambda: [torch.randn(s, generator=g, dtype=DT) for s in shapes]  # noqa: E731
    if not contiguous:  # a transposed first tensor sends the bucket down the _foreach path
        mk0 = mk
        mk = lambda: [t.t() if i == 0 else t for i, t in enumerate(mk0())]  # noqa: E731
    ps, gs, ms = mk(), mk(), mk()
    vs = [t.abs() for t in mk()]
    kw = dict(
        lr=0.1, betas=(0.9, 0.99), eps=1e-4, weight_decay=0.1, hessian_power=0.7, maximize=True
    )
    a = [copy.deepcopy(t) for t in (ps, ms, vs)]
    b = [copy.deepcopy(t) for t in (ps, ms, vs)]
    ta, tb = [torch.tensor(0.0) for _ in shapes], [torch.tensor(0.0) for _ in shapes]
    ha, hb = [torch.tensor(2.0) for _ in shapes], [torch.tensor(2.0) for _ in shapes]
    holder = types.SimpleNamespace()
    for _ in range(3):
        adahessian(a[0], gs, a[1], a[2], ta, ha, **kw, foreach=False)
        adahessian(b[0], gs, b[1], b[2], tb, hb, **kw, foreach=True, scratch=holder)
    for x, z in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, z)
    assert bool(vars(holder).get("_workspace")) == (
        block is not None
    )  # mixed buckets split across both routes
    assert [float(s) for s in tb] == [3.0, 3.0, 3.0]


def test_maximize_equals_minimizing_the_negative() -> None:
    model, x, y = _convnet(5)
    twin = copy.deepcopy(model)
    o1 = AdaHessian(model.parameters(), generator=torch.Generator().manual_seed(0))
    o2 = AdaHessian(twin.parameters(), maximize=True, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        o1.step(_loss_fn(model, x, y))
        o2.step(lambda: -F.cross_entropy(twin(x), y))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)


# ----------------------------------------------------------------------- error inputs
@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_closure_contract_errors() -> None:
    model, x, y = _convnet()
    opt = AdaHessian(model.parameters())
    with pytest.raises(
        ClosureRequiredError, match=r"(?s)AdaHessian\.step\(\) needs a closure.*def"
    ):
        opt.step()

    def calls_backward():
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=True)  # the peers' convention
        return loss

    with pytest.raises(ClosureRequiredError, match=r"called backward\(\)"):
        opt.step(calls_backward)
    with pytest.raises(ClosureRequiredError, match="returned str"):
        opt.step(lambda: "loss")
    assert len(opt.state) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -0.1}, r"lr must be a finite number >= 0, got -0\.1"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\] must be in \[0, 1\)"),
        ({"betas": (-0.1, 0.9)}, r"betas\[0\] must be in \[0, 1\)"),
        ({"eps": -1e-4}, r"eps must be a finite number > 0"),
        ({"weight_decay": -1.0}, r"weight_decay must be a finite number >= 0"),
        ({"hessian_power": 1.5}, r"hessian_power must be a number in \[0, 1\]"),
        ({"update_period": 0}, r"update_period must be an int >= 1"),
        ({"estimator": "gnb"}, r"estimator must be 'hutchinson' or a callable"),
        ({"on_nonfinite": "warn"}, r"on_nonfinite must be one of 'raise'"),
    ],
)
def test_bad_hyperparameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        AdaHessian(_convnet()[0].parameters(), **kwargs)


def test_nonfinite_gradient_raises_and_changes_nothing_or_skips() -> None:
    model, x, y = _convnet()
    opt = AdaHessian(model.parameters())
    for _ in range(2):
        opt.step(_loss_fn(model, x, y))
    snap = copy.deepcopy((model.state_dict(), opt.state_dict()))
    hook = model[3].weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError, match=r"at step 3: parameter 2 of param group 0 \(shape"):
        opt.step(_loss_fn(model, x, y))

    def unchanged() -> None:
        for k, v in model.state_dict().items():
            assert torch.equal(v, snap[0][k])
        for pid, st in opt.state_dict()["state"].items():
            for key, v in st.items():
                assert torch.equal(v, snap[1]["state"][pid][key])

    unchanged()
    opt.param_groups[0]["on_nonfinite"] = "skip"
    opt.step(_loss_fn(model, x, y))
    unchanged()
    assert opt.param_groups[0]["nonfinite_skips"] == 1
    hook.remove()
    opt.step(_loss_fn(model, x, y))
    assert int(opt.state[model[3].weight]["step"]) == 3


def test_nonfinite_curvature_raises_naming_the_parameter() -> None:
    x = nn.Parameter(torch.tensor([1.0, 2.0], dtype=DT))

    def overflow(params, grads, outputs, generator):
        return [torch.tensor([float("inf"), 1.0], dtype=DT)]

    opt = AdaHessian([x], estimator=overflow)
    with pytest.raises(NonFiniteError, match=r"non-finite curvature estimate at step 1: parame"):
        opt.step(lambda: (x**2).sum())
    assert len(opt.state) == 0


def test_state_dict_round_trip_keeps_counters_and_probes() -> None:
    """hessian_step stays a float32 counter (torch would cast it to the parameter dtype) and the
    probe generator is restored, so the resumed run is bit-identical."""
    model, x, y = _convnet(3)
    opt = AdaHessian(model.parameters(), update_period=2)
    for _ in range(3):
        opt.step(_loss_fn(model, x, y))
    twin = copy.deepcopy(model)
    opt2 = AdaHessian(twin.parameters(), update_period=2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.state[twin[0].weight]["hessian_step"].dtype == torch.float32
    for _ in range(2):
        opt.step(_loss_fn(model, x, y))
        opt2.step(_loss_fn(twin, x, y))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("period", [1, 2])
def test_multi_tensor_path_equals_single_tensor_reference_float64(period: int) -> None:
    """The whole optimizer, foreach=None (multi-tensor) vs foreach=False (single-tensor), float64:
    parameters and state bit-equal, with refreshes every step and every other step."""
    model, x, y = _convnet(4)
    twin = copy.deepcopy(model)
    kw = {"lr": 0.05, "weight_decay": 0.1, "hessian_power": 0.5, "update_period": period}
    fast = AdaHessian(model.parameters(), **kw, seed=9)
    ref = AdaHessian(twin.parameters(), **kw, seed=9, foreach=False)
    for _ in range(4):
        fast.step(lambda: F.cross_entropy(model(x), y))
        ref.step(lambda: F.cross_entropy(twin(x), y))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_hessian_diag_sq", "step", "hessian_step"):
            assert torch.equal(fast.state[p][key], ref.state[q][key])


def test_seed_makes_runs_reproducible_without_the_global_rng() -> None:
    def run(seed: int | None, global_seed: int) -> list[torch.Tensor]:
        model, x, y = _convnet(3)
        torch.manual_seed(global_seed)
        opt = AdaHessian(model.parameters(), lr=0.05, seed=seed)
        for _ in range(3):
            torch.randn(5)  # global draws between steps must not matter
            opt.step(lambda: F.cross_entropy(model(x), y))
        return [p.detach().clone() for p in model.parameters()]

    same = run(7, 0), run(7, 1)
    assert all(torch.equal(a, b) for a, b in zip(*same))
    again = run(None, 4), run(None, 4)
    assert all(torch.equal(a, b) for a, b in zip(*again))
    with pytest.raises(ParameterError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        AdaHessian(_convnet()[0].parameters(), seed=-3)
