"""The public base of every curvature operator built from ``(model, loss_fn, data)``.

:class:`CurvatureOperator` holds what the Hessian, GGN and Fisher operators share: the parameters
they differentiate (and the check that those have not been replaced or changed since the cached
graphs were built), the model mode and BatchNorm statistics around every forward, the loss and its
weight per batch, and the graph cache. A subclass builds one *linearisation* per batch and applies
it to the columns of a matrix.
"""

from __future__ import annotations

import contextlib
import math
import operator
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor, nn

from curvlab.errors import (
    CurvlabError,
    DTypeError,
    InvalidArgumentError,
    LossNotScalarError,
    NonDeterministicError,
    NonFiniteError,
    ShapeMismatchError,
    UnsupportedLossError,
)
from curvlab.operators._checks import check_choice
from curvlab.operators._context import full_precision, model_context, unwrap_model
from curvlab.operators._losses import check_target_shape
from curvlab.operators.base import LinearOperator
from curvlab.operators.data import BatchSource, TargetFn, move_to
from curvlab.operators.param_space import ParamSpace, select_parameters

__all__ = ["CurvatureOperator", "Mode", "NonDeterministicModelWarning", "OperatorOptions"]

Mode = Literal["eval", "train", "as-is"]
OutputFn = Callable[[Any], Tensor]
_OUTPUT_FN_HINT = (
    "pass output_fn= to map the model's output to the tensor the loss takes (e.g. "
    "output_fn=curvlab.operators.shift_logits with target_fn=curvlab.operators.shift_labels for "
    "a causal LM, or lambda out: out.logits.transpose(1, 2) for per-token cross-entropy)"
)
_MODES = ("eval", "train", "as-is")
_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
GRAPH_CACHE_BYTES = 1 << 30
"""``cache_graph=None`` caches the graphs of several batches when they are estimated to fit this."""
_version = operator.attrgetter("_version")
# what the model may raise on inputs it cannot take (wider than shapes: a model's own checks)
_MODEL_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError)
# torch names the dtype in its messages ("must have the same dtype", "Input type (long int)")
_NAMES_A_DTYPE = re.compile(r"type|Long|Int|Bool|Byte|Char|Short")
# the engine torch.autograd.grad calls after validating its arguments (torch >= 1.x, private)
_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)


class NonDeterministicModelWarning(UserWarning):
    """The model has dropout or BatchNorm in training mode, so its curvature is not a fixed matrix."""


class OperatorOptions(TypedDict, total=False):
    """The keyword options every curvature operator takes (see :class:`HessianOperator`)."""

    mode: Mode
    reduction: str | None
    cache_graph: bool | None
    check_finite: bool
    vectorize: bool
    output_fn: OutputFn | None
    target_fn: TargetFn | None


def _loss_reduction(loss_fn: Any, reduction: str | None) -> str:
    if reduction is not None:
        return check_choice(reduction, ("mean", "sum"), "reduction")
    red = getattr(loss_fn, "reduction", "mean")
    if red not in ("mean", "sum"):
        raise LossNotScalarError(
            f"the loss has reduction={red!r}; curvature operators need a scalar loss, so use "
            "reduction='mean' or 'sum'"
        )
    return str(red)


def _input_tensors(x: Any) -> list[Tensor]:
    """The tensors inside a batch's inputs (a tensor, or a tuple/list/dict of them)."""
    if isinstance(x, Tensor):
        return [x]
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    return [t for v in values for t in _input_tensors(v)]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), leaf


