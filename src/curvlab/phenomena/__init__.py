"""Reproductions of the seed papers' training-dynamics phenomena on CPU-sized problems."""

from curvlab.phenomena._common import PhenomenonResult
from curvlab.phenomena.deep_linear import DeepLinearConfig, deep_linear, saxe_mode_strength
from curvlab.phenomena.eos import EoSConfig, edge_of_stability, half_square_loss
from curvlab.phenomena.index import PHENOMENA, run_all, run_phenomenon, write_index
from curvlab.phenomena.matrix_sensing import MatrixSensingConfig, matrix_sensing
from curvlab.phenomena.neural_collapse import NeuralCollapseConfig, neural_collapse
from curvlab.phenomena.subspace import SubspaceConfig, tiny_subspace

__all__ = [
    "PHENOMENA",
    "run_all",
    "run_phenomenon",
    "write_index",
    "EoSConfig",
    "edge_of_stability",
    "half_square_loss",
    "DeepLinearConfig",
    "deep_linear",
    "saxe_mode_strength","MatrixSensingConfig", "PhenomenonResult", "matrix_sensing"]
