r"""1-bit Adam: Adam whose momentum is communicated with error-compensated 1-bit compression.

The model is *not* wrapped in DDP: the optimizer communicates. With ``W`` ranks, local gradient
:math:`g^{(r)}_t` on rank ``r``, and :math:`C` the 1-bit compressor of
:func:`~curvlab.distributed._compress.onebit_allreduce`:

.. math::
   \begin{aligned}
   &\textbf{warm-up } (t \le T_\text{freeze}):\quad g_t = \tfrac{1}{W}\textstyle\sum_r g^{(r)}_t
      \ \text{(full-precision all-reduce)};\quad m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t;
      \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
   &\textbf{compression } (t > T_\text{freeze}):\quad v_t = v_{T_\text{freeze}} \text{ (frozen)};
      \quad m_t = \operatorname{onebit\_allreduce}\big(\beta_1 m_{t-1} + (1-\beta_1) g^{(r)}_t;
      \ e_w, e_s\big) \\
   &\theta_t = \theta_{t-1} - \gamma\Big(\frac{m_t}{\sqrt{v_t} + \epsilon} + \lambda\theta_{t-1}\Big)
      \qquad \text{(no bias correction)}
   \end{aligned}

``onebit_allreduce`` (DeepSpeed's ``compressed_allreduce``): each rank adds its worker error
:math:`e_w` to its (zero-padded) momentum, sends sign bits and one scale
:math:`\|b\|_2/\sqrt{\dim b}`, keeps the residual as the new worker error; rank ``r`` is the
"server" of chunk ``r``: it averages the chunks it received, adds its server error :math:`e_s`,
compresses again (residual kept) and all-gathers the result. After the exchange every rank holds
the same momentum.

Communication (per tensor of ``n`` elements, ``W`` ranks): during warm-up one all-reduce of
the gradients; afterwards an ``all_to_all`` of ``n/8`` bytes of signs plus ``all_gather``\ s of
the ``n/(8W)`` server sign bytes and of the scales — about 1/32 of an fp32 all-reduce.

Source read: ``microsoft/DeepSpeed`` ``deepspeed/runtime/fp16/onebit/adam.py`` and
``deepspeed/runtime/comm/nccl.py`` (``compressed_allreduce``). Deviations, all deliberate: no
"initialisation" step (DeepSpeed's first ``step`` updates ``m, v`` but not the parameters); the
error buffers are saved in ``state_dict`` and restored by ``load_state_dict`` (DeepSpeed resets
them on load; here every rank saves and loads its own state, with the same world size); the
warm-up all-reduce is done by the optimizer (DeepSpeed's engine does it); the phase is decided per
parameter by its own step count; signs are packed with torch bit operations instead of cupy; no
``exp_avg_mask`` and no ``"non_freeze"`` groups; with one rank nothing is compressed (as
DeepSpeed). Non-finite gradients are not checked: a rank that skipped a step would desynchronise
the collectives.

Paper: Tang, Gan, Rajbhandari, Lian, Zhang, Liu, He, "1-bit Adam: Communication Efficient
Large-Scale Training with Adam's Convergence Speed", ICML 2021, arXiv 2102.02888.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlab.distributed._comm import Comm, resolve_comm
from curvlab.distributed._compress import onebit_allreduce, onebit_sizes
from curvlab.errors import ParameterError, StateDictError
from curvlab.optim._validation import (
    check_state_dict,
    validate_betas,
    validate_eps,
    validate_lr,
    validate_weight_decay,
)

__all__ = ["OneBitAdam", "onebit_adam"]

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "worker_error", "server_error")
_SHAPED_KEYS = ("exp_avg", "exp_avg_sq")
_ERROR_KEYS = ("worker_error", "server_error")


def onebit_adam(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    comm: Comm,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    freeze_step: int,
) -> None:
    """One 1-bit Adam step on every rank (the rule in the module docstring).

    ``states[i]`` holds ``"step"`` (float32 scalar, completed steps), ``"exp_avg"``,
    ``"exp_avg_sq"`` and, from the first compressed step, ``"worker_error"`` (padded length) and
    ``"server_error"`` (one server chunk); all are updated in place, as are ``params``. Each
    product and sum is a separate operation, in the order of the formulas (no fused
    multiply-adds), so that a plain reference reproduces it bit for bit. The
    gradients of parameters still in warm-up are averaged by one all-reduce of their
    concatenation; ``grads`` are not modified. Every rank must call it with the same parameters.
    """
    warm = [i for i, st in enumerate(states) if float(st["step"]) < freeze_step]
    avg = {i: g for i, g in enumerate(grads)}
    if warm and comm.world > 1:
        flat = torch.cat([grads[i].reshape(-1) for i in warm])
        comm.all_reduce_sum(flat)
        flat /= comm.world
        for i, part in zip(warm, flat.split([grads[i].numel() for i in warm])):
            avg[i] = part.view_as(grads[i])
    for i, (p, st) in enumerate(zip(params, states)):
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.mul_(beta1).add_(avg[i] * (1 - beta1))
        if i in warm:
            v.mul_(beta2).add_(avg[i] * avg[i] * (1 - beta2))
        elif comm.world > 1:
            if "worker_error" not in st:
                padded, chunk = onebit_sizes(p.numel(), comm.world)
                st["worker_error"] = p.new_zeros(padded)
                st["server_error"] = p.new_zeros(chunk)
            m.copy_(onebit_allreduce(m, st["worker_error"], st["server_error"], comm))
        update = m / (v.sqrt() + eps)
        if weight_decay != 0:
            update.add_(p * weight_decay)
        p.sub_(update * lr)
        st["step"] += 1


class OneBitAdam(Optimizer):
    r"""1-bit Adam (Tang et al., ICML 2021): Adam warm-up, then frozen variance and 1-bit momentum.

    Rule (module docstring): for the first ``freeze_step`` steps, Adam without bias correction on
    the gradients averaged by a full-precision all-reduce; afterwards :math:`v` is frozen and the
    momentum, updated with the *local* gradient, is averaged by error-compensated 1-bit
    compression (worker and server error buffers, as DeepSpeed). Do not wrap the model in DDP.

    Args:
        params: parameters or param groups (the same, in the same order, on every rank).
        lr: learning rate γ (default 1e-3).
        betas: (β1, β2), each in [0, 1) (default (0.9, 0.999)).
        eps: added to √v (default 1e-8).
        weight_decay: λ ≥ 0, applied as γλθ (default 0).
        freeze_step: number of full-precision warm-up steps, an int ≥ 0 (default 100000, as
            DeepSpeed; use enough steps for v to settle — with 0, v stays 0).
        process_group: the ``torch.distributed`` group (default ``None``: the world), or a
            simulated rank from :class:`curvlab.distributed._comm.SimulatedWorld` for tests.

    State (per parameter): ``"step"``, ``"exp_avg"`` (m), ``"exp_avg_sq"`` (v) and, once
    compressing, ``"worker_error"`` and ``"server_error"`` (flat, padded). Each rank's state is its
    own: save and load it per rank, with the same world size.

    Raises:
        DistributedError: ``torch.distributed`` is not initialised.
        ParameterError: invalid hyper-parameters, or a sparse gradient at ``step``.
        StateDictError: ``load_state_dict`` with another optimizer's state, other shapes, or error
            buffers saved under another world size.

    Example (under ``torchrun``, model not wrapped in DDP)::

        opt = OneBitAdam(model.parameters(), lr=1e-3, freeze_step=1000)
        loss_fn(model(x_local), y_local).backward()
        opt.step()

    Paper: Tang et al., arXiv 2102.02888; code: microsoft/DeepSpeed ``runtime/fp16/onebit/adam.py``.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        freeze_step: int = 100000,
        process_group: Any = None,
    ) -> None:
        validate_lr(lr)
        betas = validate_betas(betas)  # type: ignore[assignment]
        validate_eps(eps)
        validate_weight_decay(weight_decay)
        if (
            not isinstance(freeze_step, numbers.Integral)
            or isinstance(freeze_step, bool)
            or freeze_step < 0
        ):
            raise ParameterError(
                f"freeze_step must be an int >= 0 (the number of full-precision warm-up steps), "
                f"got {freeze_step!r}; DeepSpeed's default is 100000"
            )
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.freeze_step: int = int(freeze_step)
        self.comm: Comm = resolve_comm(process_group, "a OneBitAdam")

    def _init_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[Any]
    ) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ParameterError("OneBitAdam does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            states.append(state)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Take one step (communicating); the optional ``closure`` re-evaluates and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            states: list[Any] = []
            self._init_group(group, params, grads, states)
            if not params:
                continue
            beta1, beta2 = group["betas"]
            onebit_adam(
                params,
                grads,
                states,
                comm=self.comm,
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                freeze_step=self.freeze_step,
            )
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's saved state (errors included); StateDictError for any other state."""
        stripped = dict(state_dict)
        if isinstance(state_dict.get("state"), dict):
            stripped["state"] = {
                k: {n: v for n, v in st.items() if n not in _ERROR_KEYS}
                for k, st in state_dict["state"].items()
            }
        check_state_dict(self, stripped, state_keys=_STATE_KEYS, param_shaped_keys=_SHAPED_KEYS)
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for pid, p in zip(ids, params):
            st = state_dict["state"].get(pid, {})
            if "worker_error" not in st:
                continue
            want = onebit_sizes(p.numel(), self.comm.world)
            got = (st["worker_error"].numel(), st["server_error"].numel())
            if got != want:
                raise StateDictError(
                    f"the error buffers of a parameter with {p.numel()} elements have sizes "
                    f"{got}, not {want}: the state_dict was saved with another world size "
                    f"(this one has {self.comm.world} ranks); resume with the same number of ranks"
                )
        Optimizer.load_state_dict(self, state_dict)
