r"""Compression with curvature: Optimal-Brain-Surgeon pruning on M-FAC's inverse Fisher, magnitude
pruning, and fake quantisation for HAWQ-V2's bit allocation.

OBS pruning (Hassibi & Stork 1993) with the blocked empirical Fisher of the M-FAC paper's pruning
application (Frantar, Kurtic & Alistarh 2021, arXiv 2107.03356, Section 4; also WoodFisher, Singh &
Alistarh 2020): the weights ``w`` of every ``Linear``/``Conv`` layer are cut into contiguous blocks
of ``blocks`` coordinates, and each block gets the damped empirical Fisher of ``m`` per-example
gradients, :math:`\hat F = \lambda I + \tfrac1m G^\top G`. The saliency of weight ``q`` is

.. math:: \rho_q = \frac{w_q^2}{2\,[\hat F^{-1}]_{qq}},

the increase of the quadratic model of the loss when ``w_q`` is removed and the others compensate.
The ``k`` least salient weights (globally, over all layers) are removed, and each block takes the
joint OBS update that keeps its removed set ``Q`` at exactly zero:

.. math:: \delta w = -\hat F^{-1}_{:,Q}\,\big(\hat F^{-1}_{QQ}\big)^{-1} w_Q.

Sparsity is reached in ``steps`` equal levels with the gradients (and ``F̂``) recomputed between
levels, as in the M-FAC pruning runs. ``fisher="mfac"`` applies ``F̂⁻¹`` through the Woodbury
identity and M-FAC's coefficients (:func:`curvlab.optim.mfac.mfac_coefficient_matrix`: one
factorisation of the ``m × m`` matrix per block, O(m³ + m²B + mB²)); ``fisher="empirical"``
factors the dense ``B × B`` block (O(B³)). The two agree to rounding; the first is cheaper when
``m < B``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from curvlab.errors import InvalidArgumentError, UnknownOptionError
from curvlab.optim.mfac import mfac_coefficient_matrix

__all__ = [
    "Pruned",
    "fake_quantize",
    "prunable_weights",
    "prune",
    "quantization_perturbation",
    "quantize",
]


class Pruned(NamedTuple):
    """What :func:`prune` returns: the model (pruned in place) and name -> mask (``True`` = kept)."""

    model: nn.Module
    masks: dict[str, Tensor]


def prunable_weights(model: nn.Module) -> dict[str, Tensor]:
    """The weights of the model's ``Linear`` and ``Conv`` layers, by parameter name (biases stay)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {
        f"{name}.weight" if name else "weight": mod.weight
        for name, mod in model.named_modules()
        if isinstance(mod, kinds)
    }


