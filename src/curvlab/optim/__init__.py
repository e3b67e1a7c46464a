"""curvlab.optim: research optimizers as ``torch.optim.Optimizer`` classes, and a name registry.

Every class follows the torch.optim anatomy (param groups, lazily created state under fixed string
keys, ``@torch.no_grad() step(closure=None)``) and declares ``closure_mode``.
"""

from curvlab.optim.adopt import ADOPT
from curvlab.optim.dog import DoG, LDoG, PolynomialDecayAverager
from curvlab.optim.registry import OPTIMIZERS, available, create

__all__ = [
    "ADOPT",
    "OPTIMIZERS",
    "DoG",
    "LDoG",
    "PolynomialDecayAverager",
    "available",
    "create",
]
