r"""Learning-rate schedules as picklable multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

Every schedule is a small frozen dataclass whose ``__call__(t)`` returns the factor that multiplies
the base learning rate at scheduler step ``t`` (``t = 0`` for the first optimizer step):

.. math::
   \begin{aligned}
   \text{LinearWarmup}(W):&\quad m(t) = \min\big(1, (t+1)/W\big) \\
   \text{LinearDecay}(T):&\quad m(t) = \max\big(0, 1 - t/T\big) \\
   \text{WarmupLinearDecay}(W, T):&\quad m(t) = (t+1)/W \ (t < W),
       \quad \max\big(0, 1 - (t-W)/(T-W)\big) \ (t \ge W) \\
   \text{Cosine}(T, W, m_\infty):&\quad m(t) = m_\infty + (1-m_\infty)\,
       \tfrac12\big(1 + \cos(\pi\,\min(1, (t-W)/(T-W)))\big) \ (t \ge W) \\
   \text{Refined}(v):&\quad m(t) = v_{\min(t, |v|-1)}
   \end{aligned}

Linear decay to zero is the default that Defazio et al. recommend: it is worst-case optimal for the
last iterate and matched or beat cosine on their ten deep-learning problems. :func:`refine_schedule`
implements their refinement: given the gradient norms :math:`\lVert g_1\rVert, \ldots,
\lVert g_T\rVert` logged in a previous run, it returns the schedule
:math:`\eta_t \propto w_t \sum_{p > t} w_p` with :math:`w_t = \lVert g_t\rVert^{-2}` (SGD-type
methods) or :math:`w_t = \lVert g_t\rVert_1^{-1}` (Adam-type methods, pass ℓ1 norms and
``power=1``), normalised to a maximum of 1; constant norms give exactly linear decay.

Use (schedules are dataclasses, so ``LambdaLR.state_dict()`` and pickling keep them):

    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupLinearDecay(warmup=2, total=10))
    >>> [round(g["lr"], 4) for g in opt.param_groups]
    [0.05]

Paper: Defazio, Cutkosky, Mehta, Mishchenko, "Optimal Linear Decay Learning Rate Schedules and
Further Refinements" ("When, Why and How Much?"), arXiv 2310.07831 (2023); code:
facebookresearch/adaptive_scheduling (``find_closed_form_schedule`` and the smoothing in
``visual.py``). Cosine: Loshchilov & Hutter, "SGDR", arXiv 1608.03983.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from curvlab.errors import EmptyDataError, ParameterError

__all__ = [
    "Cosine",
    "LinearDecay",
    "LinearWarmup",
    "Refined",
    "WarmupLinearDecay",
    "refine_schedule",
]


def _check_steps(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParameterError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class LinearWarmup:
    """m(t) = min(1, (t + 1) / warmup): reaches the base learning rate at step ``warmup - 1``.

    Example:
        >>> [LinearWarmup(4)(t) for t in range(5)]
        [0.25, 0.5, 0.75, 1.0, 1.0]
    """

    warmup: int

    def __post_init__(self) -> None:
        _check_steps("warmup", self.warmup)

    def __call__(self, t: int) -> float:
        return min(1.0, (t + 1) / self.warmup)


@dataclass(frozen=True)
class LinearDecay:
    """m(t) = max(0, 1 - t / total): linear decay to zero at step ``total`` (Defazio et al. 2023).

    Example:
        >>> [LinearDecay(4)(t) for t in range(6)]
        [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """

    total: int

    def __post_init__(self) -> None:
        _check_steps("total", self.total)

    def __call__(self, t: int) -> float:
        return max(0.0, 1.0 - t / self.total)


@dataclass(frozen=True)
class WarmupLinearDecay:
    """Linear warm-up over ``warmup`` steps, then linear decay to zero at step ``total``.

    m(t) = (t + 1) / warmup for t < warmup, else max(0, 1 - (t - warmup) / (total - warmup)).

    Example:
        >>> [WarmupLinearDecay(2, 6)(t) for t in range(7)]
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    """

    warmup: int
    total: int

    def __post_init__(self) -> None:
        _check_steps("warmup", self.warmup, minimum=0)
        _check_steps("total", self.total)
        if self.total <= self.warmup:
            raise ParameterError(
                f"total ({self.total}) must exceed warmup ({self.warmup}); "
                "total counts all steps, warm-up included"
            )

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        return max(0.0, 1.0 - (t - self.warmup) / (self.total - self.warmup))


@dataclass(frozen=True)
class Cosine:
    """Cosine decay from 1 to ``final`` at step ``total``, after an optional linear warm-up.

    m(t) = (t + 1) / warmup for t < warmup, else
    final + (1 - final) (1 + cos(π min(1, (t - warmup) / (total - warmup)))) / 2.

    Example:
        >>> [round(Cosine(4)(t), 4) for t in range(5)]
        [1.0, 0.8536, 0.5, 0.1464, 0.0]
    """

    total: int
    warmup: int = 0
    final: float = 0.0

    def __post_init__(self) -> None:
        _check_steps("total", self.total)
        _check_steps("warmup", self.warmup, minimum=0)
        if self.total <= self.warmup:
            raise ParameterError(f"total ({self.total}) must exceed warmup ({self.warmup})")
        if not 0.0 <= self.final <= 1.0:
            raise ParameterError(f"final must be in [0, 1], got {self.final!r}")

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        frac = min(1.0, (t - self.warmup) / (self.total - self.warmup))
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass(frozen=True)
class Refined:
    """A schedule given by its values: m(t) = values[min(t, len(values) - 1)].

    Build one from a previous run's gradient norms with :func:`refine_schedule`:
    ``LambdaLR(opt, Refined.from_grad_norms(norms, num_steps=T))``.

    Example:
        >>> Refined((1.0, 0.5, 0.0))(5)
        0.0
    """

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.values) == 0:
            raise EmptyDataError("Refined needs at least one value")

    @classmethod
    def from_grad_norms(
        cls,
        grad_norms: Sequence[float] | np.ndarray | Tensor,
        num_steps: int | None = None,
        **kwargs: float | int | None,
    ) -> Refined:
        """``Refined(tuple(refine_schedule(grad_norms, num_steps, **kwargs)))``."""
        return cls(tuple(refine_schedule(grad_norms, num_steps, **kwargs).tolist()))  # type: ignore[arg-type]

    def __call__(self, t: int) -> float:
        return self.values[min(t, len(self.values) - 1)]


def _median_smooth(x: np.ndarray, smooth: float) -> np.ndarray:
    """The authors' smoothing: median filter, reflective padding appended at the end only."""
    from scipy.ndimage import median_filter

    width = 2 * (int(smooth * len(x)) // 2) + 1
    if width <= 1:
        return x
    pad = 2 * width
    padded = np.pad(x, (0, pad), mode="reflect") if pad < len(x) else np.pad(x, (0, pad), "edge")
    return median_filter(padded, size=width, mode="nearest")[:-pad]


def refine_schedule(
    grad_norms: Sequence[float] | np.ndarray | Tensor,
    num_steps: int | None = None,
    *,
    power: float = 2.0,
    smooth: float = 0.1,
    resample: int | None = 10_000,
) -> Tensor:
    r"""Refine a schedule from a previous run's gradient norms (Defazio et al. 2023).

    Rule: clean the norms (non-finite entries dropped), linearly resample them to ``resample``
    points when there are fewer, smooth them with a median filter of width
    :math:`2\lfloor \text{smooth}\cdot N/2\rfloor + 1` (reflective padding at the end only, as in
    the authors' ``visual.py``), set :math:`w_t = n_t^{-\text{power}}` and

    .. math:: \eta_t \propto w_t \sum_{p=t+1}^{N} w_p \quad (t < N), \qquad \eta_N = 0,

    resample linearly to ``num_steps`` points and normalise to a maximum of 1. Large early gradient
    norms produce a warm-up, and the end anneals quickly to 0; constant norms give exactly linear
    decay ``1 - t / (num_steps - 1)``.

    Args:
        grad_norms: ‖g_t‖ per step of a previous run (ℓ2 norms with ``power=2`` for SGD-type
            methods; ℓ1 norms with ``power=1`` for Adam-type methods, as in the paper).
        num_steps: length of the returned schedule (default: the number of finite norms).
        power: exponent of the weights w_t = n_t^-power (2 or 1 in the paper).
        smooth: median-filter width as a fraction of the (resampled) length; 0 disables smoothing
            (the authors use 0.1).
        resample: upsample shorter sequences to this many points before smoothing (authors:
            10,000); ``None`` disables.

    Returns:
        float64 tensor of shape ``[num_steps]``, maximum 1, last entry 0; feed it to
        :class:`Refined` (and LambdaLR).

    Raises:
        EmptyDataError: fewer than 2 finite norms.
        ParameterError: a norm ``<= 0``, or ``power <= 0``, ``smooth`` outside [0, 1), bad sizes.

    Example:
        >>> [round(v, 12) for v in refine_schedule([1.0] * 5, smooth=0).tolist()]  # linear decay
        [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    x = np.asarray(
        grad_norms.detach().cpu().double().numpy()
        if isinstance(grad_norms, Tensor)
        else grad_norms,
        dtype=np.float64,
    ).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size < 2:
        raise EmptyDataError(
            f"refine_schedule needs at least 2 finite gradient norms, got {x.size}; log ‖g_t‖ at "
            "every step of a previous run (e.g. the value clip_grad_norm_ returns)"
        )
    if (x <= 0).any():
        raise ParameterError(
            "gradient norms must be > 0 (weights are norm**-power); "
            f"found {int((x <= 0).sum())} entries <= 0"
        )
    if not power > 0:
        raise ParameterError(f"power must be > 0 (2 for SGD-type, 1 for Adam-type), got {power!r}")
    if not 0 <= smooth < 1:
        raise ParameterError(f"smooth must be in [0, 1), got {smooth!r}; the authors use 0.1")
    n_out = x.size if num_steps is None else num_steps
    _check_steps("num_steps", n_out, minimum=2)
    if resample is not None:
        _check_steps("resample", resample, minimum=2)
        if x.size < resample:
            x = np.interp(np.linspace(0, 1, resample), np.linspace(0, 1, x.size), x)
    if smooth > 0:
        x = _median_smooth(x, smooth)
    w = x**-power
    tail = np.cumsum(w[::-1])[::-1]  # tail[t] = sum_{p >= t} w_p
    sched = np.zeros_like(w)
    sched[:-1] = w[:-1] * tail[1:]
    out = np.interp(np.linspace(0, 1, n_out), np.linspace(0, 1, sched.size), sched)
    return torch.from_numpy(out / out.max())
