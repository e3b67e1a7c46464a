"""FRUGAL: reference loop, exact signSGD / Adam parts, memory, resume, block orders, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from curvlab.errors import ParameterError, StateDictError
from curvlab.optim.frugal import FRUGAL, block_selection


def _stack(n_layers: int = 4, width: int = 6, seed: int = 0) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(n_layers):
        layers += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


def _data(seed: int, n: int, width: int = 6) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(5, width, generator=gen, dtype=torch.float64),
            torch.randn(5, width, generator=gen, dtype=torch.float64),
        )
        for _ in range(n)
    ]


def _loss(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    return ((model(X) - y) ** 2).mean()


def reference_frugal(
    model: nn.Module,
    batches: list,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    wd: float,
    density: float,
    gap: int,
    order: str,
    seed: int,
    free_scale: float,
    proj_scale: float,
) -> None:
    """The authors' BlockAdamW step, written out (float64): split = Linear weights, rest = AdamW."""
    params = list(model.parameters())
    split = [p for p in params if p.dim() >= 2]
    b1, b2 = betas
    state: dict[int, dict] = {id(p): {"step": 0} for p in params}
    active: set[int] = set()
    for t, (X, y) in enumerate(batches):
        if t % gap == 0:  # refresh: fresh state for the chosen blocks, none for the others
            chosen = block_selection(len(split), density, order, seed, t // gap)
            active = {id(split[i]) for i in chosen}
            for p in split:
                state[id(p)] = {"step": 0}
        for p in params:
            p.grad = None
        _loss(model, X, y).backward()
        with torch.no_grad():
            for p in params:
                st, g = state[id(p)], p.grad
                p.mul_(1 - lr * wd)
                st["step"] += 1
                if p.dim() >= 2 and id(p) not in active:
                    p.add_(-lr * proj_scale * free_scale * g.sign())
                    continue
                lr_p = lr * proj_scale if p.dim() >= 2 else lr
                m = st.setdefault("m", torch.zeros_like(p))
                v = st.setdefault("v", torch.zeros_like(p))
                m.mul_(b1).add_((1 - b1) * g)
                v.mul_(b2).add_((1 - b2) * g * g)
                denom = v.sqrt() / math.sqrt(1 - b2 ** st["step"]) + eps
                p.add_(m / denom * (-lr_p / (1 - b1 ** st["step"])))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("order", ["random", "descending", "mirror"])
def test_blocks_match_reference_loop(foreach: bool, order: str) -> None:
    kw = {
        "lr": 0.02,
        "betas": (0.8, 0.95),
        "eps": 1e-8,
        "wd": 0.1,
        "density": 0.5,
        "gap": 3,
        "order": order,
        "seed": 7,
        "free_scale": 0.5,
        "proj_scale": 0.7,
    }
    model = _stack()
    ref = copy.deepcopy(model)
    batches = _data(1, 8)
    opt = FRUGAL(
        model.parameters(),
        lr=kw["lr"],
        betas=kw["betas"],
        eps=kw["eps"],
        weight_decay=kw["wd"],
        density=kw["density"],
        update_gap=kw["gap"],
        block_order=order,
        seed=kw["seed"],
        inactive_lr_scale=kw["free_scale"],
        proj_params_lr_scale=kw["proj_scale"],
        foreach=foreach,
    )
    for X, y in batches:
        opt.zero_grad()
        _loss(model, X, y).backward()
        opt.step()
    reference_frugal(ref, batches, **kw)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


def test_foreach_path_equals_the_loop_bitwise() -> None:
    runs = []
    for foreach in (False, True):
        for projection in ("blocks", "columns"):
            model = _stack(seed=2)
            opt = FRUGAL(
                model.parameters(),
                lr=0.01,
                density=0.5,
                update_gap=2,
                projection=projection,
                foreach=foreach,
            )
            for X, y in _data(3, 5):
                opt.zero_grad()
                _loss(model, X, y).backward()
                opt.step()
            runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(runs[0], runs[2]):
        assert torch.equal(a, b)
    for a, b in zip(runs[1], runs[3]):
        assert torch.equal(a, b)


def test_state_free_part_is_exactly_sign_sgd() -> None:
    model = _stack(n_layers=4)
    opt = FRUGAL(
        model.parameters(),
        lr=0.03,
        weight_decay=0.0,
        density=0.25,
        update_gap=100,
        inactive_lr_scale=0.5,
        proj_params_lr_scale=2.0,
    )
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    for X, y in _data(4, 3):
        opt.zero_grad()
        _loss(model, X, y).backward()
        before = [w.detach().clone() for w in weights]
        opt.step()
        inactive = [i for i, w in enumerate(weights) if "exp_avg" not in opt.state[w]]
        assert len(inactive) == 3
        for i in inactive:
            assert weights[i].grad is not None
            want = before[i] - 0.03 * 2.0 * 0.5 * weights[i].grad.sign()
            assert torch.equal(weights[i].detach(), want)


def test_state_full_block_is_exactly_adamw_on_that_tensor() -> None:
    """Within one subspace, the chosen tensor follows torch.optim.AdamW (same hyper-parameters)."""
    model = _stack(n_layers=4)
    opt = FRUGAL(model.parameters(), lr=0.01, weight_decay=0.1, density=0.25, update_gap=100)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    batches = _data(5, 6)
    opt.zero_grad()
    _loss(model, *batches[0]).backward()
    w0 = [w.detach().clone() for w in weights]
    opt.step()
    (chosen,) = [i for i, w in enumerate(weights) if "exp_avg" in opt.state[w]]
    shadow = nn.Parameter(w0[chosen].clone())
    adamw = torch.optim.AdamW([shadow], lr=0.01, weight_decay=0.1, foreach=False)
    shadow.grad = weights[chosen].grad.clone()  # the same gradient the model saw
    adamw.step()
    for X, y in batches[1:]:
        opt.zero_grad()
        _loss(model, X, y).backward()
        shadow.grad = weights[chosen].grad.clone()
        opt.step()
        adamw.step()
        torch.testing.assert_close(
            weights[chosen].detach(), shadow.detach(), rtol=1e-13, atol=1e-15
        )
    torch.testing.assert_close(
        opt.state[weights[chosen]]["exp_avg_sq"],
        adamw.state[shadow]["exp_avg_sq"],
        rtol=1e-13,
        atol=1e-18,
    )


@pytest.mark.parametrize("projection", ["columns", "rows"])
def test_coordinate_projection_is_adam_on_the_chosen_part_and_sign_sgd_elsewhere(
    projection: str,
) -> None:
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(4, 8, dtype=torch.float64))
    opt = FRUGAL(
        [W], lr=0.05, weight_decay=0.0, density=0.25, update_gap=100, projection=projection
    )
    axis = 1 if projection == "columns" else 0
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(4, 8, generator=gen, dtype=torch.float64) for _ in range(4)]
    W.grad = grads[0]
    start = W.detach().clone()
    opt.step()
    # Adam's first step is lr·g/(|g| + eps): off the signSGD step lr by ~lr·eps/|g| >> rounding
    moved_by_sign = ((W.detach() - start).abs() - 0.05).abs() < 1e-13
    chosen = (~moved_by_sign).all(dim=1 - axis).nonzero().flatten()
    assert chosen.numel() == int(W.shape[axis] * 0.25)
    assert opt.state[W]["exp_avg"].shape[axis] == chosen.numel()
    shadow = nn.Parameter(start.index_select(axis, chosen).clone())
    adam = torch.optim.AdamW([shadow], lr=0.05, weight_decay=0.0, foreach=False)
    shadow.grad = grads[0].index_select(axis, chosen)
    adam.step()
    for g in grads[1:]:
        before = W.detach().clone()
        W.grad = g
        opt.step()
        shadow.grad = g.index_select(axis, chosen)
        adam.step()
        torch.testing.assert_close(
            W.detach().index_select(axis, chosen), shadow.detach(), rtol=1e-13, atol=1e-15
        )
        mask = torch.ones(W.shape[axis], dtype=torch.bool)
        mask[chosen] = False
        rest = mask.nonzero().flatten()
        want = (before - 0.05 * g.sign()).index_select(axis, rest)
        assert torch.equal(W.detach().index_select(axis, rest), want)


