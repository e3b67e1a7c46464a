"""Exceptions raised by curvlab.

Every error curvlab raises on bad input is a :class:`CurvlabError`; each subclass names one kind of
mistake, and its message says what to do about it. Subclasses also inherit from the built-in
exception a user would otherwise catch (``ValueError``, ``TypeError``, ``RuntimeError``), so code
written against plain Python conventions keeps working.
"""

from __future__ import annotations

__all__ = [
    "ArgumentTypeError",
    "CalibrationError",
    "ClosureRequiredError",
    "CurvatureInputError",
    "CurvatureNotSuppliedError",
    "CurvlabError",
    "DTypeError",
    "DataNotFoundError",
    "DistributedError",
    "DoubleBackwardError",
    "EmptyDataError",
    "ExecutorError",
    "ImportNotAllowedError",
    "IndefiniteSystemError",
    "InvalidArgumentError",
    "LossNotScalarError",
    "MissingLabelsError",
    "ModelLoadError",
    "MonitorMismatchError",
    "NoExactDiagonalError",
    "NonDeterministicError",
    "NonFiniteError",
    "NotAttachedError",
    "NotConvergedError",
    "NotSymmetricError",
    "OutputPathError",
    "ParameterError",
    "ShapeMismatchError",
    "StateDictError",
    "StoreError",
    "SuiteError",
    "UnknownNameError",
    "UnknownOptionError",
    "UnsupportedLossError",
    "WorkerError",
    "ZeroCurvatureWarning",
]


class CurvlabError(Exception):
    """Base class of every error curvlab raises on bad input."""


class LossNotScalarError(CurvlabError, ValueError):
    """The loss function returned something other than a scalar tensor."""


class NonFiniteError(CurvlabError, FloatingPointError):
    """A loss, gradient or matrix-vector product contains NaN or infinity."""


class EmptyDataError(CurvlabError, ValueError):
    """The data holds no batch, or a batch holds no example."""


class ParameterError(CurvlabError, ValueError):
    """The chosen parameters are empty, do not require grad, or are not the model's."""


class ShapeMismatchError(CurvlabError, ValueError):
    """A vector, matrix, model output or target has a shape that does not fit."""


class UnsupportedLossError(CurvlabError, TypeError):
    """A loss for which the requested curvature (GGN, Fisher) is not implemented."""


class NotSymmetricError(CurvlabError, ValueError):
    """A symmetric-only estimator was handed an operator not declared symmetric."""


class ClosureRequiredError(CurvlabError, RuntimeError):
    """An optimizer step needs a closure and none (or one returning no loss) was given."""


class StateDictError(CurvlabError, ValueError):
    """A state_dict does not belong to this optimizer or does not fit its parameters."""


class NonDeterministicError(CurvlabError, RuntimeError):
    """Two evaluations of the same model, loss and data disagree (dropout, shuffling, augmentation)."""


class DataNotFoundError(CurvlabError, FileNotFoundError):
    """A data set's files are missing (e.g. a system package not installed); the message says how to get them."""


class UnknownNameError(CurvlabError, LookupError):
    """A problem, optimizer or suite name that is not registered; the message lists the known ones."""


class SuiteError(CurvlabError, ValueError):
    """A benchmark suite file is invalid; the message names the offending field."""


class StoreError(CurvlabError, RuntimeError):
    """A benchmark store cannot be used: unwritable path, newer schema, or not a curvlab store."""


class InvalidArgumentError(CurvlabError, ValueError, TypeError):
    """An argument is out of range or of the wrong type (tolerance, budget, k, chunk size, count)."""


class ArgumentTypeError(CurvlabError, TypeError):
    """An argument is of the wrong kind (not an optimizer, a monitor, a callable, a layer)."""


class UnknownOptionError(CurvlabError, ValueError):
    """A method, probe, mode or other option name is not one of the accepted ones; the message lists them."""


class DTypeError(CurvlabError, TypeError):
    """A matrix or operator has a dtype curvlab cannot compute with (integers, booleans)."""


class NoExactDiagonalError(CurvlabError, ValueError):
    """The operator has no exact diagonal; the message names the stochastic alternative."""


class ModelLoadError(CurvlabError, ValueError):
    """A user's ``module:function`` model cannot be imported, raises, or returns the wrong thing."""


class NotAttachedError(CurvlabError, RuntimeError):
    """A monitor's attach-time state was read before :func:`curvlab.monitors.attach` ran."""


class DistributedError(CurvlabError, RuntimeError):
    """torch.distributed is not set up as the operation needs (no initialised process group)."""


class ZeroCurvatureWarning(UserWarning):
    """An optimizer steps with a curvature estimate that was never given (it is still zero)."""


class ImportNotAllowedError(SuiteError):
    """A suite names an optimizer as ``module:Class`` (code to import) without the explicit permission."""


class OutputPathError(CurvlabError, ValueError):
    """An output folder that is a file, lies inside a file, or cannot be written."""


class MissingLabelsError(CurvlabError, ValueError):
    """A dict batch (Hugging Face style) has no ``labels`` entry for the loss's targets."""


class CurvatureNotSuppliedError(ClosureRequiredError):
    """A curvature optimizer's refresh step came and nothing supplied the estimate; add the callback named."""


class CurvatureInputError(CurvlabError, ValueError):
    """A training loop hands the curvature estimate no loss or logits it can use; the message says what to return."""


class DoubleBackwardError(CurvlabError, RuntimeError):
    """The model's graph cannot be differentiated twice (torch.compile, a kernel without double backward)."""


class MonitorMismatchError(SuiteError):
    """A suite attaches a monitor that does not fit one of its optimizers or problems."""


class IndefiniteSystemError(CurvlabError, ValueError):
    """CG met a direction of non-positive curvature: the system is indefinite or singular."""

    def __init__(
        self,
        message: str,
        *,
        direction: object = None,
        curvature: float = 0.0,
        num_matvecs: int = 0,
    ) -> None:
        super().__init__(message)
        self.direction = direction
        self.curvature = curvature
        self.num_matvecs = num_matvecs


class NotConvergedError(CurvlabError, RuntimeError):
    """An iterative solve stopped before reaching its tolerance within its product budget."""


class CalibrationError(CurvlabError, RuntimeError):
    """The reference of ``curvlab bench calibrate`` gave no usable value for a problem."""


class WorkerError(CurvlabError, RuntimeError):
    """Benchmark worker processes keep dying before finishing a run; the message says why."""


class ExecutorError(CurvlabError, RuntimeError):
    """The benchmark's executor cannot run: its engine (Ray) is not installed or its cluster is unreachable."""
