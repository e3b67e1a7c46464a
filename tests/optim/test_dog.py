"""DoG / L-DoG against hand-written reference loops (paper Alg. 1, authors' r_eps rule), float64."""

import pytest
import torch

from curvlab.errors import StateDictError
from curvlab.optim.dog import DoG, LDoG, PolynomialDecayAverager


def reference_dog(xs0, grad_fn, steps, reps_rel, eps, wd, layerwise, init_eta=None, c=1.0):
    """DoG pseudo-code on a list of tensors; returns iterates and final (rbar, G) per block."""
    xs = [x.clone() for x in xs0]
    blocks = [[i] for i in range(len(xs))] if layerwise else [list(range(len(xs)))]
    x0 = [x.clone() for x in xs]
    rbar = [None] * len(blocks)
    G = [None] * len(blocks)
    history = []
    for t in range(steps):
        gs = [g + wd * x for g, x in zip(grad_fn(xs, t), xs)]
        new = []
        for b, idx in enumerate(blocks):
            if t == 0:
                norm_x0 = torch.sqrt(sum((x0[i] ** 2).sum() for i in idx))
                rbar[b] = (0.0 if init_eta is not None else reps_rel) * (1 + norm_x0)
                G[b] = eps + sum((gs[i] ** 2).sum() for i in idx)
            else:
                dist = torch.sqrt(sum(((xs[i] - x0[i]) ** 2).sum() for i in idx))
                rbar[b] = torch.maximum(rbar[b], dist)
                G[b] = G[b] + sum((gs[i] ** 2).sum() for i in idx)
            eta = c * rbar[b] / torch.sqrt(G[b])
            if t == 0 and init_eta is not None:
                eta = torch.tensor(init_eta, dtype=torch.float64)
            new += [(i, xs[i] - eta * gs[i]) for i in idx]
        for i, x in new:
            xs[i] = x
        history.append([x.clone() for x in xs])
    return history, rbar, G


def _problem(gen):
    shapes = [(3, 4), (4,), (2, 3)]
    xs0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]

    def grad_fn(xs, t):
        return [
            (1 + k) * (x - tg) + 0.1 * torch.cos(x + t)
            for k, (x, tg) in enumerate(zip(xs, targets))
        ]

    return xs0, grad_fn


@pytest.mark.parametrize("cls", [DoG, LDoG])
@pytest.mark.parametrize(
    ("reps_rel", "wd", "init_eta", "c"),
    [(1e-6, 0.0, None, 1.0), (1e-2, 0.1, None, 0.7), (1e-6, 0.0, 0.05, 1.0)],
)
def test_matches_reference_loop(cls, reps_rel, wd, init_eta, c, gen):
    xs0, grad_fn = _problem(gen)
    layerwise = cls is LDoG
    hist, rbar, G = reference_dog(xs0, grad_fn, 5, reps_rel, 1e-8, wd, layerwise, init_eta, c)
    ps = [torch.nn.Parameter(x.clone()) for x in xs0]
    opt = cls(ps, reps_rel=reps_rel, lr=c, weight_decay=wd, init_eta=init_eta)
    for t in range(5):
        grads = grad_fn([p.detach() for p in ps], t)
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        for p, ref in zip(ps, hist[t]):
            torch.testing.assert_close(p.detach(), ref, rtol=1e-13, atol=1e-15)
        for p, g in zip(ps, grads):
            assert torch.equal(p.grad, g), "weight decay must not modify p.grad"
    for k, p in enumerate(ps):
        st = opt.state[p]
        b = k if layerwise else 0
        torch.testing.assert_close(st["rbar"], torch.as_tensor(rbar[b]), rtol=1e-13, atol=0)
        torch.testing.assert_close(st["G"], G[b], rtol=1e-13, atol=0)
        assert torch.equal(st["x0"], xs0[k]) and st["step"].item() == 5
        assert st["rbar"].dtype == torch.float64


