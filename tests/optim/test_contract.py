"""Shared contract suite: every optimizer in CASES must pass every test below.

Adding an optimizer is one row in CASES, e.g.::

    Case("sophia", Sophia, {"lr": 1e-2}, closure_mode="loss", quadratic={"lr": 0.1}),

Fields of a row (all but ``name`` and ``factory`` optional):

* ``factory(params, **kwargs)`` builds the optimizer; ``kwargs`` are used by the API tests.
* ``closure_mode``: ``"backward"`` (torch standard: the closure zeroes grads, calls backward and
  returns the loss) or ``"loss"`` (the closure returns the loss, or ``(loss, outputs)``, WITHOUT
  calling backward; step computes the gradients).
* ``driver(opt, problem) -> loss``: one optimisation step; default: chosen by ``closure_mode``.
  ``problem`` has ``.loss()`` (scalar tensor) and ``.loss_and_outputs()`` (``(loss, logits)``;
  logits are ``None`` for the quadratic and Rosenbrock).
* ``quadratic`` / ``rosenbrock``: kwargs for the convergence runs; ``steps=(n_quadratic,
  n_rosenbrock)``, a run of more than 5000 steps is marked slow. With ``schedule=True`` (default)
  both runs use a linear-decay LambdaLR (Defazio et al. 2023) so that the last iterate converges.
* ``errors``: ``((kwargs, exception type, regex), ...)``: bad constructor inputs, their messages.
* ``curvlab``: the row is a curvlab optimizer, so the curvlab policies are checked as well
  (non-finite gradients, ``StateDictError`` on foreign or mismatched state, sparse gradients,
  the ``closure_mode`` class attribute).
* ``group_kwargs``: hyper-parameters of the second param group in the multi-group test.
* ``skip``: ``{test name: reason}`` for a test that does not apply (say why).
* ``float32_state``: state keys kept in float32 next to half-precision parameters (DoG's iterate).
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from curvlab.errors import ClosureRequiredError, NonFiniteError, ParameterError, StateDictError
from curvlab.optim.adahessian import AdaHessian
from curvlab.optim.adopt import ADOPT
from curvlab.optim.dog import DoG, LDoG
from curvlab.optim.frugal import FRUGAL
from curvlab.optim.mfac import MFAC
from curvlab.optim.newton import Newton
from curvlab.optim.psgd_kron import PSGDKron
from curvlab.optim.psgd_lra import PSGDLRA
from curvlab.optim.psgd_xmat import PSGDXMat
from curvlab.optim.sophia import Sophia


# ----------------------------------------------------------------------------- problems
class Problem:
    """A small classification MLP (or a test function) with fixed data; all randomness seeded."""

    def __init__(
        self, dtype: torch.dtype = torch.float64, seed: int = 0, extra_unused: bool = False
    ):
        g = torch.Generator().manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.5)
        self.X = torch.randn(16, 5, generator=g, dtype=torch.float64).to(dtype)
        self.y = torch.randint(0, 3, (16,), generator=g)
        self.unused = nn.Parameter(torch.ones(2, dtype=dtype)) if extra_unused else None

    def params(self) -> list[nn.Parameter]:
        ps = list(self.model.parameters())
        return [*ps, self.unused] if self.unused is not None else ps

    def loss_and_outputs(self) -> tuple[Tensor, Tensor | None]:
        logits = self.model(self.X)
        return F.cross_entropy(logits.float(), self.y).to(logits.dtype), logits

    def loss(self) -> Tensor:
        return self.loss_and_outputs()[0]


class Objective:
    """f(x) on one parameter vector x; ``minimiser`` is the known argmin."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "quadratic":
            # f(x) = 1/2 (x - x*)ᵀ A (x - x*), A = diag(logspace(0, 1, 8)): condition number 10
            self.A = torch.logspace(0, 1, 8, dtype=torch.float64)
            self.minimiser = torch.linspace(-1, 1, 8, dtype=torch.float64)
            self.x = nn.Parameter(torch.zeros(8, dtype=torch.float64))
        else:
            # Rosenbrock (a=1, b=100): minimiser (1, 1), start at the classic (-1.2, 1)
            self.minimiser = torch.ones(2, dtype=torch.float64)
            self.x = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))

    def params(self) -> list[nn.Parameter]:
        return [self.x]

    def loss_and_outputs(self) -> tuple[Tensor, Tensor | None]:
        x = self.x
        if self.kind == "quadratic":
            d = x - self.minimiser
            return 0.5 * (self.A * d * d).sum(), None
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2, None

    def loss(self) -> Tensor:
        return self.loss_and_outputs()[0]