def _batches(data: Any) -> list[tuple[Tensor, Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return [(data[0], data[1])]
    return list(data)


def _example_grads(
    model: nn.Module, loss_fn: Any, data: Any, names: Sequence[str], num_grads: int
) -> Tensor:
    """``[m, d]``: per-example gradients of the loss w.r.t. ``names`` (flattened, concatenated)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(theta: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**params, **theta}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    rows, taken = [], 0
    for x, y in _batches(data):
        x, y = x[: num_grads - taken], y[: num_grads - taken]
        g = vmap(grad(one), in_dims=(None, 0, 0))({k: params[k] for k in names}, x, y)
        rows.append(torch.cat([g[k].reshape(len(x), -1) for k in names], dim=1))
        taken += len(x)
        if taken >= num_grads:
            break
    return torch.cat(rows)


def _block_inverse(G: Tensor, damp: float, fisher: str) -> Tensor:
    """``F̂⁻¹`` of one block, ``F̂ = λI + GᵀG/m`` with ``G`` of shape ``[m, B]`` (float64)."""
    m = G.shape[0]
    G = G.double()
    if fisher == "empirical":
        F = G.T @ G / m
        F.diagonal().add_(damp)
        return torch.cholesky_inverse(torch.linalg.cholesky(F))
    coef = mfac_coefficient_matrix(G @ G.T, G, damp, m)
    inv = -(G.T @ coef)
    inv.diagonal().add_(1.0 / damp)
    return (inv + inv.T) / 2


def _obs_level(
    weights: dict[str, Tensor], G: Tensor, keep: int, blocks: int, damp: float, fisher: str
) -> None:
    """One OBS level: remove all but the ``keep`` most salient weights, update the rest."""
    flat = torch.cat([w.detach().reshape(-1).double() for w in weights.values()])
    spans: list[tuple[int, int]] = []
    start = 0
    for w in weights.values():
        spans += [
            (s, min(s + blocks, start + w.numel())) for s in range(start, start + w.numel(), blocks)
        ]
        start += w.numel()
    inverses = [_block_inverse(G[:, a:b], damp, fisher) for a, b in spans]
    diag = torch.cat([inv.diagonal() for inv in inverses])
    saliency = flat**2 / (2 * diag)
    removed = torch.ones_like(flat, dtype=torch.bool)
    removed[torch.topk(saliency, keep).indices] = False
    for (a, b), inv in zip(spans, inverses):
        q = removed[a:b].nonzero().flatten()
        if len(q) == 0:
            continue
        w = flat[a:b]
        delta = -inv[:, q] @ torch.linalg.solve(inv[q][:, q], w[q])
        w += delta
        w[q] = 0.0
    offset = 0
    with torch.no_grad():
        for p in weights.values():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def prune(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    sparsity: float,
    *,
    method: str = "obs",
    fisher: str = "mfac",
    blocks: int = 128,
    num_grads: int = 256,
    damp: float = 1e-4,
    steps: int = 4,
) -> Pruned:
    """Prune the ``Linear``/``Conv`` weights of ``model`` IN PLACE to the given global sparsity.

    ``method="obs"``: Optimal Brain Surgeon on the blocked empirical Fisher (rule in the module
    docstring); ``method="magnitude"``: global magnitude pruning (zero the smallest ``|w|`` over all
    layers; Blalock et al. 2020's baseline). Biases and other parameters are not pruned.

    Args:
        model: the model; its prunable weights are overwritten (pruned entries exactly zero).
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced, for the per-example gradients.
        data: ``(inputs, targets)`` or an iterable of such batches (OBS only).
        sparsity: the fraction of prunable weights set to zero, in ``[0, 1)``.
        method: ``"obs"`` or ``"magnitude"``.
        fisher: ``"mfac"`` (Woodbury with M-FAC's coefficients) or ``"empirical"`` (dense blocks).
        blocks: block size ``B`` of the block-diagonal Fisher.
        num_grads: ``m``, the per-example gradients in the Fisher.
        damp: λ > 0, the Fisher's damping.
        steps: sparsity levels, with the Fisher recomputed at each.

    Returns:
        :class:`Pruned` ``(model, masks)``: the same model object; masks by parameter name.

    Raises:
        InvalidArgumentError: sparsity outside ``[0, 1)``, a non-positive ``blocks``,
            ``num_grads``, ``steps`` or ``damp``, or a model without prunable layers.
        UnknownOptionError: an unknown ``method`` or ``fisher``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> res = prune(net, nn.functional.cross_entropy, (x, y), 0.5, blocks=8, num_grads=32)
        >>> sum(int((~m).sum()) for m in res.masks.values())   # half of 4*8 + 8*3 weights
        28
    """
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or not 0 <= sparsity < 1
    ):
        raise InvalidArgumentError(
            f"sparsity must be in [0, 1) (the fraction of weights removed), got {sparsity!r}"
        )
    if method not in ("obs", "magnitude"):
        raise UnknownOptionError(f"method must be 'obs' or 'magnitude', got {method!r}")
    if fisher not in ("mfac", "empirical"):
        raise UnknownOptionError(f"fisher must be 'mfac' or 'empirical', got {fisher!r}")
    for name, value in (("blocks", blocks), ("num_grads", num_grads), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp > 0):
        raise InvalidArgumentError(f"damp must be finite and > 0, got {damp!r}; e.g. damp=1e-4")
    weights = prunable_weights(model)
    if not weights:
        raise InvalidArgumentError("the model has no Linear or Conv layer to prune")
    total = sum(w.numel() for w in weights.values())
    if method == "magnitude":
        flat = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()])
        keep = flat.new_zeros(total, dtype=torch.bool)
        keep[torch.topk(flat, total - round(sparsity * total)).indices] = True
        offset = 0
        with torch.no_grad():
            for w in weights.values():
                w.mul_(keep[offset : offset + w.numel()].view_as(w))
                offset += w.numel()
    else:
        for level in range(1, steps + 1):
            G = _example_grads(model, loss_fn, data, list(weights), num_grads)
            keep_n = total - round(sparsity * level / steps * total)
            _obs_level(weights, G, keep_n, blocks, float(damp), fisher)
    return Pruned(model, {name: w.detach() != 0 for name, w in weights.items()})


def quantize(w: Tensor, bits: int) -> Tensor:
    """Symmetric uniform per-tensor quantisation: ``round(w / s)·s`` clamped to ``2^(b−1) − 1``
    levels each side, ``s = max|w| / (2^(b−1) − 1)`` (the quantiser HAWQ's experiments use).

    Example:
        >>> quantize(torch.tensor([0.5, -0.2, 0.3]), 2).tolist()
        [0.5, -0.0, 0.5]
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise InvalidArgumentError(f"bits must be an integer >= 2, got {bits!r}")
    levels = 2 ** (bits - 1) - 1
    scale = w.abs().max() / levels
    if float(scale) == 0.0:
        return w.clone()
    return torch.round(w / scale).clamp(-levels, levels) * scale


def _module_weights(model: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    modules = dict(model.named_modules())
    missing = [
        n
        for n in names
        if n not in modules or not isinstance(getattr(modules[n], "weight", None), Tensor)
    ]
    if missing:
        raise InvalidArgumentError(f"no module with a weight named {missing}; use module names")
    return {n: modules[n].weight for n in names}


def quantization_perturbation(
    model: nn.Module, names: Iterable[str], choices: Sequence[int] = (2, 4, 8)
) -> dict[str, dict[int, float]]:
    """``{module: {bits: ‖Q_b(W) − W‖²}}`` for the modules' weights (HAWQ-V2's perturbation term),
    the input of :meth:`~curvlab.estimators.results.LayerSensitivity.allocate_bits`."""
    return {
        n: {
            int(b): float((quantize(w.detach(), int(b)) - w.detach()).pow(2).sum()) for b in choices
        }
        for n, w in _module_weights(model, names).items()
    }


def fake_quantize(model: nn.Module, bits_per_layer: Mapping[str, int]) -> nn.Module:
    """A deep copy of ``model`` whose listed modules' weights are replaced by :func:`quantize`'d
    ones (the original is untouched); evaluate it to measure what the allocation costs."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in _module_weights(clone, bits_per_layer).items():
            w.copy_(quantize(w, int(bits_per_layer[name])))
    return clone