def _state_bytes(opt: FRUGAL, params: list[Tensor]) -> int:
    """Bytes of the per-entry state (the scalar step counters are O(1) per tensor)."""
    return sum(
        v.numel() * v.element_size()
        for p in params
        for v in opt.state[p].values()
        if isinstance(v, Tensor) and v.dim() > 0
    )


def test_memory_is_two_bytes_per_split_parameter_at_density_quarter() -> None:
    # blocks: eight equal tensors, two state-full
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(8)])
    opt = FRUGAL(model.parameters(), density=0.25)
    model(torch.randn(3, 16)).sum().backward()
    opt.step()
    weights = [m.weight for m in model]
    assert _state_bytes(opt, weights) == 2 * sum(w.numel() for w in weights)
    biases = [m.bias for m in model]  # not split: plain AdamW, 8 B/param
    assert _state_bytes(opt, biases) == 8 * sum(b.numel() for b in biases)
    # columns: any shapes, at most 8 · density bytes per split parameter
    model = nn.Sequential(nn.Linear(10, 30), nn.Linear(30, 7), nn.Linear(7, 3))
    opt = FRUGAL(model.parameters(), density=0.25, projection="columns")
    model(torch.randn(3, 10)).sum().backward()
    opt.step()
    weights = [m.weight for m in model]
    n = sum(w.numel() for w in weights)
    assert 0 < _state_bytes(opt, weights) <= 2 * n


