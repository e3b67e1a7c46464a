"""Curvature operators over data sharded across ``torch.distributed`` ranks.

Each rank builds an ordinary operator on its own shard of the data (on the *unwrapped* model:
DDP does not support double backward, pytorch/pytorch#63812); :class:`DistributedOperator` makes
every product the product of the operator over the union of the shards by one ``all_reduce``.
Estimators then run unchanged on every rank; give them generators with the same seed on every
rank so that all ranks draw the same probes and stay in lockstep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from curvlab.distributed._sync import check_same_on_ranks, digest, require_process_group
from curvlab.errors import InvalidArgumentError
from curvlab.operators.base import LinearOperator
from curvlab.operators.curvature import CurvatureOperator

__all__ = ["DistributedOperator"]


class DistributedOperator(LinearOperator):
    r"""The curvature over all ranks' data, from a rank-local curvature operator.

    With a mean-reduced loss, rank ``r`` holding :math:`N_r` of the :math:`N = \sum_r N_r` target
    elements contributes its local matrix :math:`A_r` (a mean over its shard) with weight
    :math:`N_r/N`:

    .. math:: A = \sum_r \frac{N_r}{N} A_r, \qquad A V = \operatorname{all\_reduce}\Big(\frac{N_r}{N} A_r V\Big)

    (with a sum-reduced loss every weight is 1). The counts are all-reduced once, at construction,
    with a checksum of the parameters: ranks whose models differ raise at once instead of mixing
    two problems. Each product costs the local products plus one ``all_reduce`` of an ``[n, k]``
    block. :meth:`block` and :meth:`blocks` make it usable by
    :func:`~curvlab.layer_sensitivity` (``operator=``).

    Args:
        local: the operator of this rank's shard (Hessian, GGN, Fisher, empirical Fisher).
        group: the process group (default: the world).

    Raises:
        DistributedError: ``torch.distributed`` is not initialised, or the ranks' parameters
            differ.
        InvalidArgumentError: ``local`` is not a curvature operator.

    Example (run under ``torchrun``)::

        H_local = cl.HessianOperator(ddp_model.module, loss_fn, local_loader)
        H = cl.distributed.DistributedOperator(H_local)
        top = cl.eigsh(H, k=5, generator=torch.Generator().manual_seed(0))  # same seed everywhere
    """

    def __init__(self, local: CurvatureOperator, group: Any = None) -> None:
        if not isinstance(local, CurvatureOperator):
            raise InvalidArgumentError(
                f"DistributedOperator wraps a rank-local curvature operator (HessianOperator, "
                f"GGNOperator, ...), got {type(local).__name__}; build one on this rank's shard"
            )
        require_process_group("building a DistributedOperator")
        super().__init__(local.shape, local.dtype, local.device)
        self.local = local
        self.group = group
        self.is_symmetric = local.is_symmetric
        self.is_psd = local.is_psd
        count = torch.tensor([float(local.data.total)], dtype=torch.float64, device=local.device)
        dist.all_reduce(count, group=group)
        check_same_on_ranks({"the model's parameters": digest(local.params)}, group)
        self.global_total = float(count)
        self.scale = local.data.total / self.global_total if local.reduction == "mean" else 1.0
        self.param_space = local.param_space

    def _parts(self) -> tuple[LinearOperator, ...]:
        return (self.local,)

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.local.matmat(V) * self.scale
        dist.all_reduce(out, group=self.group)
        return out

    def exact_diagonal(self) -> Tensor:
        """The exact diagonal over all ranks' data, when the local operator has one (the GGN)."""
        out = self.local.exact_diagonal() * self.scale
        dist.all_reduce(out, group=self.group)
        return out

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The loss and flat gradient over all ranks' data."""
        loss, grad = self.local.loss_and_gradient()
        packed = torch.cat([grad, grad.new_tensor([loss])]) * self.scale
        dist.all_reduce(packed, group=self.group)
        return float(packed[-1]), packed[:-1]

    def blocks(self, by: str = "module") -> dict[str, list[str]]:
        """Parameter names grouped into blocks, as the local operator's :meth:`blocks`."""
        return self.local.blocks(by)

    def block(self, names: str | Sequence[str]) -> DistributedOperator:
        """The diagonal block over all ranks' data for a subset of the parameters.

        A collective: every rank must ask for the same block, in the same order.
        """
        return DistributedOperator(self.local.block(names), self.group)
