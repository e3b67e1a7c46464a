"""Small models on data that ships with the dependencies, ready for curvature measurements.

Each entry builds ``(model, loss_fn, data)`` deterministically from a seed: the model is briefly
trained (full-batch Adam) so that its curvature is that of a network in training, not at random
initialisation. Used by ``curvlab spectrum`` and the examples; no download happens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.datasets import digits
from curvlab.errors import InvalidArgumentError, ModelLoadError

__all__ = ["ZOO", "CurvatureProblem", "load_problem"]


@dataclass(frozen=True)
class CurvatureProblem:
    """A model, its loss and the data its curvature is measured on."""

    name: str
    model: nn.Module
    loss_fn: Any
    data: tuple[Tensor, Tensor]
    description: str


def _digits_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 16), nn.Tanh(), nn.Linear(16, 10)
    )


def _digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 192),
        nn.ReLU(),
        nn.Linear(192, 10),
    )


def _digit_images(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    X, y = digits(dtype=dtype)
    return X.reshape(-1, 1, 8, 8), y


def _breast_cancer(dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_breast_cancer

    Xn, yn = load_breast_cancer(return_X_y=True)
    X = torch.as_tensor((Xn - Xn.mean(0)) / Xn.std(0), dtype=dtype)
    return X, torch.as_tensor(yn, dtype=dtype).unsqueeze(1)


@dataclass(frozen=True)
class _Recipe:
    """How one zoo entry is built: model, loss, data, full-batch Adam training, measured subset."""

    name: str
    model: Callable[[], nn.Module]
    loss_fn: Callable[[], nn.Module]
    data: Callable[[torch.dtype], tuple[Tensor, Tensor]]
    lr: float
    train_steps: int
    measured_on: int | None
    description: str

    def __call__(
        self, seed: int = 0, dtype: torch.dtype = torch.float32, train_steps: int | None = None
    ) -> CurvatureProblem:
        """Build the problem: initialise from ``seed``, train, keep the first ``measured_on``
        examples. The initialisation draws from torch's global generator seeded with ``seed``,
        whose state is restored afterwards (the caller's random stream is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            X, y = self.data(dtype)
            model, loss_fn = self.model().to(dtype), self.loss_fn()
            opt = torch.optim.Adam(model.parameters(), lr=self.lr)
            for _ in range(self.train_steps if train_steps is None else train_steps):
                opt.zero_grad()
                loss_fn(model(X), y).backward()
                opt.step()
        data = (X[: self.measured_on], y[: self.measured_on])
        return CurvatureProblem(self.name, model, loss_fn, data, self.description)


_RECIPES = (
    _Recipe(
        "digits-mlp",
        _digits_mlp,
        nn.CrossEntropyLoss,
        lambda dtype: digits(dtype=dtype),
        lr=1e-2,
        train_steps=100,
        measured_on=512,
        description="tanh MLP 64-128-16-10 on sklearn digits (10,554 params), Hessian on 512 "
        "digits",
    ),
    _Recipe(
        "digits-cnn",
        _digits_cnn,
        nn.CrossEntropyLoss,
        _digit_images,
        lr=1e-3,
        train_steps=120,
        measured_on=256,
        description="ReLU CNN conv8-conv16(stride 2)-fc192-fc10 on digits as 1x8x8 (52,522 "
        "params), 256 digits",
    ),
    _Recipe(
        "breast-cancer-logreg",
        lambda: nn.Linear(30, 1),
        nn.BCEWithLogitsLoss,
        _breast_cancer,
        lr=1e-2,
        train_steps=200,
        measured_on=None,
        description="logistic regression on sklearn breast_cancer (31 params, convex: PSD Hessian)",
    ),
)

#: name -> ``fn(seed=0, dtype=torch.float32, train_steps=None) -> CurvatureProblem``.
ZOO: dict[str, Callable[..., CurvatureProblem]] = {r.name: r for r in _RECIPES}


def load_problem(spec: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> CurvatureProblem:
    """A zoo entry by name, or a user's ``module:function`` returning ``(model, loss_fn, data)``.

    ``module`` is imported with the current directory on the import path, as ``python -m`` does.

    Raises:
        InvalidArgumentError: an unknown name (the message lists the known ones).
        ModelLoadError: ``module:function`` cannot be imported, raises, calls ``sys.exit``, or
            does not return a ``(model, loss_fn, data)`` triple with an ``nn.Module`` first.
    """
    if spec in ZOO:
        return ZOO[spec](seed=seed, dtype=dtype)
    if ":" not in spec:
        import difflib

        close = difflib.get_close_matches(spec, list(ZOO), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InvalidArgumentError(
            f"unknown problem {spec!r}; known: {', '.join(ZOO)}, or module:function for your own "
            f"model returning (model, loss_fn, data).{hint}"
        )
    module_name, func_name = spec.split(":", 1)
    fn = _import_function(module_name, func_name)
    try:
        out = fn()
    except SystemExit as exc:  # KeyboardInterrupt still propagates
        raise ModelLoadError(
            f"{spec}() called sys.exit({exc.code!r}) instead of returning; fix the function so "
            "that it returns (model, loss_fn, data)"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(
            f"{spec}() raised {type(exc).__name__}: {exc}; fix the function so that it returns "
            "(model, loss_fn, data)"
        ) from exc
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], nn.Module)):
        raise ModelLoadError(
            f"{spec}() must return a tuple (model, loss_fn, data) with an nn.Module first, got "
            f"{type(out).__name__}"
        )
    model, loss_fn, data = out
    return CurvatureProblem(spec, model, loss_fn, data, f"user model {spec}")


def _import_function(module_name: str, func_name: str) -> Callable[[], Any]:
    """``module_name.func_name``, imported with the current directory first on ``sys.path``."""
    import importlib
    import os
    import sys

    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        fn = getattr(importlib.import_module(module_name), func_name)
    except (Exception, SystemExit) as exc:  # ImportError, AttributeError, the module's own
        raise ModelLoadError(
            f"cannot load {module_name}:{func_name}: {type(exc).__name__}: {exc}. Pass "
            "module:function where module is importable from the current directory (a file "
            "module.py here) and function takes no argument"
        ) from exc
    finally:
        if added:
            sys.path.remove(cwd)
    if not callable(fn):
        raise ModelLoadError(f"{module_name}:{func_name} is not a function; pass module:function")
    return fn  # type: ignore[no-any-return]
