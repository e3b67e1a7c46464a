"""The closure contract of the curvature optimizers (``closure_mode = "loss"``: Sophia, AdaHessian).

``step(closure)`` takes a closure that returns the loss WITHOUT calling ``backward()`` — the loss
tensor, or ``(loss, outputs)`` with the model outputs the loss was computed from (the GNB
estimator samples labels from them). The optimizer takes the gradient itself with
``torch.autograd.grad``, keeping the graph (or building a ``create_graph=True`` one) only on the
steps that refresh the curvature, writes the detached gradient into ``p.grad`` and returns the
detached loss::

    def closure():
        logits = model(x)
        return loss_fn(logits, y), logits   # or just the loss
    optimizer.step(closure)

A missing or broken closure raises :class:`~curvlab.errors.ClosureRequiredError` with that example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlab.errors import ClosureRequiredError, LossNotScalarError, ParameterError
from curvlab.estimators.param_diagonal import CurvatureEstimator
from curvlab.optim._validation import check_finite_curvature, check_finite_grads, next_step_number

__all__ = [
    "StepInputs",
    "closure_grads",
    "closure_required",
    "closure_step",
    "estimate_curvature",
    "resolve_estimator",
]


def closure_required(name: str, hint: str = "") -> ClosureRequiredError:
    """The error for a missing closure, with an example of the contract (and ``hint`` after it)."""
    return ClosureRequiredError(
        f"{name}.step() needs a closure that returns the loss WITHOUT calling backward() (the "
        "optimizer takes the gradients, and the curvature when due, itself), e.g.\n"
        "    def closure():\n"
        "        logits = model(x)\n"
        "        return loss_fn(logits, y), logits   # or just the loss\n"
        "    optimizer.step(closure)" + hint
    )


def _call_closure(
    closure: object, params: Sequence[Tensor], name: str
) -> tuple[Tensor, Tensor | None]:
    """Run the closure with grad enabled; return ``(scalar loss, outputs or None)``.

    Gradients are cleared first so that a closure that calls ``backward()`` is detected.
    """
    if closure is None or not callable(closure):
        raise closure_required(name)
    for p in params:
        p.grad = None
    with torch.enable_grad():
        out = closure()
    where = f"the closure passed to {name}.step()"
    if any(p.grad is not None for p in params):
        raise ClosureRequiredError(
            f"{where} called backward(): it must return the loss WITHOUT calling backward() — the "
            "optimizer computes the gradients itself (with create_graph=True only on the steps "
            "that refresh the curvature)"
        )
    loss, outputs = out, None
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ClosureRequiredError(
                f"{where} returned a sequence of {len(out)} items; return the loss tensor, or a "
                "pair (loss, outputs)"
            )
        loss, outputs = out
    if not isinstance(loss, Tensor):
        raise ClosureRequiredError(
            f"{where} returned {type(loss).__name__}, not a loss tensor; return the loss "
            "(computed with grad enabled, without backward()), or (loss, outputs)"
        )
    if loss.numel() != 1:
        raise LossNotScalarError(
            f"{where} returned a loss of shape {tuple(loss.shape)}; reduce it to a scalar "
            "(e.g. loss.mean())"
        )
    if outputs is not None and not isinstance(outputs, Tensor):
        raise ClosureRequiredError(
            f"{where} returned outputs of type {type(outputs).__name__}; the second item must be "
            "the model outputs (a tensor)"
        )
    if loss.dim() != 0:
        with torch.enable_grad():
            loss = loss.reshape(())
    return loss, outputs


def _loss_grads(
    loss: Tensor, params: Sequence[Tensor], *, create_graph: bool, retain_graph: bool
) -> list[Tensor | None]:
    """``torch.autograd.grad`` of the closure's loss, with the contract's error messages."""
    if loss.grad_fn is None and not loss.requires_grad:
        raise ClosureRequiredError(
            "the closure's loss does not depend on the parameters (no autograd graph): compute it "
            "with grad enabled from the model's outputs and return it WITHOUT calling backward()"
        )
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(
                loss,
                list(params),
                create_graph=create_graph,
                retain_graph=retain_graph or create_graph,
                allow_unused=True,
            )
    except RuntimeError as exc:  # graph freed by a backward() inside the closure
        if "backward through the graph a second time" in str(exc) or "freed" in str(exc):
            raise ClosureRequiredError(
                "the closure's loss graph was already freed: the closure must return the loss "
                "WITHOUT calling loss.backward(); the optimizer computes the gradient itself"
            ) from exc
        raise
    return list(grads)


def closure_grads(
    closure: object, params: list[Tensor], name: str, estimator: CurvatureEstimator | None
) -> tuple[Tensor, Tensor | None, list[Tensor | None]]:
    """Run the closure and take the loss gradient; write it, detached, into ``p.grad``.

    The graph is kept for ``estimator`` when one is given (built with ``create_graph=True`` if
    ``estimator.create_graph``), so pass it only on the steps that refresh the curvature.

    Returns:
        ``(detached loss, outputs, gradients)``, the gradients with their graph when kept.

    Raises:
        ClosureRequiredError: no closure, one that called ``backward()``, returned no loss tensor,
            a loss without graph, or outputs that are not a tensor.
        LossNotScalarError: a loss with more than one element.
    """
    loss, outputs = _call_closure(closure, params, name)
    grads = _loss_grads(
        loss,
        params,
        create_graph=bool(getattr(estimator, "create_graph", False)),
        retain_graph=estimator is not None,
    )
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.detach()
    return loss.detach(), outputs, grads


def estimate_curvature(
    estimator: CurvatureEstimator,
    params: list[Tensor],
    grads: list[Tensor | None],
    outputs: Tensor | None,
    generator: torch.Generator,
) -> list[Tensor | None]:
    """Call ``estimator`` with grad enabled (the optimizer's ``step`` runs under ``no_grad``)."""
    with torch.enable_grad():
        return estimator(params, grads, outputs, generator)


class StepInputs(NamedTuple):
    """What :func:`closure_step` hands to ``step``: the loss, and whether and with what to go on."""

    loss: Tensor
    proceed: bool
    params: list[Tensor]
    estimate: list[Tensor | None] | None


def closure_step(
    optimizer: Optimizer,
    closure: object,
    estimator: CurvatureEstimator | None,
    generator: torch.Generator,
) -> StepInputs:
    """The start of a curvature optimizer's ``step``: gradients, then the curvature when due.

    Runs the closure over the parameters that require grad, puts the gradients into ``p.grad``,
    applies the ``on_nonfinite`` policy to them (:func:`check_finite_grads`), then, if
    ``estimator`` is given, estimates the curvature and applies the same policy to it
    (:func:`check_finite_curvature`).

    Returns:
        ``StepInputs(loss, proceed, params, estimate)``: the detached loss; ``proceed`` is
        ``False`` when the step must be skipped (policy ``"skip"``); ``estimate`` is one tensor
        (or ``None``) per entry of ``params``, or ``None`` without ``estimator``.

    Raises:
        ClosureRequiredError, LossNotScalarError: see :func:`closure_grads`.
        NonFiniteError: a NaN/inf gradient or estimate under ``on_nonfinite="raise"``.
    """
    groups: list[dict[str, Any]] = optimizer.param_groups
    params = [p for g in groups for p in g["params"] if p.requires_grad]
    loss, outputs, grads = closure_grads(closure, params, type(optimizer).__name__, estimator)
    step = lambda: next_step_number(optimizer)  # noqa: E731
    if not check_finite_grads(groups, step=step):
        return StepInputs(loss, False, params, None)
    if estimator is None:
        return StepInputs(loss, True, params, None)
    diag = estimate_curvature(estimator, params, grads, outputs, generator)
    proceed = check_finite_curvature(groups, params, diag, step=step)
    return StepInputs(loss, proceed, params, diag)


def resolve_estimator(
    estimator: object, builtin: Mapping[str, CurvatureEstimator], names: str
) -> tuple[str, CurvatureEstimator]:
    """``(name, estimator)`` for an optimizer's ``estimator=`` argument.

    A string selects one of ``builtin``; an instance of a built-in estimator's class keeps its
    name (so ``GNBEstimator(likelihood="gaussian")`` is still ``"gnb"``); any other callable is
    ``"custom"``.

    Raises:
        ParameterError: an unknown name ("estimator must be {names} or a callable, got ..."), or
            neither a string nor a callable.
    """
    if isinstance(estimator, str):
        if estimator not in builtin:
            raise ParameterError(f"estimator must be {names} or a callable, got {estimator!r}")
        return estimator, builtin[estimator]
    if not callable(estimator):
        raise ParameterError(f"estimator must be a string or a callable, got {estimator!r}")
    for name, known in builtin.items():
        if type(estimator) is type(known):
            return name, estimator  # type: ignore[return-value]
    return "custom", estimator  # type: ignore[return-value]
