"""M-FAC: preconditioning by the inverse empirical Fisher of a sliding window of gradients.

Frantar, Kurtic, Alistarh 2021, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", arXiv 2107.03356 (NeurIPS 2021). Official code: IST-DASLab/M-FAC ``optim.py``
(classes ``HInvFastUpMulti`` and ``MFAC``), read at commit 8116367.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlab.errors import ParameterError, StateDictError
from curvlab.operators._context import full_precision
from curvlab.optim._scratch import workspace
from curvlab.optim._validation import (
    add_param_group_checked,
    group_options,
    group_step,
    load_state_dict_checked,
    start_step,
    validate_in_range,
    validate_int,
    validate_positive,
    validate_standard,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["MFAC", "MFACHyper", "mfac", "mfac_coefficient_matrix", "mfac_coefficients"]

#: Per-parameter state keys (``"dots"`` lives only in each group's anchor parameter).
_STATE_KEYS = ("step", "grad_window", "momentum_buffer", "dots")


class MFACHyper(TypedDict):
    """The hyper-parameters of one M-FAC step, as in the param groups (see :class:`MFAC`)."""

    lr: float | Tensor
    momentum: float
    weight_decay: float
    damp: float


class MFAC(Optimizer):
    r"""M-FAC: θ ← θ − lr · F̂⁻¹ g with the damped empirical Fisher of the last ``m`` gradients.

    Algorithm (one window per param group; with the default single group this is exactly the
    official optimizer, whose window spans all parameters)::

        g_t  = ∇f(θ_t) + wd · θ_t                       (coupled L2, as the official code)
        G    : ring buffer of the last m gradients (rows; zero rows until m steps were taken)
        F̂_t  = λ I + (1/m) Σ_{i=1..m} g_i g_iᵀ          (zero rows add nothing; the 1/m stays)
        u_t  = F̂_t⁻¹ g_t = g_t / λ − Gᵀ c,  c = λ⁻² (λ⁻¹ G Gᵀ + m I)⁻¹ G g_t
        v_t  = μ v_{t−1} + (1 − μ) u_t   if momentum μ > 0 (v_0 = 0),   else v_t = u_t
        θ_{t+1} = θ_t − lr · v_t

    Each step replaces the oldest row of ``G`` with ``g_t``, refreshes one row and column of
    ``G Gᵀ`` (``O(d m)``), refactors the ``m × m`` system (``O(m³)``, see :func:`mfac_coefficients`)
    and applies ``F̂⁻¹`` (``O(d m + m²)``): two passes over ``G`` per step, no ``d × d`` matrix.

    Cost per window length ``m`` (``d`` parameters, ``b`` bytes per entry: 4 in float32):

    * memory: the window ``m · d · b`` bytes (``4 m`` bytes per float32 parameter), ``G Gᵀ``
      ``m² · b`` bytes, the momentum buffer ``d · b`` if ``momentum > 0``;
    * time: two passes over the window per step (``G g`` and ``Gᵀ c``, ``O(m d)``) and one
      ``m × m`` Cholesky factorization (``O(m³)``, negligible next to ``m d`` for ``m ≪ d``).

    Measured at 1M parameters (``benchmarks/optim_step_time.py``, CPU, 1 thread, medians of
    interleaved steps, quiet machine: load average 0.6–1.1 on 2 cores), step time ÷ torch's
    ``AdamW(foreach=True)`` and state bytes per parameter (an earlier run under load 9–14 gave
    1.3, 2.0, 3.3, 6.1, 12 and 94: the ratios move with the reference's own time):

    ==========  =====  =====  =====  =====  =====  ======
    ``m``         8     16     32     64    128    1024
    time ×      1.8    2.8    4.8    8.4    16     127
    B/param      32     64    128    256    512    4,100
    ==========  =====  =====  =====  =====  =====  ======

    Hence the default ``num_grads=32`` (the smallest window the official CUDA coefficient
    kernel accepts, ``m % 32 == 0``), not the official ``1024``: the authors run 512 (README) to
    1024 (``ngrads`` default, their BERT fine-tuning) on GPUs; pass ``num_grads=1024`` for that
    setting when the memory (``4 m d`` bytes) and time allow.

    Several param groups get separate windows (a block-diagonal F̂ over the groups), so
    ``num_grads``, ``damp``, ``momentum`` and ``weight_decay`` are per-group hyper-parameters.
    Parameters without a gradient in a step are not updated and contribute a zero block to that
    step's window row. Learning rates are not comparable to SGD's: outside the span of the window
    F̂⁻¹ ≈ I / λ, so ``lr = 1e-3`` with ``damp = 1e-5`` is a step of 100 along such directions (the
    official defaults).

    Deviations from the official ``optim.MFAC``: pure torch (no CUDA kernel, runs on CPU); the
    ``m × m`` system is factored by Cholesky in float64 instead of float32 LU without pivoting (same
    matrix, better conditioned arithmetic); one window per param group; no ``sparse`` mode, no
    multi-GPU split of the window; parameters keep their dtype (the official window is float32);
    the default window is 32 gradients, not 1024 (above).

    Args:
        params: parameters or param groups.
        lr: learning rate (default ``1e-3``, official).
        momentum: μ in ``[0, 1)`` (default ``0``, official).
        weight_decay: coupled L2 coefficient added to the gradient before the window (default 0).
        num_grads: window length ``m ≥ 1`` (default ``32``; official ``ngrads`` default
            ``1024``; cost above).
        damp: damping ``λ > 0`` (default ``1e-5``, official).
        on_nonfinite: ``"raise"`` | ``"skip"`` | ``"ignore"``, see ``curvlab.optim._validation``.

    State: per parameter ``"step"`` (float32 scalar: the steps its window row took part in; the
    group's ring position is the largest of them modulo ``m``), ``"grad_window"`` (``[m, numel]``)
    and ``"momentum_buffer"`` (if ``momentum > 0``); ``"dots"`` (``G Gᵀ``, ``[m, m]``) in the
    group's first parameter with state.

    Raises:
        ParameterError: an invalid hyper-parameter, or parameters of one group on different
            devices/dtypes.
        NonFiniteError: a NaN/inf gradient under ``on_nonfinite="raise"``; nothing is changed.
        StateDictError: ``load_state_dict`` with another optimizer's state, other shapes or
            another ``num_grads``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = MFAC(model.parameters(), lr=1e-2, num_grads=8, damp=1e-2)
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     torch.nn.functional.mse_loss(model(x), y).backward()
        ...     opt.step()
        >>> opt.state[model.weight]["grad_window"].shape
        torch.Size([8, 4])

    Paper: Frantar, Kurtic, Alistarh 2021, "M-FAC: Efficient Matrix-Free Approximations of
    Second-Order Information", arXiv 2107.03356.
    """

    closure_mode: ClassVar[str] = "backward"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        num_grads: int = 32,
        damp: float = 1e-5,
        *,
        on_nonfinite: str = "raise",
    ) -> None:
        defaults = {
            "num_grads": num_grads,
            "damp": damp,
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "on_nonfinite": on_nonfinite,
            "nonfinite_skips": 0,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group: one window, so one dtype and device; hyper-parameters validated."""
        add_param_group_checked(self, param_group, _validate_group)

    def _init_group(self, group: dict[str, Any], *lists: list[Any]) -> Tensor:
        """Create the state lazily; append every parameter that takes part (a gradient, or a window
        whose row is zeroed) to ``lists = (params, grads, windows, momentum_buffers, state_steps)``;
        return the group's ``G Gᵀ``.
        """
        m = int(group["num_grads"])
        dots = next(
            (st["dots"] for p in group["params"] if "dots" in (st := self.state.get(p, {}))), None
        )
        for p in group["params"]:
            if p.grad is None and p not in self.state:
                continue
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["grad_window"] = torch.zeros((m, p.numel()), dtype=p.dtype, device=p.device)
            if dots is None:
                dots = st["dots"] = torch.zeros((m, m), dtype=p.dtype, device=p.device)
            if group["momentum"] > 0.0 and p.grad is not None and "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            entries = (p, p.grad, st["grad_window"], st.get("momentum_buffer"), st["step"])
            for lst, entry in zip(lists, entries):
                lst.append(entry)
        assert dots is not None
        return dots

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state_dict saved by :class:`MFAC` on parameters of the same shapes.

        Raises:
            StateDictError: the state_dict comes from another optimizer, another model, or its
                windows do not fit the param groups' ``num_grads``.
        """
        load_state_dict_checked(
            self,
            state_dict,
            state_keys=_STATE_KEYS,
            param_shaped_keys=("momentum_buffer",),
            free_shape_keys=("grad_window", "dots"),
            check_shapes=functools.partial(_check_window_shapes, self),
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One M-FAC step; ``closure`` (optional) zeroes grads, calls backward, returns the loss."""
        loss, proceed = start_step(self, closure)
        if not proceed:
            return loss
        for group in self.param_groups:
            if any(p.grad is not None for p in group["params"]):
                lists: tuple[list[Any], ...] = ([], [], [], [], [])
                dots = self._init_group(group, *lists)
                row = group_step(self, group) % int(group["num_grads"])
                hyper: MFACHyper = group_options(group, MFACHyper)
                with full_precision():  # the window's products in the gradients' dtype
                    mfac(*lists, dots=dots, row=row, scratch=self, **hyper)
        return loss


def mfac(
    *lists: list[Any],
    dots: Tensor,
    row: int,
    scratch: object | None = None,
    **hyper: Unpack[MFACHyper],
) -> None:
    """Functional API that performs the M-FAC computation; see :class:`MFAC`.

    ``lists``: ``params, grads, windows, momentum_buffers, state_steps``, equally long. Writes
    each gradient (with coupled weight decay; zeros where ``grads[i]`` is ``None``) into
    ``row`` of its window, refreshes ``dots`` (``G Gᵀ``), then updates the parameters with a
    gradient, their ``momentum_buffers`` and every ``state_steps`` entry in place. There is no
    multi-tensor path: the window products are already one matrix-vector product per tensor.
    ``scratch``: the owner of a reusable buffer for the d-sized IHVP (:mod:`._scratch`).
    ``hyper``: see :class:`MFACHyper`.
    """
    _single_tensor_mfac(*lists, dots=dots, row=row, scratch=scratch, **hyper)


def _single_tensor_mfac(
    *lists: list[Any], dots: Tensor, row: int, scratch: object | None, **hyper: Unpack[MFACHyper]
) -> None:
    """The M-FAC rule of the class docstring, one tensor at a time (the reference)."""
    params, grads, windows, momentum_buffers, state_steps = lists
    lr, momentum, damp = hyper["lr"], float(hyper["momentum"]), float(hyper["damp"])
    weight_decay = float(hyper["weight_decay"])
    m = dots.shape[0]
    low = dots.dtype in (torch.float16, torch.bfloat16)
    acc_dtype = torch.float32 if low else dots.dtype

    # 1. write g_t (with coupled weight decay) into the row of every window; gx = G g_t.
    entries: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []  # (param, g, window, buf)
    gx = torch.zeros(m, dtype=acc_dtype, device=dots.device)
    for p, grad, window, buf in zip(params, grads, windows, momentum_buffers):
        if grad is None:
            window[row].zero_()
            continue
        g = grad.reshape(-1)
        if weight_decay != 0.0:
            g = g.add(p.reshape(-1), alpha=weight_decay)
        window[row].copy_(g)
        if low:
            gx.add_(window.float() @ g.float())
        else:
            gx.add_(window @ g)
        entries.append((p, g, window, buf))

    # 2. refresh row and column `row` of G Gᵀ, factor the m × m system, solve.
    dots[row].copy_(gx)
    dots[:, row].copy_(gx)
    c = mfac_coefficients(dots, gx, damp, m).to(acc_dtype)

    # 3. u = g / λ − Gᵀ c, momentum, parameter update.
    for p, g, window, buf in entries:
        if low:
            u = torch.addmv(g.float(), window.float().t(), c, beta=1.0 / damp, alpha=-1.0)
            u = u.to(p.dtype)
        else:
            u = workspace(scratch, g) if scratch is not None else torch.empty_like(g)
            torch.addmv(g, window.t(), c, beta=1.0 / damp, alpha=-1.0, out=u)
        u = u.view_as(p)
        if momentum > 0.0:
            assert buf is not None
            buf.mul_(momentum).add_(u, alpha=1.0 - momentum)
            u = buf
        if isinstance(lr, Tensor):
            p.sub_(u * lr)
        else:
            p.add_(u, alpha=-lr)
    torch._foreach_add_(state_steps, torch.tensor(1.0), alpha=1.0)


def _check_window_shapes(opt: MFAC, state_dict: Mapping[str, Any]) -> None:
    """Windows are ``[num_grads, numel]`` and ``dots`` is ``[num_grads, num_grads]``."""
    for sg, g in zip(state_dict["param_groups"], opt.param_groups):
        m = int(sg["num_grads"])
        for pid, p in zip(sg["params"], g["params"]):
            st = state_dict["state"].get(pid, {})
            w = st.get("grad_window")
            if isinstance(w, Tensor) and tuple(w.shape) != (m, p.numel()):
                raise StateDictError(
                    f"state 'grad_window' of a parameter of shape {tuple(p.shape)} has "
                    f"shape {tuple(w.shape)}, expected {(m, p.numel())}: the state_dict was "
                    "saved for a model with different parameter shapes or another num_grads"
                )
            d = st.get("dots")
            if isinstance(d, Tensor) and tuple(d.shape) != (m, m):
                raise StateDictError(
                    f"state 'dots' has shape {tuple(d.shape)}, expected {(m, m)} (num_grads="
                    f"{m}); the state_dict was saved with another window length"
                )


def _validate_group(group: Mapping[str, Any]) -> None:
    ps = group["params"]
    if any(p.dtype != ps[0].dtype or p.device != ps[0].device for p in ps):
        raise ParameterError(
            "MFAC keeps one gradient window per param group, so all parameters of a group "
            "must share one dtype and device; put parameters of other dtypes/devices into "
            "their own param group"
        )
    if not all(p.is_floating_point() for p in ps):
        raise ParameterError("MFAC optimizes floating-point parameters only")
    validate_standard(group, "lr", "weight_decay", "on_nonfinite")
    validate_in_range(
        "momentum", group["momentum"], 0, 1, hi_open=True, hint="; use 0 to disable momentum"
    )
    validate_int(
        "num_grads", group["num_grads"], 1, " (the gradient window length); e.g. num_grads=32"
    )
    validate_positive("damp", group["damp"], "; it is the λ of F = λI + (1/m) Σ g gᵀ, e.g. 1e-5")


def mfac_coefficients(dots: Tensor, gx: Tensor, damp: float, num_grads: int) -> Tensor:
    """Coefficients ``c`` with ``F̂⁻¹ x = x / λ − Gᵀ c`` for the damped empirical Fisher of a window.

    With the window ``G = [g_1 … g_m]ᵀ`` (``m × d``) and ``F̂ = λ I + (1/m) Gᵀ G``, the Woodbury
    identity gives ``F̂⁻¹ = λ⁻¹ I − λ⁻² Gᵀ K⁻¹ G`` with the ``m × m`` matrix ``K = λ⁻¹ G Gᵀ + m I``.
    The official dynamic algorithm factors ``K`` by LU without pivoting (its ``U`` minus ``m I`` is
    the paper's matrix ``D``, its unit lower factor gives the coefficient matrix ``B = λ⁻¹ L⁻¹``),
    then ``F̂⁻¹ x = λ⁻¹ x − Gᵀ Bᵀ diag(1/(m + D_ii)) B G x``. ``K`` is symmetric positive definite,
    so that factorization equals ``LDLᵀ``, obtained here from a Cholesky factor
    (``torch.linalg.cholesky``, CPU and CUDA; LU without pivoting exists in torch only on CUDA).
    ``K`` is factored in float64. Cost: ``O(m³)`` for the factorization and ``O(m²)`` for the
    solve; the caller pays ``O(d m)`` for ``G x`` and ``Gᵀ c``.

    Args:
        dots: ``G Gᵀ``, shape ``[m, m]``.
        gx: ``G x``, shape ``[m]``.
        damp: the damping ``λ > 0``.
        num_grads: ``m``, the window length (the ``1/m`` of the Fisher; zero rows count).

    Returns:
        ``c = λ⁻² K⁻¹ G x``, shape ``[m]``, dtype float64 (float32 on MPS).

    Example:
        >>> G = torch.eye(2, 3, dtype=torch.float64)   # two gradients e_1, e_2 in R^3
        >>> x = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
        >>> c = mfac_coefficients(G @ G.T, G @ x, damp=0.5, num_grads=2)
        >>> x / 0.5 - G.T @ c       # F = 0.5 I + 0.5 diag(1, 1, 0) -> F⁻¹ x = (1, 1, 2)
        tensor([1., 1., 2.], dtype=torch.float64)

    Paper: Frantar, Kurtic, Alistarh 2021, arXiv 2107.03356 (Section 3.3, dynamic algorithm).
    """
    return mfac_coefficient_matrix(dots, gx.unsqueeze(1), damp, num_grads).squeeze(1)


def mfac_coefficient_matrix(dots: Tensor, gX: Tensor, damp: float, num_grads: int) -> Tensor:
    """:func:`mfac_coefficients` for ``k`` vectors at once: ``C = λ⁻² K⁻¹ G X`` from one factor.

    The ``m × m`` matrix ``K`` is factored once and the ``k`` right-hand sides are solved together
    (``O(m³ + m² k)``), so ``F̂⁻¹ X = X / λ − Gᵀ C``; with ``X = I`` this gives the whole inverse.

    Args:
        dots: ``G Gᵀ``, shape ``[m, m]``.
        gX: ``G X``, shape ``[m, k]``.
        damp: the damping ``λ > 0``.
        num_grads: ``m``, the window length.

    Returns:
        ``C``, shape ``[m, k]``, dtype float64 (float32 on MPS).

    Example:
        >>> G = torch.eye(2, 3, dtype=torch.float64)
        >>> C = mfac_coefficient_matrix(G @ G.T, G, damp=0.5, num_grads=2)   # X = I
        >>> torch.eye(3, dtype=torch.float64) / 0.5 - G.T @ C   # F⁻¹ = diag(1, 1, 2)
        tensor([[1., 0., 0.],
                [0., 1., 0.],
                [0., 0., 2.]], dtype=torch.float64)
    """
    m = num_grads
    lam_inv = 1.0 / damp
    wide = torch.float32 if dots.device.type == "mps" else torch.float64  # MPS has no float64
    k = dots.to(wide) * lam_inv
    k.diagonal().add_(float(m))
    chol, _ = torch.linalg.cholesky_ex(k)
    sol = torch.cholesky_solve(gX.to(wide), chol)
    return sol.mul_(lam_inv * lam_inv)
