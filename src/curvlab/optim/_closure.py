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

**Curvature from the training loop** (:class:`CurvatureFeed`, used by the framework callbacks of
:mod:`curvlab.integrations`): after ``optimizer.expect_external_curvature(source)``, ``step()``
follows the torch contract instead — the gradients are read from ``p.grad`` (the closure, if any,
calls ``backward()`` itself, as Lightning's does) — and the curvature of a refresh step comes from
:meth:`CurvatureFeed.estimate_curvature`, called on the live graph of that step's forward pass
before the loop's own ``backward()``::

    optimizer.expect_external_curvature("my loop")
    for x, y in data:
        logits = model(x)
        loss = loss_fn(logits, y)
        if optimizer.curvature_due():
            optimizer.estimate_curvature(loss, logits)   # keeps the graph, leaves p.grad alone
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlab.errors import (
    ArgumentTypeError,
    ClosureRequiredError,
    CurvatureInputError,
    CurvatureNotSuppliedError,
    DoubleBackwardError,
    LossNotScalarError,
    ParameterError,
)
from curvlab.estimators.param_diagonal import CurvatureEstimator, GNBEstimator
from curvlab.operators._context import full_precision
from curvlab.optim._validation import (
    check_finite_curvature,
    check_finite_grads,
    next_step_number,
    steps_taken,
)

__all__ = [
    "FRAMEWORK_SETUP",
    "CurvatureFeed",
    "StepInputs",
    "closure_grads",
    "closure_required",
    "closure_step",
    "estimate_curvature",
    "fed_step",
    "resolve_estimator",
]

#: the one-line set-up that feeds a curvature optimizer in each kind of training loop
FRAMEWORK_SETUP = (
    "callbacks=[curvlab.integrations.lightning.CurvatureCallback()] in the Lightning Trainer, "
    "callbacks=[curvlab.integrations.transformers.CurvatureCallback()] in the Hugging Face "
    "Trainer, or curvlab.integrations.attach_curvature(model, optimizer) once before an "
    "accelerate (or any torch-style) loop"
)


def closure_required(name: str, hint: str = "") -> ClosureRequiredError:
    """The error for a missing closure, with an example of the contract (and ``hint`` after it)."""
    return ClosureRequiredError(
        f"{name}.step() needs a closure that returns the loss WITHOUT calling backward() (the "
        "optimizer takes the gradients, and the curvature when due, itself), e.g.\n"
        "    def closure():\n"
        "        logits = model(x)\n"
        "        return loss_fn(logits, y), logits   # or just the loss\n"
        "    optimizer.step(closure)" + hint + "\nIn a framework loop (no closure, or one that "
        "calls backward()), add its curvature set-up instead: " + FRAMEWORK_SETUP
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
            "that refresh the curvature). In Lightning's automatic optimization add "
            "callbacks=[curvlab.integrations.lightning.CurvatureCallback()] to the Trainer"
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
    with full_precision():  # derivatives in the parameters' dtype, whatever autocast is active
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

    loss: Tensor | None
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

    Runs the closure over the parameters that require grad, puts the gradients into ``p.grad``
    (averaged over the ranks after :meth:`CurvatureFeed.data_parallel`, the loss too), applies the ``on_nonfinite`` policy to them (:func:`check_finite_grads`), then, if
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
    sync = getattr(optimizer, "_data_parallel", None)
    if sync is not None:  # CurvatureFeed.data_parallel: gradients averaged over the ranks
        loss = sync.average_gradients(params, loss)
    step = lambda: next_step_number(optimizer)  # noqa: E731
    if not check_finite_grads(groups, step=step):
        return StepInputs(loss, False, params, None)
    if estimator is None:
        return StepInputs(loss, True, params, None)
    with full_precision():
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


def _estimate_keeping_graph(
    estimator: Any,
    params: list[Tensor],
    grads: list[Tensor | None],
    outputs: Tensor | None,
    generator: torch.Generator | None,
    name: str,
) -> list[Tensor | None]:
    """Call ``estimator`` with ``retain_graph=True``: the loop back-propagates the graph later."""
    try:
        accepts = "retain_graph" in inspect.signature(estimator).parameters
    except (TypeError, ValueError):
        accepts = False
    if not accepts:
        raise CurvatureInputError(
            f"{name}'s custom estimator {estimator!r} takes no retain_graph= argument; in a "
            "framework loop the training loop back-propagates the same forward pass after the "
            "estimate, so the estimator must accept retain_graph=True and pass it to its "
            "torch.autograd.grad calls (see curvlab.estimators.param_diagonal.CurvatureEstimator)"
        )
    return list(estimator(params, grads, outputs, generator, retain_graph=True))


#: fragments of torch's messages when a graph cannot be differentiated twice
_NO_DOUBLE_BACKWARD = (
    "double backward",
    "is not implemented",
    "does not support",
    "differentiate twice",
)


def _double_backward_error(name: str, exc: RuntimeError) -> DoubleBackwardError:
    """The error for a model whose graph has no second derivative (compiled, some kernels)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DoubleBackwardError(
        f"{name}'s curvature estimate differentiates the model's graph twice, and this graph does "
        f"not allow it ({first}). For a torch.compile'd model, train the eager module "
        "(model._orig_mod) on the curvature steps or compile with backend='eager'; for attention "
        "kernels without a double backward, load the model with attn_implementation='eager' (or "
        "run under torch.nn.attention.sdpa_kernel(SDPBackend.MATH)); or use Sophia's default "
        "estimator='gnb' (SophiaG), which needs first derivatives only"
    )


_Feed = TypeVar("_Feed", bound="CurvatureFeed")


class CurvatureFeed:
    """Mixin of Sophia and AdaHessian: their curvature supplied by the training loop.

    A framework loop (Lightning automatic optimization, the Hugging Face ``Trainer``, an
    accelerate loop) calls ``backward()`` itself and then ``optimizer.step()`` with no closure (or
    a closure that back-propagates). The integrations of :mod:`curvlab.integrations` switch the
    optimizer to that contract with :meth:`expect_external_curvature` and, on the forward pass of
    every step that refreshes the curvature (:meth:`curvature_due`), call
    :meth:`estimate_curvature` on the live graph before the loop's ``backward()``. The next
    ``step()`` takes the gradients from ``p.grad`` and applies that estimate; the update is the
    same as in the closure contract, with the same random draws.
    """

    _estimator: Any
    _generator: torch.Generator
    _data_parallel: Any = None
    _curvature_source: str | None = None
    _pending_curvature: tuple[list[Tensor], list[Tensor | None]] | None = None

    @property
    def curvature_source(self) -> str | None:
        """What supplies the curvature (set by :meth:`expect_external_curvature`), or ``None``."""
        return self._curvature_source

    @property
    def has_pending_curvature(self) -> bool:
        """Whether an estimate is waiting for the next ``step()``."""
        return self._pending_curvature is not None

    @property
    def needs_loss(self) -> bool:
        """Whether the estimator differentiates the loss (Hutchinson, custom; not GNB)."""
        return not self.needs_logits

    @property
    def needs_logits(self) -> bool:
        """Whether the estimator samples labels from the model's logits (GNB, SophiaG's default)."""
        return isinstance(getattr(self._estimator, "inner", self._estimator), GNBEstimator)

    def data_parallel(self: _Feed, model: Any = None, *, group: Any = None) -> _Feed:
        """Average the gradients and the curvature estimate over data-parallel ranks.

        Call it once on every rank after building the optimizer from
        ``ddp_model.parameters()``; the closure then calls the unwrapped module
        (``ddp_model.module(x)``: DDP does not support the double backward). Every step averages
        the gradients and the loss over the ranks (one ``all_reduce``), and every refresh the
        curvature estimate (one more), so that with equal shards the trajectory is that of one
        process on the concatenated batches: :mod:`curvlab.distributed.data_parallel`. In a
        framework loop (:meth:`expect_external_curvature`) the estimate is averaged and the
        gradients are left to DDP's own ``backward()``. Seed every rank's optimizer alike: the
        probes must be the same on every rank (checked here).

        Args:
            model: the ``DistributedDataParallel`` model (its process group is used), a plain
                module, or ``None``.
            group: the process group when ``model`` is not a DDP model (default: the world).

        Returns:
            The optimizer itself.

        Raises:
            DistributedError: ``torch.distributed`` is not initialised, or the ranks disagree on
                the parameters, the hyper-parameters or the seed (one all-reduced checksum).
            InvalidArgumentError: the optimizer has parameters that are not ``model``'s.

        Example (under ``torchrun``)::

            ddp = DistributedDataParallel(model)
            opt = Sophia(ddp.parameters(), seed=0).data_parallel(ddp)

            def closure():
                logits = ddp.module(x)  # this rank's batch x, y
                return loss_fn(logits, y), logits

            opt.step(closure)
        """
        from curvlab.distributed.data_parallel import DataParallelCurvature

        sync = DataParallelCurvature(cast(Optimizer, self), model, group)
        inner = getattr(self._estimator, "inner", self._estimator)
        self._data_parallel = sync
        self._estimator = sync.estimator(inner)
        return self

    def expect_external_curvature(self, source: str | None) -> None:
        """Take the gradients from ``p.grad`` and the curvature from :meth:`estimate_curvature`.

        From now on ``step()`` accepts no closure or a torch-style one (it calls ``backward()``);
        a step that refreshes the curvature without an estimate raises
        :class:`~curvlab.errors.CurvatureNotSuppliedError` naming ``source``. ``None`` restores
        the closure contract. Any pending estimate is dropped.

        Args:
            source: what supplies the estimates, as the user would write it (e.g.
                ``"curvlab.integrations.lightning.CurvatureCallback()"``), or ``None``.

        Raises:
            ArgumentTypeError: ``source`` is neither a string nor ``None``.
        """
        if source is not None and not isinstance(source, str):
            raise ArgumentTypeError(
                f"source must name what supplies the curvature (a string) or be None, got "
                f"{type(source).__name__}"
            )
        self._curvature_source = source
        self._pending_curvature = None

    def curvature_due(self) -> bool:
        """Whether the next ``step()`` refreshes the curvature (steps 1, k+1, 2k+1, …)."""
        opt = cast(Optimizer, self)
        period = opt.defaults["update_period"]
        return period is not None and steps_taken(opt) % period == 0

    def estimate_curvature(self, loss: Tensor | None, outputs: Tensor | None = None) -> None:
        """Estimate the curvature from a live forward graph; the next ``step()`` applies it.

        Call it after the forward pass and before the loop's ``backward()``: the graph is kept
        for that backward and ``p.grad`` is not touched. The estimate is the one the closure
        contract would make from the same forward pass (same estimator, same random draws).

        Args:
            loss: the scalar training loss, with its graph (not needed by the GNB estimator).
            outputs: the model outputs the loss was computed from (logits; needed by GNB).

        Raises:
            CurvatureInputError: no logits with a graph for GNB, or no scalar loss with a graph
                for the other estimators.
            DoubleBackwardError: the graph cannot be differentiated twice (a compiled model).
        """
        opt = cast(Optimizer, self)
        name = type(self).__name__
        if self.needs_logits and not (isinstance(outputs, Tensor) and outputs.grad_fn is not None):
            raise CurvatureInputError(
                f"{name}'s Gauss-Newton-Bartlett estimate (SophiaG) samples labels from the "
                "model's logits: pass the logits, with their graph, as outputs (or use "
                "estimator='hutchinson', which needs only the loss)"
            )
        if self.needs_loss and not (
            isinstance(loss, Tensor) and loss.numel() == 1 and loss.grad_fn is not None
        ):
            raise CurvatureInputError(
                f"{name}'s curvature estimate differentiates the loss: pass the scalar training "
                "loss with its graph (computed with grad enabled, before backward())"
            )
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        grads: list[Tensor | None] = [None] * len(params)
        try:
            with torch.enable_grad(), full_precision():
                if self.needs_loss:
                    grads = _loss_grads(
                        cast(Tensor, loss).reshape(()),
                        params,
                        create_graph=bool(getattr(self._estimator, "create_graph", False)),
                        retain_graph=True,
                    )
                diag = _estimate_keeping_graph(
                    self._estimator, params, grads, outputs, self._generator, name
                )
        except RuntimeError as exc:
            if any(s in str(exc) for s in _NO_DOUBLE_BACKWARD):
                raise _double_backward_error(name, exc) from exc
            raise
        del grads
        self._pending_curvature = (params, [None if d is None else d.detach() for d in diag])


def fed_step(optimizer: Optimizer, closure: Callable[[], Any] | None) -> StepInputs:
    """The start of ``step`` under :meth:`CurvatureFeed.expect_external_curvature`.

    Runs the torch-style closure if given (it calls ``backward()``), takes the pending estimate,
    applies the ``on_nonfinite`` policy to ``p.grad`` and to the estimate.

    Returns:
        ``StepInputs(loss, proceed, params, estimate)`` as :func:`closure_step`; ``estimate`` is
        ``None`` when no estimate was pending (a step that does not refresh).

    Raises:
        CurvatureNotSuppliedError: the step refreshes the curvature and nothing supplied it.
        NonFiniteError: a NaN/inf gradient or estimate under ``on_nonfinite="raise"``.
    """
    feed = cast(CurvatureFeed, optimizer)
    loss: Tensor | None = None
    if closure is not None:
        with torch.enable_grad():
            out = closure()
        loss = out.detach() if isinstance(out, Tensor) else None
    pending, feed._pending_curvature = feed._pending_curvature, None
    step = lambda: next_step_number(optimizer)  # noqa: E731
    if pending is None and feed.curvature_due():
        raise CurvatureNotSuppliedError(
            f"{type(optimizer).__name__} step {step()} refreshes its curvature (every "
            f"{optimizer.defaults['update_period']} steps), but {feed.curvature_source} supplied "
            "no estimate: the estimate is taken on the step's training forward pass (model in "
            "training mode, grad enabled) before backward(). Set the loop up with one of: "
            + FRAMEWORK_SETUP
        )
    groups: list[dict[str, Any]] = optimizer.param_groups
    params = [p for g in groups for p in g["params"] if p.requires_grad]
    if not check_finite_grads(groups, step=step):
        return StepInputs(loss, False, params, None)
    if pending is None:
        return StepInputs(loss, True, params, None)
    params, diag = pending
    return StepInputs(loss, check_finite_curvature(groups, params, diag, step=step), params, diag)
