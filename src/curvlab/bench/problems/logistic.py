"""L2-regularised logistic and softmax regression on scikit-learn's shipped data (convex, f* known).

The data are split once (seed 0, whatever the run's seed): 20% validation, 20% test, the rest
training; features are standardised with the training part's mean and deviation. The objective is
``f(W, b) = (1/n) Σ CE(W xᵢ + b, yᵢ) + (λ/2) ‖W‖²_F`` on the training part, in float64 and full
batch. ``f*`` is computed once to high precision (Newton steps on the exact Hessian) and cached
under the problem name, λ and the SHA-256 of the training data, so a changed scikit-learn data file
can never be scored against a stale optimum; the suboptimality ``subopt = f − f*`` is recorded with
every evaluation. The target metric is the validation cross-entropy (``valid_loss``, unregularised),
the final quality the test cross-entropy; accuracies are recorded too. These problems follow the
research notes' b1/b2 (breast_cancer 569×30 with λ = 1e-3; digits 1797×64 with λ = 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.bench.problems.base import (
    Problem,
    ProblemInstance,
    Target,
    cached_value,
    checksum,
    split_indices,
)

__all__ = ["SoftmaxRegression", "load_sklearn", "regularised_optimum"]


def load_sklearn(name: str, standardize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Features and integer labels of a scikit-learn bundled data set.

    Args:
        name: ``"breast_cancer"``, ``"digits"``, ``"wine"`` or ``"iris"``.
        standardize: scale every column to zero mean and unit variance over the whole set
            (constant columns left 0); False returns the raw features.

    Returns:
        ``(X [n, d] float64, y [n] int64)``.
    """
    from sklearn import datasets

    loader = {
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
    }[name]
    bunch = loader()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    if not standardize:
        return x, y
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd[sd == 0.0] = 1.0
    return (x - mu) / sd, y


def _objective(w: Tensor, x: Tensor, y: Tensor, lam: float, classes: int) -> Tensor:
    d = x.shape[1]
    weight = w[: classes * d].view(classes, d)
    bias = w[classes * d :]
    logits = x @ weight.T + bias
    return nn.functional.cross_entropy(logits, y) + 0.5 * lam * (weight**2).sum()


def _newton_system(
    w: Tensor, x: Tensor, y: Tensor, lam: float, classes: int
) -> tuple[Tensor, Tensor]:
    """Exact gradient and Hessian of the softmax objective (parameters: W row-major, then b)."""
    n, d = x.shape
    weight = w[: classes * d].view(classes, d)
    bias = w[classes * d :]
    p = torch.softmax(x @ weight.T + bias, dim=1)  # [n, C]
    r = p.clone()
    r[torch.arange(n), y] -= 1.0
    xt = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)  # [n, d+1]
    g_full = r.T @ xt / n  # [C, d+1]
    g = torch.cat([(g_full[:, :d] + lam * weight).reshape(-1), g_full[:, d]])
    # H[(a,i),(b,j)] = (1/n) sum_k p_ka (delta_ab - p_kb) xt_ki xt_kj
    h4 = torch.einsum("ka,ki,kj->aij", p, xt, xt) / n  # diagonal blocks' first term
    a_mat = (p.unsqueeze(2) * xt.unsqueeze(1)).reshape(n, classes * (d + 1))
    h = -(a_mat.T @ a_mat / n).view(classes, d + 1, classes, d + 1)
    for a in range(classes):
        h[a, :, a, :] += h4[a]
    # reorder (class, feature+bias) to the parameter layout [W (C*d), b (C)]
    perm = [a * (d + 1) + i for a in range(classes) for i in range(d)] + [
        a * (d + 1) + d for a in range(classes)
    ]
    hm = h.reshape(classes * (d + 1), classes * (d + 1))[perm][:, perm]
    hm[: classes * d, : classes * d] += lam * torch.eye(classes * d, dtype=x.dtype)
    return g, hm