def test_converges_on_a_quadratic_with_split_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    A = torch.linspace(1.0, 10.0, 6, dtype=torch.float64)
    targets = [torch.randn(6, 6, generator=gen, dtype=torch.float64) for _ in range(4)]
    Ws = [nn.Parameter(torch.zeros(6, 6, dtype=torch.float64)) for _ in range(4)]
    steps = 1500
    opt = FRUGAL(Ws, lr=0.1, weight_decay=0.0, density=0.5, update_gap=20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)
    for _ in range(steps):
        opt.zero_grad()
        sum((0.5 * A * (W - T) ** 2).sum() for W, T in zip(Ws, targets)).backward()
        opt.step()
        sched.step()
    err = max((W.detach() - T).abs().max().item() for W, T in zip(Ws, targets))
    assert err < 1e-3


@pytest.mark.parametrize("projection", ["blocks", "columns"])
def test_resume_across_a_refresh_is_bit_identical(projection: str) -> None:
    model = _stack(seed=4)
    batches = _data(6, 10)

    def make(m: nn.Module) -> FRUGAL:
        return FRUGAL(m.parameters(), lr=0.01, density=0.5, update_gap=3, projection=projection)

    opt = make(model)
    for X, y in batches[:4]:
        opt.zero_grad()
        _loss(model, X, y).backward()
        opt.step()
    model2 = copy.deepcopy(model)
    opt2 = make(model2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for X, y in batches[4:]:
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            _loss(m, X, y).backward()
            o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def _official_order(n: int, k: int, order: str, refreshes: int) -> list[list[int]]:
    """The authors' next_block_start bookkeeping, transcribed as a loop."""
    out, start = [], None
    for _ in range(refreshes):
        if order == "ascending":
            start = 0 if start is None else start
            out.append([i % n for i in range(start, start + k)])
            start += k
            start -= n if start >= n else 0
        elif order == "descending":
            start = n - 1 if start is None else start
            out.append([i % n for i in range(start, start - k, -1)])
            start -= k
            start += n if start < 0 else 0
        else:
            start = 0 if start is None else start
            sel = []
            for i in range(start, start + k // 2):
                sel += [i % (n // 2), n - 1 - i % (n // 2)]
            out.append(sel)
            start += k // 2
            start -= n // 2 if start >= n // 2 else 0
    return out


@pytest.mark.parametrize("order", ["ascending", "descending", "mirror"])
def test_block_orders_follow_the_official_bookkeeping(order: str) -> None:
    for n, density in ((8, 0.25), (12, 1 / 3), (6, 2 / 3)):
        k = round(n * density)
        want = _official_order(n, k, order, 7)
        got = [block_selection(n, density, order, 0, r) for r in range(7)]
        assert got == want


def test_random_blocks_are_deterministic_and_vary() -> None:
    a = [block_selection(12, 0.25, "random", 3, r) for r in range(6)]
    assert a == [block_selection(12, 0.25, "random", 3, r) for r in range(6)]
    assert len({tuple(s) for s in a}) > 1
    assert all(len(set(s)) == 3 for s in a)
    assert block_selection(2, 0.25, "random", 0, 0) == []  # round(0.5) == 0, as the official code


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, r"lr must be a finite number >= 0"),
        ({"density": 1.5}, r"density must be a number in \[0, 1\]"),
        ({"update_gap": 0}, r"update_gap must be an int >= 1"),
        ({"projection": "svd"}, r"projection must be one of 'blocks', 'columns', 'rows'"),
        ({"block_order": "shuffle"}, r"block_order must be one of"),
        ({"inactive_update_rule": "adam"}, r"inactive_update_rule must be one of"),
        ({"inactive_lr_scale": -1.0}, r"inactive_lr_scale must be a finite number >= 0"),
        ({"split": "auto"}, r"split must be one of None, True, False, got 'auto'; None splits"),
        ({"seed": -1}, r"seed must be an int >= 0"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\] must be in \[0, 1\)"),
        ({"eps": 0.0}, r"eps must be a finite number > 0"),
        ({"block_order": "mirror", "density": 0.25}, r"activates tensors in pairs"),
    ],
)
def test_bad_hyperparameters_raise_their_message(kwargs: dict, match: str) -> None:
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])
    with pytest.raises(ParameterError, match=match):
        FRUGAL(model.parameters(), **kwargs)


