"""Tests of curvlab.optim.Sophia (SophiaG / SophiaH): paper rule, official convention, contract."""

from __future__ import annotations

import copy
import gc
import math
import types
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvlab.errors import (
    ClosureRequiredError,
    NonFiniteError,
    ParameterError,
    ShapeMismatchError,
    ZeroCurvatureWarning,
)
from curvlab.estimators.probes import rademacher_like
from curvlab.optim.sophia import Sophia, sophia

DT = torch.float64


def _mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=DT))
    x = torch.randn(12, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, x, y


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure():
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    return closure


# ----------------------------------------------------------------------- reference loop (paper)
def _reference_sophia(model, x, y, *, steps, lr, betas, rho, wd, k, eps, estimator, seed):
    """Algorithm 3 of Liu et al. 2023, plain torch, float64; curvature from a dense Hessian
    (Hutchinson) or hand-sampled labels (GNB) drawn from a generator seeded like the optimizer's."""
    params = list(model.parameters())
    n_par = len(params)
    lrs, rhos, wds = ([v] * n_par if isinstance(v, float) else v for v in (lr, rho, wd))
    sizes = [p.numel() for p in params]
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    history = []
    for t in range(1, steps + 1):
        logits = model(x)
        grads = torch.autograd.grad(F.cross_entropy(logits, y), params)
        if (t - 1) % k == 0:
            if estimator == "gnb":
                probs = torch.softmax(logits.detach().float(), -1)
                y_hat = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                g_hat = torch.autograd.grad(F.cross_entropy(model(x), y_hat), params)
                h_hat = [x.shape[0] * gh * gh for gh in g_hat]
            else:
                z = rademacher_like(params, generator=gen)
                flat = torch.cat([p.detach().reshape(-1) for p in params])

                def f(v, _sizes=sizes):
                    ws = [c.view_as(p) for c, p in zip(v.split(_sizes), params)]
                    return F.cross_entropy(
                        torch.func.functional_call(
                            model, dict(zip([n for n, _ in model.named_parameters()], ws)), (x,)
                        ),
                        y,
                    )

                hess = torch.autograd.functional.hessian(f, flat)
                zf = torch.cat([zz.reshape(-1) for zz in z])
                h_hat = [c.view_as(p) for c, p in zip((zf * (hess @ zf)).split(sizes), params)]
            h = [betas[1] * hh + (1 - betas[1]) * e for hh, e in zip(h, h_hat)]
        with torch.no_grad():
            for p, g, mm, hh, lr_, rho_, wd_ in zip(params, grads, m, h, lrs, rhos, wds):
                mm.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                p.mul_(1 - lr_ * wd_)
                ratio = (mm.abs() / (rho_ * hh.clamp(min=0) + eps)).clamp(max=1)
                p.sub_(lr_ * mm.sign() * ratio)
        history.append(
            ([p.detach().clone() for p in params], [t.clone() for t in m], [t.clone() for t in h])
        )
    return history


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
@pytest.mark.parametrize("foreach", [True, False])
def test_matches_reference_loop_on_params_and_state(estimator: str, foreach: bool) -> None:
    hp = {"lr": 0.05, "betas": (0.9, 0.95), "rho": 0.05, "weight_decay": 0.1}
    model, x, y = _mlp(1)
    ref_model = copy.deepcopy(model)
    opt = Sophia(
        model.parameters(),
        **hp,
        estimator=estimator,
        update_period=2,
        foreach=foreach,
        generator=torch.Generator().manual_seed(3),
    )
    history = _reference_sophia(
        ref_model,
        x,
        y,
        steps=5,
        lr=hp["lr"],
        betas=hp["betas"],
        rho=hp["rho"],
        wd=hp["weight_decay"],
        k=2,
        eps=1e-15,
        estimator=estimator,
        seed=3,
    )
    for t in range(5):
        opt.step(_closure(model, x, y))
        ps, ms, hs = history[t]
        for p, rp, rm, rh in zip(model.parameters(), ps, ms, hs):
            st = opt.state[p]
            torch.testing.assert_close(p.detach(), rp, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(st["exp_avg"], rm, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(st["hessian"], rh, rtol=1e-10, atol=1e-13)
            assert int(st["step"]) == t + 1
    # the reference is not trivially satisfied: curvature is non-zero and not all clipped
    assert any(bool((opt.state[p]["hessian"] > 0).any()) for p in model.parameters())


# ----------------------------------------------------------------------- closed form
def test_closed_form_on_diagonal_quadratic() -> None:
    """On f(x) = ½ xᵀDx the Hutchinson estimate is D exactly, so h after the refreshes at steps 1
    and k+1 is (1−β2)D and (1−β2)(1+β2)D, constant in between, and the first step is known."""
    d = torch.tensor([1.0, 4.0, 0.25, 9.0], dtype=DT)
    x0 = torch.tensor([0.3, -0.02, 1.0, 0.001], dtype=DT)
    x = nn.Parameter(x0.clone())
    b1, b2, rho, lr, k = 0.9, 0.99, 0.5, 0.01, 4
    opt = Sophia(
        [x],
        lr=lr,
        betas=(b1, b2),
        rho=rho,
        weight_decay=0.0,
        estimator="hutchinson",
        update_period=k,
    )
    f = lambda: 0.5 * (d * x * x).sum()  # noqa: E731
    opt.step(f)
    h1 = (1 - b2) * d
    assert torch.equal(opt.state[x]["hessian"], h1)
    m1 = (1 - b1) * d * x0
    expect = x0 - lr * (m1 / (rho * h1 + 1e-15)).clamp(-1, 1)
    torch.testing.assert_close(x.detach(), expect, rtol=1e-15, atol=1e-17)
    # coordinates 1 and 3 are unclipped (a Newton-like step), 0 and 2 are clipped (sign step)
    ratio = (m1 / (rho * h1)).abs()
    assert bool(ratio[[1, 3]].lt(1).all()) and bool(ratio[[0, 2]].gt(1).all())
    for _ in range(k - 1):
        opt.step(f)
        assert torch.equal(opt.state[x]["hessian"], h1)
    opt.step(f)  # step k+1 refreshes
    torch.testing.assert_close(opt.state[x]["hessian"], b2 * h1 + (1 - b2) * d, rtol=1e-15, atol=0)


@pytest.mark.parametrize("kind", ["quadratic", "rosenbrock"])
def test_converges_on_quadratic_and_rosenbrock_sophia_h(kind: str) -> None:
    if kind == "quadratic":
        a = torch.logspace(0, 1, 8, dtype=DT)
        xs = torch.linspace(-1, 1, 8, dtype=DT)
        x = nn.Parameter(torch.zeros(8, dtype=DT))
        f = lambda: 0.5 * (a * (x - xs) ** 2).sum()  # noqa: E731
        hp, steps, tol = {"lr": 0.05, "rho": 0.1}, 500, 1e-3
    else:
        xs = torch.ones(2, dtype=DT)
        x = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=DT))
        f = lambda: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2  # noqa: E731
        hp, steps, tol = {"lr": 0.1, "rho": 0.01}, 1500, 1e-4
    opt = Sophia(
        [x],
        **hp,
        weight_decay=0.0,
        estimator="hutchinson",
        generator=torch.Generator().manual_seed(0),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    for _ in range(steps):
        opt.step(f)
        sched.step()
    assert (x.detach() - xs).norm() < tol, x


def test_sophia_g_trains_a_softmax_classifier() -> None:
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(3, 5, generator=g, dtype=DT)
    y = torch.arange(60) % 3
    x = centers[y] + torch.randn(60, 5, generator=g, dtype=DT)
    model = nn.Linear(5, 3).to(DT)
    opt = Sophia(model.parameters(), lr=0.05, weight_decay=0.0, generator=g)
    first = opt.step(_closure(model, x, y))
    for _ in range(100):
        last = opt.step(_closure(model, x, y))
    assert last < 0.1 * first


# ----------------------------------------------------------------------- cadence and memory
def test_create_graph_only_on_refresh_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = _mlp()
    seen = []
    real = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        seen.append((bool(kwargs.get("create_graph")), bool(kwargs.get("retain_graph"))))
        return real(outputs, inputs, *args, **kwargs)

    opt = Sophia(model.parameters(), estimator="hutchinson", update_period=10)
    monkeypatch.setattr(torch.autograd, "grad", spy)
    per_step = []
    for _ in range(21):
        seen.clear()
        opt.step(_closure(model, x, y))
        per_step.append(list(seen))
    refresh = [i + 1 for i, calls in enumerate(per_step) if any(c for c, _ in calls)]
    assert refresh == [1, 11, 21]
    assert all(
        calls == [(False, False)] for i, calls in enumerate(per_step) if i + 1 not in refresh
    )


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_memory_does_not_grow_over_200_steps(estimator: str) -> None:
    """With the cyclic garbage collector off, each step's autograd graph is freed by reference
    counting as soon as step() returns: a weak reference to an activation the graph saves (the
    tanh output; torch keeps a tensor's Python object alive while a graph holds it) dies, so no
    graph is kept in p.grad, in the state or in a param↔grad cycle; and the number of live
    tensors is the same after 20 and after 200 steps."""
    model, x, y = _mlp()
    opt = Sophia(model.parameters(), estimator=estimator, update_period=10)
    refs = []

    def closure():
        hidden = torch.tanh(model[0](x))
        refs.append(weakref.ref(hidden))
        logits = model[2](hidden)
        return F.cross_entropy(logits, y), logits

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
        assert p.grad.grad_fn is None and not p.grad.requires_grad
        assert all(v.grad_fn is None for v in opt.state[p].values())


# ----------------------------------------------------------------------- official convention
def _official_sophiag_loop(model, x, y, *, steps, lr, betas, rho, wd, k, bs, seed):
    """The official SophiaG usage (Liuhong99/Sophia train_sophiag.py + sophia.py, as documented in
    curvlab's docstring): step with p.grad, then after steps k, 2k, … a GNB pass on fresh labels,
    hessian ← β2·hessian + (1−β2)·ĝ⊙ĝ (no batch factor), ratio = |m|/(ρ·bs·hessian + 1e-15)."""
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    h = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    for it in range(steps):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g, mm, hh in zip(params, grads, m, h):
                p.mul_(1 - lr * wd)
                mm.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                ratio = (mm.abs() / (rho * bs * hh + 1e-15)).clamp(None, 1)
                p.addcmul_(mm.sign(), ratio, value=-lr)
        if it % k == k - 1:
            logits = model(x)
            probs = torch.softmax(logits.detach().float(), -1)
            y_hat = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            g_hat = torch.autograd.grad(F.cross_entropy(logits, y_hat), params)
            for hh, gh in zip(h, g_hat):
                hh.mul_(betas[1]).addcmul_(gh, gh, value=1 - betas[1])
    return h


def test_manual_loop_reproduces_the_official_sophiag_and_its_batch_factor() -> None:
    """update_period=None + update_curvature(bs=B) after back-propagating the sampled-label loss
    is the official loop; state['hessian'] is B × the official one, parameters are equal."""
    hp = {"lr": 0.02, "betas": (0.965, 0.99), "rho": 0.04, "weight_decay": 0.1}
    model, x, y = _mlp(2)
    ref = copy.deepcopy(model)
    b = x.shape[0]
    h_official = _official_sophiag_loop(
        ref,
        x,
        y,
        steps=9,
        lr=hp["lr"],
        betas=hp["betas"],
        rho=hp["rho"],
        wd=hp["weight_decay"],
        k=3,
        bs=b,
        seed=5,
    )
    opt = Sophia(model.parameters(), **hp, update_period=None)
    gen = torch.Generator().manual_seed(5)
    for it in range(9):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if it == 0:  # the official loop's first k steps have zero curvature: said once
            with pytest.warns(ZeroCurvatureWarning, match="first step with zero curvature"):
                opt.step()
        else:
            opt.step()
        if it % 3 == 2:
            logits = model(x)
            probs = torch.softmax(logits.detach().float(), -1)
            y_hat = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            opt.zero_grad()
            F.cross_entropy(logits, y_hat).backward()
            opt.update_curvature(bs=b)
    for p, rp, rh in zip(model.parameters(), ref.parameters(), h_official):
        torch.testing.assert_close(p, rp, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(opt.state[p]["hessian"], b * rh, rtol=1e-12, atol=1e-15)


def test_update_curvature_sources_and_errors() -> None:
    model, x, y = _mlp()
    params = list(model.parameters())
    opt = Sophia(params, update_period=None, generator=torch.Generator().manual_seed(0))
    # closure source: h changes; params, momentum, step and p.grad do not
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    loss = opt.update_curvature(_closure(model, x, y))
    assert loss is not None and loss.grad_fn is None
    for p, b in zip(params, before):
        assert torch.equal(p, b) and torch.equal(p.grad, torch.ones_like(p))
        assert torch.equal(opt.state[p]["exp_avg"], torch.zeros_like(p))
        assert int(opt.state[p]["step"]) == 0
    h_after = [opt.state[p]["hessian"].clone() for p in params]
    assert all(bool((h >= 0).all()) for h in h_after) and any(bool(h.any()) for h in h_after)
    # diagonal source: plain EMA
    diag = [torch.full_like(p, 2.0) for p in params]
    opt.update_curvature(diagonal=diag)
    for p, h in zip(params, h_after):
        torch.testing.assert_close(opt.state[p]["hessian"], 0.99 * h + 0.01 * 2.0)
    with pytest.raises(ShapeMismatchError, match="one tensor"):
        opt.update_curvature(diagonal=diag[:1])
    with pytest.raises(ParameterError, match="one source"):
        opt.update_curvature(_closure(model, x, y), diagonal=diag)
    with pytest.raises(ParameterError, match="needs bs="):
        opt.update_curvature()


# ----------------------------------------------------------------------- groups, paths, maximize
def test_param_groups_follow_the_reference_per_group() -> None:
    """Two groups with their own lr, rho and weight decay (one curvature draw covers both)."""
    model, x, y = _mlp(4)
    ref = copy.deepcopy(model)
    g0, g1 = list(model[0].parameters()), list(model[2].parameters())
    opt = Sophia(
        [{"params": g0}, {"params": g1, "lr": 0.01, "rho": 0.2, "weight_decay": 0.0}],
        lr=0.03,
        betas=(0.9, 0.95),
        rho=0.05,
        weight_decay=0.1,
        estimator="hutchinson",
        update_period=2,
        generator=torch.Generator().manual_seed(1),
    )
    history = _reference_sophia(
        ref,
        x,
        y,
        steps=4,
        lr=[0.03, 0.03, 0.01, 0.01],
        betas=(0.9, 0.95),
        rho=[0.05, 0.05, 0.2, 0.2],
        wd=[0.1, 0.1, 0.0, 0.0],
        k=2,
        eps=1e-15,
        estimator="hutchinson",
        seed=1,
    )
    for t in range(4):
        opt.step(_closure(model, x, y))
        for p, rp in zip(model.parameters(), history[t][0]):
            torch.testing.assert_close(p.detach(), rp, rtol=1e-12, atol=1e-13)


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
    shapes = [(3, 4), (5,), (2, 2, 3)]
    mk = lambda: [torch.randn(s, generator=g, dtype=DT) for s in shapes]  # noqa: E731
    if not contiguous:  # a transposed first tensor sends the bucket down the _foreach path
        mk0 = mk
        mk = lambda: [t.t() if i == 0 else t for i, t in enumerate(mk0())]  # noqa: E731
    ps, gs, ms, hs = mk(), mk(), mk(), mk()
    hs[0][0, 0] = -1.0  # a negative curvature entry (SophiaH)
    kw = dict(
        lr=0.1,
        betas=(0.9, 0.99),
        rho=0.3,
        weight_decay=0.2,
        eps=1e-12,
        maximize=True,
        clamp_hessian=True,
    )
    a = [copy.deepcopy(t) for t in (ps, ms, hs)]
    b = [copy.deepcopy(t) for t in (ps, ms, hs)]
    sa = [torch.tensor(0.0) for _ in shapes]
    sb = [torch.tensor(0.0) for _ in shapes]
    holder = types.SimpleNamespace()
    for _ in range(3):
        sophia(a[0], gs, a[1], a[2], sa, **kw, foreach=False)
        sophia(b[0], gs, b[1], b[2], sb, **kw, foreach=True, scratch=holder)
    for x, z in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, z)
    # mixed buckets split across both routes
    assert bool(vars(holder).get("_workspace")) == (block is not None)
    assert [float(s) for s in sb] == [3.0, 3.0, 3.0]


def test_maximize_equals_minimizing_the_negative() -> None:
    model, x, y = _mlp(5)
    twin = copy.deepcopy(model)
    o1 = Sophia(
        model.parameters(),
        lr=0.01,
        estimator="hutchinson",
        generator=torch.Generator().manual_seed(0),
    )
    o2 = Sophia(
        twin.parameters(),
        lr=0.01,
        estimator="hutchinson",
        maximize=True,
        generator=torch.Generator().manual_seed(0),
    )
    for _ in range(3):
        o1.step(lambda: F.cross_entropy(model(x), y))
        o2.step(lambda: -F.cross_entropy(twin(x), y))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)


# ----------------------------------------------------------------------- error inputs
def test_missing_closure_shows_an_example() -> None:
    model, _, _ = _mlp()
    opt = Sophia(model.parameters())
    with pytest.raises(ClosureRequiredError, match=r"(?s)def closure\(\):.*optimizer\.step"):
        opt.step()


def test_closure_contract_errors() -> None:
    model, x, y = _mlp()
    opt = Sophia(model.parameters())

    def calls_backward():
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss, logits

    with pytest.raises(ClosureRequiredError, match=r"called backward\(\)"):
        opt.step(calls_backward)
    with pytest.raises(ClosureRequiredError, match=r"return \(loss, logits\)"):
        opt.step(lambda: F.cross_entropy(model(x), y))  # GNB needs the logits
    with pytest.raises(ClosureRequiredError, match="returned float"):
        opt.step(lambda: 1.0)
    with pytest.raises(ClosureRequiredError, match="returned NoneType"):
        opt.step(lambda: None)
    with pytest.raises(ClosureRequiredError, match="with their autograd graph"):
        opt.step(lambda: (F.cross_entropy(model(x), y), model(x).detach()))
    assert len(opt.state) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, r"lr must be a finite number >= 0, got -1\.0"),
        ({"betas": (1.0, 0.99)}, r"betas\[0\] must be in \[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\] must be in \[0, 1\)"),
        ({"rho": -1.0}, r"rho must be a finite number >= 0"),
        ({"weight_decay": -1.0}, r"weight_decay must be a finite number >= 0"),
        ({"eps": 0.0}, r"eps must be a finite number > 0"),
        ({"estimator": "fisher"}, r"estimator must be 'gnb' \(SophiaG\), 'hutchinson'"),
        ({"estimator": 3}, r"estimator must be a string or a callable"),
        ({"update_period": 0}, r"update_period must be an int >= 1"),
        ({"bs": 0}, r"bs must be a positive int"),
        ({"likelihood": "poisson"}, r"likelihood must be 'categorical' or 'gaussian'"),
        ({"on_nonfinite": "warn"}, r"on_nonfinite must be one of 'raise'"),
    ],
)
def test_bad_hyperparameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        Sophia(_mlp()[0].parameters(), **kwargs)


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_nonfinite_gradient_raises_and_changes_nothing_or_skips(estimator: str) -> None:
    model, x, y = _mlp()
    opt = Sophia(model.parameters(), estimator=estimator, update_period=2)
    for _ in range(2):
        opt.step(_closure(model, x, y))
    snap = copy.deepcopy((model.state_dict(), opt.state_dict()))
    poison = model[0].weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match=r"at step 3: parameter 0 of param group 0 \(shape"):
        opt.step(_closure(model, x, y))  # step 3 is a refresh step
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[0][k])
    for pid, st in opt.state_dict()["state"].items():
        for key, v in st.items():
            assert torch.equal(v, snap[1]["state"][pid][key])
    opt.param_groups[0]["on_nonfinite"] = "skip"
    opt.step(_closure(model, x, y))
    assert opt.param_groups[0]["nonfinite_skips"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[0][k])
    poison.remove()
    opt.step(_closure(model, x, y))
    assert int(opt.state[model[0].weight]["step"]) == 3


