"""Gradient noise scale (critical batch size) and the batch-size learning-rate scaling rules.

Draw k disjoint mini-batches of size B from a data pool, take their mean-loss gradients g_1..g_k
and ḡ = (1/k) Σ g_i. With G the true gradient and Σ the per-example gradient covariance,
E‖g_i − ḡ‖² summed over i equals (k−1)·tr(Σ)/B and E‖ḡ‖² = ‖G‖² + tr(Σ)/(kB), so

    tr(Σ)  ≈ B/(k−1) · Σ_i ‖g_i − ḡ‖²,     ‖G‖² ≈ ‖ḡ‖² − tr(Σ)/(kB),
    B_simple = tr(Σ) / ‖G‖²                 (McCandlish et al. 2018, eq. 2.9),

both unbiased (for batches drawn with replacement; disjoint batches from a pool much larger than
k·B are close). B_simple estimates the critical batch size: below it, doubling the batch roughly
halves the steps; above it, little is gained. The step that is optimal for batch B is
ε_opt(B) = ε_max / (1 + B_noise/B), reported as ``batch_efficiency = 1/(1 + B_simple/B)``.

Scaling rules when the batch changes from B to B' (Granziol, Zohren & Roberts 2022): SGD's learning
rate scales linearly, η' = η·B'/B; Adam-type methods by the square root, η' = η·sqrt(B'/B).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from curvlab.errors import EmptyDataError, InvalidArgumentError, ShapeMismatchError
from curvlab.monitors._attach import LossFn, Monitor

__all__ = ["GradientNoiseScale", "lr_scaling_rule", "noise_scale_from_gradients", "scale_lr"]


def noise_scale_from_gradients(grads: Tensor, batch_size: int) -> dict[str, float]:
    """Estimate tr(Σ), ‖G‖² and B_simple from k mini-batch gradients (rows of ``grads``, [k, n]).

    Args:
        grads: one flattened mean-loss gradient per mini-batch, shape [k, n], k >= 2.
        batch_size: the mini-batch size B.

    Returns:
        ``{"trace_cov", "grad_norm_sq", "b_simple", "batch_efficiency"}``; ``b_simple`` is ``inf``
        when the noise swamps the signal (estimated ‖G‖² <= 0).

    Example:
        >>> import torch
        >>> g = torch.tensor([[1.0, 0.0], [3.0, 0.0]])   # mean (2, 0); spread 2 per batch
        >>> noise_scale_from_gradients(g, batch_size=4)["trace_cov"]
        8.0

    Paper: McCandlish, Kaplan, Amodei & OpenAI Dota Team, "An Empirical Model of Large-Batch
    Training", 2018 (arXiv 1812.06162).
    """
    if grads.ndim != 2 or grads.shape[0] < 2:
        raise ShapeMismatchError(
            f"need a [k, n] matrix of k >= 2 batch gradients (one flattened gradient per row), "
            f"got shape {tuple(grads.shape)}"
        )
    _check_batch_size("batch_size", batch_size)
    g = grads.to(torch.float64)
    k = g.shape[0]
    mean = g.mean(dim=0)
    trace_cov = batch_size * float(((g - mean) ** 2).sum()) / (k - 1)
    grad_norm_sq = float(mean @ mean) - trace_cov / (k * batch_size)
    b_simple = trace_cov / grad_norm_sq if grad_norm_sq > 0 else math.inf
    return {
        "trace_cov": trace_cov,
        "grad_norm_sq": grad_norm_sq,
        "b_simple": b_simple,
        "batch_efficiency": 1.0 / (1.0 + b_simple / batch_size),
    }


def _check_batch_size(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgumentError(f"{name} must be an integer >= 1 (examples), got {value!r}")


def lr_scaling_rule(optimizer: torch.optim.Optimizer | type) -> str:
    """``"sqrt"`` for Adam-type optimizers (a second-moment state), ``"linear"`` otherwise.

    Example:
        >>> lr_scaling_rule(torch.optim.AdamW), lr_scaling_rule(torch.optim.SGD)
        ('sqrt', 'linear')
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    adaptive = (
        "adam",
        "rmsprop",
        "adagrad",
        "adadelta",
        "adopt",
        "sophia",
        "lamb",
        "lion",
        "nadam",
    )
    return "sqrt" if any(tag in cls.__name__.lower() for tag in adaptive) else "linear"


