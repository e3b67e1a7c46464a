"""Monitors and how they hook onto an optimizer.

A monitor is a small object that, every ``every`` optimizer steps, computes a dictionary of named
floats from a model, a fixed probe batch and the optimizer, and does no I/O. :func:`attach` hooks a
list of monitors onto an optimizer through ``Optimizer.register_step_post_hook``; after every
``every``-th step it calls the due monitors and hands their numbers, keyed ``"<monitor>/<number>"``,
to a sink (:mod:`curvlab.monitors.sinks`). It returns a :class:`MonitorHandle` that removes the hook.

Bad input raises at attach time: each monitor's :meth:`Monitor.validate` checks that the optimizer
updates the parameters it watches and that its probe batch fits the model. A monitor that raises
during training never breaks the training step: the error is caught, recorded in
:attr:`MonitorHandle.failures`, written to the sink as ``"<monitor>/failed" = 1.0`` and warned about
once per monitor; the model's train/eval mode is restored in every case.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvlab._hooks import HookHandle
from curvlab.errors import (
    ArgumentTypeError,
    EmptyDataError,
    InvalidArgumentError,
    LossNotScalarError,
    ParameterError,
    ShapeMismatchError,
)

LossFn = Callable[[Tensor, Tensor], Tensor]


class MonitorWarning(UserWarning):
    """A monitor failed during training; the training step itself was not affected."""


@dataclass(frozen=True)
class MonitorFailure:
    """One failed monitor check: the optimizer step, the monitor's name and the error text."""

    step: int
    monitor: str
    error: str


class Monitor:
    """Base class of the training-dynamics monitors.

    A subclass implements :meth:`compute` (named floats, no I/O) and, when it needs more than the
    default checks, :meth:`validate`. The default :meth:`validate` checks that every parameter in
    :attr:`params` is updated by the optimizer and, when the monitor has a ``model``, ``loss_fn`` and
    ``data`` (a probe batch ``(inputs, targets)``), that the model has a trainable parameter and
    that the batch runs through the model and gives a scalar loss.

    Args:
        every: check after every ``every``-th optimizer step (>= 1).
        name: prefix of the numbers written to the sink (``"<name>/<number>"``).
        params: the parameters the monitor watches (default: the model's trainable ones).

    Raises:
        InvalidArgumentError: ``every`` < 1 or ``name`` empty or holding ``/``.
    """

    model: nn.Module | None = None
    loss_fn: LossFn | None = None
    data: tuple[Tensor, Tensor] | None = None

    def __init__(self, *, every: int, name: str, params: Sequence[Tensor] | None = None) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise InvalidArgumentError(
                f"every must be an integer >= 1 (checks every N steps), got {every!r}"
            )
        if not isinstance(name, str) or not name or "/" in name:
            raise InvalidArgumentError(
                f"name must be a non-empty string without '/', got {name!r}; it prefixes the "
                "numbers as '<name>/<number>'"
            )
        self.every = every
        self.name = name
        self._params = list(params) if params is not None else None

    @property
    def params(self) -> list[Tensor]:
        """The parameters the monitor reads: ``params=`` if given, else the model's trainable ones."""
        if self._params is not None:
            return self._params
        if self.model is None:
            return []
        return [p for p in self.model.parameters() if p.requires_grad]

    def validate(self, optimizer: torch.optim.Optimizer) -> None:
        """Check, at attach time, that the monitor can run with ``optimizer``.

        Raises:
            ParameterError: no parameter to watch, or the optimizer does not update one of them.
            ShapeMismatchError, LossNotScalarError, EmptyDataError: the probe batch does not fit.
        """
        if self.model is not None and not self.params:
            raise ParameterError(
                f"monitor {self.name!r}: no parameter requires grad; pass params= with the "
                "trained parameters"
            )
        check_params_in_optimizer(self.params, optimizer, self.name)
        if self.model is not None and self.loss_fn is not None and self.data is not None:
            check_probe_batch(self.model, self.loss_fn, self.data, self.name)

    def compute(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Return the monitor's named floats for the optimizer's current state (no I/O)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, every={self.every})"