def test_nonfinite_curvature_raises_naming_the_parameter() -> None:
    x = nn.Parameter(torch.tensor([1.0, 2.0], dtype=DT))

    def bad_estimator(params, grads, outputs, generator):
        return [torch.tensor([1.0, float("nan")], dtype=DT)]

    opt = Sophia([x], estimator=bad_estimator)
    with pytest.raises(NonFiniteError, match=r"non-finite curvature estimate at step 1: parame"):
        opt.step(lambda: (x**2).sum())
    assert len(opt.state) == 0 and torch.equal(x.detach(), torch.tensor([1.0, 2.0], dtype=DT))


def test_custom_estimator_is_injected_and_survives_deepcopy() -> None:
    calls = []

    def squared_gradient(params, grads, outputs, generator):
        calls.append(1)
        return [None if g is None else g * g for g in grads]

    x = nn.Parameter(torch.tensor([1.0, -2.0], dtype=DT))
    opt = Sophia([x], lr=0.1, estimator=squared_gradient, update_period=1)
    opt.step(lambda: (x**2).sum())
    torch.testing.assert_close(opt.state[x]["hessian"], 0.01 * torch.tensor([4.0, 16.0], dtype=DT))
    assert opt.param_groups[0]["estimator"] == "custom"
    x2, opt2 = copy.deepcopy((x, opt))
    opt2.step(lambda: (x2**2).sum())
    assert len(calls) == 2


