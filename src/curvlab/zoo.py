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

__all__ = ["ZOO", "CurvatureProblem", "digits", "load_problem"]


@dataclass(frozen=True)
class CurvatureProblem:
    """A model, its loss and the data its curvature is measured on."""

    name: str
    model: nn.Module
    loss_fn: Any
    data: tuple[Tensor, Tensor]
    description: str


def digits(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 8×8 digits as ``(X [1797, 64] in [0, 1], y [1797])`` (ships with sklearn)."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.as_tensor(X / 16.0, dtype=dtype), torch.as_tensor(y, dtype=torch.long)


def _train(model: nn.Module, loss_fn: Any, X: Tensor, y: Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()


def digits_mlp(
    seed: int = 0, dtype: torch.dtype = torch.float32, train_steps: int = 100
) -> CurvatureProblem:
    """64-128-16-10 tanh MLP (10,554 parameters), 100 full-batch Adam steps; Hessian on 512 digits."""
    torch.manual_seed(seed)
    X, y = digits(dtype)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 16), nn.Tanh(), nn.Linear(16, 10)
    )
    model = model.to(dtype)
    loss_fn = nn.CrossEntropyLoss()
    _train(model, loss_fn, X, y, train_steps, lr=1e-2)
    return CurvatureProblem(
        "digits-mlp",
        model,
        loss_fn,
        (X[:512], y[:512]),
        "tanh MLP 64-128-16-10 on sklearn digits (10,554 params), Hessian on 512 digits",
    )


def digits_cnn(
    seed: int = 0, dtype: torch.dtype = torch.float32, train_steps: int = 120
) -> CurvatureProblem:
    """Two-conv ReLU CNN on digits as 1×8×8 images (52,522 parameters); Hessian on 256 digits."""
    torch.manual_seed(seed)
    X, y = digits(dtype)
    X = X.reshape(-1, 1, 8, 8)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 192),
        nn.ReLU(),
        nn.Linear(192, 10),
    ).to(dtype)
    loss_fn = nn.CrossEntropyLoss()
    _train(model, loss_fn, X, y, train_steps, lr=1e-3)
    return CurvatureProblem(
        "digits-cnn",
        model,
        loss_fn,
        (X[:256], y[:256]),
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
    model = nn.Linear(30, 1).to(dtype)
    loss_fn = nn.BCEWithLogitsLoss()
    _train(model, loss_fn, X, y, train_steps, lr=1e-2)
    return CurvatureProblem(
        "breast-cancer-logreg",
        model,
        loss_fn,
        (X, y),
        "logistic regression on sklearn breast_cancer (31 params, convex: PSD Hessian)",
    )


ZOO: dict[str, Callable[..., CurvatureProblem]] = {
    "digits-mlp": digits_mlp,
    "digits-cnn": digits_cnn,
    "breast-cancer-logreg": breast_cancer_logreg,
}


def load_problem(spec: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> CurvatureProblem:
    """A zoo entry by name, or a user's ``module:function`` returning ``(model, loss_fn, data)``.

    Raises:
        ValueError: an unknown name (the message lists the known ones) or a bad ``module:function``.
    """
    if spec in ZOO:
        return ZOO[spec](seed=seed, dtype=dtype)
    if ":" not in spec:
        import difflib

        close = difflib.get_close_matches(spec, list(ZOO), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown problem {spec!r}; known: {', '.join(ZOO)}, or module:function for your own "
            f"model returning (model, loss_fn, data).{hint}"
        )
    import importlib

    module_name, func_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {spec!r}: {exc}") from exc
    out = fn()
    if not (isinstance(out, tuple) and len(out) == 3):
        raise ValueError(f"{spec} must return (model, loss_fn, data), got {type(out).__name__}")
    model, loss_fn, data = out
    return CurvatureProblem(spec, model, loss_fn, data, f"user model {spec}")
