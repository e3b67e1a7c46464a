"""Hugging Face ``Trainer`` callbacks: curvature optimizers, monitors into the Trainer's reporting.

* :class:`CurvatureCallback` — ``Trainer(..., optimizers=(Sophia(model.parameters(), ...), None),
  callbacks=[CurvatureCallback()])`` trains :class:`~curvlab.optim.Sophia` /
  :class:`~curvlab.optim.AdaHessian`: a forward hook reads the model's ``ModelOutput`` (``.loss``,
  and ``.logits`` for SophiaG) on the steps that refresh the curvature.
* :class:`MonitorCallback` — puts monitor values into the ``logs`` the Trainer reports (and into
  ``state.log_history``). The Trainer hands one ``logs`` dict to every callback in order, the
  reporters (TensorBoard, W&B, …) before the callbacks passed as ``callbacks=``; add it with
  :func:`add_callback` ``(trainer, MonitorCallback(...))``, which puts it first.

Needs the optional ``transformers`` package (``pip install curvlab[transformers]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from curvlab._optional import optional_attr
from curvlab.integrations._feed import CurvatureHandle, PendingSink, attach_curvature
from curvlab.monitors._attach import Monitor, MonitorHandle, attach

TrainerCallback: Any = optional_attr(
    "transformers",
    "TrainerCallback",
    "curvlab.integrations.transformers needs the optional 'transformers' package: pip "
    "install curvlab[transformers]",
)

__all__ = ["CurvatureCallback", "MonitorCallback", "add_callback"]

_SOURCE = "curvlab.integrations.transformers.CurvatureCallback()"


def _unwrapped(model: Any) -> Any:
    """The model the Trainer trains, without a distributed wrapper."""
    return getattr(model, "module", model)


class CurvatureCallback(TrainerCallback):  # type: ignore[misc]
    """Feed a curvature optimizer's refreshes from the Hugging Face ``Trainer``'s forward passes.

    At train begin it calls :func:`curvlab.integrations.attach_curvature` on the Trainer's model
    and optimizer (pass the optimizer as ``optimizers=(opt, None)``, or subclass
    ``create_optimizer``). On the steps that refresh the curvature (1, k+1, …; the first
    micro-batch under gradient accumulation) the model's training forward pass is read: the
    ``ModelOutput``'s ``loss`` (the batch must carry ``labels``) and, for SophiaG, its ``logits``.
    The trajectory equals the closure contract's on the same batches. Undone at train end.

    Attributes:
        handle: the :class:`~curvlab.integrations.CurvatureHandle` while training.

    Raises:
        ArgumentTypeError: (at train begin) the Trainer's optimizer is not Sophia / AdaHessian.
        CurvatureInputError: (on a refresh step) the model's output has no ``logits`` (SophiaG)
            or no ``loss`` (SophiaH, AdaHessian), or is a tuple.

    Example::

        trainer = transformers.Trainer(model, args, train_dataset=data,
                                       optimizers=(curvlab.optim.Sophia(model.parameters()), None),
                                       callbacks=[curvlab.integrations.transformers.CurvatureCallback()])
    """

    def __init__(self) -> None:
        self.handle: CurvatureHandle | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Hook the model and switch the optimizer to external curvature."""
        self.handle = attach_curvature(
            _unwrapped(kwargs.get("model")), kwargs.get("optimizer"), source=_SOURCE
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the hook."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class MonitorCallback(TrainerCallback):  # type: ignore[misc]
    """Attach curvlab monitors while training; report their values with the Trainer's logs.

    The monitors run after the optimizer steps they are due on; on such a step the callback asks
    the Trainer to log (``control.should_log``), and in ``on_log`` it adds the values to the
    ``logs`` dict and to ``state.log_history[-1]``. Every callback after it — the reporters
    (TensorBoard, W&B, MLflow, …) when it was added with :func:`add_callback` — sees them.

    Args:
        monitors: one :class:`~curvlab.monitors.Monitor` or a sequence of them.

    Attributes:
        handle: the :class:`~curvlab.monitors.MonitorHandle` while training.

    Example::

        add_callback(trainer, MonitorCallback([Sharpness(model, loss_fn, batch)]))
    """

    def __init__(self, monitors: Monitor | Sequence[Monitor]) -> None:
        self.monitors = monitors
        self.handle: MonitorHandle | None = None
        self._pending = PendingSink()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Attach the monitors to the Trainer's optimizer."""
        opt: Any = kwargs.get("optimizer")
        while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
            opt = opt.optimizer  # accelerate's AcceleratedOptimizer
        self.handle = attach(opt, self.monitors, self._pending)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Ask the Trainer to log on a step whose monitors ran."""
        if self._pending.values:
            control.should_log = True

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Add the monitor values to ``logs`` and to ``state.log_history[-1]``."""
        values = self._pending.take()
        if logs is not None:
            logs.update(values)
        if state.log_history:
            state.log_history[-1].update(values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the monitors."""
        if self.handle is not None:
            self.handle.remove()


def add_callback(trainer: Any, callback: Any) -> None:
    """Put ``callback`` first among the Trainer's callbacks, before its reporters.

    The Trainer calls its callbacks in order with one ``logs`` dict; the reporters of
    ``report_to`` come before the callbacks passed as ``callbacks=``, so a callback that adds
    values to ``logs`` (:class:`MonitorCallback`) must come first for them to be reported.

    Example::

        add_callback(trainer, MonitorCallback([Sharpness(model, loss_fn, batch)]))
    """
    trainer.callback_handler.callbacks.insert(0, callback)