def test_state_dict_restores_the_generator() -> None:
    model, x, y = _mlp()
    opt = Sophia(model.parameters(), estimator="hutchinson", update_period=1)
    opt.step(_closure(model, x, y))
    sd = copy.deepcopy(opt.state_dict())
    assert isinstance(sd["curvlab"]["generator_state"], torch.Tensor)
    twin = copy.deepcopy(model)
    opt2 = Sophia(twin.parameters(), estimator="hutchinson", update_period=1)
    opt2.load_state_dict(sd)
    opt.step(_closure(model, x, y))
    opt2.step(_closure(twin, x, y))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert math.isfinite(float(opt.state[model[0].weight]["hessian"].sum()))


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_multi_tensor_path_equals_single_tensor_reference_float64(estimator: str) -> None:
    """The whole optimizer, foreach=None (multi-tensor) vs foreach=False (single-tensor), float64:
    parameters and state bit-equal over refresh and non-refresh steps."""
    model, x, y = _mlp(4)
    twin = copy.deepcopy(model)
    kw = {"lr": 0.05, "weight_decay": 0.1, "estimator": estimator, "update_period": 2, "seed": 9}
    fast = Sophia(model.parameters(), **kw)
    ref = Sophia(twin.parameters(), **kw, foreach=False)
    for _ in range(5):
        fast.step(_closure(model, x, y))
        ref.step(_closure(twin, x, y))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "hessian", "step"):
            assert torch.equal(fast.state[p][key], ref.state[q][key])


