"""curvlab.optim: research optimizers as ``torch.optim.Optimizer`` classes, and a name registry.

Every class follows the torch.optim anatomy (param groups, lazily created state under fixed string
keys, ``@torch.no_grad() step(closure=None)``) and declares ``closure_mode``.
"""

from curvlab.optim.adahessian import AdaHessian
from curvlab.optim.adopt import ADOPT
from curvlab.optim.dog import DoG, LDoG, PolynomialDecayAverager
from curvlab.optim.frugal import FRUGAL
from curvlab.optim.mfac import MFAC
from curvlab.optim.newton import Newton
from curvlab.optim.psgd_kron import PSGDKron
from curvlab.optim.psgd_lra import PSGDLRA
from curvlab.optim.registry import OPTIMIZERS, available, create
from curvlab.optim.sophia import Sophia

__all__ = [
    "ADOPT",
    "AdaHessian",
    "FRUGAL",
    "MFAC",
    "Newton",
    "OPTIMIZERS",
    "DoG",
    "LDoG",
    "PSGDKron",
    "PSGDLRA",
    "PolynomialDecayAverager",
    "Sophia",
    "available",
    "create",
]
