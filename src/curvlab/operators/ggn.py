"""The generalised Gauss-Newton matrix of a model's loss, as a matrix-free operator."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvlab.errors import NoExactDiagonalError
from curvlab.operators._checks import check_positive_int
from curvlab.operators._losses import LossCurvature, loss_curvature
from curvlab.operators.curvature import CurvatureOperator

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
    for x, y, _ in op.data:
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
        with torch.no_grad():
            S = op._output_factor(out.detach(), y)
        keys = list(layers)
        for r in range(S.shape[2]):
            deltas = torch.autograd.grad(
                out, [outputs[k][0] for k in keys], grad_outputs=S[:, :, r], retain_graph=True
            )
            for k, delta in zip(keys, deltas):
                _accumulate(layers[k], inputs[k][0], delta.detach(), owners, diag)
    return op.param_space.flatten([diag[n] for n in op.param_space.names])


def _accumulate(
    module: nn.Module,
    a: Tensor,
    delta: Tensor,
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
        diag[wanted["weight"]] += gw_sq.reshape(diag[wanted["weight"]].shape)
    if "bias" in wanted:
        diag[wanted["bias"]] += gb_sq


class _OutputLinearisation:
    """Cached graphs of one batch: ``outputs = f(θ)`` and ``Jᵀu`` (linear in a dummy ``u``).

    ``weights`` holds the target weights ``c`` (``None`` when every target counts once).
    """

    __slots__ = ("dummy", "extra", "idx", "jt_u", "outputs", "weights")

    def __init__(
        self,
        outputs: Tensor,
        dummy: Tensor,
        jt_u: list[Tensor],
        idx: list[int],
        weights: Tensor | None,
    ) -> None:
        self.outputs = outputs
        self.dummy = dummy
        self.jt_u = jt_u
        self.idx = idx
        self.weights = weights
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
    curvature: LossCurvature

    def _setup_loss(self) -> None:
        self.curvature = loss_curvature(self.loss_fn)

    @property
    def _kappa(self) -> float:
        """``κ``: one over the loss's denominator over all the data (mean), or 1 (sum)."""
        return 1.0 / self.data.total if self.reduction == "mean" else 1.0

    def _output_factor(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``√κ S_n`` per sample (``[N, d, R]``): its outer products sum to this batch's ``M_b``."""
        targets = targets.to(self.device)
        self.curvature.check(outputs, targets)
        c = self.curvature.weights(outputs, targets)
        return self._kappa**0.5 * self.curvature.hessian_sqrt(outputs, c)

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
        c = self.curvature.weights(outputs.detach(), targets)
        lin = _OutputLinearisation(outputs, dummy, jt_u, idx, c)
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
    BCE-with-logits :math:`\kappa\,\sigma(1-\sigma)`. ``κ`` is one over the loss's denominator over
    the whole data set (mean) or 1 (sum), so :math:`G` is the GGN of the loss over the whole data
    set. Cross-entropy targets carry their weight ``c``: 0 at ``ignore_index`` (padding, masked
    tokens), the class weight otherwise, multiplying that position's output Hessian. ``G`` is
    symmetric PSD and equals the Hessian when the model is linear in θ.

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
        return self._kappa * self.curvature.hessian_matmul(lin.outputs.detach(), jv, lin.weights)

    def exact_diagonal(self, chunk_size: int = 256) -> Tensor:
        r"""The exact diagonal of ``G``, from per-sample gradients (no probes, no variance).

        .. math::

            \operatorname{diag}(G) = \kappa \sum_b \sum_{n \in b} \sum_{r}
                \big(J_n^\top S_n e_r\big)^{\odot 2}, \qquad S_n S_n^\top =
                c_n \nabla^2_{o_n}\ell

        with ``S_n`` the closed-form square root of the weighted output Hessian (``R`` = number of
        its columns, ``c_n`` the target weight). Cost: ``R`` per-sample vector-Jacobian products per
        batch, vmapped in chunks of ``chunk_size`` examples (memory ``chunk_size × n``), or one
        backward per column with hooks for Linear/Conv layers. For networks that are piecewise
        linear in each parameter (ReLU/max-pool/linear layers) every diagonal entry of the
        Hessian's residual term vanishes, so this is also the exact **Hessian** diagonal, and its
        sums per layer the exact per-layer Hessian traces (what BackPACK's ``DiagHessian`` gives).

        Raises:
            UnsupportedLossError: outputs are not ``[N, d]``.
            NoExactDiagonalError: ``mode="train"`` (per-sample gradients need per-sample
                evaluation); an ``output_fn`` is given (its rows need not be examples, e.g. the
                tokens of a causal LM); dict inputs on a model that is not made of Linear/Conv
                layers.
            InvalidArgumentError: ``chunk_size`` is not a positive integer.
        """
        chunk_size = check_positive_int(chunk_size, "chunk_size")
        if self.mode == "train":
            raise NoExactDiagonalError(
                "exact_diagonal needs per-sample evaluation, which BatchNorm/dropout in training "
                "mode do not allow; build the operator with mode='eval', or use "
                "curvlab.diagonal(op, method='hutchinson')"
            )
        if self.output_fn is not None:
            raise NoExactDiagonalError(
                "exact_diagonal needs one output row per example, which an output_fn= does not "
                "guarantee (a causal LM's rows are tokens); use curvlab.diagonal(op, "
                "method='hutchinson')"
            )
        self._sync_params()
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
        for x, y, _ in self.data:
            if not isinstance(x, Tensor):
                raise NoExactDiagonalError(
                    "the per-sample exact diagonal of this model needs tensor inputs, got "
                    f"{type(x).__name__}; use curvlab.diagonal(op, method='hutchinson')"
                )
            with self._model_mode(), torch.no_grad():
                x = x.to(self.device)
                S = self._output_factor(self._forward(x), y)  # [N, d, R]
            with self._model_mode():
                for start in range(0, x.shape[0], chunk_size):
                    xs, Ss = x[start : start + chunk_size], S[start : start + chunk_size]
                    for r in range(Ss.shape[2]):
                        g = per_sample(params, xs, Ss[:, :, r])
                        for i, n in enumerate(names):
                            diag[i] += (g[n] ** 2).sum(dim=0)
        return self.param_space.flatten(diag)
