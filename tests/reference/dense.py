"""Dense float64 oracles, built independently of curvlab with torch.func on flat parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev


def flat_params(model: nn.Module, names: Sequence[str]) -> Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in names])


def unflatten(model: nn.Module, names: Sequence[str], flat: Tensor) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    out, offset = {}, 0
    for n in names:
        k = params[n].numel()
        out[n] = flat[offset : offset + k].view_as(params[n])
        offset += k
    return out


def _call(model: nn.Module, names: Sequence[str], flat: Tensor, x: Tensor) -> Tensor:
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state.update(unflatten(model, names, flat))
    return functional_call(model, state, (x,), tie_weights=True)


def data_loss_fn(model, loss_fn, batches, names, reduction="mean") -> Callable[[Tensor], Tensor]:
    """The loss over all batches as a function of the flat parameters (mean over all targets)."""
    total = sum(y.numel() for _, y in batches)

    def f(flat: Tensor) -> Tensor:
        acc = flat.new_zeros(())
        for x, y in batches:
            w = y.numel() / total if reduction == "mean" else 1.0
            acc = acc + w * loss_fn(_call(model, names, flat, x), y)
        return acc

    return f


def dense_hessian(model, loss_fn, batches, names, reduction="mean") -> Tensor:
    # reverse-over-reverse: torch 2.13's forward-over-reverse torch.func.hessian is wrong through
    # LayerNorm (0.06 absolute error against finite differences), so it is not used as the oracle
    flat = flat_params(model, names)
    return jacrev(grad(data_loss_fn(model, loss_fn, batches, names, reduction)))(flat)


def output_hessian(kind: str, out: Tensor) -> Tensor:
    """Per-sample output Hessian blocks [N, d, d] of the summed loss (no normalisation)."""
    n, d = out.shape
    if kind == "mse":
        return 2.0 * torch.eye(d, dtype=out.dtype).expand(n, d, d)
    if kind == "bce":
        s = torch.sigmoid(out)
        return torch.diag_embed(s * (1 - s))
    p = torch.softmax(out, dim=1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def dense_ggn(model, kind, batches, names) -> Tensor:
    """GGN of the mean loss over all batches (outputs [N, d]), from full Jacobians."""
    flat = flat_params(model, names)
    total_examples = sum(y.shape[0] for _, y in batches)
    G = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype)
    for x, _ in batches:
        out = _call(model, names, flat, x)
        J = jacrev(lambda fl, x=x: _call(model, names, fl, x))(flat)  # [N, d, P]
        # mean over all elements for MSE/BCE (N*d), over examples for CE
        norm = total_examples if kind == "ce" else total_examples * out.shape[1]
        G += torch.einsum("nip,nij,njq->pq", J, output_hessian(kind, out), J) / norm
    return G


def dense_empirical_fisher(model, loss_name, batches, names) -> Tensor:
    """(1/N) Σ_n g_n g_nᵀ with g_n the gradient of example n's cross-entropy."""
    flat = flat_params(model, names)
    total = sum(y.shape[0] for _, y in batches)
    E = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype)
    for x, y in batches:

        def per_sample(fl: Tensor, x: Tensor = x, y: Tensor = y) -> Tensor:
            return F.cross_entropy(_call(model, names, fl, x), y, reduction="none")

        g = jacrev(per_sample)(flat)  # [N, P]
        E += g.T @ g / total
    return E


def dense_ggn_of_loss(model, loss_fn, x, y, names) -> Tensor:
    """GGN ``Jᵀ (∇²_o L) J`` of ``loss_fn(model(x), y)`` on one batch, the output Hessian by autograd.

    Independent of curvlab's closed forms: any masking or class weighting the loss does is in
    ``∇²_o L``.
    """
    flat = flat_params(model, names)
    out = _call(model, names, flat, x).detach()
    J = jacrev(lambda fl: _call(model, names, fl, x))(flat)  # [*out.shape, P]
    H_o = jacrev(jacrev(lambda o: loss_fn(o, y)))(out)  # [*out.shape, *out.shape]
    J2 = J.reshape(out.numel(), -1)
    return J2.T @ H_o.reshape(out.numel(), out.numel()) @ J2


def dense_empirical_fisher_of_loss(model, loss_fn, x, y, names) -> Tensor:
    """``(1/D) Σ_n g_n g_nᵀ``: ``g_n`` the gradient of example ``n``'s (weighted, masked) loss.

    ``loss_fn`` must be a ``reduction='mean'`` module; its ``reduction='none'`` copy gives the
    per-target losses (summed over the positions of each example) and ``D`` = sum / mean.
    """
    import copy

    flat = flat_params(model, names)
    none, summed = copy.deepcopy(loss_fn), copy.deepcopy(loss_fn)
    none.reduction, summed.reduction = "none", "sum"
    out = _call(model, names, flat, x)
    D = float(summed(out, y) / loss_fn(out, y))

    def per_sample(fl: Tensor) -> Tensor:
        losses = none(_call(model, names, fl, x), y)
        return losses.reshape(losses.shape[0], -1).sum(dim=1)

    g = jacrev(per_sample)(flat)  # [N, P]
    return g.T @ g / D
