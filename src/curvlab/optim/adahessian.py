r"""AdaHessian: Adam with the second moment of a Hutchinson Hessian-diagonal estimate.

.. math::
   \begin{aligned}
   &\textbf{input}: \eta \text{ (lr)},\ \beta_1, \beta_2,\ \epsilon,
       \ \lambda \text{ (weight decay)},\ k \text{ (Hessian power)},
       \ \tau \text{ (update period)} \\
   &\textbf{init}: m_0 \leftarrow 0,\ v_0 \leftarrow 0,\ n_0 \leftarrow 0 \\
   &\textbf{for } t = 1, 2, \ldots: \\
   &\quad g_t \leftarrow \nabla L_t(\theta_{t-1})
       \qquad (g_t \leftarrow -g_t \text{ if maximize}) \\
   &\quad \textbf{if } t \bmod \tau = 1 \ (\text{every step for } \tau = 1): \\
   &\qquad z \sim \text{Rademacher};\ D \leftarrow |z \odot (H_t z)|
       \ \text{(spatially averaged for conv kernels)} \\
   &\qquad v \leftarrow \beta_2 v + (1-\beta_2)\, D^2; \quad n \leftarrow n + 1 \\
   &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1)\, g_t \\
   &\quad \theta_t \leftarrow \theta_{t-1} - \eta \Big( \dfrac{m_t / (1-\beta_1^t)}
       {\big(\sqrt{v} / \sqrt{1-\beta_2^{n}}\big)^{k} + \epsilon} + \lambda\,\theta_{t-1} \Big)
   \end{aligned}

Faithful to the authors' image-classification optimizer (amirgholami/adahessian
``image_classification/optim_adahessian.py``): one Rademacher probe per step, ``D = |H z|``
(``= |z ⊙ H z|`` for ±1 probes), 4-D convolution kernels averaged over their two spatial dims,
bias corrections ``1 − β1^t`` and ``1 − β2^t``, the power ``k`` applied to ``sqrt(v)`` and to
``sqrt(1 − β2^t)`` separately, ``eps`` added after the power, and weight decay applied as
``lr · wd · θ`` outside the preconditioner (decoupled, although the official docstring calls it
an L2 penalty). Defaults are the authors': lr 0.15, betas (0.9, 0.999), eps 1e-4, weight decay 0,
Hessian power 1.

Deviations, deliberate: ``update_period`` τ > 1 refreshes the estimate every τ steps and then
updates ``v`` only on those steps, with its bias correction counting refreshes (``n``) — with
τ = 1 (default) this is exactly the official rule; davda54/ada-hessian's ``update_each`` instead
re-uses the stale estimate in ``v`` every step, which needs a third buffer. Conv1d/Conv3d kernels
(3-D / 5-D) are averaged over their spatial dims too (the official code has no branch for them);
``spatial_averaging=False`` turns averaging off. The probe comes from an explicit generator
(``seed=`` or ``generator=``, saved in ``state_dict()``), and non-finite gradients and estimates
follow curvlab's ``on_nonfinite`` policy.

Paper: Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, "ADAHESSIAN: An Adaptive Second Order
Optimizer for Machine Learning", AAAI 2021, arXiv:2006.00719; code: amirgholami/adahessian.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import torch
from torch import Tensor

from curvlab.estimators.param_diagonal import (
    CurvatureEstimator,
    HutchinsonEstimator,
    spatial_average,
)
from curvlab.optim._closure import closure_required
from curvlab.optim._diagonal_curvature import DiagonalCurvatureOptimizer, shared_docs
from curvlab.optim._dispatch import KernelChoice, dispatch
from curvlab.optim._fused import accumulate_dtype, fused_foreach
from curvlab.optim._scratch import block_ranges, bucket_rows, cpu_blocks, workspace_rows
from curvlab.optim._validation import (
    group_options,
    group_tensors,
    validate_in_range,
    validate_int,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AdaHessian", "AdaHessianHyper", "AdaHessianOptions", "adahessian"]

_STATE_KEYS = ("step", "hessian_step", "exp_avg", "exp_hessian_diag_sq")
_SHAPED_KEYS = ("exp_avg", "exp_hessian_diag_sq")


class AdaHessianHyper(TypedDict):
    """The hyper-parameters of one AdaHessian update, as in the param groups (see
    :class:`AdaHessian`)."""

    lr: float | Tensor
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    hessian_power: float
    maximize: bool


class AdaHessianOptions(AdaHessianHyper, KernelChoice):
    """The keyword arguments of :func:`adahessian`: the hyper-parameters and the path."""


@shared_docs
class AdaHessian(DiagonalCurvatureOptimizer):
    r"""AdaHessian (Yao et al. 2021): Adam whose second moment is that of ``|diag H|`` estimates.

    **Closure contract** (``closure_mode = "loss"``): ``step(closure)`` takes a closure that
    returns the loss WITHOUT calling ``backward()`` (the loss tensor, or ``(loss, outputs)``).
    The optimizer takes the gradient with ``torch.autograd.grad(create_graph=True)`` on the steps
    that refresh the curvature (every step by default, as the authors), computes one
    Hessian-vector product ``H z`` for all parameters in a single backward call, writes the
    detached gradient into ``p.grad`` and returns the detached loss. Nothing of the graph
    outlives the step (no ``loss.backward(create_graph=True)``, so no param↔grad reference cycle).
    A missing closure raises :class:`~curvlab.errors.ClosureRequiredError`.

    **In a framework loop** (Lightning, the Hugging Face ``Trainer``, accelerate), add the
    framework's one-line set-up from :mod:`curvlab.integrations`: it estimates the curvature on
    the forward pass of the refresh steps and switches ``step()`` to read ``p.grad``
    (:meth:`expect_external_curvature`); the trajectory is that of the closure contract.

    Rule (full box in the module docstring): ``D = |z ⊙ H z|`` (spatially averaged over conv
    kernels), ``v ← β2 v + (1−β2) D²``, ``m ← β1 m + (1−β1) g``,
    ``θ ← θ − lr (m/(1−β1^t) / ((√v/√(1−β2^n))^k + eps) + wd θ)``.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 0.15, the authors').
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: added to the denominator after the power (default 1e-4, the authors').
        weight_decay: decoupled weight decay, applied as ``lr·wd·θ`` (default 0). The authors'
            CIFAR script passes ``wd/lr`` to get a decay of ``wd``.
        hessian_power: k in [0, 1] (default 1; the authors report 0.5 sometimes better).
        update_period: refresh the Hessian estimate (and ``v``) every τ steps (default 1, as the
            authors; the bias correction of ``v`` counts refreshes). Optimizer-wide.
        spatial_averaging: average ``|D|`` over the spatial dims of conv kernels (≥ 3-D tensors;
            default ``True``). Optimizer-wide.
        estimator: ``"hutchinson"`` (default, :class:`~curvlab.estimators.HutchinsonEstimator`)
            or any :class:`~curvlab.estimators.CurvatureEstimator` callable; its output goes
            through ``|·|`` and spatial averaging. Optimizer-wide.
        {curvature_optimizer_args}

    State (per parameter): ``"step"``, ``"hessian_step"`` (float32 scalars), ``"exp_avg"`` (m),
    ``"exp_hessian_diag_sq"`` (v): 8 bytes per float32 parameter, as the official code.

    Raises:
        ParameterError: invalid hyper-parameters, ``seed`` or ``generator``, or a sparse
            gradient.
        ClosureRequiredError: no closure, a closure that called ``backward()`` or returned no
            loss tensor.
        NonFiniteError: NaN/inf gradient or curvature under ``on_nonfinite="raise"``.
        StateDictError: ``load_state_dict`` with another optimizer's state or other shapes.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
        >>> opt = AdaHessian(model.parameters(), lr=0.1, seed=0)
        >>> loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        >>> sorted(opt.state[model[0].weight])
        ['exp_avg', 'exp_hessian_diag_sq', 'hessian_step', 'step']

    Paper: Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, "ADAHESSIAN: An Adaptive Second Order
    Optimizer for Machine Learning", AAAI 2021, arXiv:2006.00719; code: amirgholami/adahessian.
    """

    closure_mode: ClassVar[str] = "loss"
    _state_keys = _STATE_KEYS
    _shaped_keys = _SHAPED_KEYS
    _keep_dtype_keys = ("hessian_step",)

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        *,
        update_period: int = 1,
        spatial_averaging: bool = True,
        estimator: str | CurvatureEstimator = "hutchinson",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        on_nonfinite: str = "raise",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        validate_in_range(
            "hessian_power", hessian_power, 0, 1, hint="; the authors use 1, sometimes 0.5"
        )
        validate_int(
            "update_period", update_period, 1, "; 1 = a Hessian estimate every step, as the authors"
        )
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "hessian_power": float(hessian_power),
            "maximize": bool(maximize),
            "foreach": foreach,
            "fused": fused,
            "on_nonfinite": on_nonfinite,
            "update_period": update_period,
            "spatial_averaging": bool(spatial_averaging),
        }
        super().__init__(
            params,
            defaults,
            estimator=estimator,
            builtin={"hutchinson": HutchinsonEstimator()},
            estimator_names="'hutchinson'",
            seed=seed,
            generator=generator,
        )

    def _init_group(self, group: dict[str, Any]) -> list[list[Tensor]]:
        """``[params, grads, exp_avgs, exp_hessian_diag_sqs, state_steps, hessian_steps]`` of
        ``group``'s parameters that have a gradient, their state created lazily."""
        keys = ("exp_avg", "exp_hessian_diag_sq", "step", "hessian_step")
        return group_tensors(group, self._state, keys)

    def _update_hessian(self, params: Sequence[Tensor], diag: Sequence[Tensor | None]) -> None:
        """``D = avg|ĥ|``, then ``v ← β2 v + (1 − β2) D²`` and ``n ← n + 1`` per parameter."""
        average = self.defaults["spatial_averaging"]
        own = self.defaults["estimator"] == "hutchinson"  # its output is ours to overwrite
        for p, d, group in self._estimates(params, diag):
            if average and d.dim() >= 3:
                dd = spatial_average(d)
            else:
                dd = d.abs_() if own else d.abs()
            state = self._state(p)
            beta2 = group["betas"][1]
            state["exp_hessian_diag_sq"].mul_(beta2).addcmul_(dd, dd, value=1 - beta2)
            state["hessian_step"] += 1

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor | None:  # type: ignore[override]
        """Take one AdaHessian step (with a Hessian-diagonal refresh when due).

        Args:
            closure: returns the loss, or ``(loss, outputs)``, WITHOUT calling ``backward()``.
                After :meth:`expect_external_curvature`: optional, and torch style (it calls
                ``backward()``).

        Returns:
            The closure's loss, detached (``None`` without a closure).
        """
        if closure is None and self.curvature_source is None:
            raise closure_required("AdaHessian")
        loss, proceed = self._start_step(closure)
        if not proceed:
            return loss
        for group in self.param_groups:
            tensors = self._init_group(group)
            if not tensors[0]:
                continue
            adahessian(*tensors, foreach=group["foreach"], fused=group.get("fused"), scratch=self,
                       **group_options(group, AdaHessianHyper))  # fmt: skip
        return loss


def adahessian(*lists: list[Tensor], **options: Unpack[AdaHessianOptions]) -> None:
    """Functional API that performs the AdaHessian computation; see :class:`AdaHessian`.

    ``lists``: ``params, grads, exp_avgs, exp_hessian_diag_sqs, state_steps, hessian_steps``,
    equally long (the steps: float32 scalar tensors). ``v`` (``exp_hessian_diag_sqs``) and its
    refresh count ``n`` (``hessian_steps``) have been refreshed by the caller when due; in place,
    for each parameter: ``step += 1``; ``m ← β1 m + (1 − β1) g``;
    ``θ ← θ(1 − lr·wd) − lr/(1 − β1^t) · m / ((√v)^k / (√(1 − β2^n))^k + eps)``.
    ``options``: see :class:`AdaHessianOptions`; the path as in
    :func:`~curvlab.optim._dispatch.dispatch` (:func:`_fused_adahessian`,
    :func:`_single_tensor_adahessian`, :func:`_multi_tensor_adahessian`).

    Example:
        >>> p, g, m, v = torch.zeros(2), torch.tensor([1.0, -1.0]), torch.zeros(2), torch.ones(2)
        >>> t, n = torch.tensor(0.0), torch.tensor(1.0)
        >>> adahessian([p], [g], [m], [v], [t], [n], lr=0.1, betas=(0.9, 0.0), eps=1e-4,
        ...            weight_decay=0.0, hessian_power=1.0, maximize=False)
        >>> [round(x, 4) for x in p.tolist()], float(t)
        ([-0.1, 0.1], 1.0)
    """
    dispatch(
        lists,
        options,
        single=_single_tensor_adahessian,
        multi=_multi_tensor_adahessian,
        fused=_fused_adahessian,
    )


def _rule(hyper: AdaHessianHyper) -> tuple[float, float, float, float, float, float, bool]:
    """``(lr, beta1, beta2, eps, weight_decay, hessian_power, maximize)`` of one step."""
    (beta1, beta2), power = hyper["betas"], hyper["hessian_power"]
    lr, eps, weight_decay = float(hyper["lr"]), hyper["eps"], hyper["weight_decay"]
    return lr, beta1, beta2, eps, weight_decay, power, hyper["maximize"]


def _single_tensor_adahessian(*lists: list[Tensor], **hyper: Unpack[AdaHessianHyper]) -> None:
    """The AdaHessian update, one tensor at a time: the reference for the multi-tensor path.

    ``lists``: params, grads, exp_avgs, exp_hessian_diag_sqs, state_steps, hessian_steps.
    """
    lr, beta1, beta2, eps, weight_decay, hessian_power, maximize = _rule(hyper)
    for param, grad, exp_avg, v, step_t, hstep_t in zip(*lists):
        if maximize:
            grad = -grad
        step_t += 1
        step, n = float(step_t), float(hstep_t)
        exp_avg.lerp_(grad, 1 - beta1)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**n if n > 0 else 1.0  # v = 0 before the first refresh
        denom = v.sqrt()
        if hessian_power != 1:
            denom.pow_(hessian_power)
        denom.div_(math.sqrt(bias_correction2) ** hessian_power).add_(eps)
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def _multi_tensor_adahessian(
    *lists: list[Tensor], scratch: object | None = None, **hyper: Unpack[AdaHessianHyper]
) -> None:
    """The AdaHessian update, multi-tensor; bit-equal to :func:`_single_tensor_adahessian`.

    Tensors are bucketed by (device, dtype, step, Hessian step) so each bucket shares its bias
    corrections. Large contiguous CPU tensors are processed in cache-sized blocks
    (:func:`~curvlab.optim._scratch.cpu_blocks`: EMA, denominator and update while the block is in
    cache, through a reusable scratch row; no full-size temporaries); everything else uses
    ``torch._foreach_*`` kernels.
    """
    lr, beta1, beta2, eps, weight_decay, hessian_power, maximize = _rule(hyper)
    buckets = bucket_rows(
        zip(*lists), key=lambda row: (row[0].device, row[0].dtype, float(row[4]), float(row[5]))
    )
    for (device, dtype, step, n), (ps, gs, ms, vs, ts, _) in buckets.items():
        torch._foreach_add_(ts, 1.0)
        step += 1
        if maximize:
            gs = list(torch._foreach_neg(gs))
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**n if n > 0 else 1.0  # v = 0 before the first refresh
        scale = math.sqrt(bias_correction2) ** hessian_power
        blocked, (ps, gs, ms, vs), size = cpu_blocks([ps, gs, ms, vs])
        if blocked:
            scratch_row = workspace_rows(scratch, 1, size, dtype, device)[0]
        for pf, gf, mf, vf in blocked:
            for s, e in block_ranges(pf.numel(), size):
                d, mb, pb = scratch_row[: e - s], mf[s:e], pf[s:e]
                mb.lerp_(gf[s:e], 1 - beta1)
                torch.sqrt(vf[s:e], out=d)
                if hessian_power != 1:
                    d.pow_(hessian_power)
                d.div_(scale).add_(eps)
                if weight_decay != 0:
                    pb.mul_(1 - lr * weight_decay)
                pb.addcdiv_(mb, d, value=-lr / bias_correction1)
        if not ps:
            continue
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        denom = torch._foreach_sqrt(vs)
        if hessian_power != 1:
            torch._foreach_pow_(denom, hessian_power)
        torch._foreach_div_(denom, scale)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, value=-lr / bias_correction1)


