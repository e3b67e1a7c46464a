"""What every integration shares: find the curvature optimizer, read a model's output, feed it.

A curvature optimizer (:class:`curvlab.optim.Sophia`, :class:`curvlab.optim.AdaHessian`) needs, on
the steps that refresh its curvature, the loss and/or the logits of that step's forward pass with
their graph. :func:`attach_curvature` gets them from a forward hook on the model (Hugging Face
``ModelOutput`` with ``.loss`` / ``.logits``, a dict, or a logits tensor); the Lightning callback
from the ``training_step`` output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._hooks import HookHandle
from curvlab.errors import ArgumentTypeError, CurvatureInputError
from curvlab.optim._closure import CurvatureFeed

__all__ = ["CurvatureHandle", "PendingSink", "attach_curvature", "curvature_optimizer", "feed"]

_ACCELERATE_SOURCE = "curvlab.integrations.attach_curvature(model, optimizer)"


def curvature_optimizer(optimizer: Any, source: str) -> CurvatureFeed:
    """The curvlab curvature optimizer inside ``optimizer`` (unwrapping framework wrappers).

    Raises:
        ArgumentTypeError: it is not a :class:`~curvlab.optim.Sophia` or
            :class:`~curvlab.optim.AdaHessian` (first-order optimizers need no curvature set-up).
    """
    inner = optimizer
    while not isinstance(inner, CurvatureFeed) and isinstance(
        getattr(inner, "optimizer", None), torch.optim.Optimizer
    ):
        inner = inner.optimizer  # accelerate's AcceleratedOptimizer, Lightning's wrapper
    if not isinstance(inner, CurvatureFeed):
        raise ArgumentTypeError(
            f"{source} feeds the curvature of curvlab's Sophia or AdaHessian, but the optimizer "
            f"is {type(inner).__name__}: build it as curvlab.optim.Sophia(model.parameters(), "
            "...) (or AdaHessian), or drop the curvature set-up (first-order optimizers need none)"
        )
    return inner


def feed(
    optimizer: CurvatureFeed,
    loss: Tensor | None,
    logits: Tensor | None,
    *,
    loss_fix: str,
    logits_fix: str,
) -> None:
    """Estimate the curvature from ``loss`` / ``logits`` if the next step refreshes it.

    Once per optimizer step (the first micro-batch under gradient accumulation).

    Raises:
        CurvatureInputError: the estimator needs logits (GNB) or the loss that is missing; the
            message ends with ``logits_fix`` / ``loss_fix``, the framework's way to supply it.
    """
    if not optimizer.curvature_due() or optimizer.has_pending_curvature:
        return
    name = type(optimizer).__name__
    if optimizer.needs_logits and not isinstance(logits, Tensor):
        raise CurvatureInputError(
            f"{name}'s Gauss-Newton-Bartlett estimate (SophiaG, estimator='gnb') samples labels "
            f"from the model's logits, and none reached it: {logits_fix} (or use "
            "estimator='hutchinson', which needs only the loss)"
        )
    if optimizer.needs_loss and not isinstance(loss, Tensor):
        raise CurvatureInputError(
            f"{name}'s curvature estimate differentiates the training loss, and none reached it: "
            f"{loss_fix}"
        )
    optimizer.estimate_curvature(loss, logits)


def split_output(output: Any) -> tuple[Tensor | None, Tensor | None]:
    """``(loss, logits)`` of a model output: a ``ModelOutput`` / dict, or a logits tensor.

    Raises:
        CurvatureInputError: a tuple or another type (the fields cannot be told apart).
    """
    if isinstance(output, Tensor):
        return None, output
    if isinstance(output, Mapping):
        return output.get("loss"), output.get("logits")
    raise CurvatureInputError(
        f"the model returned a {type(output).__name__}, in which the curvature set-up cannot tell "
        "the loss from the logits: return a dict or a Hugging Face ModelOutput with 'loss' and "
        "'logits' (for Hugging Face models, do not pass return_dict=False), or the logits tensor"
    )


class CurvatureHandle(HookHandle):
    """What :func:`attach_curvature` returns: the forward hook that feeds the optimizer.

    ``remove()`` (or leaving a ``with`` block) removes the hook and restores the optimizer's
    closure contract.
    """

    def __init__(self, model: nn.Module, optimizer: CurvatureFeed, source: str) -> None:
        self.model = model
        self.optimizer = optimizer
        optimizer.expect_external_curvature(source)
        self._hook: Any = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if not self.optimizer.curvature_due() or self.optimizer.has_pending_curvature:
            return
        loss, logits = split_output(output)
        feed(
            self.optimizer,
            loss,
            logits,
            loss_fix="the model computes no loss; pass the targets in the batch (Hugging Face: "
            "a 'labels' entry) so that its output carries 'loss', or call "
            "optimizer.estimate_curvature(loss, logits) yourself before backward()",
            logits_fix=f"the model's output ({type(output).__name__}) has no 'logits'; train a "
            "model with a prediction head (e.g. ...ForCausalLM, ...ForSequenceClassification)",
        )

    def _detached(self) -> None:
        """Give the optimizer back its closure contract."""
        self.optimizer.expect_external_curvature(None)


def attach_curvature(
    model: nn.Module, optimizer: Any, *, source: str = _ACCELERATE_SOURCE
) -> CurvatureHandle:
    """Feed ``optimizer``'s curvature from ``model``'s training forward passes (one line of set-up).

    For an accelerate loop, or any loop that calls ``backward()`` and ``optimizer.step()`` itself:
    on the first training forward pass (``model.training``, grad enabled) of every step that
    refreshes the curvature, a forward hook reads the output's ``loss`` and ``logits`` (a Hugging
    Face ``ModelOutput`` or a dict; a tensor output is the logits) and estimates the curvature on
    the live graph; ``optimizer.step()`` then reads ``p.grad`` and applies it. The trajectory is
    that of the closure contract on the same batches.

    Args:
        model: the model (or accelerate's prepared model); the hook goes on it.
        optimizer: a :class:`~curvlab.optim.Sophia` or :class:`~curvlab.optim.AdaHessian`, or a
            wrapper of one (accelerate's prepared optimizer).
        source: how the set-up is named in error messages.

    Returns:
        A :class:`CurvatureHandle`; ``handle.remove()`` undoes the set-up.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``, or the optimizer is not a curvature
            optimizer.

    Example:
        >>> from curvlab.optim import Sophia
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = Sophia(model.parameters(), lr=1e-3, update_period=2, seed=0)
        >>> handle = attach_curvature(model, opt)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> for _ in range(3):
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        ...     _ = opt.step(); opt.zero_grad()
        >>> handle.remove()
        >>> float(opt.state[model.weight]["step"])
        3.0
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(
            f"attach_curvature needs the model (an nn.Module) whose forward passes feed the "
            f"curvature, got {type(model).__name__}"
        )
    return CurvatureHandle(model, curvature_optimizer(optimizer, source), source)


class PendingSink:
    """A monitor sink that keeps the latest value of every name until a callback reports it.

    Example:
        >>> sink = PendingSink()
        >>> sink.write(2, {"a/b": 1.0})
        >>> sink.take(), sink.take()
        ({'a/b': 1.0}, {})
    """

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Keep ``values`` (later values of a name replace earlier ones)."""
        self.values.update(values)

    def take(self) -> dict[str, float]:
        """The values kept since the last call, now forgotten."""
        out, self.values = self.values, {}
        return out