def scale_lr(lr: float, batch_size: int, new_batch_size: int, rule: str = "linear") -> float:
    """Rescale a learning rate tuned at ``batch_size`` to ``new_batch_size``.

    ``linear``: η·B'/B (SGD); ``sqrt``: η·sqrt(B'/B) (Adam-type).

    Example:
        >>> scale_lr(0.1, 128, 512), scale_lr(1e-3, 128, 512, rule="sqrt")
        (0.4, 0.002)

    Paper: Granziol, Zohren & Roberts, "Learning Rates as a Function of Batch Size: A Random Matrix
    Theory Approach to Neural Network Training", JMLR 2022 (arXiv 2006.09092).
    """
    _check_batch_size("batch_size", batch_size)
    _check_batch_size("new_batch_size", new_batch_size)
    ratio = new_batch_size / batch_size
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise InvalidArgumentError(
        f"rule must be 'linear' (SGD) or 'sqrt' (Adam-type), got {rule!r}; "
        "lr_scaling_rule(optimizer) picks one"
    )


class GradientNoiseScale(Monitor):
    """Monitor the simple gradient noise scale B_simple = tr(Σ)/‖G‖² (the critical batch size).

    Each check draws ``num_batches`` disjoint batches of ``batch_size`` examples from ``data``
    (a pool, e.g. a few thousand training examples) with ``generator``, takes each batch's gradient
    with ``torch.autograd.grad`` in eval mode (``.grad`` is untouched) and applies
    :func:`noise_scale_from_gradients`. Cost: ``num_batches`` gradient evaluations, no HVP.

    Args:
        model: the model. loss_fn: ``loss_fn(outputs, targets)`` with mean reduction.
        data: the pool ``(inputs, targets)``, at least ``num_batches * batch_size`` examples.
        batch_size: B. num_batches: k >= 2 (default 8).
        params: the parameters (default: all that require grad).
        generator: randomness of the batch draw (default: a generator seeded with 0).
        every: check every ``every`` steps. name: prefix (default ``"noise_scale"``).

    Numbers: ``b_simple``, ``trace_cov``, ``grad_norm_sq``, ``batch_efficiency``.

    Paper: McCandlish et al. 2018 (arXiv 1812.06162); Granziol et al. 2022 (arXiv 2006.09092).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | Callable[..., Tensor],
        data: tuple[Tensor, Tensor],
        *,
        batch_size: int,
        num_batches: int = 8,
        params: Sequence[Tensor] | None = None,
        generator: torch.Generator | None = None,
        every: int = 100,
        name: str = "noise_scale",
    ) -> None:
        super().__init__(every=every, name=name, params=params)
        if not isinstance(num_batches, int) or num_batches < 2:
            raise InvalidArgumentError(
                f"num_batches must be an integer >= 2 to estimate a variance, got {num_batches!r}"
            )
        _check_batch_size("batch_size", batch_size)
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.batch_size, self.num_batches = batch_size, num_batches
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def validate(self, optimizer: torch.optim.Optimizer) -> None:
        """Default checks, plus: the pool holds num_batches * batch_size examples."""
        super().validate(optimizer)
        assert self.data is not None
        pool = self.data[0].shape[0]
        if pool < self.num_batches * self.batch_size:
            raise EmptyDataError(
                f"monitor {self.name!r}: the data pool has {pool} examples but num_batches * "
                f"batch_size = {self.num_batches * self.batch_size}; pass more data or smaller batches"
            )

    def compute(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """B_simple and friends from ``num_batches`` fresh mini-batch gradients."""
        assert self.model is not None and self.loss_fn is not None and self.data is not None
        inputs, targets = self.data
        order = torch.randperm(inputs.shape[0], generator=self.generator)
        params = self.params
        self.model.eval()
        rows = []
        for i in range(self.num_batches):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size].to(inputs.device)
            loss = self.loss_fn(self.model(inputs[idx]), targets[idx])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1).detach()
                        for g, p in zip(grads, params)
                    ]
                )
            )
        return noise_scale_from_gradients(torch.stack(rows), self.batch_size)