def default_driver(closure_mode: str) -> Callable[[Optimizer, Any], Any]:
    if closure_mode == "loss":
        return lambda opt, problem: opt.step(problem.loss)

    def drive(opt: Optimizer, problem: Any) -> Any:
        def closure() -> Tensor:
            opt.zero_grad()
            loss = problem.loss()
            loss.backward()
            return loss

        return opt.step(closure)

    return drive


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[..., Optimizer]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    closure_mode: str = "backward"
    driver: Callable[[Optimizer, Any], Any] | None = None
    quadratic: Mapping[str, Any] = field(default_factory=dict)
    rosenbrock: Mapping[str, Any] = field(default_factory=dict)
    steps: tuple[int, int] = (300, 3000)
    errors: tuple[tuple[Mapping[str, Any], type[Exception], str], ...] = ()
    curvlab: bool = True
    group_kwargs: Mapping[str, Any] | None = None
    skip: Mapping[str, str] = field(default_factory=dict)
    schedule: bool = True
    float32_state: tuple[str, ...] = ()

    def make(self, params: Any, **overrides: Any) -> Optimizer:
        return self.factory(params, **{**self.kwargs, **overrides})

    def step(self, opt: Optimizer, problem: Any) -> Any:
        return (self.driver or default_driver(self.closure_mode))(opt, problem)


_LR_ERR = ((({"lr": -1.0}), ParameterError, r"lr must be a finite number >= 0, got -1\.0"),)
_EPS_ERR = ({"eps": 0.0}, ParameterError, r"eps must be a finite number > 0, got 0\.0")
_WD_ERR = ({"weight_decay": -0.1}, ParameterError, r"weight_decay must be a finite number >= 0")
_POLICY_ERR = ({"on_nonfinite": "warn"}, ParameterError, r"on_nonfinite must be one of 'raise'")

