"""The benchmark problem contract: what a problem declares and what one seeded instance provides.

A *problem* is a fixed workload in the AlgoPerf sense (Dahl et al., 2023, arXiv 2306.07179): the
model, the data, the loss, the evaluation metric and the step budget are all fixed; the optimizer is
the only free part. A problem builds an *instance* from an integer seed; everything random in the
instance (initialisation, minibatch order, label noise) is drawn from generators seeded by that
integer, so the same seed gives bit-identical runs (DeepOBS PR #44 is the cautionary tale).

**Splits.** Every problem declares three splits (:attr:`Problem.splits` says what each one is):
``train`` (what the optimizer sees), ``valid`` (where the target is measured, so time-to-target)
and ``test`` (the final quality reported). Data-set problems split their shipped data once, with a
fixed seed independent of the run's seed; synthetic problems draw held-out samples; a deterministic
problem without data (the ill-conditioned quadratic) says that its validation and test metric is
the objective itself. Metric names carry their split as a prefix (``valid_accuracy``,
``test_loss``) unless the problem declares that the split does not exist.

**Targets.** A problem declares its target *metric* and direction; the *threshold* belongs to the
suite, calibrated from a reference (``curvlab bench calibrate``), so :class:`Target` without a
threshold (NaN) is never reached.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from curvlab.errors import ParameterError

__all__ = [
    "Problem",
    "ProblemInstance",
    "Target",
    "cache_dir",
    "cached_value",
    "checksum",
    "gaussian_held_out",
    "gaussian_held_out_splits",
    "split_indices",
    "split_seed",
]


@dataclass(frozen=True)
class Target:
    """The time-to-target criterion of a problem: ``metric`` crosses ``threshold``.

    A run *reaches* the target at the first scheduled evaluation where ``value <= threshold``
    (``higher_is_better=False``) or ``value >= threshold`` (``higher_is_better=True``).

    Args:
        metric: name of the evaluation metric (a key of ``ProblemInstance.evaluate()``).
        threshold: the value to reach (NaN, the default: not calibrated, never reached).
        higher_is_better: direction of the metric (accuracy: True, loss or suboptimality: False).

    Example:
        >>> Target("accuracy", 0.9, higher_is_better=True).reached(0.93)
        True
    """

    metric: str
    threshold: float = math.nan
    higher_is_better: bool = False

    def reached(self, value: float) -> bool:
        """Whether ``value`` meets the target (NaN never does, nor does any value a NaN target)."""
        if not (math.isfinite(value) and math.isfinite(self.threshold)):
            return False
        return value >= self.threshold if self.higher_is_better else value <= self.threshold


@dataclass
class ProblemInstance:
    """One seeded instance of a problem: a model, a minibatch stream, a loss and an evaluation.

    The runner's training step is ``outputs = forward(batch_inputs); loss = loss_fn(outputs,
    targets)``,
    exactly the same code for every optimizer. ``evaluate()`` runs off the clock under
    ``torch.no_grad`` and returns named floats that include the target metric.

    Args:
        model: the module whose parameters are optimised.
        loss_fn: ``(outputs, targets) -> scalar loss``.
        next_batch: draws the next training minibatch ``(inputs, targets)`` from the instance's own
            generator (full-batch problems return the same tensors every time).
        evaluate: ``() -> {metric: value}`` on the validation and test splits (and any training
            figure), names prefixed by their split (see the module docstring).
        outputs_are_logits: whether ``outputs`` are class logits (then curvature optimizers in
            ``closure_mode == "loss"`` receive ``(loss, outputs)`` for Gauss-Newton-Bartlett
            sampling).
        forward: optional replacement for ``model(inputs)``.
    """

    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    next_batch: Callable[[], tuple[Tensor, Tensor]]
    evaluate: Callable[[], dict[str, float]]
    outputs_are_logits: bool = False
    forward: Callable[[Tensor], Tensor] | None = None

    def loss_and_outputs(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Forward pass and loss on one batch (the harness's single training-step code path)."""
        outputs = self.forward(inputs) if self.forward is not None else self.model(inputs)
        return self.loss_fn(outputs, targets), outputs


