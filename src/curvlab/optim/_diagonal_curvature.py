"""What the diagonal-curvature optimizers (:class:`~curvlab.optim.sophia.Sophia`,
:class:`~curvlab.optim.adahessian.AdaHessian`) share.

:class:`DiagonalCurvatureOptimizer`, their base: the constructor checks both make, the lazily
created state, and the start of ``step`` (gradients and, when due, the curvature estimate, from
the closure or from the training loop, through the one non-finite policy, then folded into the
state by the subclass's ``_update_hessian``). :func:`shared_docs` fills the argument
documentation both docstrings share, in the manner of torch's ``_foreach_doc`` pieces.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from curvlab.estimators.param_diagonal import CurvatureEstimator
from curvlab.optim._closure import CurvatureFeed, closure_step, fed_step, resolve_estimator
from curvlab.optim._fused import validate_fused
from curvlab.optim._validation import ProbeGeneratorState, probe_generator, validate_standard

__all__ = ["DiagonalCurvatureOptimizer", "shared_docs"]

_T = TypeVar("_T", bound=Callable[..., Any])

#: The shared pieces of the docstrings, by placeholder name (a docstring line ``{name}``).
_DOC_PIECES = {
    "curvature_optimizer_args": """\
maximize: maximise the objective instead.
foreach: use the multi-tensor fast path (default ``None`` = ``True``): ``_foreach``
    kernels, and cache-sized blocks through a small reusable scratch buffer for large
    CPU tensors; bit-equal to the single-tensor reference (``False``).
fused: run the update as ``torch.compile``'d kernels, one call per bucket of tensors
    (default ``None`` = ``False``): one pass over memory; the first step compiles for
    ~10-30 s (see :mod:`curvlab.optim._fused`). Equal to the reference within float
    round-off.
on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` for NaN/inf gradients or
    curvature estimates; see :mod:`curvlab.optim._validation`.
seed: seed of a private CPU generator for the estimator's random draws (probes
    or sampled labels). ``None`` (default, and no ``generator``): the seed is one
    draw from torch's global generator at construction, so ``torch.manual_seed(s)`` before
    building the optimizer reproduces a run; pass ``seed=`` to be independent of it.
generator: the random source itself (instead of ``seed``). Its state is saved in
    ``state_dict()`` (key ``"curvlab"``) so a resumed run is bit-identical.""",
}


def shared_docs(obj: _T) -> _T:
    """Replace every docstring line ``{name}`` of ``obj`` by the shared piece ``name``, indented
    as that line (a decorator; a docstring stripped by ``python -OO`` stays ``None``)."""
    if obj.__doc__:
        obj.__doc__ = re.sub(
            r"^( *)\{(\w+)\}$",
            lambda m: textwrap.indent(_DOC_PIECES[m[2]], m[1]),
            obj.__doc__,
            flags=re.MULTILINE,
        )
    return obj


class DiagonalCurvatureOptimizer(CurvatureFeed, ProbeGeneratorState, Optimizer):
    """The base of Sophia and AdaHessian: an optimizer whose state holds an EMA of a curvature
    diagonal, refreshed from an estimator (:mod:`curvlab.estimators.param_diagonal`).

    A subclass checks its own hyper-parameters, builds ``defaults`` and calls ``__init__``;
    it names its state (``_state_keys``, of which ``_shaped_keys`` are shaped like the
    parameter, the others float32 scalars) and folds an estimate into it (``_update_hessian``).
    """

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        estimator: str | CurvatureEstimator,
        builtin: Mapping[str, CurvatureEstimator],
        estimator_names: str,
        seed: int | None,
        generator: torch.Generator | None,
    ) -> None:
        """Check the arguments both optimizers take (``fused``/``foreach``, ``lr``, ``betas``,
        ``eps``, ``weight_decay``, ``on_nonfinite``, the estimator, the seed or generator),
        then ``Optimizer.__init__`` with ``defaults`` plus ``estimator`` (its name, from
        ``builtin`` or ``"custom"``) and ``nonfinite_skips``."""
        validate_fused(defaults["fused"], defaults["foreach"])
        validate_standard(defaults, "lr", "betas", "eps", "weight_decay", "on_nonfinite")
        name, self._estimator = resolve_estimator(estimator, builtin, estimator_names)
        self._generator = probe_generator(seed, generator)
        defaults = {**defaults, "betas": tuple(defaults["betas"])}
        super().__init__(params, {**defaults, "nonfinite_skips": 0, "estimator": name})

    def _state(self, p: Tensor) -> dict[str, Any]:
        """``p``'s state, created lazily under ``_state_keys`` (the one place state is created)."""
        state = self.state[p]
        if len(state) == 0:
            for key in self._state_keys:
                if key in self._shaped_keys:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                else:
                    state[key] = torch.tensor(0.0, dtype=torch.float32)
        return state

    def _update_hessian(self, params: Sequence[Tensor], diag: Sequence[Tensor | None]) -> None:
        """Fold the estimate ``diag`` (one tensor or ``None`` per entry of ``params``) into the
        state."""
        raise NotImplementedError

    def _estimates(
        self, params: Sequence[Tensor], diag: Sequence[Tensor | None]
    ) -> Iterator[tuple[Tensor, Tensor, dict[str, Any]]]:
        """``(p, its estimate, its param group)`` for every parameter with an estimate."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        return ((p, d, group_of[id(p)]) for p, d in zip(params, diag) if d is not None)

    def _start_step(self, closure: Callable[[], Any] | None) -> tuple[Tensor | None, bool]:
        """The start of ``step``: the gradients and, on a refresh step, the curvature estimate,
        from the closure (:func:`~curvlab.optim._closure.closure_step`) or from the training loop
        (:meth:`expect_external_curvature`), both through the ``on_nonfinite`` policy; then the
        estimate is folded into the state (:meth:`_update_hessian`).

        Returns:
            ``(loss, proceed)``: the detached loss (or ``None``) and whether the step goes on.
        """
        if self.curvature_source is not None:
            run = fed_step(self, closure)
        else:
            estimator = self._estimator if self.curvature_due() else None
            run = closure_step(self, closure, estimator, self._generator)
        if run.proceed and run.estimate is not None:
            self._update_hessian(run.params, run.estimate)
        return run.loss, run.proceed