CASES: list[Case] = [
    Case(
        "torch.AdamW",
        torch.optim.AdamW,
        {"lr": 1e-2, "foreach": True},
        curvlab=False,
        quadratic={"lr": 0.1, "weight_decay": 0.0},
        rosenbrock={"lr": 0.02, "betas": (0.9, 0.99), "weight_decay": 0.0},
        steps=(500, 3000),
        errors=(
            ({"lr": -1.0}, ValueError, "Invalid learning rate"),
            ({"betas": (0.9, 1.0)}, ValueError, "Invalid beta parameter at index 1"),
        ),
    ),
    Case(
        "adopt",
        ADOPT,
        {"lr": 1e-2},
        quadratic={"lr": 0.1},
        rosenbrock={"lr": 0.02, "betas": (0.9, 0.99)},
        steps=(500, 3000),
        errors=(
            *_LR_ERR,
            _EPS_ERR,
            _WD_ERR,
            _POLICY_ERR,
            ({"betas": (0.9, 1.0)}, ParameterError, r"betas\[1\] must be in \[0, 1\)"),
            ({"clip_exponent": -0.5}, ParameterError, "clip_exponent must be"),
        ),
    ),
    Case(
        "adopt-single-tensor",
        ADOPT,
        {"lr": 1e-2, "foreach": False},
        quadratic={"lr": 0.1},
        rosenbrock={"lr": 0.02, "betas": (0.9, 0.99)},
        steps=(500, 3000),
        skip={
            "rosenbrock": "foreach == single-tensor is proven in test_adopt.py; adopt row runs it"
        },
    ),
    Case(
        "adopt-decoupled",
        ADOPT,
        {"lr": 1e-2, "weight_decay": 0.1, "decouple": True},
        quadratic={"lr": 0.1, "weight_decay": 0.0},
        rosenbrock={"lr": 0.02, "betas": (0.9, 0.99), "weight_decay": 0.0},
        steps=(500, 3000),
        skip={
            "quadratic": "with weight_decay=0 this is the adopt row",
            "rosenbrock": "with weight_decay=0 this is the adopt row",
        },
    ),
    Case(
        "dog",
        DoG,
        {"reps_rel": 1e-2},
        quadratic={"reps_rel": 1e-2},
        rosenbrock={"reps_rel": 1e-6},
        steps=(300, 12000),
        schedule=False,
        float32_state=("x_float32",),
        errors=(
            *_LR_ERR,
            _WD_ERR,
            _POLICY_ERR,
            ({"reps_rel": 0.0}, ParameterError, "reps_rel must be a finite number > 0"),
            ({"init_eta": -1.0}, ParameterError, "init_eta must be a finite number > 0"),
        ),
    ),
    Case(
        "ldog",
        LDoG,
        {"reps_rel": 1e-2, "weight_decay": 1e-3},
        quadratic={"reps_rel": 1e-2, "weight_decay": 0.0},
        steps=(300, 12000),
        schedule=False,
        float32_state=("x_float32",),
        errors=(*_LR_ERR, _POLICY_ERR),
        skip={"rosenbrock": "one parameter tensor: LDoG is DoG, covered by the dog row"},
    ),
    Case(
        "mfac",
        MFAC,
        {"lr": 1e-2, "num_grads": 4, "damp": 1e-1},
        quadratic={"lr": 0.1, "num_grads": 8, "damp": 1.0, "momentum": 0.9},
        rosenbrock={"lr": 0.1, "num_grads": 8, "damp": 1.0, "momentum": 0.9},
        steps=(500, 3000),
        errors=(
            *_LR_ERR,
            _WD_ERR,
            _POLICY_ERR,
            ({"momentum": 1.0}, ParameterError, r"momentum must be a number in \[0, 1\)"),
            ({"num_grads": 0}, ParameterError, r"num_grads must be an int >= 1"),
            ({"damp": 0.0}, ParameterError, r"damp must be a finite number > 0"),
        ),
    ),
    Case(
        "frugal",
        FRUGAL,
        {"lr": 1e-2},
        quadratic={"lr": 0.1, "weight_decay": 0.0},
        rosenbrock={"lr": 0.02, "weight_decay": 0.0},
        steps=(500, 6000),
        errors=(
            *_LR_ERR,
            _EPS_ERR,
            _WD_ERR,
            _POLICY_ERR,
            ({"betas": (0.9, 1.0)}, ParameterError, r"betas\[1\] must be in \[0, 1\)"),
            ({"density": 1.5}, ParameterError, r"density must be a number in \[0, 1\]"),
            ({"update_gap": 0}, ParameterError, r"update_gap must be an int >= 1"),
            ({"projection": "svd"}, ParameterError, r"projection must be one of"),
        ),
    ),
    Case(
        "frugal-columns-split-all",
        FRUGAL,
        {"lr": 1e-2, "split": True, "projection": "columns", "density": 0.5, "update_gap": 2},
        quadratic={"lr": 0.02, "update_gap": 50, "inactive_lr_scale": 0.1, "weight_decay": 0.0},
        rosenbrock={
            "lr": 0.02,
            "update_gap": 50,
            "inactive_update_rule": "sgd",
            "inactive_lr_scale": 0.1,
            "weight_decay": 0.0,
        },
        steps=(500, 6000),
    ),
    Case(
        "sophia-g",
        Sophia,
        {"lr": 1e-2},
        closure_mode="loss",
        driver=lambda opt, prob: opt.step(prob.loss_and_outputs),
        errors=(
            *_LR_ERR,
            _EPS_ERR,
            _WD_ERR,
            _POLICY_ERR,
            ({"betas": (0.965, 1.0)}, ParameterError, r"betas\[1\] must be in \[0, 1\)"),
            ({"rho": -0.1}, ParameterError, r"rho must be a finite number >= 0"),
            ({"estimator": "fisher"}, ParameterError, r"estimator must be 'gnb' \(SophiaG\)"),
            ({"update_period": 0}, ParameterError, r"update_period must be an int >= 1"),
            ({"seed": -1}, ParameterError, r"seed must be an int in \[0, 2\*\*64\)"),
            ({"seed": 1, "generator": torch.Generator()}, ParameterError, r"not both"),
        ),
        skip={
            "closure": "GNB needs (loss, logits); the loss-only closure contract is run by the "
            "sophia-h row, and tests/optim/test_sophia.py checks the GNB closure errors",
            "param_groups": "one sampled-label draw covers all groups, so two optimizers on split "
            "groups draw different labels; test_sophia.py checks groups against the reference loop",
            "quadratic": "GNB needs a likelihood (logits); the update rule converges in sophia-h",
            "rosenbrock": "GNB needs a likelihood (logits); the update rule converges in sophia-h",
        },
    ),
    Case(
        "sophia-h",
        Sophia,
        {"lr": 1e-2, "estimator": "hutchinson"},
        closure_mode="loss",
        quadratic={"lr": 0.05, "rho": 0.1, "weight_decay": 0.0},
        rosenbrock={"lr": 0.1, "rho": 0.01, "weight_decay": 0.0},
        steps=(500, 1500),
        skip={
            "param_groups": "one Rademacher probe covers all groups (H z couples them), so two "
            "optimizers on split groups differ; test_sophia.py checks groups against the reference loop"
        },
    ),
    Case(
        "sophia-g-single-tensor",
        Sophia,
        {"lr": 1e-2, "foreach": False},
        closure_mode="loss",
        driver=lambda opt, prob: opt.step(prob.loss_and_outputs),
        skip={
            "closure": "see sophia-g",
            "param_groups": "see sophia-g",
            "quadratic": "see sophia-g",
            "rosenbrock": "see sophia-g",
        },
    ),
    Case(
        "adahessian",
        AdaHessian,
        {"lr": 0.05},
        closure_mode="loss",
        quadratic={},
        rosenbrock={"lr": 0.1, "hessian_power": 0.5},
        steps=(300, 5000),
        errors=(
            *_LR_ERR,
            _WD_ERR,
            _POLICY_ERR,
            ({"eps": 0.0}, ParameterError, r"eps must be a finite number > 0, got 0\.0"),
            ({"betas": (0.9, 1.0)}, ParameterError, r"betas\[1\] must be in \[0, 1\)"),
            ({"hessian_power": 1.5}, ParameterError, r"hessian_power must be a number in \[0, 1\]"),
            ({"update_period": 0}, ParameterError, r"update_period must be an int >= 1"),
            ({"seed": "0"}, ParameterError, r"seed must be an int in \[0, 2\*\*64\)"),
            ({"generator": 0}, ParameterError, r"generator must be a torch\.Generator"),
        ),
        skip={
            "param_groups": "one Rademacher probe covers all groups (H z couples them), so two "
            "optimizers on split groups differ; test_adahessian.py checks the rule per group"
        },
    ),
    Case(
        "adahessian-single-tensor-period-2",
        AdaHessian,
        {"lr": 0.05, "foreach": False, "update_period": 2},
        closure_mode="loss",
        quadratic={},
        skip={
            "param_groups": "see adahessian",
            "rosenbrock": "the adahessian row runs it (5000 steps)",
        },
    ),
    Case(
        "psgd_kron",
        PSGDKron,
        {"lr": 1e-2},
        quadratic={"lr": 0.03},
        rosenbrock={"lr": 0.01, "max_skew": math.inf},
        steps=(300, 3000),
        errors=(
            *_LR_ERR,
            _WD_ERR,
            _POLICY_ERR,
            (
                {"preconditioner_lr": 0.0},
                ParameterError,
                r"preconditioner_lr must be a number in \(0",
            ),
            ({"momentum": 1.0}, ParameterError, r"momentum must be a number in \[0\.0, 1\.0\)"),
            ({"geometry": "QUAD"}, ParameterError, "geometry must be one of 'EQ', 'Q0.5EQ1.5'"),
            (
                {"preconditioner_update_probability": 0.0},
                ParameterError,
                "preconditioner_update_probability must be",
            ),
            ({"momentumm": 0.9}, ParameterError, r"PSGDKron got unknown options \['momentumm'\]"),
        ),
    ),
    Case(
        "psgd_kron-q0p5eq1p5-momentum",
        PSGDKron,
        {
            "lr": 1e-2,
            "geometry": "Q0.5EQ1.5",
            "momentum": 0.9,
            "weight_decay": 0.1,
            "preconditioner_update_probability": 0.5,
            "max_skew": math.inf,
        },
        quadratic={"lr": 0.03, "weight_decay": 0.0},
        rosenbrock={"lr": 0.01, "weight_decay": 0.0},
        steps=(300, 3000),
    ),
    Case(
        "psgd_lra",
        PSGDLRA,
        {"lr": 1e-2, "rank": 4},
        quadratic={"lr": 0.03},
        rosenbrock={"lr": 0.01, "rank": 1},
        steps=(300, 3000),
        errors=(
            *_LR_ERR,
            _WD_ERR,
            _POLICY_ERR,
            ({"rank": 100}, ParameterError, r"rank must be smaller than the number of entries"),
            ({"rank": -1}, ParameterError, r"rank must be an int >= 0, got -1"),
        ),
    ),
    Case(
        "psgd_xmat",
        PSGDXMat,
        {"lr": 1e-2},
        quadratic={"lr": 0.03},
        rosenbrock={"lr": 0.01},
        steps=(300, 3000),
        errors=(
            *_LR_ERR,
            _WD_ERR,
            _POLICY_ERR,
            ({"fit": "fd"}, ParameterError, r"fit must be one of 'whiten', 'hvp'"),
            ({"momentumm": 0.9}, ParameterError, r"PSGDXMat got unknown options \['momentumm'\]"),
        ),
    ),
    *(
        Case(
            f"{name}-hvp",
            cls,
            {"lr": 1e-2, "fit": "hvp", **extra},
            closure_mode="loss",
            quadratic=quadratic,
            rosenbrock=rosenbrock,
            steps=(300, 3000),
            skip={
                "param_groups": "one Hessian-vector product over all groups (H v couples them), "
                "so two optimizers on split groups differ; the test_psgd_* files check the "
                "pair fit against reference loops"
            },
        )
        for name, cls, extra, quadratic, rosenbrock in (
            ("psgd_kron", PSGDKron, {}, {"lr": 0.3}, {"lr": 1.0, "max_skew": math.inf}),
            ("psgd_lra", PSGDLRA, {"rank": 4}, {"lr": 0.3}, {"lr": 1.0, "rank": 1}),
            ("psgd_xmat", PSGDXMat, {}, {"lr": 0.3}, {"lr": 1.0}),
        )
    ),
    Case(
        "newton",
        Newton,
        {"lr": 0.5, "damping": 1.0, "solver": "minres"},
        closure_mode="loss",
        quadratic={"lr": 1.0, "damping": 0.0},
        rosenbrock={"lr": 1.0, "damping": 0.0, "solver": "minres"},
        steps=(5, 50),
        schedule=False,
        errors=(
            *_LR_ERR,
            _POLICY_ERR,
            ({"damping": -1.0}, ParameterError, r"damping must be a finite number >= 0"),
            ({"method": "bfgs"}, ParameterError, r"method must be one of damped, regularized"),
        ),
        skip={
            "param_groups": "one Newton direction over all groups (a joint Hessian, documented); "
            "only lr may differ, proven in test_newton.py",
            "state_dict_shapes": "Newton's state holds no parameter-shaped tensor (step counts "
            "and the last step's diagnostics), so a state saved for other shapes loads harmlessly",
        },
    ),
]

