r"""Sophia: a clipped diagonal-Newton step with a curvature estimate refreshed every k steps.

.. math::
   \begin{aligned}
   &\textbf{input}: \eta \text{ (lr)},\ \beta_1, \beta_2,\ \rho,\ \lambda \text{ (weight decay)},
       \ \epsilon,\ k \text{ (update period)}, \\
   &\qquad \text{Estimator} \in \{\text{GNB}, \text{Hutchinson}\} \\
   &\textbf{init}: m_0 \leftarrow 0,\ h_0 \leftarrow 0 \\
   &\textbf{for } t = 1, 2, \ldots: \\
   &\quad g_t \leftarrow \nabla L_t(\theta_{t-1})
       \qquad (g_t \leftarrow -g_t \text{ if maximize}) \\
   &\quad \textbf{if } t \bmod k = 1: \ \hat h_t \leftarrow \text{Estimator}(\theta_{t-1}),
       \quad h_t \leftarrow \beta_2 h_{t-k} + (1-\beta_2)\,\hat h_t
       \quad \textbf{else } h_t \leftarrow h_{t-1} \\
   &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1)\, g_t \\
   &\quad \theta_{t-1} \leftarrow \theta_{t-1}(1 - \eta\lambda) \\
   &\quad \theta_t \leftarrow \theta_{t-1} - \eta\,
       \mathrm{clip}\!\big(m_t / (\rho \max(h_t, 0) + \epsilon),\ -1,\ 1\big)
   \end{aligned}

Estimators (:mod:`curvlab.estimators.param_diagonal`, passed as ``estimator=``):

* ``"gnb"`` (SophiaG, default): Gauss-Newton-Bartlett, ``ĥ = B · ĝ ⊙ ĝ`` with ``ĝ`` the gradient
  of the mean cross-entropy on labels sampled from the model's own logits, ``B`` the number of
  predictions in the batch (tokens for a language model). Needs the closure to return
  ``(loss, logits)``. ``ĥ ≥ 0``.
* ``"hutchinson"`` (SophiaH): ``ĥ = z ⊙ (H z)``, z Rademacher; may be negative, which the
  ``max(h, 0)`` turns into a plain sign step for that coordinate (as the authors' SophiaH code).

**Batch-size convention.** The official SophiaG (Liuhong99/Sophia ``sophia.py``) stores
``hessian = EMA(ĝ ⊙ ĝ)`` *without* the batch factor and multiplies inside the step:
``ratio = |m| / (rho * bs * hessian + 1e-15)`` with ``bs`` = tokens per batch passed to
``step(bs=...)``. Here the factor is applied when the estimate is made: ``state["hessian"]`` is
``EMA(B · ĝ ⊙ ĝ)``, a Hessian-diagonal estimate, with ``B`` the number of predictions in the
outputs the closure returned (``bs=`` overrides it), and the step divides by
``rho * hessian + eps``. So with the same ``rho`` and ``bs`` equal to the prediction count of the
batch the estimate is taken on, the updates are the same and ``state["hessian"]`` here is ``B``
times the official one. ``rho`` therefore has the same meaning (and default, 0.04) as in the
official code; it is the paper's γ.

Deviations from the official code, deliberate: the curvature is refreshed *before* the update of
steps 1, k+1, 2k+1, … on the step's own batch, from the same forward pass (the paper's
Algorithm 3; the official training loop refreshes after steps k, 2k, … with an extra forward on the
next batch, so its first k steps are pure sign steps — the author reports the order matters
little, Liuhong99/Sophia#22); ``eps`` is a hyper-parameter (official: 1e-15 fixed); SophiaH takes
Rademacher rather than Gaussian probes and no bias correction (as SophiaG and the paper);
``maximize=True`` negates the gradient and, for estimates of the loss's own curvature
(Hutchinson, custom), the estimate too, so maximising f is minimising −f (the GNB estimate, a
Gauss-Newton matrix of the model's likelihood, keeps its sign); non-finite gradients and
estimates follow curvlab's ``on_nonfinite`` policy; the random source is an explicit generator
(``seed=`` or ``generator=``), saved in ``state_dict()``.

Paper: Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for
Language Model Pre-training", ICLR 2024, arXiv:2305.14342; code: Liuhong99/Sophia.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import torch
from torch import Tensor

from curvlab.errors import ParameterError, ShapeMismatchError, ZeroCurvatureWarning
from curvlab.estimators.param_diagonal import (
    CurvatureEstimator,
    GNBEstimator,
    HutchinsonEstimator,
)
from curvlab.optim._closure import closure_grads, closure_required, estimate_curvature
from curvlab.optim._diagonal_curvature import DiagonalCurvatureOptimizer, shared_docs
from curvlab.optim._dispatch import KernelChoice, dispatch
from curvlab.optim._fused import accumulate_dtype, fused_foreach
from curvlab.optim._scratch import block_ranges, bucket_rows, cpu_blocks, workspace_rows
from curvlab.optim._validation import (
    check_finite_curvature,
    check_finite_grads,
    group_options,
    group_tensors,
    next_step_number,
    validate_int,
    validate_nonnegative,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Sophia", "SophiaHyper", "SophiaOptions", "sophia"]

_STATE_KEYS = ("step", "exp_avg", "hessian")
_SHAPED_KEYS = ("exp_avg", "hessian")


class SophiaHyper(TypedDict):
    """The hyper-parameters of one Sophia update, as in the param groups (see :class:`Sophia`)."""

    lr: float | Tensor
    betas: tuple[float, float]
    rho: float
    weight_decay: float
    eps: float
    maximize: bool


class SophiaOptions(SophiaHyper, KernelChoice):
    """The keyword arguments of :func:`sophia`: the hyper-parameters, the path and
    ``clamp_hessian`` (use ``max(h, 0)``: for estimates that may be negative, e.g. Hutchinson)."""

    clamp_hessian: bool


_ESTIMATOR_NAMES = "'gnb' (SophiaG), 'hutchinson' (SophiaH)"
_MANUAL_LOOP_HINT = (
    "\n(or construct Sophia(..., update_period=None) to step from p.grad and call "
    "update_curvature() yourself)"
)
_ZERO_CURVATURE_MESSAGE = (
    "Sophia(update_period=None) takes its first step with zero curvature: no update_curvature() "
    "call has given it an estimate, so every coordinate moves by a clipped sign step "
    "lr·sign(m) until one does. Call update_curvature(...) every k steps (before the first step "
    "to avoid this warning; the official SophiaG loop calls it after steps k, 2k, ...), or "
    "construct Sophia with update_period=k to refresh it from the step's closure"
)


@shared_docs
class Sophia(DiagonalCurvatureOptimizer):
    r"""Sophia (Liu et al. 2023): SophiaG (Gauss-Newton-Bartlett, default) or SophiaH (Hutchinson).

    **Closure contract** (``closure_mode = "loss"``): ``step(closure)`` takes a closure that
    returns the loss WITHOUT calling ``backward()`` — either the loss tensor or ``(loss, logits)``,
    the model outputs the loss was computed from (required by the default GNB estimator, which
    samples labels from them). The optimizer computes the gradient itself with
    ``torch.autograd.grad``, writes it into ``p.grad`` and returns the (detached) loss. The
    curvature is refreshed only on steps 1, k+1, 2k+1, … (``k = update_period``), from the same
    forward pass; only those steps keep the graph for a second backward (GNB) or build a
    ``create_graph=True`` graph (Hutchinson), so no graph outlives a step and memory stays flat.
    A missing closure raises :class:`~curvlab.errors.ClosureRequiredError`.

    **Driving your own loop**: construct with ``update_period=None``; then ``step()`` without a
    closure uses the gradients in ``p.grad`` (torch style: call ``loss.backward()`` first) and
    never refreshes the curvature; call :meth:`update_curvature` yourself (with a closure, with
    an explicit diagonal, or — as in the official SophiaG loop — after back-propagating the
    sampled-label loss, with ``bs=``). Until the first such call the curvature is zero and every
    coordinate takes a clipped sign step; the first step taken so warns once
    (:class:`~curvlab.errors.ZeroCurvatureWarning`).

    **In a framework loop** (Lightning, the Hugging Face ``Trainer``, accelerate), the loop calls
    ``backward()`` and ``step()`` itself: add the framework's one-line set-up from
    :mod:`curvlab.integrations`, which estimates the curvature on the forward pass of steps 1,
    k+1, … (:meth:`curvature_due`, :meth:`estimate_curvature`) and switches ``step()`` to read
    ``p.grad`` (:meth:`expect_external_curvature`). The trajectory is that of the closure
    contract on the same batches.

    Rule (the module docstring has the full algorithm box):
    :math:`\theta \leftarrow \theta(1-\eta\lambda) - \eta\,\mathrm{clip}(m/(\rho\max(h,0)+\epsilon),
    \pm 1)`, :math:`m` the EMA (β1) of gradients, :math:`h` the EMA (β2) of the curvature
    estimate, refreshed every k steps. No bias correction.

    **Batch-size factor**: ``state["hessian"]`` is the EMA of ``B · ĝ ⊙ ĝ`` (the GNB estimate
    *with* its batch factor, ``B`` = predictions per batch, e.g. tokens); the official code stores
    it without ``B`` and multiplies by ``bs`` in ``step(bs=...)``. Same ``rho``, same update when
    ``bs`` equals ``B``; see the module docstring.

    Args:
        params: parameters or param groups.
        lr: learning rate η (default 1e-4, the official default; GPT-2 runs used 3e-4 to 7e-4).
        betas: (β1, β2) for the gradient EMA and the curvature EMA (default (0.965, 0.99)).
        rho: ρ, the clipping scale (default 0.04; official GPT-2 configs 0.03 to 0.08). Larger ρ:
            more coordinates clipped to a sign step.
        weight_decay: decoupled weight decay λ (default 0.1).
        estimator: ``"gnb"`` (SophiaG, :class:`~curvlab.estimators.GNBEstimator` built from
            ``likelihood`` and ``bs``), ``"hutchinson"`` (SophiaH,
            :class:`~curvlab.estimators.HutchinsonEstimator`), or any
            :class:`~curvlab.estimators.CurvatureEstimator` callable (kept on the instance,
            included in ``copy.deepcopy``/``pickle``, not in ``state_dict``).
        update_period: k, refresh the curvature every k steps (default 10); ``None`` for manual
            refreshes through :meth:`update_curvature` (``step()`` then accepts no closure).
        bs: batch factor B of the GNB estimate; default the number of predictions in the logits
            (all leading dims). Optimizer-wide.
        likelihood: GNB sampling distribution, ``"categorical"`` (default; logits ``[..., C]``) or
            ``"gaussian"`` (regression outputs, loss ``½‖f − y‖²`` per prediction).
        eps: added to the denominator (default 1e-15, as the official code).
        {curvature_optimizer_args}

    ``estimator``, ``update_period``, ``bs`` and ``likelihood`` are optimizer-wide (the
    constructor's values are used for all param groups).

    State (per parameter, created at its first gradient): ``"step"`` (float32 scalar),
    ``"exp_avg"`` (m), ``"hessian"`` (h): 8 bytes per float32 parameter, as the official code.

    Raises:
        ParameterError: invalid hyper-parameters, ``seed`` or ``generator``, ``fused=True`` with
            ``foreach=True`` (at construction), or a sparse gradient.
        ClosureRequiredError: no closure, a closure that called ``backward()``, or one that
            returned no loss tensor (or no logits for the GNB estimator).
        NonFiniteError: NaN/inf gradient or curvature under ``on_nonfinite="raise"`` (nothing is
            changed).
        StateDictError: ``load_state_dict`` with another optimizer's state or other shapes.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> opt = Sophia(model.parameters(), lr=1e-3, seed=0)
        >>> def closure():
        ...     logits = model(x)
        ...     return torch.nn.functional.cross_entropy(logits, y), logits
        >>> loss = opt.step(closure)
        >>> sorted(opt.state[model.weight])
        ['exp_avg', 'hessian', 'step']

    Paper: Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for
    Language Model Pre-training", ICLR 2024, arXiv:2305.14342; code: Liuhong99/Sophia.
    """

    closure_mode: ClassVar[str] = "loss"
    _state_keys = _STATE_KEYS
    _shaped_keys = _SHAPED_KEYS

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        *,
        estimator: str | CurvatureEstimator = "gnb",
        update_period: int | None = 10,
        bs: int | None = None,
        likelihood: str = "categorical",
        eps: float = 1e-15,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        on_nonfinite: str = "raise",
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        validate_nonnegative("rho", rho, "; the official default is 0.04")
        if update_period is not None:
            hint = "; the paper's k, default 10, or None for manual refreshes"
            validate_int("update_period", update_period, 1, hint)
        builtin: dict[str, CurvatureEstimator] = {
            "gnb": GNBEstimator(likelihood=likelihood, batch_size=bs),  # checks both
            "hutchinson": HutchinsonEstimator(),
        }
        defaults = {
            "lr": lr,
            "betas": betas,
            "rho": rho,
            "weight_decay": weight_decay,
            "eps": eps,
            "maximize": bool(maximize),
            "foreach": foreach,
            "fused": fused,
            "on_nonfinite": on_nonfinite,
            "update_period": update_period,
            "bs": bs,
            "likelihood": likelihood,
        }
        super().__init__(
            params,
            defaults,
            estimator=estimator,
            builtin=builtin,
            estimator_names=_ESTIMATOR_NAMES,
            seed=seed,
            generator=generator,
        )

    def _init_group(self, group: dict[str, Any]) -> list[list[Tensor]]:
        """``[params, grads, exp_avgs, hessians, state_steps]`` of ``group``'s parameters that have
        a gradient, their state created lazily."""
        return group_tensors(group, self._state, ("exp_avg", "hessian", "step"))

    def _update_hessian(self, params: Sequence[Tensor], diag: Sequence[Tensor | None]) -> None:
        """``h ← β2 h + (1 − β2) ĥ`` for every parameter with an estimate.

        Under ``maximize`` the objective is ``−loss``, whose curvature is ``−ĥ`` for a curvature
        estimate of the loss (Hutchinson, custom); the GNB estimate is a Gauss-Newton matrix of
        the model's likelihood and keeps its sign.
        """
        flip = self.defaults["estimator"] != "gnb"
        for p, d, group in self._estimates(params, diag):
            beta2 = group["betas"][1]
            scale = -(1 - beta2) if flip and group["maximize"] else 1 - beta2
            self._state(p)["hessian"].mul_(beta2).add_(d.to(p.dtype), alpha=scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor | None:  # type: ignore[override]
        """Take one Sophia step (refreshing the curvature first on steps 1, k+1, 2k+1, …).

        Args:
            closure: returns the loss, or ``(loss, logits)``, WITHOUT calling ``backward()``.
                Optional with ``update_period=None`` (then ``p.grad`` is used) and after
                :meth:`expect_external_curvature` (then a closure, if given, calls
                ``backward()`` itself, torch style).

        Returns:
            The closure's loss (detached), or ``None`` without a closure.
        """
        period = self.defaults["update_period"]
        loss: Tensor | None = None
        if closure is not None or self.curvature_source is not None:
            loss, proceed = self._start_step(closure)
            if not proceed:
                return loss
        elif period is not None:
            raise closure_required("Sophia", _MANUAL_LOOP_HINT)
        elif not check_finite_grads(self.param_groups, step=lambda: next_step_number(self)):
            return None
        if period is None and not self.state:
            warnings.warn(_ZERO_CURVATURE_MESSAGE, ZeroCurvatureWarning, stacklevel=4)
        clamp = self.defaults["estimator"] != "gnb"
        for group in self.param_groups:
            lists = self._init_group(group)
            if not lists[0]:
                continue
            sophia(*lists, foreach=group["foreach"], fused=group.get("fused"), scratch=self,
                   clamp_hessian=clamp, **group_options(group, SophiaHyper))  # fmt: skip
        return loss

    @torch.no_grad()
    def update_curvature(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        diagonal: Sequence[Tensor | None] | None = None,
        bs: int | None = None,
    ) -> Tensor | None:
        """Refresh the curvature EMA ``h ← β2 h + (1 − β2) ĥ`` now, from one of three sources.

        Use it when you drive the loop yourself (``update_period=None``), or to add a refresh.
        It changes neither the parameters, nor the momentum, nor the step count, nor ``p.grad``.

        * ``closure`` (loss, or ``(loss, logits)``, without backward): ``ĥ`` from the optimizer's
          estimator at the current parameters.
        * ``diagonal``: your own estimate, one tensor (or ``None``) per parameter of
          ``param_groups`` in order, *with* its batch factor (e.g. ``B · ĝ ⊙ ĝ``).
        * neither: the official SophiaG loop — you back-propagated the mean cross-entropy on labels
          sampled from the model into ``p.grad``; ``ĥ = bs · p.grad ⊙ p.grad`` (``bs`` required
          here, or set at construction).

        Args:
            closure: see above.
            diagonal: see above.
            bs: batch factor B for the ``p.grad`` source.

        Returns:
            The closure's loss (detached), or ``None``.

        Raises:
            ParameterError: more than one source, or no ``bs`` for the ``p.grad`` source.
            ShapeMismatchError: ``diagonal`` does not fit the parameters.
            NonFiniteError: a NaN/inf estimate under ``on_nonfinite="raise"``.

        Example (the official loop, every k steps, after the usual step)::

            logits = model(x)
            y_hat = torch.distributions.Categorical(logits=logits).sample()
            optimizer.zero_grad()
            F.cross_entropy(logits.view(-1, logits.size(-1)), y_hat.view(-1)).backward()
            optimizer.update_curvature(bs=y_hat.numel())
        """
        if closure is not None and diagonal is not None:
            raise ParameterError(
                "update_curvature takes one source: a closure, or diagonal=, or neither (p.grad)"
            )
        loss: Tensor | None = None
        if closure is not None:
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            saved = [p.grad for p in params]
            try:
                loss, outputs, grads = closure_grads(closure, params, "Sophia", self._estimator)
                diag = estimate_curvature(self._estimator, params, grads, outputs, self._generator)
                del grads, outputs
            finally:
                for p, g in zip(params, saved):
                    p.grad = g
        else:
            params = [p for g in self.param_groups for p in g["params"]]
            diag = self._given_diagonal(params, diagonal, bs)
        step = lambda: next_step_number(self)  # noqa: E731
        if check_finite_curvature(self.param_groups, params, diag, step=step):
            self._update_hessian(params, diag)
        return loss

    def _given_diagonal(
        self, params: list[Tensor], diagonal: Sequence[Tensor | None] | None, bs: int | None
    ) -> list[Tensor | None]:
        """The estimate passed as ``diagonal=``, checked, or ``bs · p.grad ⊙ p.grad``."""
        if diagonal is not None:
            diag = list(diagonal)
            if len(diag) != len(params) or any(
                d is not None and d.shape != p.shape for d, p in zip(diag, params)
            ):
                raise ShapeMismatchError(
                    f"diagonal must hold one tensor (or None) per parameter of param_groups "
                    f"({len(params)}), each shaped like its parameter"
                )
            return diag
        factor = bs if bs is not None else self.defaults["bs"]
        if factor is None:
            raise ParameterError(
                "update_curvature() without a closure or diagonal reads ĝ from p.grad and needs "
                "bs=, the number of predictions (e.g. tokens) the sampled-label loss averaged "
                "over, so that ĥ = bs · ĝ ⊙ ĝ"
            )
        return [None if p.grad is None else p.grad * p.grad * factor for p in params]


def sophia(*lists: list[Tensor], **options: Unpack[SophiaOptions]) -> None:
    """Functional API that performs the Sophia computation; see :class:`Sophia`.

    ``lists``: ``params, grads, exp_avgs, hessians, state_steps``, equally long (``state_steps``:
    float32 scalar tensors of completed steps). In place, for each parameter: ``step += 1``;
    ``θ ← θ(1 − lr·wd)``; ``m ← β1 m + (1 − β1) g``; ``θ ← θ − lr · clip(m / (ρ·h + ε), −1, 1)``,
    ``h`` replaced by ``max(h, 0)`` when ``clamp_hessian``. The curvature ``h`` is refreshed by the
    caller (:class:`Sophia`). ``options``: see :class:`SophiaOptions`; the path as in
    :func:`~curvlab.optim._dispatch.dispatch` (:func:`_fused_sophia`,
    :func:`_single_tensor_sophia`, :func:`_multi_tensor_sophia`).

    Example:
        >>> p, g = torch.zeros(2), torch.tensor([1.0, -1.0])
        >>> m, h, t = torch.zeros(2), torch.ones(2), torch.tensor(0.0)
        >>> sophia([p], [g], [m], [h], [t], lr=0.1, betas=(0.9, 0.99), rho=1.0, weight_decay=0.0,
        ...        eps=1e-15, maximize=False, clamp_hessian=True)
        >>> p.tolist(), float(t)
        ([-0.010000000707805157, 0.010000000707805157], 1.0)
    """
    dispatch(
        lists,
        options,
        single=_single_tensor_sophia,
        multi=_multi_tensor_sophia,
        fused=_fused_sophia,
    )


def _rule(hyper: SophiaHyper) -> tuple[float, float, float, float, float, bool]:
    """``(lr, beta1, rho, weight_decay, eps, maximize)`` of one step."""
    lr, betas, maximize = float(hyper["lr"]), hyper["betas"], hyper["maximize"]
    return lr, betas[0], hyper["rho"], hyper["weight_decay"], hyper["eps"], maximize


def _single_tensor_sophia(
    *lists: list[Tensor], clamp_hessian: bool, **hyper: Unpack[SophiaHyper]
) -> None:
    """The Sophia update, one tensor at a time: the reference for :func:`_multi_tensor_sophia`.

    ``lists``: params, grads, exp_avgs, hessians, state_steps. ``clip(m/d, −1, 1)`` equals the
    official ``sign(m)·min(|m|/d, 1)`` for d > 0.
    """
    lr, beta1, rho, weight_decay, eps, maximize = _rule(hyper)
    for param, grad, exp_avg, hess, step_t in zip(*lists):
        if maximize:
            grad = -grad
        step_t += 1
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        h = hess.clamp(min=0) if clamp_hessian else hess
        ratio = exp_avg / (h * rho + eps)
        param.add_(ratio.clamp_(-1, 1), alpha=-lr)


def _multi_tensor_sophia(
    *lists: list[Tensor],
    clamp_hessian: bool,
    scratch: object | None = None,
    **hyper: Unpack[SophiaHyper],
) -> None:
    """The Sophia update, multi-tensor; bit-equal to :func:`_single_tensor_sophia`.

    Tensors are grouped by (device, dtype). Large contiguous CPU tensors are processed in
    cache-sized blocks (:func:`~curvlab.optim._scratch.cpu_blocks`) — EMA, clipped ratio and
    update while the block is in cache, through two reusable scratch rows and
    ``clip(m/d, −1, 1) = m / max(d, |m|)`` for ``d > 0``. Everything else uses ``torch._foreach_*``
    kernels.
    """
    lr, beta1, rho, weight_decay, eps, maximize = _rule(hyper)
    buckets = bucket_rows(zip(*lists), key=lambda row: (row[0].device, row[0].dtype))
    for (device, dtype), (ps, gs, ms, hs, ts) in buckets.items():
        torch._foreach_add_(ts, 1.0)
        if maximize:
            gs = list(torch._foreach_neg(gs))
        blocked, (ps, gs, ms, hs), size = cpu_blocks([ps, gs, ms, hs])
        if blocked:
            rows = workspace_rows(scratch, 2, size, dtype, device)
        for pf, gf, mf, hf in blocked:
            for s, e in block_ranges(pf.numel(), size):
                d, a = rows[0, : e - s], rows[1, : e - s]
                mb, pb = mf[s:e], pf[s:e]
                mb.lerp_(gf[s:e], 1 - beta1)
                if clamp_hessian:
                    torch.clamp(hf[s:e], min=0.0, out=d)
                    d.mul_(rho)
                else:
                    torch.mul(hf[s:e], rho, out=d)
                d.add_(eps)
                torch.abs(mb, out=a)
                torch.maximum(d, a, out=d)
                torch.div(mb, d, out=d)
                if weight_decay != 0:
                    pb.mul_(1 - lr * weight_decay)
                pb.add_(d, alpha=-lr)
        if not ps:
            continue
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        if clamp_hessian:
            denom = torch._foreach_clamp_min(hs, 0.0)
            torch._foreach_mul_(denom, rho)
        else:
            denom = torch._foreach_mul(hs, rho)
        torch._foreach_add_(denom, eps)
        ratio = torch._foreach_div(ms, denom)
        del denom
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        torch._foreach_add_(ps, ratio, alpha=-lr)


def _sophia_kernel(
    ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], hs: list[Tensor], lr: float,
    beta1: float, rho: float, eps: float, gsign: float, decay: float, h_min: float,
) -> None:  # fmt: skip
    """One Sophia update of each tensor, written for one pass (:mod:`._fused`).

    ``gsign`` is -1 under maximize, ``decay`` the weight-decay factor ``1 - lr·wd``, ``h_min`` 0
    when the curvature is clamped (``-inf`` otherwise).
    """
    for p, g, m, h in zip(ps, gs, ms, hs):
        acc = accumulate_dtype(p)
        m32 = m.to(acc) + (1 - beta1) * (g.to(acc) * gsign - m.to(acc))
        ratio = torch.clamp(m32 / (h.to(acc).clamp_min(h_min) * rho + eps), -1.0, 1.0)
        m.copy_(m32)
        p.copy_(p.to(acc) * decay - lr * ratio)


def _fused_sophia(*lists: list[Tensor], clamp_hessian: bool, **hyper: Unpack[SophiaHyper]) -> None:
    """The Sophia update as one compiled kernel per bucket of tensors
    (:func:`._fused.fused_foreach`); equal to :func:`_single_tensor_sophia` within round-off."""
    lr, beta1, rho, weight_decay, eps, maximize = _rule(hyper)
    gsign, h_min = (-1.0 if maximize else 1.0), (0.0 if clamp_hessian else -math.inf)
    rule = (lr, beta1, rho, eps, gsign, 1 - lr * weight_decay, h_min)
    fused_foreach(_sophia_kernel, [(row, rule) for row in zip(*lists[:4])])
    torch._foreach_add_(lists[4], 1.0)
