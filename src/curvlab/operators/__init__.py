"""Curvature operators: the Hessian, GGN and Fisher of a model's loss, known through products.

Every operator is a :class:`LinearOperator` over the flat vector of the chosen parameters.
"""

from curvlab.operators._context import UnwrappedModelWarning
from curvlab.operators.base import DenseOperator, LinearOperator, as_operator
from curvlab.operators.counting import CountingOperator
from curvlab.operators.curvature import CurvatureOperator, NonDeterministicModelWarning
from curvlab.operators.data import shift_labels, shift_logits
from curvlab.operators.fisher import EmpiricalFisherOperator, FisherOperator
from curvlab.operators.ggn import GGNOperator
from curvlab.operators.hessian import HessianOperator
from curvlab.operators.param_space import ParamSpace

__all__ = [
    "CountingOperator",
    "CurvatureOperator",
    "DenseOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "NonDeterministicModelWarning",
    "ParamSpace",
    "UnwrappedModelWarning",
    "as_operator",
    "shift_labels",
    "shift_logits",
]