@dataclass
class Problem(ABC):
    """A benchmark problem: declared target, budget and evaluation schedule, built from a seed.

    Subclasses set the class-level metadata and implement :meth:`build`. Problems whose data may be
    absent override :meth:`check_data` to raise :class:`~curvlab.errors.DataNotFoundError` with the
    command that installs the data.

    Attributes:
        name: registry name (``digits-mlp``).
        description: one line for ``curvlab bench list`` and the report.
        target: the time-to-target metric on the validation split and its direction (the
            threshold comes from the suite; a problem's own is NaN).
        budget_steps: optimizer steps of the tuned track (the defaults track gets 1.5x).
        eval_every: evaluation period in steps (evaluation also runs at step 0 and at the budget).
        data: where the data comes from (``synthetic``, ``scikit-learn``, ``fashion-mnist``, ...).
        final_metric: the metric reported as final quality at the budget, on the test split
            (default: the target's metric with ``valid_`` replaced by ``test_``).
        splits: what the ``train``, ``valid`` and ``test`` splits are, one phrase each.
    """

    name: str = ""
    description: str = ""
    target: Target = field(default_factory=lambda: Target("valid_loss"))
    budget_steps: int = 100
    eval_every: int = 10
    data: str = "synthetic"
    final_metric: str = ""
    splits: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name, description = self.default_name_and_description()
        self.name = self.name or name
        self.description = self.description or description
        if not self.final_metric:
            metric = self.target.metric
            self.final_metric = (
                "test_" + metric.removeprefix("valid_") if metric.startswith("valid_") else metric
            )

    def default_name_and_description(self) -> tuple[str, str]:
        """The ``(name, description)`` an empty ``name`` or ``description`` field takes.

        The declared fields by default; a problem whose name says its parameters (the condition
        number of a quadratic) overrides this.
        """
        return self.name, self.description

    @abstractmethod
    def build(self, seed: int) -> ProblemInstance:
        """Build the instance for ``seed`` (initialisation and minibatch order depend on it)."""

    def check_data(self) -> None:
        """Raise :class:`~curvlab.errors.DataNotFoundError` if data is missing (default: no-op)."""
        return None

    def info(self) -> dict[str, object]:
        """The declared metadata as a JSON-serialisable dict (stored with every suite)."""
        return {
            "name": self.name,
            "description": self.description,
            "target_metric": self.target.metric,
            "target_threshold": self.target.threshold,
            "higher_is_better": self.target.higher_is_better,
            "budget_steps": self.budget_steps,
            "eval_every": self.eval_every,
            "data": self.data,
            "final_metric": self.final_metric,
            "splits": dict(self.splits),
        }