def test_seed_makes_runs_reproducible_without_the_global_rng() -> None:
    """seed= fixes the probes/labels; seed=None draws one seed from the global RNG at
    construction, so torch.manual_seed before construction reproduces the run."""

    def run(seed: int | None, global_seed: int) -> list[torch.Tensor]:
        model, x, y = _mlp(3)
        torch.manual_seed(global_seed)
        opt = Sophia(model.parameters(), lr=0.05, update_period=1, seed=seed)
        for _ in range(3):
            torch.randn(5)  # global draws between steps must not matter
            opt.step(_closure(model, x, y))
        return [p.detach().clone() for p in model.parameters()]

    same = run(7, 0), run(7, 1)
    assert all(torch.equal(a, b) for a, b in zip(*same))
    again = run(None, 4), run(None, 4)
    assert all(torch.equal(a, b) for a, b in zip(*again))
    other = run(None, 5)
    assert not all(torch.equal(a, b) for a, b in zip(again[0], other))
    with pytest.raises(ParameterError, match="pass seed= or generator=, not both"):
        Sophia(_mlp()[0].parameters(), seed=1, generator=torch.Generator())


def test_manual_loop_without_curvature_warns_once() -> None:
    """update_period=None and no update_curvature(): the curvature is zero; warned once, at the
    first step, and not at all when the curvature was given before the first step."""
    model, x, y = _mlp()
    opt = Sophia(model.parameters(), update_period=None, seed=0)
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(ZeroCurvatureWarning, match=r"update_curvature\(\.\.\.\) every k steps"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        given = Sophia(model.parameters(), update_period=None, seed=0)
        given.update_curvature(_closure(model, x, y))
        given.step()
