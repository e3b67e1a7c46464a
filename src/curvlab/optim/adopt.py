r"""ADOPT: Adam with the second moment taken from the *previous* step, and a clipped normalised
gradient.

.. math::
   \begin{aligned}
   &\textbf{input}: \gamma \text{ (lr)},\ \beta_1, \beta_2,\ \epsilon,
       \ \lambda \text{ (weight decay)},
       \ c(t) = t^{\kappa} \text{ (clip, } \kappa = 1/4\text{)},\ \theta_0 \\
   &\textbf{init}: m_0 \leftarrow 0 \\
   &t = 0: \quad g_0 \leftarrow \nabla f(\theta_0) \ (+\lambda\theta_0 \text{ if coupled});
       \quad v_0 \leftarrow g_0^2; \quad \text{no parameter update} \\
   &\textbf{for } t = 1, 2, \ldots: \\
   &\quad g_t \leftarrow \nabla f(\theta_{t-1}) \qquad (g_t \leftarrow -g_t \text{ if maximize}) \\
   &\quad \textbf{if } \lambda \ne 0: \ \textbf{if} \text{ decouple}:
       \theta_{t-1} \leftarrow \theta_{t-1} - \gamma\lambda\theta_{t-1}
       \ \textbf{else}\ g_t \leftarrow g_t + \lambda\theta_{t-1} \\
   &\quad n_t \leftarrow \mathrm{clip}\big(g_t / \max(\sqrt{v_{t-1}}, \epsilon),\ -c(t),\ c(t)\big)
   \\
   &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1)\, n_t \\
   &\quad \theta_t \leftarrow \theta_{t-1} - \gamma\, m_t \\
   &\quad v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \qquad
       \text{(updated after use: } n_t \text{ is independent of } g_t \text{ through } v) \\
   \end{aligned}

Variant: the authors' current ("clipped", 22 Nov 2024) ADOPT, as in iShohei220/adopt
``src/adopt/adopt.py`` (commit 6468572) and the updated arXiv v3: ``clip_exponent=0.25`` gives the
clip schedule c(t) = t^{1/4} evaluated at the number of completed steps (1 at the first real
update); ``clip_exponent=None`` is the original, un-clipped ADOPT of the first arXiv version. There
is no bias correction. ``decouple=False`` (the authors' default) adds ``weight_decay * θ`` to the
gradient (Adam style, also on the initialisation step); ``decouple=True`` shrinks θ by ``lr *
weight_decay`` before the update (AdamW style, not on the initialisation step) — use it when
replacing AdamW.

Deviations from the official code, all deliberate: the clip is a number (``clip_exponent``), not a
lambda kept on the instance, so ``copy.deepcopy``/``pickle`` keep it; the foreach path buckets
tensors by step count (the official one reads the step of the first tensor for the whole group);
``fused=True`` is curvlab's compiled kernel (:mod:`curvlab.optim._fused`), not the official
``fused`` flag; there is no ``capturable``/``differentiable`` path; non-finite gradients follow curvlab's
``on_nonfinite`` policy.

This file is the template of curvlab's optimizer layout (see :mod:`curvlab.optim`): the class
validates and creates state (``_init_group``), ``step`` holds no math and calls the functional
:func:`adopt`, which dispatches to :func:`_single_tensor_adopt` (the reference, the rule as in the
paper), :func:`_multi_tensor_adopt` (the foreach fast path, equal to it) or
:func:`_fused_adopt` (one compiled kernel per bucket of tensors, equal to it).

Paper: Taniguchi, Harada, Minegishi, Oshima, Jeong, Nagahara, Iiyama, Suzuki, Iwasawa, Matsuo,
"ADOPT: Modified Adam Can Converge with Any β2 with the Optimal Rate", NeurIPS 2024,
arXiv 2411.02853.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlab.optim._dispatch import KernelChoice, dispatch
from curvlab.optim._fused import accumulate_dtype, fused_foreach, validate_fused
from curvlab.optim._scratch import (
    block_ranges,
    bucket_rows,
    chunks,
    cpu_blocks,
    workspace_rows,
    workspace_views,
)
from curvlab.optim._validation import (
    group_options,
    load_state_dict_checked,
    start_step,
    validate_nonnegative,
    validate_standard,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["ADOPT", "ADOPTHyper", "ADOPTOptions", "adopt"]

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")
_SHAPED_KEYS = ("exp_avg", "exp_avg_sq")


class ADOPTHyper(TypedDict):
    """The hyper-parameters of one ADOPT step, as in the param groups (see :class:`ADOPT`)."""

    lr: float | Tensor
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    decouple: bool
    clip_exponent: float | None
    maximize: bool


class ADOPTOptions(ADOPTHyper, KernelChoice):
    """The keyword arguments of :func:`adopt`: the hyper-parameters and the path."""


class ADOPT(Optimizer):
    r"""ADOPT (Taniguchi et al., NeurIPS 2024), the authors' current clipped variant.

    Rule (see the module docstring for the full algorithm box): at the first step only
    :math:`v \leftarrow g^2`; then :math:`m \leftarrow \beta_1 m + (1-\beta_1)
    \,\mathrm{clip}(g/\max(\sqrt{v},\epsilon), \pm t^{1/4})`,
    :math:`\theta \leftarrow \theta - \gamma m`,
    and only afterwards :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`. No bias correction.

    Args:
        params: parameters or param groups.
        lr: learning rate γ (default 1e-3).
        betas: (β1, β2), each in [0, 1) (default (0.9, 0.9999)).
        eps: floor of √v (default 1e-6; it is a ``max``, not an added term).
        weight_decay: λ ≥ 0 (default 0).
        decouple: ``False`` (default, as the authors): L2 added to the gradient; ``True``:
        AdamW-style
            decoupled decay θ ← θ(1 − γλ), skipped on the initialisation step.
        clip_exponent: κ of the clip schedule c(t) = t^κ (default 0.25 as in the authors' repo);
            ``None`` disables clipping (original ADOPT).
        maximize: maximise the objective instead.
        foreach: use the multi-tensor path (default ``None`` = ``True``; it is faster on CPU as
            well).
        fused: run ``torch.compile``'d kernels, one call per bucket of a group's tensors (default
            ``None`` = ``False``): one pass over memory (plus the non-finite check's pass over the
            gradients), but the first step compiles for ~10-30 s (see
            :mod:`curvlab.optim._fused`).
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"``; see
            :mod:`curvlab.optim._validation`.

    State (per parameter, created at its first gradient): ``"step"`` (float32 scalar, completed
    steps), ``"exp_avg"`` (m) and ``"exp_avg_sq"`` (v), each of the parameter's shape and dtype:
    8 bytes per float32 parameter.

    Raises:
        ParameterError: invalid hyper-parameters or ``fused=True`` with ``foreach=True`` (at
            construction), or a sparse gradient (at step).
        NonFiniteError: a NaN/inf gradient under ``on_nonfinite="raise"``; nothing is changed.
        StateDictError: ``load_state_dict`` with another optimizer's state or other shapes.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ADOPT(model.parameters(), lr=1e-3, weight_decay=0.01, decouple=True)
        >>> for _ in range(2):
        ...     opt.zero_grad()
        ...     model(torch.ones(4, 3)).pow(2).mean().backward()
        ...     opt.step()
        >>> int(opt.state[model.weight]["step"])
        2

    Paper: Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any β2 with the Optimal Rate",
    NeurIPS 2024, arXiv 2411.02853; code: iShohei220/adopt.
    """

    closure_mode: ClassVar[str] = "backward"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        decouple: bool = False,
        clip_exponent: float | None = 0.25,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        validate_fused(fused, foreach)
        if clip_exponent is not None:
            validate_nonnegative(
                "clip_exponent", clip_exponent, "; the authors use 0.25, None disables clipping"
            )
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "decouple": bool(decouple),
            "clip_exponent": clip_exponent,
            "maximize": bool(maximize),
            "foreach": foreach,
            "fused": fused,
            "on_nonfinite": on_nonfinite,
            "nonfinite_skips": 0,
        }
        validate_standard(defaults, "lr", "betas", "eps", "weight_decay", "on_nonfinite")
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults)

    def _init_group(self, group: dict[str, Any], *lists: list[Tensor]) -> None:
        """Create the state of new parameters; append every parameter with a gradient to
        ``lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)``.
        """
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            entries = (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
            for lst, entry in zip(lists, entries):
                lst.append(entry)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Take one ADOPT step; the optional ``closure`` zeroes grads, calls backward, returns loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss, proceed = start_step(self, closure)
        if proceed:
            for group in self.param_groups:
                lists: tuple[list[Tensor], ...] = ([], [], [], [], [])
                self._init_group(group, *lists)
                if lists[0]:
                    hyper: ADOPTHyper = group_options(group, ADOPTHyper)
                    adopt(*lists, foreach=group["foreach"], fused=group.get("fused"), scratch=self,
                          **hyper)  # fmt: skip
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict saved by :class:`ADOPT`; raises StateDictError for any other."""
        load_state_dict_checked(
            self, state_dict, state_keys=_STATE_KEYS, param_shaped_keys=_SHAPED_KEYS
        )


def adopt(*lists: list[Tensor], **options: Unpack[ADOPTOptions]) -> None:
    """Functional API that performs the ADOPT computation; see :class:`ADOPT`.

    ``lists``: ``params, grads, exp_avgs, exp_avg_sqs, state_steps``, equally long; updates the
    parameters, ``exp_avgs`` (m), ``exp_avg_sqs`` (v) and ``state_steps`` (completed steps, a
    float32 scalar tensor per parameter) in place. ``options``: the :class:`ADOPTHyper` and the
    path (:class:`~curvlab.optim._dispatch.KernelChoice`): ``fused=True`` selects
    :func:`_fused_adopt`; else ``foreach`` (default ``None`` = ``True``) selects
    :func:`_multi_tensor_adopt`, ``False`` :func:`_single_tensor_adopt`; ``scratch``: an object
    (the optimizer) whose reusable buffers the CPU fast path may use (:mod:`._scratch`), ``None``
    allocates fresh temporaries.
    """
    dispatch(
        lists, options, single=_single_tensor_adopt, multi=_multi_tensor_adopt, fused=_fused_adopt
    )


def _single_tensor_adopt(*lists: list[Tensor], **hyper: Unpack[ADOPTHyper]) -> None:
    """The ADOPT rule as in the paper, one tensor at a time: the reference.

    ``lists``: the tensor lists of :func:`adopt`, in its order.
    """
    lr, (beta1, beta2), eps = float(hyper["lr"]), hyper["betas"], hyper["eps"]
    weight_decay, decouple = hyper["weight_decay"], hyper["decouple"]
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(*lists):
        if hyper["maximize"]:
            grad = -grad
        if torch.is_complex(param):
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
        if weight_decay != 0 and not decouple:
            grad = grad.add(param, alpha=weight_decay)
        step = float(step_t)
        if step == 0:
            exp_avg_sq.addcmul_(grad, grad)
            step_t += 1
            continue
        if weight_decay != 0 and decouple:
            param.mul_(1 - lr * weight_decay)
        normed = grad / exp_avg_sq.sqrt().clamp_(min=eps)
        if hyper["clip_exponent"] is not None:
            clip = step ** hyper["clip_exponent"]
            normed.clamp_(-clip, clip)
        exp_avg.lerp_(normed, 1 - beta1)
        param.add_(exp_avg, alpha=-lr)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_t += 1


def _multi_tensor_adopt(
    *lists: list[Tensor], scratch: object | None = None, **hyper: Unpack[ADOPTHyper]
) -> None:
    """The ADOPT rule with ``torch._foreach_*`` kernels; equal to :func:`_single_tensor_adopt`.

    Tensors are bucketed by (device, dtype, completed steps), so parameters whose gradients appeared
    at different times still get their own clip value and initialisation step. ``scratch``: the
    owner of reusable temporary buffers (used on CPU), see :func:`adopt`.
    """
    lr, (beta1, beta2), eps = float(hyper["lr"]), hyper["betas"], hyper["eps"]
    weight_decay, decouple, maximize = hyper["weight_decay"], hyper["decouple"], hyper["maximize"]
    clip_exponent = hyper["clip_exponent"]
    rows = (  # complex tensors as their real views
        [torch.view_as_real(t) for t in row[:4]] + [row[4]] if torch.is_complex(row[0]) else row
        for row in zip(*lists)
    )
    buckets = bucket_rows(rows, key=lambda row: (row[0].device, row[0].dtype, float(row[4])))
    one = torch.tensor(1.0)
    for (_, _, step), (ps, gs, ms, vs, ts) in buckets.items():
        if maximize:
            gs = list(torch._foreach_neg(gs))
        if weight_decay != 0 and not decouple:
            if maximize:
                torch._foreach_add_(gs, ps, alpha=weight_decay)
            else:
                gs = list(torch._foreach_add(gs, ps, alpha=weight_decay))
        if step == 0:
            torch._foreach_addcmul_(vs, gs, gs)
            torch._foreach_add_(ts, one, alpha=1.0)
            continue
        clip = None if clip_exponent is None else step**clip_exponent
        decay = 1 - lr * weight_decay if decouple else 1.0
        if scratch is not None and ps[0].device.type == "cpu" and ps[0].dtype != torch.float16:
            dtype, device = ps[0].dtype, ps[0].device
            blocked, (ps, gs, ms, vs), size = cpu_blocks([ps, gs, ms, vs])
            if blocked:
                row = workspace_rows(scratch, 1, size, dtype, device)[0]
                _blocked_adopt(blocked, row, (lr, beta1, beta2, eps, clip, decay))
            if not ps:
                torch._foreach_add_(ts, one, alpha=1.0)
                continue
        if decay != 1:
            torch._foreach_mul_(ps, decay)
        # normed = g / max(sqrt(v), eps), computed as g * rsqrt(max(v, eps^2)) (equal up to
        # rounding; float16 cannot hold eps^2 and takes sqrt-then-reciprocal). On CPU the
        # temporary lives in a reusable scratch buffer (as large as the largest tensor): fresh
        # allocations cost page faults that dominate the step there.
        use_scratch = scratch is not None and ps[0].device.type == "cpu"
        for idx in chunks([v.numel() for v in vs]) if use_scratch else [range(len(ps))]:
            g_, m_, v_ = [gs[i] for i in idx], [ms[i] for i in idx], [vs[i] for i in idx]
            if scratch is not None and use_scratch:
                normed = workspace_views(scratch, v_)
                torch._foreach_copy_(normed, v_)
                if ps[0].dtype == torch.float16:
                    torch._foreach_sqrt_(normed)
                    torch._foreach_clamp_min_(normed, eps)
                    torch._foreach_reciprocal_(normed)
                else:
                    torch._foreach_clamp_min_(normed, eps * eps)
                    torch._foreach_rsqrt_(normed)
            elif ps[0].dtype == torch.float16:
                normed = list(torch._foreach_sqrt(v_))
                torch._foreach_clamp_min_(normed, eps)
                torch._foreach_reciprocal_(normed)
            else:
                normed = list(torch._foreach_maximum(v_, eps * eps))
                torch._foreach_rsqrt_(normed)
            torch._foreach_mul_(normed, g_)
            if clip is not None:
                # on CPU, large tensors: one clamp_ pass each beats two foreach passes; small ones
                # are dominated by per-call overhead, where the two foreach calls win
                large = sum(t.numel() for t in normed) >= 65536 * len(normed)
                if ps[0].device.type == "cpu" and large:
                    for t in normed:
                        t.clamp_(-clip, clip)
                else:  # multi-tensor kernels: fewer launches
                    torch._foreach_clamp_min_(normed, -clip)
                    torch._foreach_clamp_max_(normed, clip)
            torch._foreach_lerp_(m_, normed, 1 - beta1)
            del normed
        torch._foreach_add_(ps, ms, alpha=-lr)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        torch._foreach_add_(ts, one, alpha=1.0)


def _adopt_kernel(
    ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], lr: float,
    beta1: float, beta2: float, eps: float, clip: float, gsign: float, l2: float, decay: float,
) -> None:  # fmt: skip
    """One ADOPT update of each tensor (after its initialisation step), written for one pass.

    ``gsign`` is -1 under maximize, ``l2`` the coupled weight decay (0 when decoupled), ``decay``
    the decoupled shrink factor (1 when coupled), ``clip`` c(t) (``inf`` without clipping).
    """
    for p, g, m, v in zip(ps, gs, ms, vs):
        acc = accumulate_dtype(p)
        g32 = g.to(acc) * gsign + p.to(acc) * l2
        p32 = p.to(acc) * decay
        normed = torch.clamp(g32 / v.to(acc).sqrt().clamp_min(eps), -clip, clip)
        m32 = m.to(acc) + (1 - beta1) * (normed - m.to(acc))
        m.copy_(m32)
        p.copy_(p32 - lr * m32)
        v.copy_(v.to(acc) * beta2 + (1 - beta2) * g32 * g32)


def _fused_adopt(*lists: list[Tensor], **hyper: Unpack[ADOPTHyper]) -> None:
    """The ADOPT rule as one compiled kernel per bucket of tensors (:func:`._fused.fused_foreach`);
    equal to :func:`_single_tensor_adopt`. Tensors at their initialisation step take the foreach
    path.
    """
    lr, (beta1, beta2), eps = float(hyper["lr"]), hyper["betas"], hyper["eps"]
    weight_decay, decouple, kappa = hyper["weight_decay"], hyper["decouple"], hyper["clip_exponent"]
    steps = [float(t) for t in lists[4]]
    init = [i for i, step in enumerate(steps) if step == 0]
    if init:
        _multi_tensor_adopt(*([lst[i] for i in init] for lst in lists), **hyper)
    skip = set(init)
    gsign = -1.0 if hyper["maximize"] else 1.0
    l2 = 0.0 if decouple else float(weight_decay)
    decay = 1 - lr * weight_decay if decouple else 1.0
    rows = []
    for i, (param, grad, exp_avg, exp_avg_sq) in enumerate(zip(*lists[:4])):
        if i in skip:
            continue
        tensors = [param, grad, exp_avg, exp_avg_sq]
        if torch.is_complex(param):
            tensors = [torch.view_as_real(t) for t in tensors]
        clip = float("inf") if kappa is None else steps[i] ** kappa
        rows.append((tensors, (lr, beta1, beta2, eps, clip, gsign, l2, decay)))
    fused_foreach(_adopt_kernel, rows)
    done = [t for i, t in enumerate(lists[4]) if i not in skip]
    if done:
        torch._foreach_add_(done, 1.0)


def _blocked_adopt(
    blocked: list[tuple[Tensor, ...]],
    row: Tensor,
    rule: tuple[float, float, float, float, float | None, float],
) -> None:
    """The ADOPT update of large contiguous CPU tensors, one cache-sized block at a time.

    ``blocked``: ``(param, grad, exp_avg, exp_avg_sq)`` flat views (:func:`cpu_blocks`); ``row``:
    a scratch row of the block size; ``rule``: ``(lr, beta1, beta2, eps, clip or None, decay)``.
    Every operation of the update runs while the block is in cache, as in the foreach path.
    """
    lr, beta1, beta2, eps, clip, decay = rule
    for p, g, m, v in blocked:
        for s, e in block_ranges(p.numel(), row.numel()):
            pb, gb, mb, vb, normed = p[s:e], g[s:e], m[s:e], v[s:e], row[: e - s]
            torch.clamp_min(vb, eps * eps, out=normed)
            normed.rsqrt_().mul_(gb)
            if clip is not None:
                normed.clamp_(-clip, clip)
            if decay != 1:
                pb.mul_(decay)
            mb.lerp_(normed, 1 - beta1)
            pb.add_(mb, alpha=-lr)
            vb.mul_(beta2).addcmul_(gb, gb, value=1 - beta2)