ids = [c.name for c in CASES]
parametrize = pytest.mark.parametrize("case", CASES, ids=ids)


def maybe_skip(case: Case, test: str) -> None:
    if test in case.skip:
        pytest.skip(case.skip[test])


def clone_problem(problem: Problem) -> Problem:
    return copy.deepcopy(problem)


def _state_tensors(opt: Optimizer) -> list[tuple[int, str, Tensor]]:
    out = []
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        for k, v in sorted(opt.state.get(p, {}).items()):
            if isinstance(v, Tensor):
                out.append((i, k, v))
    return out


def assert_same_params_and_state(a: Optimizer, b: Optimizer) -> None:
    pa = [p for g in a.param_groups for p in g["params"]]
    pb = [p for g in b.param_groups for p in g["params"]]
    for x, y in zip(pa, pb):
        assert torch.equal(x, y), (x, y)
    sa, sb = _state_tensors(a), _state_tensors(b)
    assert [(i, k) for i, k, _ in sa] == [(i, k) for i, k, _ in sb]
    for (i, k, x), (_, _, y) in zip(sa, sb):
        assert x.dtype == y.dtype and torch.equal(x, y), (i, k, x, y)


# ----------------------------------------------------------------------------- API tests
@parametrize
def test_state_dict_round_trip_is_bit_identical(case: Case) -> None:
    maybe_skip(case, "state_dict")
    for dtype in (torch.float64, torch.bfloat16):
        prob = Problem(dtype)
        opt = case.make(prob.params())
        for _ in range(3):
            case.step(opt, prob)
        saved = copy.deepcopy(opt.state_dict())
        prob2 = clone_problem(prob)
        opt2 = case.make(prob2.params())
        opt2.load_state_dict(saved)
        assert_same_params_and_state(opt, opt2)
        for _ in range(2):
            case.step(opt, prob)
            case.step(opt2, prob2)
        assert_same_params_and_state(opt, opt2)