class CurvatureOperator(LinearOperator):
    """Base of the Hessian, GGN and Fisher operators of a model's loss over a data set.

    Subclasses build, per batch, a *linearisation* (the autograd graph a product needs) and apply
    it to the columns of a matrix. When ``cache_graph`` is on, the linearisations are built once
    and reused by every product until a parameter changes, so each product costs one backward pass
    per column instead of a fresh forward and backward. ``cache_graph=None`` (the default) caches
    a single batch always, and several batches when their graphs are estimated to take at most
    :data:`GRAPH_CACHE_BYTES` (1 GiB): the bytes of the tensors the first batch's graph saves
    (parameters excluded, each storage once), scaled by the number of targets of all batches over
    the first batch's. The Hessian then concatenates them into one graph where that is exact
    (see :meth:`_merged_batch`), so a product over several batches costs what one over the same
    data in one batch costs. A change is detected from the parameters' identity (a module attribute
    replaced), version counter (in-place updates, optimizer steps) and storage (``p.data = new``),
    at the cost of one pass over the parameter list per product, in C (``map``) rather than a
    Python loop; inside an estimator (:meth:`fixed`) the pass runs once per call instead. Writes
    through ``p.data`` (``p.data.copy_(...)``) bypass all three: call :meth:`clear_cache` after
    them.

    Every forward the operator runs leaves the model as it found it: the training flags are
    restored and BatchNorm layers that run in training mode use batch statistics without updating
    their running statistics or ``num_batches_tracked``.

    Args and raises: as :class:`~curvlab.operators.HessianOperator`.
    """

    is_symmetric = True
    merge_batches = False
    """Whether automatically cached batches may be concatenated into one graph (Hessian: yes)."""

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
        output_fn: OutputFn | None = None,
        target_fn: TargetFn | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a function "
                "of the parameters in an nn.Module"
            )
        if loss_fn is None or not callable(loss_fn):
            raise UnsupportedLossError(
                f"loss_fn must be a callable loss(outputs, targets) -> scalar, got {loss_fn!r}; "
                "pass e.g. nn.CrossEntropyLoss() or nn.MSELoss()"
            )
        for fn, what in ((output_fn, "output_fn"), (target_fn, "target_fn")):
            if fn is not None and not callable(fn):
                raise InvalidArgumentError(
                    f"{what} must be a callable or None, got {type(fn).__name__}"
                )
        self.mode: Mode = check_choice(mode, _MODES, "mode")  # type: ignore[assignment]
        model, prefix = unwrap_model(model)
        if prefix and params is not None:
            params = [p.removeprefix(prefix) if isinstance(p, str) else p for p in params]
        names, tensors = select_parameters(model, params)
        self.model = model
        self.loss_fn = loss_fn
        self.output_fn = output_fn
        self.reduction = _loss_reduction(loss_fn, reduction)
        self._setup_loss()
        self.data = (
            data
            if isinstance(data, BatchSource)
            else BatchSource(data, self.reduction, loss_fn, target_fn)
        )
        self.params: list[Tensor] = tensors
        owners = [_owner(model, n) for n in names]
        self._slots = [module._parameters for module, _ in owners]
        self._leaves = [leaf for _, leaf in owners]
        self.param_space = ParamSpace(tuple(names), tuple(p.shape for p in tensors))
        self.check_finite = check_finite
        self.vectorize = bool(vectorize)
        self.cache_graph = True if cache_graph is None else bool(cache_graph)
        self._auto_cache = cache_graph is None and not self.data.single
        self._cache: list[Any] | None = None
        self._cache_key: tuple[list[int], list[int]] | None = None
        self._fixed_depth = 0
        self._finite: Tensor | None = None  # products' finiteness, pending inside fixed()
        self._unchecked = False  # inside fixed(check_products=False): the caller checks
        self._init_args: OperatorOptions = {
            "mode": mode,
            "reduction": self.reduction,
            "cache_graph": cache_graph,
            "check_finite": check_finite,
            "vectorize": vectorize,
            "output_fn": output_fn,
        }
        dtypes = {p.dtype for p in tensors}
        if len(dtypes) != 1:
            raise ShapeMismatchError(
                f"the chosen parameters mix dtypes {sorted(map(str, dtypes))}; cast the model to "
                "one dtype (model.double() or model.float())"
            )
        super().__init__((self.param_space.dim,) * 2, tensors[0].dtype, tensors[0].device)
        self._warn_if_stochastic()
        self._validate_batches()

    def _setup_loss(self) -> None:
        """Hook run before the data is read (GGN/Fisher: identify the loss's curvature)."""

    def _validate_batches(self) -> None:
        """Fail at construction, not mid-computation: evaluate the loss on the first batch.

        With ``cache_graph`` the cached graphs are built right here instead: the same checks
        run inside ``_linearise`` and the forward pass is not spent twice. Batches whose inputs
        have other shapes than the first batch's are evaluated too, so that data the model cannot
        take fails here with the shapes named.
        """
        shapes = self.data.feature_shapes
        differ = any(s != shapes[0] for s in shapes)  # the data is read again only then
        for i, (x, y) in enumerate(self.data._iter_raw() if differ else ()):
            if shapes[i] != shapes[0]:
                self._try_batch(x, y, self._shapes_note(i))
        if self._auto_cache:
            self.cache_graph = self._graphs_fit()
        if self.cache_graph:
            for _ in self._linearisations():
                pass
            return
        x, y, w = next(iter(self.data))
        with torch.no_grad(), self._model_mode():
            outputs = self._forward(x)
            self._loss(outputs, y, w)
            self._check_outputs(outputs, y.to(self.device))

    def _graphs_fit(self) -> bool:
        """Whether the graphs of all batches are estimated to fit :data:`GRAPH_CACHE_BYTES`.

        Builds the first batch's linearisation once with a hook that records the storage of every
        tensor its graph saves (parameters excluded), and scales those bytes by the number of
        targets of all the batches over the first's.
        """
        storages: dict[int, int] = {}
        own = {p.untyped_storage().data_ptr() for p in self.params}

        def pack(t: Tensor) -> Tensor:
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # a tensor without a storage of its own
                return t
            if st.data_ptr() not in own:
                storages[st.data_ptr()] = st.nbytes()
            return t

        x, y, w = next(iter(self.data))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self._model_mode():
            self._linearise(x, y, w)
        sizes = self.data.sizes
        return sum(storages.values()) * sum(sizes) / sizes[0] <= GRAPH_CACHE_BYTES

    def _try_batch(self, x: Any, y: Tensor, what: str) -> None:
        with torch.no_grad(), self._model_mode():
            outputs = self._forward(x)  # a model that rejects x raises naming the batch
        targets = y.to(self.device)
        try:
            check_target_shape(self.loss_fn, outputs, targets)
            self.loss_fn(outputs, targets)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise ShapeMismatchError(
                f"{what}, and the loss rejects its output ({exc}); give every batch inputs "
                "of the shape the model takes"
            ) from exc

    def _shapes_note(self, i: int) -> str:
        shapes = self.data.feature_shapes
        return f"batch {i} has inputs of shapes {shapes[i]}, batch 0 {shapes[0]}"

    def _check_outputs(self, outputs: Tensor, targets: Tensor) -> None:
        """Hook for operators with requirements on the outputs (GGN/Fisher: the loss kind)."""

    # -- model mode -----------------------------------------------------------------------------
    def _stochastic_modules(self) -> list[str]:
        return [
            n for n, m in self.model.named_modules() if isinstance(m, _STOCHASTIC) and m.training
        ]

    def _warn_if_stochastic(self) -> None:
        if self.mode == "eval":
            return
        if self.mode == "train":
            names = [n for n, m in self.model.named_modules() if isinstance(m, _STOCHASTIC)]
        else:
            names = self._stochastic_modules()
        if names:
            warnings.warn(
                f"modules {names[:4]} (dropout/BatchNorm) run in training mode, so this "
                f"{type(self).__name__} is not a fixed matrix: products depend on the batch "
                "statistics and the random state. Use mode='eval' (the default) for a fixed matrix.",
                NonDeterministicModelWarning,
                stacklevel=3,
            )

    @contextlib.contextmanager
    def _model_mode(self) -> Iterator[None]:
        """Run the model in the operator's mode; restore the flags and BatchNorm statistics after.

        A BatchNorm layer in training mode with ``track_running_stats`` normalises by the batch
        statistics and updates its running ones; with ``track_running_stats`` off for the forward
        it computes the same output and updates nothing (no copy of the statistics is needed).
        """
        modules = list(self.model.modules())
        flags = [(m, m.training) for m in modules] if self.mode != "as-is" else []
        want = self.mode == "train"
        if flags and any(flag != want for _, flag in flags):
            self.model.train(want)  # only when a flag differs: train() walks the whole model
        frozen = [
            bn
            for bn in modules
            if isinstance(bn, nn.modules.batchnorm._BatchNorm)
            and bn.training
            and bn.track_running_stats
        ]
        for bn in frozen:
            bn.track_running_stats = False
        try:
            yield
        finally:
            for bn in frozen:
                bn.track_running_stats = True
            for m, flag in flags:
                if m.training != flag:
                    m.training = flag

    # -- forward ----------------------------------------------------------------------------
    def _forward(self, inputs: Any) -> Tensor:
        """The model's output on ``inputs`` as the tensor the loss takes.

        Dict inputs are passed as keywords (``model(**inputs)``), anything else as one argument;
        the forward runs in :func:`~curvlab.operators._context.model_context` (no autocast, math
        attention). The output goes through ``output_fn`` if given; otherwise a tensor is taken as
        it is and a ``ModelOutput`` (or any dict/object with ``logits``) gives its logits. An
        error the model raises becomes the one :meth:`_model_error` names (the ``try`` costs a
        forward that succeeds nothing).
        """
        moved = move_to(inputs, self.device)
        with model_context():
            try:
                out = self.model(**moved) if isinstance(moved, Mapping) else self.model(moved)
            except _MODEL_ERRORS as exc:
                error = self._model_error(inputs, exc)
                if error is None:
                    raise
                raise error from exc
            if self.output_fn is not None:
                out = self.output_fn(out)
                if not isinstance(out, Tensor):
                    raise ShapeMismatchError(
                        f"output_fn returned {type(out).__name__}; it must return the tensor "
                        "the loss takes"
                    )
                return out
        if isinstance(out, Tensor):
            return out
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        if not isinstance(logits, Tensor):
            raise ShapeMismatchError(
                f"the model returned {type(out).__name__}, which is not a tensor and has no "
                f"logits; {_OUTPUT_FN_HINT}"
            )
        return logits

    def _model_error(self, inputs: Any, exc: Exception) -> CurvlabError | None:
        """The error to raise for ``exc``, which the model raised on ``inputs`` (``None``: as is).

        Runs only after the model raised, so it costs the products nothing. The batch is found
        by the identity of its first input tensor (else it is named by its shapes). Floating-point
        inputs of another dtype than the parameters', or integer inputs with an error that names
        a dtype, give a :class:`~curvlab.errors.DTypeError`; any other error a
        :class:`~curvlab.errors.ShapeMismatchError`. Out of memory and curvlab's own errors
        (from a nested operator) pass unchanged.
        """
        if isinstance(exc, (CurvlabError, torch.OutOfMemoryError)):
            return None
        tensors = _input_tensors(inputs)
        index = self._batch_index(tensors)
        where = "a batch" if index is None else f"batch {index}"
        told = f"the model raised on {where}: {exc}"
        floats = {t.dtype for t in tensors if t.is_floating_point() and t.dtype != self.dtype}
        if floats:
            wrong = sorted(map(str, floats))
            return DTypeError(
                f"{told}; its inputs are {', '.join(wrong)} and the model's parameters "
                f"{self.dtype}: convert the inputs (x.to({self.dtype})) or the model "
                f"(model.to({wrong[0]}))"
            )
        ints = sorted({str(t.dtype) for t in tensors if not t.is_floating_point()})
        if ints and _NAMES_A_DTYPE.search(str(exc)):
            return DTypeError(
                f"{told}; its inputs are {', '.join(ints)}: convert integer features to the "
                f"model's float dtype (x.to({self.dtype}))"
            )
        shapes = self.data.feature_shapes
        if index is not None and shapes[index] != shapes[0]:
            return ShapeMismatchError(
                f"{told}; {self._shapes_note(index)}: give every batch inputs of the shape the "
                "model takes"
            )
        shape = tuple(tuple(t.shape) for t in tensors)
        return ShapeMismatchError(
            f"{told}; give inputs of the shape the model takes (these have shapes {shape})"
        )

    def _batch_index(self, tensors: Sequence[Tensor]) -> int | None:
        """The position in the data of the batch whose first input tensor is ``tensors[0]``."""
        if tensors:
            for i, (x, _) in enumerate(self.data._iter_raw()):
                first = _input_tensors(x)
                if first and first[0] is tensors[0]:
                    return i
        return None

    def _loss(self, outputs: Tensor, targets: Tensor, weight: float) -> Tensor:
        targets = move_to(targets, self.device)
        check_target_shape(self.loss_fn, outputs, targets)
        try:
            loss = self.loss_fn(outputs, targets)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ShapeMismatchError(
                f"the loss function rejected the model output of shape {tuple(outputs.shape)} "
                f"with targets of shape {tuple(targets.shape)} ({exc}); check that the model's "
                f"output fits the loss, or {_OUTPUT_FN_HINT}"
            ) from exc
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise LossNotScalarError(
                f"loss_fn returned {shape}, not a scalar; use a loss with reduction='mean' or "
                "'sum' (e.g. nn.CrossEntropyLoss()), or reduce it yourself"
            )
        loss = loss.reshape(())
        if self.check_finite and not bool(torch.isfinite(loss.detach())):
            raise NonFiniteError(
                f"the loss is {loss.item()} on a batch; check the data and the parameters for "
                "NaN/inf before measuring curvature"
            )
        return loss * weight if weight != 1.0 else loss

    # -- linearisation cache ----------------------------------------------------------------
    def _sync_params(self) -> None:
        """Follow replaced parameters and drop the cached graphs when a parameter changed.

        One pass over the parameter list, run by ``map`` in C: a parameter object replaced on its
        module is picked up (it must keep its shape and dtype), and the cache key (version
        counters and storages of the parameters) catches in-place updates and ``p.data = new``.
        Skipped inside :meth:`fixed`, which runs it once on entry.
        """
        if self._fixed_depth:
            return
        current = list(map(dict.get, self._slots, self._leaves))
        if not all(map(operator.is_, current, self.params)):
            self._follow_replaced(current)
        key = (list(map(_version, self.params)), list(map(Tensor.data_ptr, self.params)))
        if key != self._cache_key:
            self._cache = None
            self._cache_key = key

    @contextlib.contextmanager
    def fixed(self, *, check_products: bool = True) -> Iterator[None]:
        """Within the block the parameters are taken as fixed: an estimator's products.

        The parameter check runs once on entry instead of at every product; a change made
        inside the block is seen at the first product after it. On an accelerator the products'
        finiteness check is a device flag read once when the block ends (raising
        :class:`~curvlab.errors.NonFiniteError` then), so products do not wait for the host.
        With ``check_products=False`` the products are not checked inside the block (the caller
        checks what it computes from them); a nested block with the default checks again.
        """
        self._sync_params()
        self._fixed_depth += 1
        unchecked, self._unchecked = self._unchecked, not check_products
        try:
            yield
        finally:
            self._fixed_depth -= 1
            self._unchecked = unchecked
        if not self._fixed_depth and self._finite is not None:
            finite, self._finite = self._finite, None
            if not bool(finite):
                self._raise_nonfinite()

    def _follow_replaced(self, current: Sequence[Tensor | None]) -> None:
        """Adopt parameters replaced on their modules, if they keep their shape and dtype."""
        for i, (new, old) in enumerate(zip(current, self.params)):
            if new is old:
                continue
            if new is None or new.shape != old.shape or new.dtype != self.dtype:
                raise ShapeMismatchError(
                    f"parameter {self.param_space.names[i]!r} was replaced by "
                    f"{'nothing' if new is None else (tuple(new.shape), new.dtype)} since the "
                    f"operator was built for {(tuple(old.shape), old.dtype)}; build a new operator"
                )
            self.params[i] = new

    def _linearise(self, inputs: Any, targets: Tensor, weight: float) -> Any:
        raise NotImplementedError

    def _apply(self, lin: Any, V: Tensor) -> Tensor:
        """Return this batch's contribution to ``A @ V`` for ``V`` of shape ``[n, k]``."""
        raise NotImplementedError

    def _linearisations(self) -> Iterator[Any]:
        self._sync_params()
        if self.cache_graph:
            if self._cache is None:
                merged = self._merged_batch()
                with self._model_mode():
                    self._cache = [self._linearise(x, y, w) for x, y, w in merged or self.data]
            yield from self._cache
            return
        for x, y, w in self.data:
            with self._model_mode():
                lin = self._linearise(x, y, w)
            yield lin
            del lin

    def _merged_batch(self) -> list[tuple[Tensor, Tensor, float]] | None:
        """All batches as one, when the cache was chosen automatically and that is exact.

        In ``mode="eval"`` a model treats examples independently, so the loss's own reduction
        over the concatenated batches is the full-data loss (mean: the summed losses over the
        summed denominators, class weights and ``ignore_index`` included; sum: the sum), and
        one graph replaces several: a product is one backward pass instead of one per batch.
        Only for tensor inputs and targets of equal trailing shapes and without ``output_fn``
        (which may not act example by example); ``cache_graph=True`` keeps one graph per batch.
        """
        if not (self.merge_batches and self._auto_cache and self.cache_graph):
            return None
        if self.mode != "eval" or self.output_fn is not None:
            return None
        pairs = list(self.data._iter_raw())
        if not all(isinstance(x, Tensor) for x, _ in pairs):
            return None
        if len({(x.shape[1:], y.shape[1:], x.dtype, y.dtype) for x, y in pairs}) != 1:
            return None
        xs = torch.cat([move_to(x, self.device) for x, _ in pairs])
        ys = torch.cat([move_to(y, self.device) for _, y in pairs])
        return [(xs, ys, 1.0)]

    def clear_cache(self) -> None:
        """Drop the cached graphs (they are rebuilt at the next product)."""
        self._cache = None
        self._cache_key = None

    def _matmat(self, V: Tensor) -> Tensor:
        out: Tensor | None = None
        with full_precision():
            for lin in self._linearisations():
                part = self._apply(lin, V)  # a fresh tensor: accumulate in place
                out = part if out is None else out.add_(part)
        if out is None:
            out = torch.zeros_like(V)
        if not self.check_finite or self._unchecked:
            return out
        if self._fixed_depth and out.device.type != "cpu":
            # inside an estimator on an accelerator: a flag on the device, read when the
            # estimator's block ends, so that products do not synchronise with the host
            finite = torch.isfinite(out).all()
            self._finite = finite if self._finite is None else self._finite & finite
        # a finite sum implies finite entries; only a non-finite sum (NaN/inf, or an overflow
        # of the sum itself) needs the element-wise check
        elif not math.isfinite(float(out.sum())) and not bool(torch.isfinite(out).all()):
            self._raise_nonfinite()
        return out

    def _raise_nonfinite(self) -> None:
        raise NonFiniteError(
            f"a {type(self).__name__} product contains NaN/inf; the loss surface is not "
            "finite here (check the parameters, the data and the input vectors)"
        )

    # -- helpers for subclasses -------------------------------------------------------------
    def _grad(
        self,
        outputs: Sequence[Tensor] | Tensor,
        grad_outputs: Sequence[Tensor] | Tensor | None,
        *,
        create_graph: bool = False,
        batched: bool = False,
    ) -> list[Tensor]:
        """``autograd.grad`` w.r.t. the chosen parameters, with zeros for unused ones.

        With ``batched=True`` the ``grad_outputs`` carry a leading batch dimension of columns
        (``is_grads_batched``) and so do the results.
        """
        if create_graph or batched or grad_outputs is None or _ENGINE is None:
            grads = torch.autograd.grad(
                outputs,
                self.params,
                grad_outputs=grad_outputs,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
                is_grads_batched=batched,
            )
        else:  # a product: the shapes are ours, so skip autograd.grad's checks (~0.1 ms a call)
            grads = _ENGINE.run_backward(
                tuple(outputs) if isinstance(outputs, Sequence) else (outputs,),
                tuple(grad_outputs) if isinstance(grad_outputs, Sequence) else (grad_outputs,),
                True,  # retain_graph
                False,  # create_graph
                tuple(self.params),
                True,  # allow_unreachable (unused parameters give None)
                False,  # accumulate_grad
            )
        if not batched:
            return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]
        first = grad_outputs if isinstance(grad_outputs, Tensor) else next(iter(grad_outputs or []))
        k = first.shape[0]
        return [p.new_zeros(k, *p.shape) if g is None else g for g, p in zip(grads, self.params)]

    def _columns(self, V: Tensor) -> list[Tensor]:
        """``V [n, k]`` split per parameter as ``[k, *shape]`` pieces (for batched products)."""
        return [piece.movedim(-1, 0) for piece in self.param_space.split(V)]

    def _flatten_columns(self, pieces: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`_columns`: ``[k, *shape]`` pieces to an ``[n, k]`` matrix."""
        k = pieces[0].shape[0]
        return torch.cat([p.reshape(k, -1) for p in pieces], dim=1).T

    # -- public extras ----------------------------------------------------------------------
    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Return the full-data loss and its flat gradient ``[n]`` over the chosen parameters."""
        self._sync_params()
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for x, y, w in self.data:
            with self._model_mode(), torch.enable_grad():
                loss = self._loss(self._forward(x), y, w)
                g = self._grad(loss, None)
            total += loss.detach()
            grad += self.param_space.flatten([t.detach() for t in g])
        return float(total), grad

    def check_deterministic(
        self, rtol: float = 1e-6, generator: torch.Generator | None = None
    ) -> None:
        """Raise :class:`~curvlab.errors.NonDeterministicError` if the operator is not a fixed matrix.

        Evaluates the loss and gradient twice (fresh forward passes) and, without a graph cache,
        two products with the same random vector; any disagreement beyond ``rtol`` means the model
        or the data changes between evaluations (dropout or BatchNorm in training mode, a shuffling
        or augmenting loader). Costs two gradients and, without a cache, two products; it is
        opt-in rather than run at every construction.
        """
        (l1, g1), (l2, g2) = self.loss_and_gradient(), self.loss_and_gradient()
        problems = []
        if abs(l1 - l2) > rtol * max(abs(l1), 1e-30) or not torch.allclose(
            g1, g2, rtol=rtol, atol=0
        ):
            problems.append("the loss/gradient")
        if not self.cache_graph:
            dev = generator.device if generator is not None else torch.device("cpu")
            v = torch.randn(self.shape[0], generator=generator, dtype=self.dtype, device=dev).to(
                self.device
            )
            if not torch.allclose(self.matmat(v), self.matmat(v), rtol=rtol, atol=0):
                problems.append("products")
        if problems:
            raise NonDeterministicError(
                f"{' and '.join(problems)} changed between two evaluations: the model or the data "
                "is not deterministic (dropout/BatchNorm in training mode, a shuffling DataLoader, "
                "data augmentation). Use mode='eval', shuffle=False, or a fixed list of batches."
            )

    def block(self, names: str | Sequence[str]) -> CurvatureOperator:
        """The diagonal block of this operator for a subset of its parameters.

        Args:
            names: a block name from :meth:`blocks` (a module such as ``"fc1"``), a parameter
                name, or a list of parameter names.

        Returns:
            An operator of the same kind over those parameters only. Its products are cheaper:
            autograd skips everything the other parameters need.
        """
        if isinstance(names, str):
            groups = self.blocks("module")
            names = groups.get(names, [names])
        return type(self)(
            self.model,
            self.loss_fn,
            self.data,
            params=list(names),
            **self._block_kwargs(),
        )

    def _block_kwargs(self) -> dict[str, Any]:
        return dict(self._init_args)

    def blocks(self, by: str = "module") -> dict[str, list[str]]:
        """Parameter names grouped into blocks: per ``"module"`` (default) or per ``"param"``."""
        return self.param_space.groups(by)
