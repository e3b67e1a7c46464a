r"""Curvature optimizers (Sophia, AdaHessian) over data-parallel ranks.

Under the closure contract the optimizer takes the gradient itself with
``torch.autograd.grad`` (``create_graph=True`` on the steps that refresh a Hessian estimate).
``DistributedDataParallel`` synchronises gradients from hooks that only ``loss.backward()``
runs, and it does not support a double backward through the wrapper (pytorch/pytorch#63812), so
the closure calls the *unwrapped* module (``ddp_model.module``) and the optimizer does the
communication that DDP would have done, after
:meth:`~curvlab.optim._closure.CurvatureFeed.data_parallel`:

* every step, one ``all_reduce`` averages the gradients (and the loss) over the ranks;
* once per refresh, one ``all_reduce`` averages the curvature estimate. A Hutchinson estimate
  :math:`z \odot (H_r z)` is linear in the rank's Hessian, so with the same probe :math:`z` on
  every rank the average is :math:`z \odot (\bar H z)`, the estimate on the union of the batches.
  The Gauss-Newton-Bartlett estimate :math:`B\,\hat g \odot \hat g` is not linear: the ranks sum
  their parts of the sampled-label gradient :math:`\hat g` first, then square it, with
  :math:`B` the union's prediction count. Labels are drawn for the union's outputs from the
  shared generator, each rank keeping the rows of its shard, so every draw is the one a single
  process makes on the concatenated batch.

With equal shards (DDP's convention: the objective is the mean of the ranks' mean losses) the
trajectory is that of one process on the concatenated batches, to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from curvlab.distributed._sync import (
    all_reduce_like,
    check_same_on_ranks,
    digest,
    require_process_group,
)
from curvlab.errors import ArgumentTypeError, InvalidArgumentError
from curvlab.estimators.param_diagonal import GNBEstimator

__all__ = ["DataParallelCurvature"]


class DataParallelCurvature:
    """What a curvature optimizer communicates over data-parallel ranks (see the module).

    Built by :meth:`~curvlab.optim._closure.CurvatureFeed.data_parallel`; checks at construction,
    with one all-reduced checksum, that every rank holds the same parameters, hyper-parameters
    and random generator state.

    Args:
        optimizer: a :class:`~curvlab.optim.Sophia` or :class:`~curvlab.optim.AdaHessian`.
        model: the ``DistributedDataParallel`` model (its process group is used, and the
            optimizer's parameters must be its parameters), a plain module, or ``None``.
        group: the process group when ``model`` is not a DDP model (default: the world).

    Raises:
        DistributedError: ``torch.distributed`` is not initialised, or the ranks disagree on the
            parameters, the hyper-parameters or the seed.
        ArgumentTypeError: ``model`` is not an ``nn.Module``.
        InvalidArgumentError: a parameter of the optimizer is not one of ``model``'s.
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module | None = None, group: Any = None):
        name = type(optimizer).__name__
        require_process_group(f"{name}.data_parallel()")
        if model is not None and not isinstance(model, nn.Module):
            raise ArgumentTypeError(
                f"{name}.data_parallel() takes the DistributedDataParallel model (or None), got "
                f"{type(model).__name__}"
            )
        if isinstance(model, nn.parallel.DistributedDataParallel):
            group = model.process_group
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if model is not None:
            known = {id(p) for p in model.parameters()}
            if any(id(p) not in known for p in params):
                raise InvalidArgumentError(
                    f"{name}.data_parallel(model): the optimizer has parameters that are not "
                    "model's; build the optimizer from ddp_model.parameters()"
                )
        self.group = group
        generator: torch.Generator = optimizer._generator  # type: ignore[attr-defined]
        hyper = {k: v for k, v in optimizer.defaults.items() if k != "nonfinite_skips"}
        check_same_on_ranks(
            {
                "the model's parameters": digest(params),
                f"{name}'s hyper-parameters": digest([repr(sorted(hyper.items()))]),
                "the seed (the probe generator's state)": digest([generator.get_state()]),
            },
            group,
        )

    def average_gradients(self, params: Sequence[Tensor], loss: Tensor) -> Tensor:
        """Average ``p.grad`` (in place) and ``loss`` over the ranks; return the averaged loss."""
        grads = [p.grad for p in params]
        out = all_reduce_like([*grads, loss], [*params, loss], self.group, mean=True)
        for p, g in zip(params, out):
            p.grad = g
        return out[-1]  # type: ignore[return-value]

    def estimator(self, inner: Any) -> DataParallelEstimator:
        """``inner`` (the optimizer's estimator) made to estimate over the union of the batches."""
        return DataParallelEstimator(inner, self.group)