@parametrize
def test_param_groups_with_different_hyperparameters(case: Case) -> None:
    maybe_skip(case, "param_groups")
    prob = Problem()
    first, second = list(prob.model[0].parameters()), list(prob.model[2].parameters())
    defaults = case.make(prob.params()).defaults
    other = dict(case.group_kwargs or {})
    if case.group_kwargs is None:
        other["lr"] = 0.5 * float(case.kwargs.get("lr", defaults["lr"])) + 1e-3
        if "weight_decay" in defaults:
            other["weight_decay"] = 0.05
    opt = case.make([{"params": first}, {"params": second, **other}])
    ref = clone_problem(prob)
    ref_first, ref_second = list(ref.model[0].parameters()), list(ref.model[2].parameters())
    ref_a = case.make(ref_first)
    ref_b = case.make(ref_second, **other)
    for _ in range(4):
        case.step(opt, prob)
        # two separate optimizers driven by the same gradients
        for o in (ref_a, ref_b):
            o.zero_grad()
        case_loss = ref.loss()
        if case.closure_mode == "backward":
            case_loss.backward()
            ref_a.step()
            ref_b.step()
        else:
            ref_a.step(ref.loss)
            ref_b.step(ref.loss)
    for x, y in zip(prob.params(), ref.params()):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    assert opt.param_groups[1]["lr"] == other["lr"]


