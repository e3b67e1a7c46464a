"""M-FAC: preconditioning by the inverse empirical Fisher of a sliding window of gradients.

Frantar, Kurtic, Alistarh 2021, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", arXiv 2107.03356 (NeurIPS 2021). Official code: IST-DASLab/M-FAC ``optim.py``
(classes ``HInvFastUpMulti`` and ``MFAC``), read at commit 8116367.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlab.errors import ParameterError, StateDictError
from curvlab.optim._scratch import workspace
from curvlab.optim._validation import (
    check_finite_grads,
    check_state_dict,
    grads_of,
    validate_lr,
    validate_on_nonfinite,
    validate_positive,
    validate_weight_decay,
)

__all__ = ["MFAC", "mfac_coefficients", "mfac_coefficient_matrix"]

#: Per-parameter state keys (``"step"`` and ``"dots"`` live only in each group's anchor parameter).
_STATE_KEYS = ("grad_window", "momentum_buffer", "step", "dots")


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

    Memory: ``m · d`` floats for the window (``4 m`` bytes per parameter in float32, 128 B at
    ``m = 32``, 4 KiB at the official default ``m = 1024``), ``m²`` for ``G Gᵀ`` and ``d`` for the
    momentum buffer if ``momentum > 0``.

    Several param groups get separate windows (a block-diagonal F̂ over the groups), so
    ``num_grads``, ``damp``, ``momentum`` and ``weight_decay`` are per-group hyper-parameters.
    Parameters without a gradient in a step are not updated and contribute a zero block to that
    step's window row. Learning rates are not comparable to SGD's: outside the span of the window
    F̂⁻¹ ≈ I / λ, so ``lr = 1e-3`` with ``damp = 1e-5`` is a step of 100 along such directions (the
    official defaults).

    Deviations from the official ``optim.MFAC``: pure torch (no CUDA kernel, runs on CPU); the
    ``m × m`` system is factored by Cholesky in float64 instead of float32 LU without pivoting (same
    matrix, better conditioned arithmetic); one window per param group; no ``sparse`` mode, no
    multi-GPU split of the window; parameters keep their dtype (the official window is float32).

    Args:
        params: parameters or param groups.
        lr: learning rate (default ``1e-3``, official).
        momentum: μ in ``[0, 1)`` (default ``0``, official).
        weight_decay: coupled L2 coefficient added to the gradient before the window (default 0).
        num_grads: window length ``m ≥ 1`` (official ``ngrads``, default ``1024``).
        damp: damping ``λ > 0`` (default ``1e-5``, official).
        on_nonfinite: ``"raise"`` | ``"skip"`` | ``"ignore"``, see ``curvlab.optim._validation``.

    Raises:
        ParameterError: an invalid hyper-parameter, or parameters of one group on different
            devices/dtypes.

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
        num_grads: int = 1024,
        damp: float = 1e-5,
        on_nonfinite: str = "raise",
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "num_grads": num_grads,
            "damp": damp,
            "on_nonfinite": on_nonfinite,
        }
        _validate(defaults)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _validate(group)
            ps = group["params"]
            if any(p.dtype != ps[0].dtype or p.device != ps[0].device for p in ps):
                raise ParameterError(
                    "MFAC keeps one gradient window per param group, so all parameters of a group "
                    "must share one dtype and device; put parameters of other dtypes/devices into "
                    "their own param group"
                )
            if not all(p.is_floating_point() for p in ps):
                raise ParameterError("MFAC optimizes floating-point parameters only")

    # ------------------------------------------------------------------ state
    def _anchor(self, group: dict[str, Any]) -> Tensor | None:
        """The parameter whose state holds the group's ``step`` and ``dots`` (None before)."""
        for p in group["params"]:
            st = self.state.get(p)
            if st is not None and "dots" in st:
                return p
        return None

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state_dict saved by :class:`MFAC` on parameters of the same shapes.

        Raises:
            StateDictError: the state_dict comes from another optimizer, another model, or its
                windows do not fit the param groups' ``num_grads``.
        """
        plain = {
            "param_groups": state_dict.get("param_groups", None)
            if isinstance(state_dict, Mapping)
            else None,
            "state": {},
        }
        if isinstance(state_dict, Mapping) and "state" in state_dict:
            plain["state"] = {
                pid: {k: v for k, v in st.items() if k not in ("grad_window", "dots")}
                for pid, st in state_dict["state"].items()
            }
            for pid, st in state_dict["state"].items():
                extra = sorted(set(st) - set(_STATE_KEYS))
                if extra:
                    raise StateDictError(
                        f"state of parameter id {pid!r} has keys {extra} that MFAC does not use "
                        f"(it uses {sorted(_STATE_KEYS)}): the state_dict was saved from another "
                        "optimizer; load it into that optimizer instead"
                    )
        check_state_dict(
            self,
            plain if plain["param_groups"] is not None else state_dict,
            state_keys=_STATE_KEYS,
            param_shaped_keys=("momentum_buffer",),
        )
        for sg, g in zip(state_dict["param_groups"], self.param_groups):
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
        super().load_state_dict(dict(state_dict))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One M-FAC step; ``closure`` (optional) zeroes grads, calls backward, returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads_of(self.param_groups)  # raises on sparse gradients
        step_no = 1
        for group in self.param_groups:
            anchor = self._anchor(group)
            if anchor is not None:
                step_no = int(self.state[anchor]["step"]) + 1
                break
        if not check_finite_grads(self.param_groups, step=step_no):
            return loss
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict[str, Any]) -> None:
        params = group["params"]
        if not any(p.grad is not None for p in params):
            return
        m = int(group["num_grads"])
        damp = float(group["damp"])
        wd = float(group["weight_decay"])
        mu = float(group["momentum"])
        lr = group["lr"]
        anchor = self._anchor(group)
        if anchor is None:
            anchor = next(p for p in params if p.grad is not None)
            st = self.state[anchor]
            st["step"] = torch.tensor(0.0)
            st["dots"] = torch.zeros((m, m), dtype=anchor.dtype, device=anchor.device)
        gstate = self.state[anchor]
        j = int(gstate["step"]) % m
        low = anchor.dtype in (torch.float16, torch.bfloat16)
        acc_dtype = torch.float32 if low else anchor.dtype

        # 1. write g_t (with coupled weight decay) into row j of every window; gx = G g_t.
        entries: list[tuple[Tensor, Tensor, Tensor]] = []  # (param, flat g, window)
        gx = torch.zeros(m, dtype=acc_dtype, device=anchor.device)
        for p in params:
            st = self.state[p] if (p.grad is not None or p in self.state) else None
            if st is None:
                continue
            if "grad_window" not in st:
                st["grad_window"] = torch.zeros((m, p.numel()), dtype=p.dtype, device=p.device)
            window = st["grad_window"]
            if p.grad is None:
                window[j].zero_()
                continue
            g = p.grad.reshape(-1)
            if wd != 0.0:
                g = g.add(p.reshape(-1), alpha=wd)
            window[j].copy_(g)
            if low:
                gx.add_(window.float() @ g.float())
            else:
                gx.add_(window @ g)
            entries.append((p, g, window))

        # 2. refresh row and column j of G Gᵀ, factor the m × m system, solve.
        dots = gstate["dots"]
        dots[j].copy_(gx)
        dots[:, j].copy_(gx)
        c = mfac_coefficients(dots, gx, damp, m).to(acc_dtype)

        # 3. u = g / λ − Gᵀ c, momentum, parameter update.
        for p, g, window in entries:
            if low:
                u = torch.addmv(g.float(), window.float().t(), c, beta=1.0 / damp, alpha=-1.0)
                u = u.to(p.dtype)
            else:
                u = workspace(self, g)  # reused buffer: no fresh d-sized temporary per step
                torch.addmv(g, window.t(), c, beta=1.0 / damp, alpha=-1.0, out=u)
            u = u.view_as(p)
            if mu > 0.0:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = st["momentum_buffer"]
                buf.mul_(mu).add_(u, alpha=1.0 - mu)
                u = buf
            if isinstance(lr, Tensor):
                p.sub_(u * lr)
            else:
                p.add_(u, alpha=-lr)
        gstate["step"] += 1


def _validate(group: Mapping[str, Any]) -> None:
    validate_lr(group["lr"])
    validate_weight_decay(group["weight_decay"])
    validate_on_nonfinite(group["on_nonfinite"])
    mu = group["momentum"]
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0.0 <= mu < 1.0:
        raise ParameterError(
            f"momentum must be a number in [0, 1), got {mu!r}; use 0 to disable momentum"
        )
    m = group["num_grads"]
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ParameterError(
            f"num_grads must be an int >= 1 (the gradient window length), got {m!r}; "
            "e.g. num_grads=32"
        )
    validate_positive("damp", group["damp"], "; it is the λ of F = λI + (1/m) Σ g gᵀ, e.g. 1e-5")
