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


def _trained(
    name: str,
    model: nn.Module,
    loss_fn: Any,
    data: tuple[Tensor, Tensor],
    train: tuple[int, float],
    measured_on: int,
    description: str,
) -> CurvatureProblem:
    """Train ``model`` with full-batch Adam for ``train = (steps, lr)``; measure on ``measured_on``."""
    X, y = data
    steps, lr = train
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
    return CurvatureProblem(name, model, loss_fn, (X[:measured_on], y[:measured_on]), description)


def digits_mlp(
    seed: int = 0, dtype: torch.dtype = torch.float32, train_steps: int = 100
) -> CurvatureProblem:
    """64-128-16-10 tanh MLP (10,554 parameters), 100 full-batch Adam steps; Hessian on 512 digits."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 16), nn.Tanh(), nn.Linear(16, 10)
    )
    return _trained(
        "digits-mlp",
        model.to(dtype),
        nn.CrossEntropyLoss(),
        digits(dtype=dtype),
        (train_steps, 1e-2),
        512,
        "tanh MLP 64-128-16-10 on sklearn digits (10,554 params), Hessian on 512 digits",
    )


def digits_cnn(
    seed: int = 0, dtype: torch.dtype = torch.float32, train_steps: int = 120
) -> CurvatureProblem:
    """Two-conv ReLU CNN on digits as 1×8×8 images (52,522 parameters); Hessian on 256 digits."""
    torch.manual_seed(seed)
    X, y = digits(dtype=dtype)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 192),
        nn.ReLU(),
        nn.Linear(192, 10),
    )
    return _trained(
        "digits-cnn",
        model.to(dtype),
        nn.CrossEntropyLoss(),
        (X.reshape(-1, 1, 8, 8), y),
        (train_steps, 1e-3),
        256,
        "ReLU CNN conv8-conv16(stride 2)-fc192-fc10 on digits as 1x8x8 (52,522 params), 256 digits",
    )


def breast_cancer_logreg(
    seed: int = 0, dtype: torch.dtype = torch.float32, train_steps: int = 200
) -> CurvatureProblem:
    """Logistic regression on scikit-learn's standardised breast-cancer data (31 parameters)."""
    from sklearn.datasets import load_breast_cancer

    torch.manual_seed(seed)
    Xn, yn = load_breast_cancer(return_X_y=True)
    X = torch.as_tensor((Xn - Xn.mean(0)) / Xn.std(0), dtype=dtype)
    y = torch.as_tensor(yn, dtype=dtype).unsqueeze(1)
    return _trained(
        "breast-cancer-logreg",
        nn.Linear(30, 1).to(dtype),
        nn.BCEWithLogitsLoss(),
        (X, y),
        (train_steps, 1e-2),
        len(y),
        "logistic regression on sklearn breast_cancer (31 params, convex: PSD Hessian)",
    )


ZOO: dict[str, Callable[..., CurvatureProblem]] = {
    "digits-mlp": digits_mlp,
    "digits-cnn": digits_cnn,
    "breast-cancer-logreg": breast_cancer_logreg,
}


def load_problem(spec: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> CurvatureProblem:
    """A zoo entry by name, or a user's ``module:function`` returning ``(model, loss_fn, data)``.

    ``module`` is imported with the current directory on the import path, as ``python -m`` does.

    Raises:
        InvalidArgumentError: an unknown name (the message lists the known ones).
        ModelLoadError: ``module:function`` cannot be imported, raises, or does not return a
            ``(model, loss_fn, data)`` triple with an ``nn.Module`` first.
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
    except Exception as exc:  # ImportError, AttributeError, or the module's own error
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
