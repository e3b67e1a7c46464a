r"""DoG and L-DoG: parameter-free step sizes from the distance travelled over the gradients seen.

.. math::
   \begin{aligned}
   &\textbf{input}: x_0,\ r_\epsilon\text{-rule } \rho \text{ (reps\_rel)},
       \ c \text{ (lr, default 1)},\ \epsilon,\ \lambda \text{ (weight decay)} \\
   &\textbf{for } t = 0, 1, \ldots: \\
   &\quad g_t \leftarrow \nabla f(x_t) + \lambda x_t \\
   &\quad \bar r_t \leftarrow \begin{cases} \rho\,(1 + \lVert x_0 \rVert) & t = 0 \\
       \max(\bar r_{t-1},\ \lVert x_t - x_0 \rVert) & t \ge 1 \end{cases} \qquad
       G_t \leftarrow \epsilon + \textstyle\sum_{i \le t} \lVert g_i \rVert^2 \\
   &\quad \eta_t \leftarrow c\, \bar r_t / \sqrt{G_t}
       \qquad (\eta_0 \leftarrow \text{init\_eta} \text{ if given; then } \bar r_0 = 0) \\
   &\quad x_{t+1} \leftarrow x_t - \eta_t\, g_t \\
   \end{aligned}

DoG takes the norms over all the parameters of a param group as one vector; L-DoG (layer-wise) keeps
:math:`\bar r, G, \eta` per parameter tensor. The authors stress that the reported results need
iterate averaging: use :class:`PolynomialDecayAverager` (γ = 8) next to the optimizer.

Faithful to formll/dog ``src/dog/dog.py`` (v1.0.3, commit 8d45cf5): the r_ε rule ``reps_rel * (1 +
‖x0‖)``, ``eps`` added once to G at the first step, ``lr`` = c = 1, the first-step ``init_eta``
override (which sets ``reps_rel`` to 0), weight decay added to the gradient before the norms.
Deliberate differences: ``p.grad`` is not modified in place by weight decay; no assertion (and no
device-to-host synchronisation) in the update: :math:`\bar r`, :math:`G`, :math:`\eta` stay tensors
on the parameters' device; the distance and the norms cover the parameters that have had a gradient
(the official code needs every parameter of the group to have one); state lives in ``state`` (x0,
r̄, G per parameter; DoG writes the same group scalars into every parameter's state), so
``state_dict``, ``copy.deepcopy`` and ``pickle`` keep everything.

Low precision (bfloat16/float16 parameters): DoG's first steps are tiny by design (the first step
moves the parameters by :math:`r_\epsilon \approx 10^{-6}(1 + \lVert x_0 \rVert)`), far below the
resolution of a bfloat16 number (:math:`2^{-8}` relative), so an update applied in bfloat16 rounds
away, the distance stays 0 and the parameters never move (official code included). curvlab keeps a
float32 copy ``"x_float32"`` of each half-precision parameter (4 bytes per parameter): the update
is applied to it and the parameter is its rounding; distances, gradient-norm sums and η are float32
scalars. The iterates then track a float32 run within bfloat16 rounding. (The parameter is set
from that copy at every step: an in-place change of a half-precision parameter made outside the
optimizer is overwritten.)

Paper: Ivgi, Hinder, Carmon, "DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size
Schedule", ICML 2023, arXiv 2302.12022. Averaging: Shamir & Zhang, ICML 2013 (polynomial-decay
averaging).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from curvlab.errors import ParameterError, StateDictError
from curvlab.optim._dispatch import KernelChoice, split_choice
from curvlab.optim._fused import accumulate_dtype, fused_foreach, validate_fused
from curvlab.optim._scratch import block_ranges, workspace_rows
from curvlab.optim._validation import (
    check_finite_grads,
    grads_of,
    group_options,
    load_state_dict_checked,
    next_step_number,
    run_closure,
    validate_nonnegative,
    validate_positive,
    validate_standard,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["DoG", "DoGHyper", "DoGOptions", "LDoG", "PolynomialDecayAverager", "dog"]

_STATE_KEYS = ("step", "x0", "x_float32", "rbar", "G")
_SHAPED_KEYS = ("x0", "x_float32")
#: saved in their own dtype (float32 scalars and copies next to half-precision parameters)
_KEEP_DTYPE_KEYS = ("rbar", "G", "x_float32")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
#: CPU: tensors with at least this many entries take ``x - x0`` through the scratch buffer.
_SCRATCH_NUMEL = 65536
#: block of the CPU distance ‖x − x0‖ (a 256 KiB float32 row: stays in L2 with x and x0's block)
_BLOCK = 1 << 16


class DoGHyper(TypedDict):
    """The hyper-parameters of one DoG step, as in the param groups (see :class:`DoG`)."""

    lr: float | Tensor
    weight_decay: float
    init_eta: float | None


class DoGOptions(DoGHyper, KernelChoice):
    """The keyword arguments of :func:`dog` besides ``layerwise`` and ``grad_norms``: the
    hyper-parameters and the path."""


class DoG(Optimizer):
    r"""DoG, "Distance over Gradients" (Ivgi, Hinder, Carmon 2023): SGD with η_t = c·r̄_t/√G_t.

    Rule: :math:`\bar r_t = \max(r_\epsilon, \max_{i\le t}\lVert x_i - x_0\rVert)`,
    :math:`G_t = \epsilon + \sum_{i\le t}\lVert g_i\rVert^2`,
    :math:`x_{t+1} = x_t - c\,\bar r_t/\sqrt{G_t}\; g_t`, with :math:`r_\epsilon =` ``reps_rel``
    :math:`\cdot(1+\lVert x_0\rVert)` and norms over the whole param group (see the module
    docstring).

    Args:
        params: parameters or param groups (each group is one DoG "vector").
        reps_rel: ρ in r_ε = ρ(1 + ‖x0‖) (default 1e-6; 1e-4 for batch-norm nets, 1e-8 if training
            diverges early).
        lr: c, a multiplier of η (default 1.0; the authors advise against changing it;
            schedulers may still scale it).
        weight_decay: λ, added to the gradient (L2) before the norms (default 0).
        eps: added once to G at the first step (default 1e-8).
        init_eta: if given, the first step size η_0 (then r̄_0 = 0 and ``reps_rel`` is ignored).
        foreach: use the multi-tensor path (default ``None`` = ``True``).
        fused: take ‖x − x0‖ with ``torch.compile``'d reductions, one call per bucket of
            tensors (default ``None`` = ``False``; the first step compiles for ~10-30 s, see :mod:`curvlab.optim._fused`).
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` (the only policy with no
            device-to-host synchronisation at all); see :mod:`curvlab.optim._validation`.

    State (per parameter): ``"x0"`` (copy of the parameter at its first gradient: 4 bytes per
    float32 parameter), ``"step"`` (float32 scalar, completed steps), ``"rbar"`` and ``"G"``
    (scalar tensors in float32, or float64 for float64 groups; for DoG the group's values, one
    tensor shared by every parameter's state) and, for bfloat16/float16 parameters only,
    ``"x_float32"`` (the float32 iterate, see the module docstring). The step size of the last
    step is ``optimizer.last_eta(group_index)``.

    Raises:
        ParameterError: invalid hyper-parameters, or a sparse gradient.
        NonFiniteError: a NaN/inf gradient under ``on_nonfinite="raise"``; nothing is changed.
        StateDictError: ``load_state_dict`` with another optimizer's state or other shapes.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = DoG(model.parameters())
        >>> avg = PolynomialDecayAverager(model.parameters(), gamma=8)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     model(torch.ones(4, 3)).pow(2).mean().backward()
        ...     opt.step()
        ...     avg.step()
        >>> bool(opt.last_eta(0) > 0)
        True

    Paper: Ivgi, Hinder, Carmon, ICML 2023, arXiv 2302.12022; code: formll/dog.
    """

    closure_mode: ClassVar[str] = "backward"
    layerwise: ClassVar[bool] = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        reps_rel: float = 1e-6,
        lr: float | Tensor = 1.0,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        init_eta: float | None = None,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        validate_fused(fused, foreach)
        if init_eta is not None:
            validate_positive("init_eta", init_eta, "; it is the first step size, or None")
            reps_rel = 0.0
        else:
            validate_positive(
                "reps_rel",
                reps_rel,
                "; the authors suggest 1e-6 (1e-4 for batch-norm nets, 1e-8 if training diverges)",
            )
        validate_positive("eps", eps, "; it keeps G > 0 at the first step, e.g. 1e-8")
        defaults = {
            "reps_rel": reps_rel,
            "lr": lr,
            "weight_decay": weight_decay,
            "eps": eps,
            "init_eta": init_eta,
            "foreach": foreach,
            "fused": fused,
            "on_nonfinite": on_nonfinite,
            "nonfinite_skips": 0,
        }
        validate_standard(defaults, "lr", "weight_decay", "on_nonfinite")
        super().__init__(params, defaults)

    def last_eta(self, group_index: int = 0) -> Tensor | list[Tensor]:
        """η of the last step: a scalar tensor for DoG, one per parameter (with state) for L-DoG."""
        group = self.param_groups[group_index]
        etas = []
        for p in group["params"]:
            st = self.state.get(p)
            if st:
                etas.append(group["lr"] * st["rbar"] / st["G"].sqrt())
        if not etas:
            raise ParameterError(f"param group {group_index} has taken no step yet")
        return etas if self.layerwise else etas[0]

    def _init_group(self, group: dict[str, Any], *lists: list[Tensor]) -> None:
        """Create the state of new parameters (r̄ = r_ε, G = ε); append every one with a gradient
        to ``lists = (params, grads, x0s, iterates, rbars, Gs, state_steps)``.

        A parameter joining a DoG group later takes the group's current r̄ and G.
        """
        new = [p for p in group["params"] if p.grad is not None and not self.state.get(p)]
        if new:
            with_grad = [p for p in group["params"] if p.grad is not None]
            sdtype = _scalar_dtype(with_grad)
            device = with_grad[0].device
            eps, reps_rel = group["eps"], group["reps_rel"]
            x_norms = list(torch._foreach_norm(new, 2, dtype=sdtype))
            tracked = next((p for p in group["params"] if self.state.get(p)), None)
            for p, x_norm in zip(new, x_norms):
                st = self.state[p]
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["x0"] = p.detach().clone(memory_format=torch.preserve_format)
                if p.dtype in _LOW_PRECISION:
                    st["x_float32"] = p.detach().float()
                if self.layerwise:
                    st["rbar"] = reps_rel * (1 + x_norm)
                    st["G"] = torch.tensor(eps, dtype=sdtype, device=p.device)
                elif tracked is not None:  # the group's scalars, shared
                    st["rbar"] = self.state[tracked]["rbar"]
                    st["G"] = self.state[tracked]["G"]
            if not self.layerwise and tracked is None:
                rbar = reps_rel * (1 + torch.stack(x_norms).to(device).norm())
                G = torch.tensor(eps, dtype=sdtype, device=device)
                for p in new:  # one r̄ and one G tensor for the whole group
                    self.state[p]["rbar"] = rbar
                    self.state[p]["G"] = G
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            iterate = st.get("x_float32", p)
            entries = (p, p.grad, st["x0"], iterate, st["rbar"], st["G"], st["step"])
            for lst, entry in zip(lists, entries):
                lst.append(entry)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Take one DoG step; ``closure`` (optional) zeroes grads, calls backward, returns the loss."""
        loss = run_closure(closure)
        grads_of(self.param_groups)  # sparse gradients raise before any norm is taken
        # the 2-norms of the raw gradients serve the finite check and (without weight decay) G
        norms = [
            _grad_norms([p.grad for p in g["params"] if p.grad is not None])
            for g in self.param_groups
        ]
        flat = [n for ns in norms for n in ns]
        if not check_finite_grads(
            self.param_groups, step=lambda: next_step_number(self), grad_norms=flat
        ):
            return loss
        for group, raw_norms in zip(self.param_groups, norms):
            lists: tuple[list[Tensor], ...] = ([], [], [], [], [], [], [])
            self._init_group(group, *lists)
            if lists[0]:
                hyper: DoGHyper = group_options(group, DoGHyper)
                dog(*lists, foreach=group["foreach"], fused=group.get("fused"),
                    grad_norms=raw_norms, scratch=self, layerwise=self.layerwise,
                    **hyper)  # fmt: skip
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict saved by this class; raises StateDictError for any other."""
        load_state_dict_checked(
            self,
            state_dict,
            state_keys=_STATE_KEYS,
            param_shaped_keys=_SHAPED_KEYS,
            keep_dtype_keys=_KEEP_DTYPE_KEYS,
        )
        if not self.layerwise:
            # DoG's group scalars must agree across a group's parameters; they are shared again
            for gi, group in enumerate(self.param_groups):
                states = [self.state[p] for p in group["params"] if self.state.get(p)]
                for key in ("rbar", "G"):
                    if any(not torch.equal(st[key], states[0][key]) for st in states[1:]):
                        raise StateDictError(
                            f"param group {gi}: the parameters carry different {key!r} values, "
                            "so the state_dict was saved from LDoG (layer-wise); load it into LDoG"
                        )
                    for st in states[1:]:
                        st[key] = states[0][key]


class LDoG(DoG):
    r"""L-DoG: layer-wise DoG, with r̄, G and η kept per parameter tensor (Ivgi et al. 2023).

    Rule, for every parameter tensor :math:`x^{(k)}` separately:
    :math:`\bar r^{(k)}_0 = \rho(1 + \lVert x^{(k)}_0\rVert)`,
    :math:`\bar r^{(k)}_t = \max(\bar r^{(k)}_{t-1}, \lVert x^{(k)}_t - x^{(k)}_0\rVert)`,
    :math:`G^{(k)}_t = \epsilon + \sum_{i\le t}\lVert g^{(k)}_i\rVert^2`,
    :math:`x^{(k)}_{t+1} = x^{(k)}_t - c\,\bar r^{(k)}_t/\sqrt{G^{(k)}_t}\; g^{(k)}_t`.
    Arguments, state and errors as :class:`DoG` (``rbar`` and ``G`` are per tensor; ``init_eta``
    is the first step size of each tensor).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = LDoG(model.parameters())
        >>> model(torch.ones(4, 3)).sum().backward(); opt.step()
        >>> len(opt.last_eta(0))
        2

    Paper: Ivgi, Hinder, Carmon, ICML 2023, arXiv 2302.12022; code: formll/dog (class LDoG).
    """

    layerwise: ClassVar[bool] = True


def dog(
    *lists: list[Tensor],
    layerwise: bool,
    grad_norms: list[Tensor] | None = None,
    **options: Unpack[DoGOptions],
) -> None:
    """Functional API that performs the DoG (``layerwise=False``) or L-DoG computation; see
    :class:`DoG`.

    ``lists``: ``params, grads, x0s, iterates, rbars, Gs, state_steps``, equally long. Updates
    ``iterates`` (each parameter, or its float32 copy for half precision; the parameter is then
    set to its rounding), ``rbars``, ``Gs`` (r̄ and G, updated in place: for DoG every entry holds
    the group's value) and ``state_steps`` in place. ``rbars``/``Gs`` enter with the values of
    the previous step (r_ε and ε before the first). ``grad_norms``: the 2-norms of ``grads`` if
    already computed (used when ``weight_decay == 0``). ``options``: the :class:`DoGHyper` and
    the path (:class:`~curvlab.optim._dispatch.KernelChoice`): ``foreach`` (default ``None`` =
    ``True``) selects :func:`_multi_tensor_dog`, else :func:`_single_tensor_dog`; ``scratch``:
    the owner of reusable buffers (:mod:`._scratch`) for the fast path; ``fused=True``: the fast
    path with ‖x − x0‖ from one compiled call per bucket of tensors (:mod:`._fused`).
    """
    choice, hyper = split_choice(options)
    if choice.get("foreach") is False and not choice.get("fused"):
        _single_tensor_dog(*lists, layerwise=layerwise, **hyper)
    else:
        _multi_tensor_dog(
            *lists, grad_norms=grad_norms, layerwise=layerwise, scratch=choice.get("scratch"),
            fused=bool(choice.get("fused")), **hyper,
        )  # fmt: skip


def _single_tensor_dog(*lists: list[Tensor], layerwise: bool, **hyper: Unpack[DoGHyper]) -> None:
    """The DoG rule as in the paper, one tensor at a time: the reference (lists as in :func:`dog`)."""
    params, grads, x0s, iterates, rbars, Gs, state_steps = lists
    lr, weight_decay, init_eta = hyper["lr"], hyper["weight_decay"], hyper["init_eta"]
    sdtype = rbars[0].dtype
    gs = [g.to(x.dtype) for g, x in zip(grads, iterates)]
    if weight_decay != 0:
        gs = [g.add(x, alpha=weight_decay) for g, x in zip(gs, iterates)]
    g_sq = [torch.linalg.vector_norm(g, dtype=sdtype).square() for g in gs]
    dists = [torch.linalg.vector_norm(x - x0, dtype=sdtype) for x, x0 in zip(iterates, x0s)]
    if layerwise:
        for rbar, G, dist, gsq in zip(rbars, Gs, dists, g_sq):
            rbar.copy_(torch.maximum(rbar, dist))
            G.add_(gsq)
    else:
        rbar = torch.maximum(rbars[0], torch.stack(dists).square().sum().sqrt())
        G = Gs[0] + torch.stack(g_sq).sum()
        for r, g_acc in zip(rbars, Gs):
            r.copy_(rbar)
            g_acc.copy_(G)
    group_first = torch.stack(state_steps).amax() == 0
    for param, g, x, rbar, G, step_t in zip(params, gs, iterates, rbars, Gs, state_steps):
        eta = lr * rbar / G.sqrt()
        if init_eta is not None:  # the first step size: per tensor (L-DoG) or per group (DoG)
            first = step_t == 0 if layerwise else group_first
            eta = torch.where(first.to(eta.device), init_eta, eta)
        x.sub_(eta * g)
        if x is not param:
            param.copy_(x)
        step_t += 1


def _multi_tensor_dog(
    *lists: list[Tensor],
    grad_norms: list[Tensor] | None,
    layerwise: bool,
    scratch: object | None,
    fused: bool = False,
    **hyper: Unpack[DoGHyper],
) -> None:
    """The DoG rule with ``torch._foreach_*`` kernels; equal to :func:`_single_tensor_dog`.

    No device-to-host synchronisation: r̄, G and η stay tensors on the parameters' device.
    """
    params, grads, x0s, iterates, rbars, Gs, state_steps = lists
    lr, weight_decay, init_eta = hyper["lr"], hyper["weight_decay"], hyper["init_eta"]
    sdtype = rbars[0].dtype
    device = rbars[0].device
    low = [(p, x) for p, x in zip(params, iterates) if x is not p]
    gs = [g.to(x.dtype) for g, x in zip(grads, iterates)] if low else grads
    if weight_decay != 0:
        gs = list(torch._foreach_add(gs, iterates, alpha=weight_decay))
        grad_norms = None
    if grad_norms is None:
        grad_norms = list(torch._foreach_norm(gs, 2, dtype=sdtype))
    dists = _distances(iterates, x0s, sdtype, None if fused else scratch, fused)
    if layerwise:
        torch._foreach_maximum_(rbars, dists)
        torch._foreach_add_(Gs, torch._foreach_mul(grad_norms, grad_norms))
        neg_etas = [-(lr * rbar / G.sqrt()) for rbar, G in zip(rbars, Gs)]
        if init_eta is not None:
            neg_etas = [
                torch.where(step_t.to(device) == 0, -init_eta, e)
                for e, step_t in zip(neg_etas, state_steps)
            ]
    else:
        rbar = torch.maximum(rbars[0], torch.stack(dists).to(device).norm())
        G = Gs[0] + torch.stack(grad_norms).to(device).square().sum()
        _fill(rbars, rbar)
        _fill(Gs, G)
        eta = lr * rbar / G.sqrt()
        if init_eta is not None:
            first = torch.stack(state_steps).amax().to(device) == 0
            eta = torch.where(first, init_eta, eta)
        neg_etas = [-eta] * len(params)
    torch._foreach_addcmul_(iterates, gs, neg_etas)
    if low:
        torch._foreach_copy_([p for p, _ in low], [x for _, x in low])
    torch._foreach_add_(state_steps, torch.tensor(1.0), alpha=1.0)


def _fill(targets: list[Tensor], value: Tensor) -> None:
    """Write a group scalar into every entry: one copy when they share one tensor (as DoG's
    state does, see ``DoG._init_group``)."""
    if all(t is targets[0] for t in targets):
        targets[0].copy_(value)
    else:
        torch._foreach_copy_(targets, [value] * len(targets))


def _scalar_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _grad_norms(grads: list[Tensor]) -> list[Tensor]:
    """2-norms of the gradients, in the scalar dtype of DoG (float32, float64 for float64)."""
    return list(torch._foreach_norm(grads, 2, dtype=_scalar_dtype(grads))) if grads else []


def _distances(
    xs: list[Tensor], x0s: list[Tensor], dtype: torch.dtype, scratch: object | None, fused: bool
) -> list[Tensor]:
    """‖x - x0‖ per tensor, without a full-size temporary for large tensors.

    ``fused``: one compiled call per bucket of tensors (:func:`_distance_kernel`). Else small tensors of
    one dtype (< 65536 elements) take two multi-tensor calls (fewer Python calls) and large
    contiguous CPU tensors one cache-sized block of ``x - x0`` at a time in the reusable scratch
    buffer of ``scratch`` (a fresh full-size ``x - x0`` costs page faults and a pass over memory).
    """
    if fused:
        return fused_foreach(_distance_kernel, [((x, x0), (dtype,)) for x, x0 in zip(xs, x0s)])
    out: list[Tensor | None] = [None] * len(xs)
    small = [
        i
        for i, (x, x0) in enumerate(zip(xs, x0s))
        if x.numel() < _SCRATCH_NUMEL and x.dtype == x0.dtype
    ]
    if small:
        diffs = torch._foreach_sub([xs[i] for i in small], [x0s[i] for i in small])
        for i, n in zip(small, torch._foreach_norm(diffs, 2, dtype=dtype)):
            out[i] = n
    for i, (x, x0) in enumerate(zip(xs, x0s)):
        if out[i] is not None:
            continue
        if scratch is not None and x.dtype == x0.dtype and x.is_contiguous() and x0.is_contiguous():
            xf, x0f = x.view(-1), x0.view(-1)
            row = workspace_rows(scratch, 1, min(_BLOCK, xf.numel()), x.dtype, x.device)[0]
            parts = [
                torch.linalg.vector_norm(
                    torch.sub(xf[s:e], x0f[s:e], out=row[: e - s]), dtype=dtype
                )
                for s, e in block_ranges(xf.numel(), row.numel())
            ]
            out[i] = torch.stack(parts).norm()
        else:
            out[i] = torch.linalg.vector_norm(x - x0, dtype=dtype)
    return out  # type: ignore[return-value]


def _distance_kernel(xs: list[Tensor], x0s: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """‖x − x0‖ in ``dtype`` of each pair, written for one compiled pass (no temporary)."""
    out = []
    for x, x0 in zip(xs, x0s):
        acc = accumulate_dtype(x)
        out.append(torch.linalg.vector_norm(x.to(acc) - x0.to(acc)).to(dtype))
    return out


class PolynomialDecayAverager:
    r"""Polynomial-decay iterate averaging (Shamir & Zhang 2013), as recommended for DoG/L-DoG.

    Rule, called once after every optimizer step t = 1, 2, ...:
    :math:`\bar x_t = (1 - w_t)\,\bar x_{t-1} + w_t\, x_t` with :math:`w_t = (\gamma+1)/(t+\gamma)`
    (so :math:`\bar x_1 = x_1`; γ = 0 is the uniform average, γ → ∞ the last iterate).

    Args:
        params: the tensors to average (e.g. ``model.parameters()``), or an ``nn.Module``, whose
            parameters and floating-point buffers (batch-norm statistics) are averaged.
        gamma: γ ≥ 0 (default 8, the authors' choice).

    Attributes:
        averaged: the averaged tensors, in the order of ``params``; ``t``: steps taken so far.

    Example:
        >>> x = torch.nn.Parameter(torch.zeros(2))
        >>> avg = PolynomialDecayAverager([x], gamma=0.0)
        >>> for v in (1.0, 2.0, 3.0):
        ...     _ = x.data.fill_(v); avg.step()
        >>> avg.averaged[0].tolist()  # uniform average of 1, 2, 3
        [2.0, 2.0]

    Paper: Shamir & Zhang, "Stochastic Gradient Descent for Non-smooth Optimization: Convergence
    Results and Optimal Averaging Schemes", ICML 2013; use with DoG: Ivgi et al. 2023,
    arXiv 2302.12022.
    """

    def __init__(self, params: Iterable[Tensor] | nn.Module, gamma: float = 8.0) -> None:
        validate_nonnegative("gamma", gamma, "; the authors use 8")
        if isinstance(params, nn.Module):
            tensors = [
                *params.parameters(),
                *(b for b in params.buffers() if b.is_floating_point()),
            ]
        else:
            tensors = list(params)
        if not tensors:
            raise ParameterError("PolynomialDecayAverager got no tensors to average")
        self.params: list[Tensor] = tensors
        self.gamma = float(gamma)
        self.t = 0
        self.averaged: list[Tensor] = [p.detach().clone() for p in tensors]

    @torch.no_grad()
    def step(self) -> None:
        """Fold the current parameters into the average (call after ``optimizer.step()``)."""
        self.t += 1
        w = (self.gamma + 1) / (self.t + self.gamma)
        torch._foreach_lerp_(self.averaged, [p.detach() for p in self.params], w)

    @torch.no_grad()
    def copy_to(self, params: Iterable[Tensor] | None = None) -> None:
        """Copy the averaged values into ``params`` (default: the averaged tensors themselves)."""
        targets = self.params if params is None else list(params)
        torch._foreach_copy_(targets, self.averaged)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Context manager: the tracked tensors hold the average inside, their own values after."""
        backup = [p.detach().clone() for p in self.params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, backup)

    def state_dict(self) -> dict[str, Any]:
        """``{"t": int, "gamma": float, "averaged": list of tensors}``."""
        return {"t": self.t, "gamma": self.gamma, "averaged": [a.clone() for a in self.averaged]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; shapes must match."""
        saved = state_dict.get("averaged")
        if not isinstance(saved, list) or len(saved) != len(self.averaged):
            raise StateDictError(
                f"expected {len(self.averaged)} averaged tensors, got "
                f"{len(saved) if isinstance(saved, list) else type(saved).__name__}"
            )
        for i, (a, s) in enumerate(zip(self.averaged, saved)):
            if a.shape != s.shape:
                raise StateDictError(
                    f"averaged tensor {i} has shape {tuple(s.shape)} in the state_dict but "
                    f"{tuple(a.shape)} here; it was saved for another model"
                )
        self.t = int(state_dict["t"])
        self.gamma = float(state_dict.get("gamma", self.gamma))
        with torch.no_grad():
            torch._foreach_copy_(self.averaged, saved)