class DataParallelEstimator:
    """A :class:`~curvlab.estimators.CurvatureEstimator` over the union of the ranks' batches.

    GNB: the sampled-label gradient summed over ranks, then squared (see the module). Any other
    estimator (Hutchinson, custom): the rank's estimate averaged over the ranks, which is the
    union's estimate when the estimator is linear in the loss (Hutchinson with shared probes).

    Args:
        inner: the optimizer's estimator.
        group: the process group (default: the world).
    """

    def __init__(self, inner: Any, group: Any = None) -> None:
        self.inner = inner
        self.group = group
        self.create_graph = bool(getattr(inner, "create_graph", False))

    def __call__(
        self, params: Any, grads: Any, outputs: Any, generator: Any, *, retain_graph: bool = False
    ) -> list[Tensor | None]:
        """The estimate over all ranks' batches (a collective: every rank calls it); the
        arguments are those of :class:`~curvlab.estimators.CurvatureEstimator`."""
        if isinstance(self.inner, GNBEstimator) and isinstance(outputs, Tensor):
            return self._gnb(params, outputs, generator, retain_graph)
        kwargs = {"retain_graph": True} if retain_graph else {}
        local = self.inner(params, grads, outputs, generator, **kwargs)
        return all_reduce_like(local, params, self.group, mean=True)

    def _gnb(
        self,
        params: Sequence[Tensor],
        outputs: Tensor,
        generator: torch.Generator | None,
        retain_graph: bool,
    ) -> list[Tensor | None]:
        """``B · ĝ ⊙ ĝ`` with ``ĝ`` the union's sampled-label gradient, ``B`` its prediction count."""
        world = dist.get_world_size(self.group)
        rows = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(rows, torch.tensor([outputs.shape[0]]), group=self.group)
        start = sum(int(r) for r in rows[: dist.get_rank(self.group)])
        union = (sum(int(r) for r in rows), *outputs.shape[1:])
        draw_device = generator.device if generator is not None else outputs.device
        if self.inner.likelihood == "categorical":
            classes = outputs.shape[-1]
            n = union[0] * (outputs.numel() // max(outputs.shape[0] * classes, 1))
            with torch.no_grad():  # torch.multinomial(p, 1) is argmax(p / q), q ~ Exp(1)
                q = torch.empty(union, dtype=torch.float32, device=draw_device)
                q = q.exponential_(1, generator=generator)[start : start + outputs.shape[0]]
                probs = torch.softmax(outputs.detach().to(draw_device, torch.float32), dim=-1)
                labels = (probs / q).argmax(-1).to(outputs.device)
            flat = outputs.reshape(-1, classes)
            sampled = F.cross_entropy(flat, labels.reshape(-1), reduction="sum") / n
        else:  # gaussian: y = outputs + noise
            per_row = outputs.numel() // max(outputs.shape[0], 1)
            n = union[0] * (per_row // outputs.shape[-1] if outputs.ndim >= 2 else 1)
            with torch.no_grad():
                noise = torch.randn(
                    union, generator=generator, device=draw_device, dtype=outputs.dtype
                )
                noise = noise[start : start + outputs.shape[0]].to(outputs.device)
            sampled = 0.5 * (noise - outputs + outputs.detach()).square().sum() / max(n, 1)
        g_hat = torch.autograd.grad(
            sampled, list(params), allow_unused=True, retain_graph=retain_graph
        )
        total = all_reduce_like(list(g_hat), params, self.group, mean=False)
        scale = float(n if self.inner.batch_size is None else self.inner.batch_size)
        return [None if g is None else (g * g).mul_(scale) for g in total]