@parametrize
def test_params_without_grad_are_untouched(case: Case) -> None:
    maybe_skip(case, "no_grad")
    prob = Problem(extra_unused=True)
    frozen = nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)
    opt = case.make([*prob.params(), frozen])
    before = [p.detach().clone() for p in (prob.unused, frozen)]
    moved = [p.detach().clone() for p in prob.model.parameters()]
    for _ in range(3):
        case.step(opt, prob)
    assert prob.unused is not None
    for p, b in zip((prob.unused, frozen), before):
        assert torch.equal(p, b)
        assert len(opt.state.get(p, {})) == 0, "no state for a parameter that never had a gradient"
    assert any(not torch.equal(p, m) for p, m in zip(prob.model.parameters(), moved))


@parametrize
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_dtype_is_kept(case: Case, dtype: torch.dtype) -> None:
    maybe_skip(case, "dtype")
    prob = Problem(dtype)
    opt = case.make(prob.params())
    before = [p.detach().clone() for p in prob.params()]
    for _ in range(3):
        case.step(opt, prob)
    for p in prob.params():
        assert p.dtype == dtype and torch.isfinite(p).all()
    assert any(not torch.equal(p, b) for p, b in zip(prob.params(), before))
    for _, key, t in _state_tensors(opt):
        if t.is_floating_point() and t.dim() > 0:
            wide = key in case.float32_state and dtype in (torch.bfloat16, torch.float16)
            assert t.dtype == (torch.float32 if wide else dtype), (key, t.dtype)


@parametrize
def test_lr_zero_freezes_parameters(case: Case) -> None:
    maybe_skip(case, "lr_zero")
    prob = Problem()
    opt = case.make(prob.params(), lr=0.0)
    before = [p.detach().clone() for p in prob.params()]
    for _ in range(4):
        case.step(opt, prob)
    for p, b in zip(prob.params(), before):
        assert torch.equal(p, b)