def regularised_optimum(x: Tensor, y: Tensor, lam: float, classes: int) -> float:
    """``min f`` of the regularised softmax objective, to about 1e-13 relative (float64).

    Newton's method with the exact Hessian and a backtracking (Armijo) line search from zero; the
    objective is strongly convex in W for ``lam > 0`` (the Hessian is singular only along the
    softmax's shift invariance of the bias, handled by a 1e-10 ridge), so Newton converges
    quadratically near the optimum.
    """
    n_params = classes * x.shape[1] + classes
    w = torch.zeros(n_params, dtype=torch.float64)
    f = float(_objective(w, x, y, lam, classes))
    for _ in range(100):
        g, h = _newton_system(w, x, y, lam, classes)
        if float(g.abs().max()) < 1e-13:
            break
        step = torch.linalg.solve(h + 1e-10 * torch.eye(n_params, dtype=h.dtype), g)
        t = 1.0
        while t > 1e-10:
            f_new = float(_objective(w - t * step, x, y, lam, classes))
            if f_new <= f - 1e-4 * t * float(g @ step):
                break
            t *= 0.5
        w = w - t * step
        if f - f_new < 1e-16 * max(1.0, abs(f)) and t == 1.0:
            f = f_new
            break
        f = f_new
    return float(_objective(w, x, y, lam, classes))


@dataclass
class SoftmaxRegression(Problem):
    """Full-batch L2-regularised softmax regression on a scikit-learn data set.

    Binary data (breast_cancer) uses two-class softmax, which has the same optimum value as logistic
    regression with the difference of the two weight rows as its weight.

    Example:
        >>> p = SoftmaxRegression(dataset="iris", lam=1e-2, name="iris-softmax")
        >>> round(p.f_star(), 6)
        0.237324
    """

    dataset: str = "digits"
    lam: float = 1e-4
    name: str = "digits-softmax"
    description: str = (
        "softmax regression on scikit-learn digits (1797x64), lambda=1e-4, full batch"
    )
    target: Target = field(default_factory=lambda: Target("valid_loss"))
    budget_steps: int = 200
    eval_every: int = 10
    data: str = "scikit-learn"
    splits: dict[str, str] = field(
        default_factory=lambda: {
            "train": "60% of the data (fixed split, seed 0): the objective",
            "valid": "20% of the data (fixed split, seed 0)",
            "test": "20% of the data (fixed split, seed 0)",
        }
    )

    def split_data(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{"train" | "valid" | "test": (x, y)}``, standardised with the training statistics."""
        x, y = load_sklearn(self.dataset, standardize=False)
        n = len(y)
        parts = dict(zip(("train", "valid", "test"), split_indices(n, n // 5, n // 5)))
        train = x[parts["train"].numpy()]
        mu, sd = train.mean(axis=0), train.std(axis=0)
        sd[sd == 0.0] = 1.0
        return {
            k: (torch.from_numpy((x[i.numpy()] - mu) / sd), torch.from_numpy(y[i.numpy()]))
            for k, i in parts.items()
        }

    def f_star(self) -> float:
        """The cached optimal training objective ``f*`` (computed once per data checksum)."""
        x, y = self.split_data()["train"]
        c = int(load_sklearn(self.dataset, standardize=False)[1].max()) + 1
        key = f"{self.name}-lam{self.lam:g}-{checksum(x, y)[:16]}"
        return cached_value(key, lambda: regularised_optimum(x, y, self.lam, c))

    def build(self, seed: int) -> ProblemInstance:
        data = self.split_data()
        x, y = data["train"]
        classes = int(max(int(t[1].max()) for t in data.values())) + 1
        f_star = self.f_star()
        gen = torch.Generator().manual_seed(seed)
        model = nn.Linear(x.shape[1], classes).to(torch.float64)
        with torch.no_grad():
            model.weight.copy_(
                0.01 * torch.randn(model.weight.shape, generator=gen, dtype=torch.float64)
            )
            model.bias.zero_()
        lam = self.lam

        def loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
            return (
                nn.functional.cross_entropy(outputs, targets) + 0.5 * lam * (model.weight**2).sum()
            )

        def evaluate() -> dict[str, float]:
            with torch.no_grad():
                f = float(loss_fn(model(x), y))
                out = {"loss": f, "subopt": max(f - f_star, 0.0)}
                for split in ("valid", "test"):
                    xs, ys = data[split]
                    logits = model(xs)
                    out[f"{split}_loss"] = float(nn.functional.cross_entropy(logits, ys))
                    out[f"{split}_accuracy"] = float((logits.argmax(1) == ys).double().mean())
            return out

        return ProblemInstance(
            model=model,
            loss_fn=loss_fn,
            next_batch=lambda: (x, y),
            evaluate=evaluate,
            outputs_are_logits=True,
        )
