"""ADOPT against a hand-written reference loop (paper Alg. 1 + the authors' clip), float64."""

from types import SimpleNamespace

import pytest
import torch

from curvlab.optim.adopt import ADOPT, _multi_tensor_adopt, _single_tensor_adopt, adopt


def reference_adopt(theta0, grad_fn, steps, lr, b1, b2, eps, wd, decouple, kappa):
    """Plain loop from the paper's pseudo-code; returns the iterates and the final (m, v)."""
    theta = theta0.clone()
    m = torch.zeros_like(theta)
    g = grad_fn(theta, 0)
    if wd and not decouple:
        g = g + wd * theta
    v = g * g  # t = 0: initialise v, no update
    history = [theta.clone()]
    for t in range(1, steps):
        g = grad_fn(theta, t)
        if wd and not decouple:
            g = g + wd * theta
        if wd and decouple:
            theta = theta - lr * wd * theta
        n = g / torch.clamp(torch.sqrt(v), min=eps)
        if kappa is not None:
            n = torch.clamp(n, -(t**kappa), t**kappa)
        m = b1 * m + (1 - b1) * n
        theta = theta - lr * m
        v = b2 * v + (1 - b2) * g * g
        history.append(theta.clone())
    return history, m, v


def _grad_fn(A, b):
    # gradient of 1/2 xᵀAx - bᵀx plus a step-dependent perturbation so steps differ
    return lambda x, t: A @ x - b + 0.3 * torch.sin(torch.arange(x.numel(), dtype=x.dtype) + t)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    ("wd", "decouple", "kappa"),
    [
        (0.0, False, 0.25),
        (0.1, False, 0.25),
        (0.1, True, 0.25),
        (0.0, False, None),
        (0.05, True, 0.5),
    ],
)
def test_matches_reference_loop(foreach, wd, decouple, kappa, gen):
    n = 6
    Q = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = Q @ Q.T / n + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    theta0 = torch.randn(n, generator=gen, dtype=torch.float64)
    grad_fn = _grad_fn(A, b)
    kw = {"lr": 0.05, "b1": 0.8, "b2": 0.95, "eps": 1e-6, "wd": wd, "decouple": decouple}
    hist, m_ref, v_ref = reference_adopt(theta0, grad_fn, 5, kappa=kappa, **kw)

    p = torch.nn.Parameter(theta0.clone())
    opt = ADOPT(
        [p], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd, decouple=decouple,
        clip_exponent=kappa, foreach=foreach,
    )  # fmt: skip
    for t in range(5):
        p.grad = grad_fn(p.detach(), t)
        opt.step()
        torch.testing.assert_close(p.detach(), hist[t], rtol=1e-13, atol=1e-14)
    st = opt.state[p]
    torch.testing.assert_close(st["exp_avg"], m_ref, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(st["exp_avg_sq"], v_ref, rtol=1e-13, atol=1e-14)
    assert st["step"].dtype == torch.float32 and st["step"].item() == 5


def test_first_step_only_initialises_v():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = ADOPT([p], lr=0.1, weight_decay=0.5, decouple=True)
    p.grad = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.float64))  # no decay either
    assert torch.equal(opt.state[p]["exp_avg_sq"], p.grad**2)
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(3, dtype=torch.float64))


def test_clip_bounds_the_normalised_gradient_of_a_zero_initialised_head():
    # v0 = 0 (zero gradient at init, as for a zero-initialised last layer): the un-clipped update
    # divides by eps; the clipped one is at most lr * (1 - b1) * 1 ** 0.25 at the first real update
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    clipped = ADOPT([p], lr=1.0, betas=(0.9, 0.999), clip_exponent=0.25)
    q = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    unclipped = ADOPT([q], lr=1.0, betas=(0.9, 0.999), clip_exponent=None)
    for opt, x in ((clipped, p), (unclipped, q)):
        x.grad = torch.zeros(2, dtype=torch.float64)
        opt.step()
        x.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1], dtype=torch.float64))
    assert q.detach().abs().min() > 1e4  # 0.1 / eps = 1e5