@parametrize
def test_lr_scheduler_takes_effect(case: Case) -> None:
    maybe_skip(case, "scheduler")
    prob = Problem()
    opt = case.make(prob.params())
    base = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else 0.0)
    before = [p.detach().clone() for p in prob.params()]
    for _ in range(3):
        case.step(opt, prob)
    assert any(not torch.equal(p, b) for p, b in zip(prob.params(), before))
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0] * len(base)
    frozen = [p.detach().clone() for p in prob.params()]
    for _ in range(3):
        case.step(opt, prob)
    for p, b in zip(prob.params(), frozen):
        assert torch.equal(p, b)


@parametrize
def test_closure_semantics(case: Case) -> None:
    maybe_skip(case, "closure")
    if case.curvlab:
        # the instance's: PSGD sets "loss" on instances built with a pair fit (fit="hvp")
        assert case.make(Problem().params()).closure_mode == case.closure_mode
    prob, ref = Problem(), Problem()
    opt, opt_ref = case.make(prob.params()), case.make(ref.params())
    if case.closure_mode == "backward":
        for _ in range(3):
            calls = []

            def closure(p: Problem = prob, o: Optimizer = opt, c: list = calls) -> Tensor:
                c.append(1)
                o.zero_grad()
                loss = p.loss()
                loss.backward()
                return loss

            expected = ref.loss().detach()
            out = opt.step(closure)
            assert len(calls) == 1 and torch.equal(out.detach(), expected)
            opt_ref.zero_grad()
            ref.loss().backward()
            assert opt_ref.step() is None
        for x, y in zip(prob.params(), ref.params()):
            assert torch.equal(x, y)
    else:
        with pytest.raises(ClosureRequiredError, match="closure"):
            opt.step()
        out = opt.step(prob.loss)
        assert isinstance(out, Tensor) and out.dim() == 0
        assert all(p.grad is not None for p in prob.params())

        def backward_closure() -> Tensor:
            loss = prob.loss()
            loss.backward()
            return loss

        with pytest.raises(ClosureRequiredError):
            opt.step(backward_closure)
        with pytest.raises(ClosureRequiredError):
            opt.step(lambda: 1.0)


@parametrize
def test_error_inputs_raise_their_message(case: Case) -> None:
    maybe_skip(case, "errors")
    for kwargs, exc, match in case.errors:
        with pytest.raises(exc, match=match):
            case.make(Problem().params(), **kwargs)


@parametrize
def test_deepcopy_and_pickle_then_step(case: Case) -> None:
    maybe_skip(case, "copy")
    prob = Problem()
    opt = case.make(prob.params())
    for _ in range(3):
        case.step(opt, prob)
    for clone in (copy.deepcopy((prob, opt)), pickle.loads(pickle.dumps((prob, opt)))):
        prob2, opt2 = clone
        assert [p for g in opt2.param_groups for p in g["params"]] == prob2.params()
        for _ in range(2):
            case.step(opt2, prob2)
    for _ in range(2):
        case.step(opt, prob)
    assert_same_params_and_state(opt, opt2)


@parametrize
def test_state_holds_only_tensors_and_numbers(case: Case) -> None:
    maybe_skip(case, "state_types")
    prob = Problem()
    opt = case.make(prob.params())
    for _ in range(3):
        case.step(opt, prob)
    sd = opt.state_dict()
    for key, st in sd["state"].items():
        assert isinstance(key, int), f"non-parameter key {key!r} in state"
        for k, v in st.items():
            assert isinstance(k, str)
            assert isinstance(v, (Tensor, int, float)) and not isinstance(v, bool), (k, type(v))
    for g in sd["param_groups"]:
        for k, v in g.items():
            assert not callable(v), f"param group holds a callable under {k!r}"


