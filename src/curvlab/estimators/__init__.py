"""Estimators: numbers computed from a curvature operator (or a dense symmetric tensor).

Each is a plain function with its cost (``num_matvecs=``) and randomness (``generator=``) in the
signature, returning a frozen record that reports what it cost and how uncertain it is.
"""

from curvlab.estimators.density import spectral_density
from curvlab.estimators.diagonal import diagonal
from curvlab.estimators.eigen import eigsh, power_iteration
from curvlab.estimators.layerwise import layer_sensitivity
from curvlab.estimators.param_diagonal import (
    CurvatureEstimator,
    GNBEstimator,
    HutchinsonEstimator,
    gnb_diagonal,
    hutchinson_diagonal,
    spatial_average,
)
from curvlab.estimators.probes import gaussian, rademacher, rademacher_like, sample_probes
from curvlab.estimators.results import Eigenpairs, Estimate, LayerSensitivity, SpectralDensity
from curvlab.estimators.solve import InverseOperator, Solution, solve
from curvlab.estimators.trace import hutchinson_trace, hutchpp_trace, trace

__all__ = [
    # results
    "Eigenpairs",
    "Estimate",
    "LayerSensitivity",
    "SpectralDensity",
    # estimators
    "diagonal",
    "eigsh",
    "hutchinson_trace",
    "hutchpp_trace",
    "layer_sensitivity",
    "power_iteration",
    "spectral_density",
    "trace",
    # probes
    "gaussian",
    "rademacher",
    "rademacher_like",
    "sample_probes",
    # per-parameter curvature diagonals (the estimates of the curvature optimizers)
    "hutchinson_diagonal",
    "gnb_diagonal",
    "spatial_average",
    "CurvatureEstimator",
    "HutchinsonEstimator",
    "GNBEstimator",
    # linear solves with an operator
    "solve",
    "Solution",
    "InverseOperator",
]
