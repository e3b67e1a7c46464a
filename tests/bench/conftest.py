"""Fixtures of the harness tests: a temporary cache, tiny suites, a fake curvature optimizer."""

from __future__ import annotations

import sys
import types
from typing import Any, ClassVar

import pytest
import torch


@pytest.fixture(autouse=True)
def _private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CURVLAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


class LossModeSGD(torch.optim.Optimizer):
    """A minimal ``closure_mode == "loss"`` optimizer: SGD plus one HVP every ``k`` steps.

    It checks the project-wide closure contract: the closure must return the loss (or (loss,
    logits))
    with its graph intact, i.e. without having called backward.
    """

    closure_mode: ClassVar[str] = "loss"

    def __init__(self, params: Any, lr: float = 0.1, k: int = 2) -> None:
        super().__init__(params, {"lr": lr, "k": k})
        self.hvps = 0
        self.seen_outputs: list[tuple[int, ...]] = []

    def cost_counters(self) -> dict[str, int]:
        return {"hvps": self.hvps}

    def step(self, closure: Any = None) -> Any:
        assert closure is not None
        self.state.setdefault("t", 0)
        t = self.state["t"]
        params = [p for g in self.param_groups for p in g["params"]]
        with torch.enable_grad():
            out = closure()
            loss, outputs = out if isinstance(out, tuple) else (out, None)
            if outputs is not None:
                self.seen_outputs.append(tuple(outputs.shape))
            refresh = t % self.param_groups[0]["k"] == 0
            grads = torch.autograd.grad(loss, params, create_graph=refresh)
            if refresh:
                v = [torch.ones_like(p) for p in params]
                torch.autograd.grad(grads, params, grad_outputs=v)
                self.hvps += 1
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = g.detach()
                p.add_(g.detach(), alpha=-self.param_groups[0]["lr"])
        self.state["t"] = t + 1
        return loss.detach()


@pytest.fixture
def fake_optimizers(monkeypatch: pytest.MonkeyPatch) -> str:
    """Registers module ``curvlab_test_opts`` with ``LossModeSGD``; returns the module name."""
    mod = types.ModuleType("curvlab_test_opts")
    mod.LossModeSGD = LossModeSGD  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "curvlab_test_opts", mod)
    return "curvlab_test_opts"


def tiny_suite(**over: Any) -> dict[str, Any]:
    """A suite small enough for unit tests (a few seconds in-process)."""
    doc: dict[str, Any] = {
        "name": "tiny",
        "problems": {
            "quadratic-k1e2": {"budget_steps": 20, "eval_every": 5, "target": 1e-2},
            "breast-cancer-logreg": {"budget_steps": 20, "eval_every": 10, "target": 0.3},
        },
        "optimizers": [
            {
                "label": "adamw",
                "optimizer": "torch.optim:AdamW",
                "fixed": {"weight_decay": 0.0},
                "defaults": {"lr": 0.01},
                "search": {"lr": {"low": 1e-3, "high": 0.3}},
            },
            "torch-sgd-momentum",
        ],
        "tracks": {
            "defaults": {"seeds": 2, "budget_factor": 1.5},
            "tuned": {"trials": 2, "studies": 2},
        },
    }
    doc.update(over)
    return doc


@pytest.fixture
def tiny() -> Any:
    """The :func:`tiny_suite` factory."""
    return tiny_suite