@pytest.mark.parametrize(
    ("case", "kind"),
    [
        pytest.param(c, kind, marks=[pytest.mark.slow] if n > 5000 else [], id=f"{kind}-{c.name}")
        for c in CASES
        for kind, n in zip(("quadratic", "rosenbrock"), c.steps)
    ],
)
def test_converges_to_the_known_minimiser(case: Case, kind: str) -> None:
    maybe_skip(case, kind)
    f = Objective(kind)
    steps = case.steps[0] if kind == "quadratic" else case.steps[1]
    opt = case.make(f.params(), **getattr(case, kind))
    factor = (lambda t: 1.0 - t / steps) if case.schedule else (lambda t: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    start = f.loss().item()
    for _ in range(steps):
        case.step(opt, f)
        sched.step()
    err = (f.x.detach() - f.minimiser).norm().item()
    assert math.isfinite(err) and f.loss().item() < start
    assert err < (1e-3 if kind == "quadratic" else 1e-2), err


# ----------------------------------------------------------------------------- curvlab policies
curvlab_cases = pytest.mark.parametrize(
    "case", [c for c in CASES if c.curvlab], ids=[c.name for c in CASES if c.curvlab]
)


def _poison(prob: Problem, opt: Optimizer, case: Case) -> None:
    """Make the last layer's bias gradient NaN on the next step."""
    bias = prob.model[2].bias
    hook = bias.register_hook(lambda g: torch.full_like(g, float("nan")))
    try:
        case.step(opt, prob)
    finally:
        hook.remove()


@curvlab_cases
def test_nonfinite_gradient_raises_naming_the_parameter_and_changes_nothing(case: Case) -> None:
    maybe_skip(case, "nonfinite")
    prob = Problem()
    opt = case.make(prob.params())
    for _ in range(2):
        case.step(opt, prob)
    snapshot = copy.deepcopy((prob, opt))
    with pytest.raises(
        NonFiniteError, match=r"at step 3: parameter 3 of param group 0 \(shape \(3,\)\)"
    ):
        _poison(prob, opt, case)
    assert_same_params_and_state(opt, snapshot[1])


@curvlab_cases
def test_nonfinite_gradient_skip_counts_and_survives_state_dict(case: Case) -> None:
    maybe_skip(case, "nonfinite")
    prob = Problem()
    opt = case.make(prob.params(), on_nonfinite="skip")
    for _ in range(2):
        case.step(opt, prob)
    snapshot = copy.deepcopy(opt)
    _poison(prob, opt, case)
    _poison(prob, opt, case)
    assert_same_params_and_state(opt, snapshot)
    assert [g["nonfinite_skips"] for g in opt.param_groups] == [2]
    opt2 = case.make(copy.deepcopy(prob).params())
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["nonfinite_skips"] == 2
    case.step(opt, prob)  # a finite step proceeds normally
    assert not torch.equal(prob.model[0].weight, snapshot.param_groups[0]["params"][0])


@curvlab_cases
def test_load_state_dict_of_another_optimizer_raises(case: Case) -> None:
    maybe_skip(case, "state_dict_errors")
    prob = Problem()
    sgd = torch.optim.SGD(prob.params(), lr=0.1, momentum=0.9)
    default_driver("backward")(sgd, prob)
    opt = case.make(prob.params())
    with pytest.raises(StateDictError, match="another optimizer"):
        opt.load_state_dict(sgd.state_dict())
    with pytest.raises(StateDictError, match="param groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})


@curvlab_cases
def test_load_state_dict_saved_for_other_shapes_raises(case: Case) -> None:
    maybe_skip(case, "state_dict_shapes")
    prob = Problem()
    opt = case.make(prob.params())
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    o_other = case.make(other.parameters())
    other_prob = Problem()
    other_prob.model = other
    other_prob.X = other_prob.X[:, :3]
    other_prob.y = other_prob.y % 5
    for _ in range(2):
        case.step(o_other, other_prob)
    with pytest.raises(StateDictError, match="shape"):
        opt.load_state_dict(o_other.state_dict())


@curvlab_cases
def test_sparse_gradient_raises(case: Case) -> None:
    maybe_skip(case, "sparse")
    emb = nn.Embedding(5, 3, sparse=True).double()
    opt = case.make(emb.parameters())

    class EmbProblem:
        def loss_and_outputs(self) -> tuple[Tensor, Tensor]:
            out = emb(torch.tensor([0, 2]))
            return out.pow(2).sum(), out

        def loss(self) -> Tensor:
            return self.loss_and_outputs()[0]

    with pytest.raises(ParameterError, match="sparse gradient"):
        case.step(opt, EmbProblem())