def test_load_state_dict_with_other_density_raises() -> None:
    model = _stack()
    opt = FRUGAL(model.parameters(), projection="columns", density=0.5)
    _loss(model, *_data(0, 1)[0]).backward()
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["density"] = 0.25
    with pytest.raises(StateDictError, match="shape"):
        FRUGAL(_stack().parameters(), projection="columns").load_state_dict(sd)


@pytest.mark.parametrize("projection", ["columns", "rows"])
def test_non_contiguous_parameter_gets_the_same_update(projection: str) -> None:
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    W_nc = nn.Parameter(base.t().contiguous().t())  # same values, column-major strides
    W_c = nn.Parameter(base.clone())
    assert not W_nc.is_contiguous()
    opts = [
        FRUGAL([W], lr=0.05, density=0.5, update_gap=2, projection=projection) for W in (W_nc, W_c)
    ]
    for _ in range(4):
        g = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        for W, opt in zip((W_nc, W_c), opts):
            W.grad = g.clone()
            opt.step()
    assert torch.equal(W_nc.detach(), W_c.detach())


@pytest.mark.parametrize("rule", ["sgd", "no"])
@pytest.mark.parametrize("projection", ["blocks", "rows"])
def test_other_state_free_rules(rule: str, projection: str) -> None:
    model = _stack(n_layers=4)
    opt = FRUGAL(
        model.parameters(),
        lr=0.03,
        weight_decay=0.0,
        density=0.25,
        update_gap=100,
        inactive_update_rule=rule,
        inactive_lr_scale=0.5,
        projection=projection,
    )
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    for X, y in _data(8, 3):
        opt.zero_grad()
        _loss(model, X, y).backward()
        before = [w.detach().clone() for w in weights]
        opt.step()
        for w, b in zip(weights, before):
            assert w.grad is not None
            if projection == "blocks" and "exp_avg" in opt.state[w]:
                continue  # the state-full tensor
            want = b - 0.03 * 0.5 * w.grad if rule == "sgd" else b
            rows = torch.ones(w.shape[0], dtype=torch.bool)
            if projection == "rows":  # rows carrying moments are state-full
                moved = (w.detach() != want).any(dim=1)
                assert int(moved.sum()) <= int(w.shape[0] * 0.25)
                rows = ~moved
            # (sgd: p + α·g may be fused into one rounding, hence a 1-ulp tolerance)
            torch.testing.assert_close(w.detach()[rows], want[rows], rtol=2e-16, atol=2e-16)