def test_first_step_size_is_reps_rel_times_one_plus_norm_over_gradient_norm():
    x = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = DoG([x], reps_rel=1e-3, eps=0.0 + 1e-8)
    x.grad = torch.tensor([0.0, 2.0], dtype=torch.float64)
    opt.step()
    eta = 1e-3 * (1 + 5.0) / (4.0 + 1e-8) ** 0.5
    torch.testing.assert_close(x.detach(), torch.tensor([3.0, 4.0 - 2 * eta], dtype=torch.float64))
    torch.testing.assert_close(opt.last_eta(), torch.tensor(eta, dtype=torch.float64))


def test_no_host_sync_in_step_with_policy_ignore(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for cls in (DoG, LDoG):
        opt = cls(model.parameters(), weight_decay=0.01, on_nonfinite="ignore")
        model(torch.ones(2, 4)).sum().backward()

        def boom(*a, **k):
            raise AssertionError("device-to-host read in DoG.step")

        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
                m.setattr(torch.Tensor, name, boom)
            opt.step()
            opt.step()


def test_bfloat16_params_keep_float32_scalars_through_state_dict():
    p = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    opt = DoG([p])
    for _ in range(3):
        p.grad = torch.full((5,), 0.3, dtype=torch.bfloat16)
        opt.step()
    assert opt.state[p]["G"].dtype == torch.float32
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = DoG([q])
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[q]["G"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["G"], opt.state[p]["G"])


def test_ldog_state_into_dog_is_rejected():
    ps = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2) * 5)]
    ld = LDoG(ps)
    for k in range(2):
        for i, p in enumerate(ps):
            p.grad = torch.full_like(p, 1.0 + i + k)
        ld.step()
    with pytest.raises(StateDictError, match="saved from LDoG"):
        DoG([torch.nn.Parameter(p.detach().clone()) for p in ps]).load_state_dict(ld.state_dict())


def test_polynomial_decay_averager_closed_form():
    x = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    gamma = 8.0
    avg = PolynomialDecayAverager([x], gamma=gamma)
    values = [1.0, -2.0, 4.0, 0.5, 3.0]
    ref = torch.zeros(3, dtype=torch.float64)
    for t, v in enumerate(values, start=1):
        x.data.fill_(v)
        avg.step()
        w = (gamma + 1) / (t + gamma)
        ref = (1 - w) * ref + w * v
        torch.testing.assert_close(avg.averaged[0], ref)
    # the weights of the closed form: x̄_T = Σ_t v_t w_t Π_{s>t} (1 - w_s)
    T = len(values)
    coef = [
        (gamma + 1)
        / (t + gamma)
        * torch.prod(
            torch.tensor(
                [1 - (gamma + 1) / (s + gamma) for s in range(t + 1, T + 1)], dtype=torch.float64
            )
        )
        for t in range(1, T + 1)
    ]
    torch.testing.assert_close(avg.averaged[0][0], sum(c * v for c, v in zip(coef, values)))
    with avg.applied():
        assert torch.equal(x.detach(), avg.averaged[0])
    assert torch.equal(x.detach(), torch.full((3,), 3.0, dtype=torch.float64))
    sd = avg.state_dict()
    avg2 = PolynomialDecayAverager([torch.zeros(3, dtype=torch.float64)])
    avg2.load_state_dict(sd)
    assert avg2.t == T and torch.equal(avg2.averaged[0], avg.averaged[0])
    with pytest.raises(StateDictError, match="shape"):
        PolynomialDecayAverager([torch.zeros(2)]).load_state_dict(sd)