def _adahessian_kernel(
    ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], step_size: float,
    beta1: float, gsign: float, power: float, scale: float, eps: float, decay: float,
    powered: bool,
) -> None:  # fmt: skip
    """One AdaHessian update of each tensor, written for one pass (:mod:`._fused`).

    ``gsign`` is -1 under maximize, ``step_size`` ``lr / (1 - β1^t)``, ``scale`` the bias
    correction ``sqrt(1 - β2^n)^k``, ``decay`` the weight-decay factor ``1 - lr·wd``;
    ``powered``: ``k != 1`` (a bool: one graph without the element-wise ``pow`` for ``k = 1``).
    """
    for p, g, m, v in zip(ps, gs, ms, vs):
        acc = accumulate_dtype(p)
        m32 = m.to(acc) + (1 - beta1) * (g.to(acc) * gsign - m.to(acc))
        root = v.to(acc).sqrt()
        denom = (root.pow(power) if powered else root) / scale + eps
        m.copy_(m32)
        p.copy_(p.to(acc) * decay - step_size * (m32 / denom))


def _fused_adahessian(*lists: list[Tensor], **hyper: Unpack[AdaHessianHyper]) -> None:
    """The AdaHessian update as one compiled kernel per bucket of tensors
    (:func:`._fused.fused_foreach`); equal to :func:`_single_tensor_adahessian` within round-off."""
    lr, beta1, beta2, eps, weight_decay, hessian_power, maximize = _rule(hyper)
    gsign = -1.0 if maximize else 1.0
    torch._foreach_add_(lists[4], 1.0)
    rows = []
    for param, grad, exp_avg, v, step_t, hstep_t in zip(*lists):
        step, n = float(step_t), float(hstep_t)
        bias_correction2 = 1 - beta2**n if n > 0 else 1.0  # v = 0 before the first refresh
        rule = (lr / (1 - beta1**step), beta1, gsign, float(hessian_power))
        scale = math.sqrt(bias_correction2) ** hessian_power
        extra = (scale, eps, 1 - lr * weight_decay, hessian_power != 1)
        rows.append(((param, grad, exp_avg, v), rule + extra))
    fused_foreach(_adahessian_kernel, rows)
