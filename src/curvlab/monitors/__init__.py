"""Training-dynamics monitors: named floats every few optimizer steps, written to a sink.

    handle = curvlab.monitors.attach(optimizer, [Sharpness(model, loss_fn, probe)], HistorySink())
    ... train ...
    handle.remove()

Monitors do no I/O; sinks (:mod:`curvlab.monitors.sinks`) do. See :func:`attach` for the contract.
"""

from curvlab.monitors._attach import Monitor, MonitorFailure, MonitorHandle, MonitorWarning, attach
from curvlab.monitors.curvature_lr import CurvatureLR
from curvlab.monitors.gfs import GFSSharpness
from curvlab.monitors.neural_collapse import NCMetrics, NeuralCollapse, neural_collapse_metrics
from curvlab.monitors.noise_scale import (
    GradientNoiseScale,
    lr_scaling_rule,
    noise_scale_from_gradients,
    scale_lr,
)
from curvlab.monitors.sharpness import Sharpness, adam_preconditioner, stability_threshold
from curvlab.monitors.sinks import CallbackSink, CSVSink, HistorySink, TensorBoardSink
from curvlab.monitors.subspace import (
    SubspaceOverlap,
    gradient_overlap,
    project_gradient_,
    subspace_persistence,
)

__all__ = [
    # machinery
    "Monitor",
    "MonitorFailure",
    "MonitorHandle",
    "MonitorWarning",
    "attach",
    # monitors
    "CurvatureLR",
    "GFSSharpness",
    "GradientNoiseScale",
    "NeuralCollapse",
    "Sharpness",
    "SubspaceOverlap",
    # functions
    "NCMetrics",
    "adam_preconditioner",
    "gradient_overlap",
    "project_gradient_",
    "stability_threshold",
    "subspace_persistence",
    "lr_scaling_rule",
    "neural_collapse_metrics",
    "noise_scale_from_gradients",
    "scale_lr",
    # sinks
    "CSVSink",
    "CallbackSink",
    "HistorySink",
    "TensorBoardSink",
]


def __getattr__(name: str) -> object:
    if name == "lightning_callback":
        raise AttributeError(
            "curvlab.monitors.lightning_callback moved to "
            "curvlab.integrations.lightning.MonitorCallback, which logs through pl_module.log: "
            "from curvlab.integrations.lightning import MonitorCallback"
        )
    if name == "StoreSink":
        raise AttributeError(
            "curvlab.monitors.StoreSink moved to curvlab.bench.StoreSink (the benchmark store's "
            "sink belongs to the benchmark): from curvlab.bench import StoreSink"
        )
    raise AttributeError(f"module 'curvlab.monitors' has no attribute {name!r}")
