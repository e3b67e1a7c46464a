"""Lightning callbacks: curvature optimizers in automatic optimization, monitors into the logger.

* :class:`CurvatureCallback` — ``Trainer(callbacks=[CurvatureCallback()])`` trains
  :class:`~curvlab.optim.Sophia` / :class:`~curvlab.optim.AdaHessian` from ``configure_optimizers``
  in automatic optimization. A ``training_step`` that returns the loss is enough for SophiaH and
  AdaHessian; SophiaG (the default GNB estimator) samples labels from the logits, so return
  ``{"loss": loss, "logits": logits}``.
* :class:`MonitorCallback` — ``Trainer(callbacks=[MonitorCallback([Sharpness(...)])])`` attaches
  curvlab monitors while fitting and logs every value through ``pl_module.log``, so the Trainer's
  logger (TensorBoard, CSV, W&B, …) records them.

Needs the optional ``lightning`` package (``pip install curvlab[lightning]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from curvlab._optional import optional_attr
from curvlab.integrations._feed import PendingSink, curvature_optimizer, feed
from curvlab.monitors._attach import Monitor, MonitorHandle, attach
from curvlab.optim._closure import CurvatureFeed

Callback: Any = optional_attr(
    "lightning.pytorch",
    "Callback",
    "curvlab.integrations.lightning needs the optional 'lightning' package: pip install "
    "curvlab[lightning] (or, in a plain loop, curvlab.integrations.attach_curvature and "
    "curvlab.monitors.attach)",
)

__all__ = ["CurvatureCallback", "MonitorCallback"]

_SOURCE = "curvlab.integrations.lightning.CurvatureCallback()"


class CurvatureCallback(Callback):  # type: ignore[misc]
    """Feed a curvature optimizer's refreshes from Lightning's automatic optimization.

    At fit start the trainer's optimizer is switched to the torch contract
    (:meth:`~curvlab.optim.Sophia.expect_external_curvature`: Lightning's closure calls
    ``backward()``) and ``training_step`` is wrapped to keep what it returns. On the steps that
    refresh the curvature (1, k+1, …; the first micro-batch under gradient accumulation),
    ``on_before_backward`` estimates it from that output — the loss, and the ``"logits"`` of a
    returned dict — on the live graph. The trajectory equals the closure contract's on the same
    batches. Everything is undone at fit end.

    Args:
        optimizer_index: which of ``trainer.optimizers`` to feed (default 0).

    Raises:
        ArgumentTypeError: (at fit start) that optimizer is not Sophia / AdaHessian.
        CurvatureInputError: (on a refresh step) ``training_step`` returned no logits for SophiaG,
            or no loss.

    Example::

        trainer = lightning.Trainer(callbacks=[curvlab.integrations.lightning.CurvatureCallback()])
    """

    def __init__(self, optimizer_index: int = 0) -> None:
        super().__init__()
        self.optimizer_index = optimizer_index
        self.optimizer: CurvatureFeed | None = None
        self._output: Any = None
        self._module: Any = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Switch the optimizer to external curvature and wrap ``training_step``."""
        opt = curvature_optimizer(trainer.optimizers[self.optimizer_index], _SOURCE)
        opt.expect_external_curvature(_SOURCE)
        self.optimizer, self._module = opt, pl_module
        step = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._output = step(*args, **kwargs)
            return self._output

        pl_module.training_step = training_step

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        """Estimate the curvature from the step's output when this step refreshes it."""
        output, self._output = self._output, None
        if self.optimizer is None:
            return
        logits = output.get("logits") if isinstance(output, Mapping) else None
        if isinstance(output, Mapping):
            output = output.get("loss")
        feed(
            self.optimizer,
            output if isinstance(output, Tensor) else loss,
            logits,
            loss_fix="return the loss (or a dict with 'loss') from training_step",
            logits_fix='return {"loss": loss, "logits": logits} from training_step',
        )

    def _restore(self) -> None:
        if self._module is not None and "training_step" in vars(self._module):
            del self._module.training_step
        if self.optimizer is not None:
            self.optimizer.expect_external_curvature(None)
        self.optimizer, self._module, self._output = None, None, None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Undo the set-up."""
        self._restore()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Undo the set-up when fitting fails."""
        self._restore()


class MonitorCallback(Callback):  # type: ignore[misc]
    """Attach curvlab monitors while fitting; log every value through ``pl_module.log``.

    The monitors run after the optimizer steps they are due on (as with
    :func:`curvlab.monitors.attach`); their values are logged in ``on_train_batch_end`` of that
    batch with ``pl_module.log(name, value, on_step=True, on_epoch=False)``, so the Trainer's
    logger records them at the trainer's global step (Lightning keeps reporting a logged value
    at later logging steps until it is logged again).

    Args:
        monitors: one :class:`~curvlab.monitors.Monitor` or a sequence of them.
        optimizer_index: which of ``trainer.optimizers`` to hook (default 0).

    Attributes:
        handle: the :class:`~curvlab.monitors.MonitorHandle` while fitting (failures, timings).

    Raises:
        (at fit start) whatever :func:`curvlab.monitors.attach` raises on bad monitors.

    Example::

        trainer = lightning.Trainer(callbacks=[MonitorCallback([Sharpness(model, loss_fn, batch)])])
    """

    def __init__(self, monitors: Monitor | Sequence[Monitor], optimizer_index: int = 0) -> None:
        super().__init__()
        self.monitors = monitors
        self.optimizer_index = optimizer_index
        self.handle: MonitorHandle | None = None
        self._pending = PendingSink()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Attach the monitors to the trainer's optimizer."""
        self.handle = attach(trainer.optimizers[self.optimizer_index], self.monitors, self._pending)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the values of the monitors that ran on this batch's step."""
        for name, value in self._pending.take().items():
            pl_module.log(name, value, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Remove the monitors."""
        if self.handle is not None:
            self.handle.remove()
