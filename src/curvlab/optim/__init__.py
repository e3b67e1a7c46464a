"""curvlab.optim: research optimizers as ``torch.optim.Optimizer`` classes, and a name registry.

Every class follows the torch.optim anatomy (param groups, lazily created state under fixed string
keys, ``@torch.no_grad() step(closure=None)``) and declares ``closure_mode``.

One layout, in the manner of ``torch/optim/adamw.py``: the class validates its arguments
(``_validation.py``), creates state only in ``_init_group`` (``state["step"]`` is a float32
scalar tensor of completed steps) and its ``step`` holds no math: it runs the closure, applies the
one non-finite policy (``check_finite_grads``) and calls the functional entry point
``<name>(*lists, **options)`` (``adopt``, ``adahessian``, ``dog``, ``frugal``, ``mfac``,
``psgd_kron``, ``psgd_lra``, ``psgd_xmat``, ``sophia``): ``lists`` are the per-parameter lists in
the order its docstring names (params, grads, the state lists, state_steps), ``options`` the
hyper-parameters of one step as one TypedDict (``ADOPTHyper``...) whose keys are the param-group
keys, plus the path (``foreach``, ``fused``, ``scratch``: ``_dispatch.KernelChoice``).
``_dispatch.dispatch`` chooses, as torch's functional ``adamw`` does, between
``_single_tensor_<name>`` (the reference, the rule as in the paper), ``_multi_tensor_<name>`` (the
foreach fast path, equal to it) and ``_fused_<name>`` (compiled, ``_fused.py``). Temporaries live
in the one scratch buffer of ``_scratch.py``; ``load_state_dict`` goes through
``load_state_dict_checked``.

Adding an optimizer: copy ``adopt.py`` (the template) to ``<name>.py`` and replace the rule, keeping
the order of the file (docstring with the algorithm box and the paper, ``_STATE_KEYS``, the
hyper-parameter TypedDict and its ``<Name>Options``, the class, the functional entry point, the
single-tensor reference, the multi-tensor path if there is one); add one line to ``OPTIMIZERS``
in ``registry.py``; write ``tests/optim/test_<name>.py`` with a float64 reference loop from the
paper's pseudo-code (and a test that the multi-tensor path equals the reference); add one ``Case``
row to the table of ``tests/optim/test_contract.py``; add one line to ``CHANGELOG.md``.
"""

from curvlab.optim.adahessian import AdaHessian
from curvlab.optim.adopt import ADOPT
from curvlab.optim.dog import DoG, LDoG, PolynomialDecayAverager
from curvlab.optim.frugal import FRUGAL
from curvlab.optim.mfac import MFAC
from curvlab.optim.newton import Newton
from curvlab.optim.psgd_kron import PSGDKron
from curvlab.optim.psgd_lra import PSGDLRA
from curvlab.optim.psgd_xmat import PSGDXMat
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
    "PSGDXMat",
    "PolynomialDecayAverager",
    "Sophia",
    "available",
    "create",
]