def test_averager_on_module_tracks_float_buffers():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    avg = PolynomialDecayAverager(net)
    assert len(avg.averaged) == 4 + 2  # weights, biases, running mean/var (not num_batches_tracked)


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_large_tensors_take_the_scratch_path_and_match_the_reference(cls, gen):
    # >= 65536 elements: distances go through the reusable scratch buffer
    xs0 = [
        torch.randn(70_000, generator=gen, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
    ]

    def grad_fn(xs, t):
        return [2 * x + 0.1 * t for x in xs]

    hist, _, _ = reference_dog(xs0, grad_fn, 4, 1e-4, 1e-8, 0.0, cls is LDoG)
    ps = [torch.nn.Parameter(x.clone()) for x in xs0]
    opt = cls(ps, reps_rel=1e-4)
    for t in range(4):
        for p, g in zip(ps, grad_fn([p.detach() for p in ps], t)):
            p.grad = g
        opt.step()
    for p, ref in zip(ps, hist[-1]):
        torch.testing.assert_close(p.detach(), ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("cls", [DoG, LDoG])
def test_bfloat16_params_move_and_track_a_float32_run(cls):
    # default reps_rel = 1e-6: the first steps are far below bfloat16 resolution; before the
    # float32 iterate the parameters never moved
    torch.manual_seed(0)
    X, y = torch.randn(64, 10), torch.randn(64, 1)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = torch.nn.Linear(10, 1)
        torch.manual_seed(1)
        model.reset_parameters()
        model = model.to(dtype)
        w0 = model.weight.detach().clone()
        opt = cls(model.parameters())
        for _ in range(50):
            opt.zero_grad()
            ((model(X.to(dtype)) - y.to(dtype)) ** 2).mean().backward()
            opt.step()
        assert model.weight.dtype == dtype
        runs[dtype] = (model.weight.detach().float(), (model.weight.detach() - w0).float())
    w32, moved32 = runs[torch.float32]
    w16, moved16 = runs[torch.bfloat16]
    assert moved16.norm() > 0.5 * moved32.norm() > 0
    torch.testing.assert_close(w16, w32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cls", [DoG, LDoG])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("init_eta", [None, 0.05])
def test_multi_tensor_path_equals_the_single_tensor_reference(cls, wd, init_eta, gen):
    xs0 = [
        torch.randn(70_000, generator=gen, dtype=torch.float64),
        torch.randn(3, 4, generator=gen, dtype=torch.float64),
        torch.randn(5, generator=gen, dtype=torch.float64),
    ]

    def grad_fn(xs, t):
        return [torch.cos(x + t) + 0.5 * x for x in xs]

    runs = []
    for foreach in (False, True):
        ps = [torch.nn.Parameter(x.clone()) for x in xs0]
        opt = cls(ps[:2], reps_rel=1e-3, weight_decay=wd, init_eta=init_eta, foreach=foreach)
        for t in range(5):
            if t == 2:  # a parameter joining late
                opt.add_param_group({"params": [ps[2]]})
            for p, g in zip(ps, grad_fn([p.detach() for p in ps], t)):
                p.grad = g
            opt.step()
        runs.append((ps, opt))
    (ps_a, opt_a), (ps_b, opt_b) = runs
    for a, b in zip(ps_a, ps_b):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-15)
        for key in ("rbar", "G", "step"):
            torch.testing.assert_close(opt_a.state[a][key], opt_b.state[b][key], rtol=1e-13, atol=0)


@pytest.mark.parametrize("gamma", [-1.0, float("nan"), "8"])
def test_averager_rejects_a_bad_gamma(gamma):
    from curvlab.errors import ParameterError

    with pytest.raises(ParameterError, match="gamma must be a finite number >= 0"):
        PolynomialDecayAverager([torch.zeros(2)], gamma=gamma)


def test_dog_group_scalars_are_one_shared_tensor_also_after_load_state_dict():
    ps = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = DoG(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    a, b = (opt.state[p] for p in ps)
    assert a["rbar"] is b["rbar"] and a["G"] is b["G"]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = DoG(qs)
    opt2.load_state_dict(opt.state_dict())
    a2, b2 = (opt2.state[q] for q in qs)
    assert a2["rbar"] is b2["rbar"] and a2["G"] is b2["G"]
    for o, xs in ((opt, ps), (opt2, qs)):
        for x in xs:
            x.grad = torch.full_like(x, 0.5)
        o.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def test_blocked_distance_equals_the_plain_norm():
    from types import SimpleNamespace

    from curvlab.optim.dog import _distances

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2**16 * 3 + 7, generator=g, dtype=torch.float64)]
    x0s = [torch.randn(xs[0].shape, generator=g, dtype=torch.float64)]
    got = _distances(xs, x0s, torch.float64, SimpleNamespace(), False)[0]
    torch.testing.assert_close(got, torch.linalg.vector_norm(xs[0] - x0s[0]), rtol=1e-14, atol=0)