def check_params_in_optimizer(
    params: Sequence[Tensor], optimizer: torch.optim.Optimizer, name: str
) -> None:
    """Raise :class:`ParameterError` unless every tensor in ``params`` is in the optimizer's groups."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentTypeError(
            f"attach() needs a torch.optim.Optimizer, got {type(optimizer).__name__}; "
            "pass the optimizer that trains the model"
        )
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in params if id(p) not in owned]
    if missing:
        shapes = ", ".join(str(tuple(p.shape)) for p in missing[:4])
        raise ParameterError(
            f"monitor {name!r} watches {len(missing)} parameter(s) (shapes {shapes}) that the "
            "optimizer does not update; attach it to the optimizer built over the same model's "
            "parameters, or pass params= with only the optimized ones"
        )


def check_probe_batch(model: nn.Module, loss_fn: LossFn, data: Any, name: str) -> None:
    """Run the probe batch through the model once (no grad) and check the loss is a finite scalar.

    Raises:
        ShapeMismatchError: ``data`` is not ``(inputs, targets)`` or does not fit the model / loss.
        EmptyDataError: the batch holds no example.
        LossNotScalarError: the loss is not a scalar.
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise ShapeMismatchError(
            f"monitor {name!r}: the probe batch must be a pair (inputs, targets) of tensors, "
            f"got {type(data).__name__}"
        )
    inputs, targets = data
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise ShapeMismatchError(
            f"monitor {name!r}: the probe batch must hold tensors, got "
            f"({type(inputs).__name__}, {type(targets).__name__})"
        )
    if inputs.shape[0] == 0:
        raise EmptyDataError(f"monitor {name!r}: the probe batch holds no example; pass a few")
    if inputs.shape[0] != targets.shape[0]:
        raise ShapeMismatchError(
            f"monitor {name!r}: the probe batch has {inputs.shape[0]} inputs but "
            f"{targets.shape[0]} targets; pass matching (inputs, targets)"
        )
    was_training = model.training
    try:
        with torch.no_grad():
            loss = loss_fn(model(inputs), targets)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise ShapeMismatchError(
            f"monitor {name!r}: the probe batch (inputs of shape {tuple(inputs.shape)}, targets of "
            f"shape {tuple(targets.shape)}) does not fit the model and loss: {exc}. Pass a batch "
            "drawn from the training data"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise LossNotScalarError(
            f"monitor {name!r}: the loss of the probe batch has shape {shape}; use a loss with "
            "reduction='mean' (or 'sum') that returns a scalar"
        )


class MonitorHandle(HookHandle):
    """What :func:`attach` returns: the live hook, its step counter, failures and the sink.

    Attributes:
        step: optimizer steps taken since attach.
        failures: every :class:`MonitorFailure` so far.
        seconds: monitor name -> total wall-clock seconds spent in its checks.
        checks: monitor name -> number of checks run.
        sink: the sink receiving the numbers.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, monitors: Sequence[Monitor], sink: Any
    ) -> None:
        self.optimizer = optimizer
        self.monitors = list(monitors)
        self.sink = sink
        self.step = 0
        self.failures: list[MonitorFailure] = []
        self.seconds: dict[str, float] = {m.name: 0.0 for m in self.monitors}
        self.checks: dict[str, int] = {m.name: 0 for m in self.monitors}
        self._warned: set[str] = set()
        self._sink_warned = False
        self._hook: Any = optimizer.register_step_post_hook(self._post_step)

    def _detached(self) -> None:
        """Flush the sink."""
        flush = getattr(self.sink, "flush", None)
        if callable(flush):
            flush()

    @property
    def history(self) -> Any:
        """The sink's history (``sink.history``) when the sink keeps one."""
        return getattr(self.sink, "history", None)

    def check_now(self, monitors: Iterable[Monitor] | None = None) -> dict[str, float]:
        """Run the given monitors (default: all) now at the current step, write and return numbers."""
        chosen = self.monitors if monitors is None else list(monitors)
        values: dict[str, float] = {}
        for monitor in chosen:
            values.update(self._run_one(monitor))
        self._write(values)
        return values

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        due = [m for m in self.monitors if self.step % m.every == 0]
        if due:
            self.check_now(due)

    def _run_one(self, monitor: Monitor) -> dict[str, float]:
        model = monitor.model
        was_training = model.training if model is not None else None
        start = time.perf_counter()
        try:
            with torch.enable_grad():
                numbers = monitor.compute(self.optimizer)
            out = {f"{monitor.name}/{key}": float(value) for key, value in numbers.items()}
        except Exception as exc:  # a monitor must never break training
            self.failures.append(MonitorFailure(self.step, monitor.name, repr(exc)))
            if monitor.name not in self._warned:
                self._warned.add(monitor.name)
                warnings.warn(
                    f"monitor {monitor.name!r} failed at step {self.step} ({exc!r}); training "
                    "continues unaffected, later failures are recorded in handle.failures without "
                    "a warning",
                    MonitorWarning,
                    stacklevel=4,
                )
            out = {f"{monitor.name}/failed": 1.0}
        finally:
            if model is not None and was_training is not None:
                model.train(was_training)
            self.seconds[monitor.name] = self.seconds.get(monitor.name, 0.0) + (
                time.perf_counter() - start
            )
            self.checks[monitor.name] = self.checks.get(monitor.name, 0) + 1
        return out

    def _write(self, values: Mapping[str, float]) -> None:
        if not values or self.sink is None:
            return
        try:
            self.sink.write(self.step, dict(values))
        except Exception as exc:  # the sink's I/O must not break training either
            self.failures.append(MonitorFailure(self.step, "<sink>", repr(exc)))
            if not self._sink_warned:
                self._sink_warned = True
                warnings.warn(
                    f"the monitor sink failed at step {self.step} ({exc!r}); training continues",
                    MonitorWarning,
                    stacklevel=4,
                )


def attach(
    optimizer: torch.optim.Optimizer,
    monitors: Monitor | Sequence[Monitor],
    sink: Any = None,
) -> MonitorHandle:
    """Hook monitors onto an optimizer; after every ``monitor.every``-th step they write to ``sink``.

    The numbers of one check go to ``sink.write(step, {"<monitor>/<number>": float})``, ``step``
    counting optimizer steps since attach. Every monitor is validated first, so bad input raises
    here rather than in the middle of training. Monitor names must be unique.

    Args:
        optimizer: the ``torch.optim.Optimizer`` that trains the model.
        monitors: one monitor or a sequence of them.
        sink: any object with ``write(step, values)`` (see :mod:`curvlab.monitors.sinks`);
            default: a new :class:`~curvlab.monitors.sinks.HistorySink`.

    Returns:
        A :class:`MonitorHandle`; ``handle.remove()`` (or leaving a ``with`` block) unhooks.

    Raises:
        ParameterError: a monitor watches parameters the optimizer does not update.
        ShapeMismatchError / LossNotScalarError / EmptyDataError: a probe batch does not fit.
        InvalidArgumentError: no monitor, duplicate names, or a sink without ``write``.
        ArgumentTypeError: ``optimizer`` is not an optimizer, or a monitor is not a Monitor.

    Example:
        >>> import torch
        >>> from curvlab.monitors import attach, HistorySink, GradientNoiseScale
        >>> model = torch.nn.Linear(3, 1)
        >>> X, y = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(64, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> mon = GradientNoiseScale(model, torch.nn.functional.mse_loss, (X, y), batch_size=8, every=2)
        >>> handle = attach(opt, [mon], HistorySink())
        >>> for _ in range(4):
        ...     opt.zero_grad(); torch.nn.functional.mse_loss(model(X), y).backward(); opt.step()
        >>> handle.remove()
        >>> handle.sink.steps("noise_scale/b_simple")
        [2, 4]
    """
    from curvlab.monitors.sinks import HistorySink

    chosen = [monitors] if isinstance(monitors, Monitor) else list(monitors)
    if not chosen:
        raise InvalidArgumentError(
            "attach() needs at least one monitor; pass [Sharpness(...), ...]"
        )
    for monitor in chosen:
        if not isinstance(monitor, Monitor):
            raise ArgumentTypeError(
                f"attach() takes curvlab.monitors.Monitor objects, got {type(monitor).__name__}"
            )
    names = [m.name for m in chosen]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(
            f"monitor names must be unique, got {names}; pass name=... to tell them apart"
        )
    if sink is None:
        sink = HistorySink()
    elif not callable(getattr(sink, "write", None)):
        raise InvalidArgumentError(
            f"the sink must have a write(step, values) method, got {type(sink).__name__}; "
            "wrap a function in curvlab.monitors.CallbackSink"
        )
    for monitor in chosen:
        monitor.validate(optimizer)
    return MonitorHandle(optimizer, chosen, sink)
