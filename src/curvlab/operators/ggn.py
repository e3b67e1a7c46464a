"""The generalised Gauss-Newton matrix of a model's loss, as a matrix-free operator."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.operators._losses import LossCurvature, loss_curvature
from curvlab.operators._model import CurvatureOperator, Mode

__all__ = ["GGNOperator", "OutputSpaceOperator"]

_FAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _layerwise_exact_diagonal(op: GGNOperator) -> Tensor | None:
    """Exact GGN diagonal for parameters of Linear/Conv layers each used once per forward.

    For each column ``r`` of the output-Hessian square root one backward pass gives every
    layer's per-sample output gradients ``δ_n``; with the layer inputs ``a_n`` the per-sample
    gradients are ``δ_n a_nᵀ`` (Linear) or ``Σ_positions δ_n unfold(a_n)ᵀ`` (Conv), squared and
    summed over samples (the approach of BackPACK's ``DiagGGNExact``, Dangel et al. 2020).
    Returns ``None`` when any chosen parameter is not such a layer's weight/bias, or a layer is
    called more than once (tied weights), so the caller falls back to the generic path.
    """
    owners: dict[str, tuple[nn.Module, str]] = {}
    modules = dict(op.model.named_modules())
    for name in op.param_space.names:
        prefix, _, leaf = name.rpartition(".")
        module = modules.get(prefix)
        if not isinstance(module, _FAST_MODULES) or leaf not in ("weight", "bias"):
            return None
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            return None
        owners[name] = (module, leaf)
    layers = {id(m): m for m, _ in owners.values()}
    inputs: dict[int, list[Tensor]] = {k: [] for k in layers}
    outputs: dict[int, list[Tensor]] = {k: [] for k in layers}

    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        inputs[id(module)].append(args[0].detach())
        outputs[id(module)].append(out)

    diag = {name: torch.zeros_like(p) for name, p in zip(op.param_space.names, op.params)}
    for x, y, w in op.data:
        for lst in (*inputs.values(), *outputs.values()):
            lst.clear()
        handles = [m.register_forward_hook(hook) for m in layers.values()]
        try:
            with op._model_mode(), torch.enable_grad():
                out = op._forward(x)
        finally:
            for h in handles:
                h.remove()
        if any(len(v) != 1 for v in outputs.values()) or not all(
            o.requires_grad for v in outputs.values() for o in v
        ):
            return None
        op.curvature.check(out, y.to(op.device))
        with torch.no_grad():
            S = op.curvature.hessian_sqrt(out.detach())
            scale = w * op.curvature.scale(out, op.reduction)
        keys = list(layers)
        for r in range(S.shape[2]):
            deltas = torch.autograd.grad(
                out, [outputs[k][0] for k in keys], grad_outputs=S[:, :, r], retain_graph=True
            )
            for k, delta in zip(keys, deltas):
                _accumulate(layers[k], inputs[k][0], delta.detach(), scale, owners, diag)
    return op.param_space.flatten([diag[n] for n in op.param_space.names])


def _accumulate(
    module: nn.Module,
    a: Tensor,
    delta: Tensor,
    scale: float,
    owners: dict[str, tuple[nn.Module, str]],
    diag: dict[str, Tensor],
) -> None:
    wanted = {leaf: name for name, (m, leaf) in owners.items() if m is module}
    n = a.shape[0]
    if isinstance(module, nn.Linear):
        if a.ndim == 2:
            gw_sq = (delta * delta).T @ (a * a)
            gb_sq = (delta * delta).sum(0)
        else:  # extra positions: per-sample gradient sums over them before squaring
            gw = torch.einsum("n...o,n...i->noi", delta, a)
            gw_sq = (gw * gw).sum(0)
            gb = delta.reshape(n, -1, delta.shape[-1]).sum(1)
            gb_sq = (gb * gb).sum(0)
    else:
        conv: Any = module
        dims = 2 if isinstance(conv, nn.Conv2d) else 1
        a4 = a if dims == 2 else a.unsqueeze(2)
        ks = conv.kernel_size if dims == 2 else (1, conv.kernel_size[0])
        st = conv.stride if dims == 2 else (1, conv.stride[0])
        pd = conv.padding if dims == 2 else (0, conv.padding[0])
        dl = conv.dilation if dims == 2 else (1, conv.dilation[0])
        U = torch.nn.functional.unfold(a4, ks, dilation=dl, padding=pd, stride=st)  # [N, K, L]
        d = delta.reshape(n, delta.shape[1], -1)  # [N, O, L]
        gw = torch.einsum("nol,nkl->nok", d, U)
        gw_sq = (gw * gw).sum(0).reshape(conv.weight.shape)
        gb = d.sum(2)
        gb_sq = (gb * gb).sum(0)
    if "weight" in wanted:
        diag[wanted["weight"]] += scale * gw_sq.reshape(diag[wanted["weight"]].shape)
    if "bias" in wanted:
        diag[wanted["bias"]] += scale * gb_sq


class _OutputLinearisation:
    """Cached graphs of one batch: ``outputs = f(θ)`` and ``Jᵀu`` (linear in a dummy ``u``)."""

    __slots__ = ("dummy", "extra", "idx", "jt_u", "outputs", "scale")

    def __init__(
        self, outputs: Tensor, dummy: Tensor, jt_u: list[Tensor], idx: list[int], scale: float
    ) -> None:
        self.outputs = outputs
        self.dummy = dummy
        self.jt_u = jt_u
        self.idx = idx
        self.scale = scale
        self.extra: Any = None


class OutputSpaceOperator(CurvatureOperator):
    r"""Base of operators of the form :math:`\sum_b J_b^\top M_b J_b` with ``J_b`` the Jacobian of
    the model's outputs on batch ``b`` and ``M_b`` a PSD matrix in output space.

    ``J v`` is computed with the double-vjp trick on a cached graph (``Jᵀu`` is linear in ``u``, so
    differentiating ``⟨Jᵀu, v⟩`` w.r.t. ``u`` gives ``J v``), ``Jᵀ w`` with one vjp. Subclasses define
    ``_output_matmul(lin, JV)`` returning ``M_b J V`` (columns in the leading dimension).
    """

    is_symmetric = True
    is_psd = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        data: Any,
        params: Iterable[Tensor | str] | None = None,
        *,
        mode: Mode = "eval",
        reduction: str | None = None,
        cache_graph: bool | None = None,
        check_finite: bool = True,
        vectorize: bool = False,
    ) -> None:
        self.curvature: LossCurvature = loss_curvature(loss_fn)
        super().__init__(
            model,
            loss_fn,
            data,
            params,
            mode=mode,
            reduction=reduction,
            cache_graph=cache_graph,
            check_finite=check_finite,
            vectorize=vectorize,
        )

    def _linearise(self, inputs: Any, targets: Tensor, weight: float) -> _OutputLinearisation:
        with torch.enable_grad():
            outputs = self._forward(inputs)
            # the loss is evaluated once: it checks shapes, scalar-ness and finiteness
            self._loss(outputs.detach(), targets, weight)
            targets = targets.to(self.device)
            self.curvature.check(outputs, targets)
            dummy = torch.zeros_like(outputs, requires_grad=True)
            jt_u = self._grad(outputs, dummy, create_graph=True)
        idx = [i for i, g in enumerate(jt_u) if g.requires_grad]
        scale = weight * self.curvature.scale(outputs, self.reduction)
        lin = _OutputLinearisation(outputs, dummy, jt_u, idx, scale)
        lin.extra = self._batch_extra(lin, targets)
        return lin

    def _batch_extra(self, lin: _OutputLinearisation, targets: Tensor) -> Any:
        return None

    def _check_outputs(self, outputs: Tensor, targets: Tensor) -> None:
        self.curvature.check(outputs, targets)

    def _jvp(self, lin: _OutputLinearisation, v: Tensor) -> Tensor:
        pieces = self.param_space.split(v)
        (jv,) = torch.autograd.grad(
            [lin.jt_u[i] for i in lin.idx],
            lin.dummy,
            grad_outputs=[pieces[i] for i in lin.idx],
            retain_graph=True,
        )
        return jv

    def _output_matmul(self, lin: _OutputLinearisation, jv: Tensor) -> Tensor:
        raise NotImplementedError

    def _apply(self, lin: _OutputLinearisation, V: Tensor) -> Tensor:
        if not lin.idx:
            return torch.zeros_like(V)
        if self.vectorize and V.shape[1] > 1:
            with torch.enable_grad():
                pieces = self._columns(V)
                (jv,) = torch.autograd.grad(
                    [lin.jt_u[i] for i in lin.idx],
                    lin.dummy,
                    grad_outputs=[pieces[i] for i in lin.idx],
                    retain_graph=True,
                    is_grads_batched=True,
                )
                w = torch.stack([self._output_matmul(lin, c) for c in jv.detach()])
                return self._flatten_columns(self._grad(lin.outputs, w, batched=True))
        cols = []
        rows = V.T.contiguous()
        with torch.enable_grad():
            for j in range(V.shape[1]):
                w = self._output_matmul(lin, self._jvp(lin, rows[j]).detach())
                cols.append(self.param_space.flatten(self._grad(lin.outputs, w)))
        return torch.stack(cols, dim=1)


class GGNOperator(OutputSpaceOperator):
    r"""The generalised Gauss-Newton matrix :math:`G = \sum_b J_b^\top\, \nabla^2_{o} L_b\, J_b`.

    ``J_b`` is the Jacobian of the model outputs on batch ``b`` w.r.t. the chosen parameters and
    :math:`\nabla^2_o L_b` the Hessian of the (weighted) loss w.r.t. the outputs, in closed form:
    MSE :math:`2\kappa I`; cross-entropy :math:`\kappa(\operatorname{diag}p - pp^\top)` per position;
    BCE-with-logits :math:`\kappa\,\sigma(1-\sigma)`. ``κ`` is the reduction's normalisation times the
    batch weight, so :math:`G` is the GGN of the loss over the whole data set (mean or sum, as the
    loss says). ``G`` is symmetric PSD and equals the Hessian when the model is linear in θ.

    Arguments, mode and caching as :class:`~curvlab.operators.HessianOperator`.

    Raises:
        UnsupportedLossError: the loss is not MSE, cross-entropy or BCE-with-logits.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        >>> X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
        >>> G = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
        >>> bool(torch.linalg.eigvalsh(G.to_dense()).min() > -1e-12)
        True
    """

    def _output_matmul(self, lin: _OutputLinearisation, jv: Tensor) -> Tensor:
        return lin.scale * self.curvature.hessian_matmul(lin.outputs.detach(), jv)

    def exact_diagonal(self, chunk_size: int = 256) -> Tensor:
        r"""The exact diagonal of ``G``, from per-sample gradients (no probes, no variance).

                .. math::

                    \operatorname{diag}(G) = \sum_b \kappa_b \sum_{n \in b} \sum_{r}
                        ig(J_n^	op S_n e_rig)^{\odot 2}, \qquad S_n S_n^	op =
        abla^2_{o_n}\ell

                with ``S_n`` the closed-form square root of the output Hessian (``R`` = number of outputs
                columns). Cost: ``R`` vmapped per-sample vector-Jacobian products per batch, in chunks of
                ``chunk_size`` examples (memory ``chunk_size × n``). For networks that are piecewise
                linear in each parameter (ReLU/max-pool/linear layers) every diagonal entry of the
                Hessian's residual term vanishes, so this is also the exact **Hessian** diagonal, and its
                sums per layer the exact per-layer Hessian traces (what BackPACK's ``DiagHessian`` gives).

                Raises:
                    UnsupportedLossError: outputs are not ``[N, d]``.
                    ValueError: ``mode="train"`` (per-sample gradients need per-sample evaluation).
        """
        if self.mode == "train":
            raise ValueError("exact_diagonal needs per-sample evaluation; use mode='eval'")
        fast = _layerwise_exact_diagonal(self)
        if fast is not None:
            return fast
        return self._vmap_exact_diagonal(chunk_size)

    def _vmap_exact_diagonal(self, chunk_size: int) -> Tensor:
        """Generic path: per-sample gradients by ``torch.func.vmap`` (any architecture)."""
        from torch.func import functional_call, grad, vmap

        names = self.param_space.names
        fixed = {
            **{n: p.detach() for n, p in self.model.named_parameters() if n not in names},
            **dict(self.model.named_buffers()),
        }
        diag = [torch.zeros_like(p) for p in self.params]

        def contract(params: dict[str, Tensor], x: Any, s: Tensor) -> Tensor:
            out = functional_call(self.model, {**fixed, **params}, (x.unsqueeze(0),))
            return (out.reshape(-1) * s).sum()

        per_sample = vmap(grad(contract), in_dims=(None, 0, 0))
        params = {n: p.detach() for n, p in zip(names, self.params)}
        for x, y, w in self.data:
            with self._model_mode(), torch.no_grad():
                x = x.to(self.device)
                outputs = self._forward(x)
                self.curvature.check(outputs, y.to(self.device))
                S = self.curvature.hessian_sqrt(outputs)  # [N, d, R]
                scale = w * self.curvature.scale(outputs, self.reduction)
            with self._model_mode():
                for start in range(0, x.shape[0], chunk_size):
                    xs, Ss = x[start : start + chunk_size], S[start : start + chunk_size]
                    for r in range(Ss.shape[2]):
                        g = per_sample(params, xs, Ss[:, :, r])
                        for i, n in enumerate(names):
                            diag[i] += scale * (g[n] ** 2).sum(dim=0)
        return self.param_space.flatten(diag)