def checksum(*arrays: object) -> str:
    """SHA-256 over the bytes of numpy arrays / tensors / strings, used to key cached optima.

    Example:
        >>> len(checksum("abc"))
        64
    """
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, Tensor):
            h.update(a.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(a, str):
            h.update(a.encode())
        else:
            h.update(memoryview(a).tobytes())  # type: ignore[arg-type]
    return h.hexdigest()


def cache_dir() -> Path:
    """Directory of curvlab's cached values: ``$CURVLAB_CACHE_DIR`` or ``~/.cache/curvlab``."""
    root = os.environ.get("CURVLAB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "curvlab"
    )
    return Path(root)


def cached_value(key: str, compute: Callable[[], float]) -> float:
    """Return the float cached under ``key`` (a name plus a data checksum), computing it once.

    The cache is a JSON file per key, written atomically (temporary file + ``os.replace``), so
    concurrent workers at worst compute the value twice. An unwritable cache directory is not an
    error: the value is then recomputed each time.
    """
    path = cache_dir() / "optima" / f"{key}.json"
    try:
        return float(json.loads(path.read_text())["value"])
    except (OSError, ValueError, KeyError):
        pass
    value = float(compute())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({"key": key, "value": repr(value)}, fh)
        os.replace(tmp, path)
    except OSError:
        pass
    return value


def epoch_sampler(
    inputs: Tensor, targets: Tensor, batch_size: int, generator: torch.Generator
) -> Callable[[], tuple[Tensor, Tensor]]:
    """Minibatches without replacement: a fresh ``randperm`` per epoch from ``generator``."""
    n = inputs.shape[0]
    if batch_size >= n:
        return lambda: (inputs, targets)
    state = {"perm": torch.randperm(n, generator=generator), "pos": 0}

    def next_batch() -> tuple[Tensor, Tensor]:
        if state["pos"] + batch_size > n:  # type: ignore[operator]
            state["perm"] = torch.randperm(n, generator=generator)
            state["pos"] = 0
        pos = int(state["pos"])  # type: ignore[call-overload]
        idx = state["perm"][pos : pos + batch_size]  # type: ignore[index]
        state["pos"] = pos + batch_size
        return inputs[idx], targets[idx]

    return next_batch


def split_indices(n: int, valid: int, test: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A fixed random partition of ``range(n)`` into ``(train, valid, test)`` index tensors.

    The permutation comes from ``numpy.random.default_rng(seed)`` (default 0, independent of the
    run's seed), so every run of every optimizer sees the same split; the training part keeps what
    the validation and test parts leave.

    Example:
        >>> tr, va, te = split_indices(10, 2, 3)
        >>> (len(tr), len(va), len(te)), sorted(torch.cat([tr, va, te]).tolist()) == list(range(10))
        ((5, 2, 3), True)
    """
    if valid < 1 or test < 1 or valid + test >= n:
        raise ParameterError(
            f"cannot split {n} examples into {valid} validation, {test} test and a training rest; "
            "choose smaller held-out parts"
        )
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    return perm[valid + test :], perm[:valid], perm[valid : valid + test]


def split_seed(seed: int, split: str) -> int:
    """The seed of a synthetic problem's held-out ``split`` draws for the run seed ``seed``.

    A hash of both, so held-out draws never coincide with the training stream (seeded by ``seed``
    itself) nor with the other split.

    Example:
        >>> split_seed(0, "valid") != split_seed(0, "test") != 0
        True
    """
    return int(hashlib.sha256(f"{seed}:{split}".encode()).hexdigest()[:15], 16)


def gaussian_held_out_splits(train: str, draws: str) -> dict[str, str]:
    """:attr:`Problem.splits` of a problem whose held-out parts are :func:`gaussian_held_out`.

    ``train`` says what the training split is; ``draws`` names the ``held_out`` Gaussian draws.

    Example:
        >>> gaussian_held_out_splits("one batch", "inputs")["test"]
        "held_out other inputs (seeded by the run's seed and 'test')"
    """
    return {
        "train": train,
        "valid": f"held_out {draws} (seeded by the run's seed and 'valid')",
        "test": f"held_out other {draws} (seeded by the run's seed and 'test')",
    }


def gaussian_held_out(seed: int, n: int, dim: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """``{"valid" | "test": [n, dim]}`` standard Gaussian draws held out for the run seed ``seed``
    (each split from its own :func:`split_seed`).

    Example:
        >>> h = gaussian_held_out(0, 3, 2, torch.float64)
        >>> sorted(h), tuple(h["valid"].shape), bool((h["valid"] != h["test"]).all())
        (['test', 'valid'], (3, 2), True)
    """
    return {
        split: torch.randn(
            n, dim, generator=torch.Generator().manual_seed(split_seed(seed, split)), dtype=dtype
        )
        for split in ("valid", "test")
    }
