"""curvlab: a curvature lab for PyTorch.

Operators (which matrix), estimators (which number), optimizers (which update), monitors and a
benchmark harness built on them. See the README for a ten-line tour.
"""

from curvlab import bench, distributed, errors, monitors, optim, phenomena, schedules
from curvlab.errors import (
    ClosureRequiredError,
    CurvlabError,
    EmptyDataError,
    LossNotScalarError,
    NonDeterministicError,
    NonFiniteError,
    NotSymmetricError,
    ParameterError,
    ShapeMismatchError,
    StateDictError,
    UnsupportedLossError,
)
from curvlab.estimators import (
    Eigenpairs,
    Estimate,
    LayerSensitivity,
    SpectralDensity,
    diagonal,
    eigsh,
    layer_sensitivity,
    power_iteration,
    spectral_density,
    trace,
)
from curvlab.operators import (
    CountingOperator,
    DenseOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
)

__version__ = "0.1.0"

__all__ = [
    # operators
    "CountingOperator",
    "DenseOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    # estimators
    "Eigenpairs",
    "Estimate",
    "LayerSensitivity",
    "SpectralDensity",
    "diagonal",
    "eigsh",
    "layer_sensitivity",
    "power_iteration",
    "spectral_density",
    "trace",
    # errors
    "ClosureRequiredError",
    "CurvlabError",
    "EmptyDataError",
    "LossNotScalarError",
    "NonDeterministicError",
    "NonFiniteError",
    "NotSymmetricError",
    "ParameterError",
    "ShapeMismatchError",
    "StateDictError",
    "UnsupportedLossError",
    "errors",
    # modules
    "bench",
    "distributed",
    "optim",
    "schedules",
    "monitors",
    "phenomena",
]
