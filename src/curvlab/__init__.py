"""curvlab: a curvature lab for PyTorch.

Operators (which matrix), estimators (which number), optimizers (which update), monitors and a
benchmark harness built on them. See the README for a ten-line tour.
"""

from curvlab import errors
from curvlab.errors import CurvlabError

__version__ = "0.1.0"

__all__ = [
    # errors
    "CurvlabError",
    "errors",
]
