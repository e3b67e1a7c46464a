"""Reproductions of the seed papers' training-dynamics phenomena on CPU-sized problems.

Each function runs one phenomenon, returns a :class:`PhenomenonResult` (numbers, whether the
paper's qualitative claim held, a note, a two-line caption) and, given ``out_dir``, writes a PNG
and a small JSON. :func:`run_all` runs them all and writes an ``index.html``.
"""

from curvlab.phenomena._common import PhenomenonResult, loglog_slope
from curvlab.phenomena.central_flow import CentralFlowConfig, central_flow
from curvlab.phenomena.compression import CompressionConfig, compression
from curvlab.phenomena.deep_linear import DeepLinearConfig, deep_linear, saxe_mode_strength
from curvlab.phenomena.eos import EoSConfig, edge_of_stability, half_square_loss
from curvlab.phenomena.gfs import GFSConfig, gfs_sharpness
from curvlab.phenomena.index import PHENOMENA, run_all, run_phenomenon, write_index
from curvlab.phenomena.matrix_sensing import MatrixSensingConfig, matrix_sensing
from curvlab.phenomena.neural_collapse import NeuralCollapseConfig, neural_collapse
from curvlab.phenomena.newton import NewtonConfig, newton_phenomenon
from curvlab.phenomena.subspace import SubspaceConfig, tiny_subspace

__all__ = [
    # the phenomena
    "edge_of_stability",
    "tiny_subspace",
    "matrix_sensing",
    "deep_linear",
    "neural_collapse",
    "newton_phenomenon",
    "compression",
    "central_flow",
    "gfs_sharpness",
    # their configurations
    "EoSConfig",
    "SubspaceConfig",
    "MatrixSensingConfig",
    "DeepLinearConfig",
    "NeuralCollapseConfig",
    "NewtonConfig",
    "CompressionConfig",
    "CentralFlowConfig",
    "GFSConfig",
    # results, running everything, helpers
    "PHENOMENA",
    "PhenomenonResult",
    "half_square_loss",
    "loglog_slope",
    "run_all",
    "run_phenomenon",
    "saxe_mode_strength",
    "write_index",
]
