"""Compressors and compressed averages over a :class:`~curvlab.distributed._comm.Comm`.

- :func:`onebit_allreduce`: 1-bit Adam's error-compensated two-stage average (DeepSpeed's
  ``compressed_allreduce``): worker compression, a chunk exchange to "server" ranks, server
  compression, an all-gather.
- :func:`compress` and :func:`mean_of_compressed`: the contractive compressors of EControl
  (top-k, scaled sign, random-k) and the average of every rank's compressed message.

Signs travel as packed bits (8 per byte, most significant first, as ``numpy.packbits``);
``sign(0)`` is ``+1`` as in DeepSpeed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from curvlab.distributed._comm import Comm

__all__ = [
    "COMPRESSORS",
    "Compressed",
    "compress",
    "mean_of_compressed",
    "onebit_allreduce",
    "onebit_sizes",
    "pack_signs",
    "unpack_signs",
]

COMPRESSORS = ("topk", "sign", "randk")
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_signs(x: Tensor) -> Tensor:
    """The bits ``x >= 0`` of a flat tensor whose length is a multiple of 8, packed to uint8."""
    bits = (x >= 0).to(torch.uint8).view(-1, 8)
    return (bits * _BIT_WEIGHTS.to(x.device)).sum(1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``+-1`` values of :func:`pack_signs`'s bits, as ``dtype`` (flat)."""
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(*packed.shape[:-1], -1).to(dtype) * 2 - 1


def _sign_scale(x: Tensor) -> tuple[Tensor, Tensor]:
    """DeepSpeed's 1-bit message of ``x``: (packed signs, scale ``||x||_2 / sqrt(len x)``)."""
    scale = torch.linalg.vector_norm(x) / math.sqrt(x.numel())
    return pack_signs(x), scale.reshape(1)


def onebit_sizes(numel: int, world: int) -> tuple[int, int]:
    """(padded length, server chunk length) of a ``numel``-element tensor over ``world`` ranks.

    As DeepSpeed: padded with zeros to a multiple of ``world * lcm(world, 8)``, so that every
    server chunk packs into whole bytes.
    """
    unit = world * math.lcm(world, 8)
    padded = -(-numel // unit) * unit
    return padded, padded // world


def onebit_allreduce(x: Tensor, worker_error: Tensor, server_error: Tensor, comm: Comm) -> Tensor:
    r"""The error-compensated 1-bit average of ``x`` over ranks (DeepSpeed's compressed_allreduce).

    With :math:`C(b) = \frac{\|b\|_2}{\sqrt{\dim b}}\operatorname{sign}(b)` (``sign(0) = +1``):

    .. math::
       \begin{aligned}
       &\text{worker: } b = \operatorname{pad}(x) + e_w;\quad e_w \leftarrow b - C(b);
         \ \text{rank } r \text{ receives chunk } r \text{ of every } C(b_j) \\
       &\text{server (chunk } r\text{): } c = \tfrac{1}{W}\textstyle\sum_j C(b_j)_r + e_s;
         \quad e_s \leftarrow c - C(c);\ \text{all-gather } C(c) \\
       \end{aligned}

    Communication: ``all_to_all`` of the packed worker signs, ``all_gather`` of the worker scales,
    ``all_gather`` of the packed server signs and of the server scales. ``worker_error`` (padded
    length) and ``server_error`` (one chunk) are updated in place; see :func:`onebit_sizes`.

    Returns:
        A new tensor of ``x``'s shape: the decompressed average.
    """
    world, dtype = comm.world, x.dtype
    buf = torch.zeros(worker_error.numel(), dtype=dtype, device=x.device)
    buf[: x.numel()] = x.reshape(-1)
    buf += worker_error
    signs, scale = _sign_scale(buf)
    worker_error.copy_(buf - scale * unpack_signs(signs, dtype))
    recv_signs = comm.all_to_all(signs.view(world, -1))
    recv_scales = comm.all_gather(scale)
    values = unpack_signs(recv_signs, dtype)
    server = values[0] * (recv_scales[0] / world)
    for j in range(1, world):
        server += values[j] * (recv_scales[j] / world)
    server += server_error
    s_signs, s_scale = _sign_scale(server)
    server_error.copy_(server - s_scale * unpack_signs(s_signs, dtype))
    all_signs = comm.all_gather(s_signs)
    all_scales = comm.all_gather(s_scale)
    out = torch.cat([unpack_signs(s, dtype) * c for s, c in zip(all_signs, all_scales)])
    return out[: x.numel()].view_as(x)


class Compressed(NamedTuple):
    """A compressed message: its dense value and what travels (``indices`` or ``scale``)."""

    dense: Tensor
    indices: Tensor | None
    scale: Tensor | None


def compress(
    x: Tensor, compressor: str, ratio: float, generator: torch.Generator | None = None
) -> Compressed:
    r"""The contractive compression :math:`C(x)` of a flat tensor.

    ``"topk"``: the ``k = max(1, floor(ratio * n))`` entries of largest magnitude (``torch.topk``);
    ``"randk"``: ``k`` entries drawn without replacement by ``generator`` (unscaled, so
    contractive with :math:`\delta = k/n`); ``"sign"``:
    :math:`\frac{\|x\|_1}{n}\operatorname{sign}(x)` with ``sign(0) = +1`` (contractive with
    :math:`\delta = \|x\|_1^2 / (n \|x\|_2^2)`; ``ratio`` unused).
    """
    if compressor == "sign":
        scale = (x.abs().sum() / x.numel()).reshape(1)
        return Compressed(torch.where(x >= 0, scale, -scale), None, scale)
    k = max(1, int(ratio * x.numel()))
    if compressor == "topk":
        idx = torch.topk(x.abs(), k, sorted=False).indices
    else:
        idx = torch.randperm(x.numel(), generator=generator)[:k].to(x.device)
    dense = torch.zeros_like(x)
    dense[idx] = x[idx]
    return Compressed(dense, idx, None)


def mean_of_compressed(msg: Compressed, compressor: str, comm: Comm) -> Tensor:
    """The average over ranks of every rank's compressed message (dense, flat).

    Only the compressed form travels: ``"topk"`` all-gathers ``k`` values and ``k`` int32
    indices; ``"randk"`` (indices drawn from a generator seeded alike on every rank, so the same
    everywhere) all-reduces the ``k`` values; ``"sign"`` all-gathers the packed signs and the
    scale. Contributions are summed in rank order.
    """
    dense, world = msg.dense, comm.world
    if compressor == "sign":
        assert msg.scale is not None
        n = dense.numel()
        signs = comm.all_gather(pack_signs(torch.cat([dense, dense.new_zeros(-n % 8)])))
        scales = comm.all_gather(msg.scale)
        total = unpack_signs(signs[0], dense.dtype)[:n] * scales[0]
        for s, c in zip(signs[1:], scales[1:]):
            total += unpack_signs(s, dense.dtype)[:n] * c
        return total / world
    assert msg.indices is not None
    total = torch.zeros_like(dense)
    if compressor == "randk":
        values = dense[msg.indices]
        comm.all_reduce_sum(values)
        total[msg.indices] = values
        return total / world
    gathered = zip(
        comm.all_gather(dense[msg.indices]), comm.all_gather(msg.indices.to(torch.int32))
    )
    for v, i in gathered:
        total.index_add_(0, i.long(), v)
    return total / world
