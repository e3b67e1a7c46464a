"""A Lightning callback that attaches curvlab monitors for the duration of ``Trainer.fit``.

Needs the optional ``lightning`` (or ``pytorch_lightning``) package; nothing here imports it until
:func:`lightning_callback` is called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from curvlab.monitors._attach import Monitor, MonitorHandle, attach

__all__ = ["lightning_callback"]


def _callback_base() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as exc:
            raise ImportError(
                "lightning_callback needs the optional 'lightning' package: pip install lightning "
                "(or call curvlab.monitors.attach(optimizer, monitors, sink) in a plain loop)"
            ) from exc
    return Callback  # type: ignore[no-any-return]


def lightning_callback(
    monitors: Monitor | Sequence[Monitor], sink: Any = None, optimizer_index: int = 0
) -> Any:
    """Return a Lightning ``Callback`` that attaches ``monitors`` at fit start and removes them at fit end.

    Args:
        monitors: the monitors (as for :func:`curvlab.monitors.attach`).
        sink: the sink (default: a HistorySink, reachable as ``callback.handle.sink``).
        optimizer_index: which of ``trainer.optimizers`` to hook.

    Raises:
        ImportError: Lightning is not installed.
    """
    base = _callback_base()

    class CurvlabMonitors(base):  # type: ignore[misc, valid-type]
        """Attach curvlab monitors to the trainer's optimizer while fitting."""

        def __init__(self) -> None:
            super().__init__()
            self.handle: MonitorHandle | None = None

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.handle = attach(trainer.optimizers[optimizer_index], monitors, sink)

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            if self.handle is not None:
                self.handle.remove()

    return CurvlabMonitors()