def test_foreach_equals_single_tensor_with_mixed_steps_dtypes_and_complex(gen):
    shapes = [(3, 4), (5,), (2, 2, 2), (7,)]
    dtypes = [torch.float64, torch.float64, torch.float32, torch.complex128]

    def make():
        g = torch.Generator().manual_seed(1)
        return [torch.randn(s, generator=g, dtype=d) for s, d in zip(shapes, dtypes)]

    ps_a, ps_b, ps_c = make(), make(), make()
    states = []
    for ps in (ps_a, ps_b, ps_c):
        ms = [torch.zeros_like(p) for p in ps]
        vs = [torch.zeros_like(p) for p in ps]
        ts = [torch.tensor(float(k % 2)) for k in range(len(ps))]  # steps 0 and 1 mixed
        states.append((ms, vs, ts))
    kw = dict(lr=0.03, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, decouple=False)
    for it in range(4):
        g = torch.Generator().manual_seed(10 + it)
        grads = [torch.randn(s, generator=g, dtype=d) for s, d in zip(shapes, dtypes)]
        _single_tensor_adopt(
            ps_a, grads, *states[0], clip_exponent=0.25, maximize=it % 2 == 1, **kw
        )
        _multi_tensor_adopt(ps_b, grads, *states[1], clip_exponent=0.25, maximize=it % 2 == 1, **kw)
        _multi_tensor_adopt(  # the CPU path through reusable scratch buffers
            ps_c,
            grads,
            *states[2],
            clip_exponent=0.25,
            maximize=it % 2 == 1,
            scratch=SimpleNamespace(),
            **kw,
        )
    flat = [[*ps, *m, *v, *t] for ps, (m, v, t) in zip((ps_a, ps_b, ps_c), states)]
    for x, y, z in zip(*flat):
        assert torch.equal(y, z)
        # float64 (and complex128): equal to 1e-14; float32: rsqrt vs sqrt-then-divide, a few ulps
        tol = (
            {"rtol": 1e-14, "atol": 1e-15}
            if x.dtype != torch.float32
            else {"rtol": 1e-6, "atol": 1e-7}
        )
        torch.testing.assert_close(x, y, **tol)


def test_deepcopy_keeps_the_clip_schedule():
    import copy

    p = torch.nn.Parameter(torch.zeros(2))
    opt = copy.deepcopy(ADOPT([p], clip_exponent=0.5))
    assert opt.param_groups[0]["clip_exponent"] == 0.5


def test_foreach_equals_single_tensor_on_large_cpu_tensors():
    # >= 65536 elements per tensor takes the per-tensor clamp branch of the CPU path
    g = torch.Generator().manual_seed(2)
    shapes = [(300, 250), (70_000,)]
    ps_a = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ps_b = [p.clone() for p in ps_a]
    st_a = [[torch.zeros_like(p) for p in ps_a] for _ in range(2)] + [
        [torch.tensor(0.0) for _ in ps_a]
    ]
    st_b = [[torch.zeros_like(p) for p in ps_b] for _ in range(2)] + [
        [torch.tensor(0.0) for _ in ps_b]
    ]
    kw = dict(lr=0.1, betas=(0.5, 0.5), eps=1e-6, weight_decay=0.0, decouple=False, maximize=False)
    for _ in range(4):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) * 10 for s in shapes]
        _single_tensor_adopt(ps_a, grads, *st_a, clip_exponent=0.25, **kw)
        _multi_tensor_adopt(ps_b, grads, *st_b, clip_exponent=0.25, scratch=SimpleNamespace(), **kw)
    for x, y in zip([*ps_a, *st_a[0], *st_a[1]], [*ps_b, *st_b[0], *st_b[1]]):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_functional_entry_point_dispatches_to_the_reference_or_the_fast_path(foreach):
    g = torch.Generator().manual_seed(3)
    ps = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    ref = [p.clone() for p in ps]
    kw = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0, decouple=False)
    kw |= dict(clip_exponent=0.25, maximize=False)
    st = [[torch.zeros_like(p) for p in ps] for _ in range(2)] + [[torch.tensor(0.0) for _ in ps]]
    st_ref = [[t.clone() for t in lst] for lst in st]
    for _ in range(3):
        grads = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in ps]
        adopt(ps, grads, *st, foreach=foreach, **kw)
        _single_tensor_adopt(ref, grads, *st_ref, **kw)
    for x, y in zip([*ps, *st[0], *st[1], *st[2]], [*ref, *st_ref[0], *st_ref[1], *st_ref[2]]):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(("wd", "decouple", "kappa"), [(0.0, False, 0.25), (0.1, True, None)])
def test_blocked_cpu_path_equals_single_tensor(wd, decouple, kappa):
    # >= BLOCK_MIN (2^17) entries: the cache-blocked path; 2^18 + 5 entries span two blocks
    g = torch.Generator().manual_seed(3)
    shapes = [(2**18 + 5,), (7, 3)]
    ps_a = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ps_b = [p.clone() for p in ps_a]
    st_a = [[torch.zeros_like(p) for p in ps_a] for _ in range(2)]
    st_a.append([torch.tensor(0.0) for _ in ps_a])
    st_b = [[t.clone() for t in lst] for lst in st_a]
    kw = dict(lr=0.1, betas=(0.5, 0.5), eps=1e-6, weight_decay=wd, decouple=decouple)
    for _ in range(4):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        _single_tensor_adopt(ps_a, grads, *st_a, clip_exponent=kappa, maximize=False, **kw)
        _multi_tensor_adopt(
            ps_b, grads, *st_b, clip_exponent=kappa, maximize=False, scratch=SimpleNamespace(), **kw
        )
    for x, y in zip([*ps_a, *st_a[0], *st_a[1]], [*ps_b, *st_b[0], *st_b[1]]):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-14)
