"""Every bad input to the monitors, phenomena, zoo, data sets and schedules: its error and message.

One row per input: what is called, the :class:`~curvlab.errors.CurvlabError` subclass it raises
(each also a ``ValueError`` / ``TypeError`` / ``RuntimeError`` as before) and a fragment of the
message, which says what to do.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from curvlab import errors
from curvlab.datasets import fashion_mnist
from curvlab.monitors import (
    CallbackSink,
    CurvatureLR,
    GradientNoiseScale,
    HistorySink,
    NeuralCollapse,
    Sharpness,
    SubspaceOverlap,
    attach,
    noise_scale_from_gradients,
    project_gradient_,
    scale_lr,
    stability_threshold,
)
from curvlab.phenomena import (
    DeepLinearConfig,
    EoSConfig,
    MatrixSensingConfig,
    NeuralCollapseConfig,
    SubspaceConfig,
    run_phenomenon,
)
from curvlab.phenomena.index import quick_config
from curvlab.schedules import Cosine, LinearWarmup
from curvlab.zoo import load_problem

X = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
Y = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
MSE = nn.functional.mse_loss


def _model() -> nn.Linear:
    return nn.Linear(3, 2)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _attach(make: Callable[[nn.Module], Any], optimizer: Any = None) -> Any:
    model = _model()
    return attach(_sgd(model) if optimizer is None else optimizer, make(model), HistorySink())


def _operator_before_attach() -> Any:
    return CurvatureLR(_model(), MSE, (X, Y)).operator


def _adam_only(model: nn.Module) -> Sharpness:
    return Sharpness(model, MSE, (X, Y), preconditioned=True)


def _no_lr() -> Any:
    model = _model()
    opt = _sgd(model)
    del opt.param_groups[0]["lr"]
    return attach(opt, Sharpness(model, MSE, (X, Y)))


def _frozen() -> Any:
    frozen = _model().requires_grad_(False)
    return attach(_sgd(_model()), CurvatureLR(frozen, MSE, (X, Y)))


# fmt: off
CASES: list[tuple[str, Callable[[], Any], type[errors.CurvlabError], str]] = [
    # attach() and the Monitor base
    ("every=0", lambda: CurvatureLR(_model(), MSE, (X, Y), every=0), errors.InvalidArgumentError,
     "every must be an integer >= 1"),
    ("every=1.5", lambda: CurvatureLR(_model(), MSE, (X, Y), every=1.5), errors.InvalidArgumentError,
     "every must be an integer >= 1"),
    ("name with /", lambda: CurvatureLR(_model(), MSE, (X, Y), name="a/b"), errors.InvalidArgumentError,
     "without '/'"),
    ("name empty", lambda: CurvatureLR(_model(), MSE, (X, Y), name=""), errors.InvalidArgumentError,
     "non-empty string"),
    ("no monitors", lambda: attach(_sgd(_model()), []), errors.InvalidArgumentError,
     "at least one monitor"),
    ("not a monitor", lambda: attach(_sgd(_model()), [object()]), errors.ArgumentTypeError,
     "takes curvlab.monitors.Monitor objects"),
    ("not an optimizer", lambda: _attach(lambda m: CurvatureLR(m, MSE, (X, Y)), optimizer="sgd"),
     errors.ArgumentTypeError, "needs a torch.optim.Optimizer"),
    ("duplicate names",
     lambda: _attach(lambda m: [CurvatureLR(m, MSE, (X, Y)), CurvatureLR(m, MSE, (X, Y))]),
     errors.InvalidArgumentError, "pass name=... to tell them apart"),
    ("sink without write", lambda: attach(_sgd(m := _model()), CurvatureLR(m, MSE, (X, Y)), object()),
     errors.InvalidArgumentError, "wrap a function in curvlab.monitors.CallbackSink"),
    ("no trainable parameter", _frozen, errors.ParameterError, "no parameter requires grad"),
    ("CallbackSink(None)", lambda: CallbackSink(None), errors.ArgumentTypeError,
     "needs a callable fn(step, values)"),
    ("operator before attach", _operator_before_attach, errors.NotAttachedError,
     "call curvlab.monitors.attach"),
    # Sharpness and SubspaceOverlap
    ("Sharpness k=0", lambda: Sharpness(_model(), MSE, (X, Y), k=0), errors.InvalidArgumentError,
     "k must be an integer >= 1"),
    ("Sharpness k=2.0", lambda: Sharpness(_model(), MSE, (X, Y), k=2.0), errors.InvalidArgumentError,
     "k must be an integer >= 1"),
    ("Sharpness tol=0", lambda: Sharpness(_model(), MSE, (X, Y), tol=0.0), errors.InvalidArgumentError,
     "tol must be > 0"),
    ("Sharpness tol=nan", lambda: Sharpness(_model(), MSE, (X, Y), tol=float("nan")),
     errors.InvalidArgumentError, "tol must be > 0"),
    ("preconditioned='yes'", lambda: Sharpness(_model(), MSE, (X, Y), preconditioned="yes"),
     errors.InvalidArgumentError, "preconditioned must be 'auto', True or False"),
    ("preconditioned=True on SGD", lambda: _attach(_adam_only), errors.InvalidArgumentError,
     "needs an Adam-type optimizer"),
    ("param group without lr", _no_lr, errors.InvalidArgumentError, "pass lr=..."),
    ("stability_threshold(lr=0)", lambda: stability_threshold(0.0), errors.InvalidArgumentError,
     "learning rate must be positive"),
    ("SubspaceOverlap k=0", lambda: SubspaceOverlap(_model(), MSE, (X, Y), k=0),
     errors.InvalidArgumentError, "k must be an integer >= 1"),
    ("SubspaceOverlap k >= n", lambda: _attach(lambda m: SubspaceOverlap(m, MSE, (X, Y), k=8)),
     errors.InvalidArgumentError, "pass a smaller k"),
    ("project_gradient_ keep='top'",
     lambda: project_gradient_([nn.Parameter(torch.zeros(2))], torch.eye(2), keep="top"),
     errors.InvalidArgumentError, "keep must be 'dom' (Dom-SGD) or 'bulk'"),
    # GradientNoiseScale and the scaling rules
    ("num_batches=1", lambda: GradientNoiseScale(_model(), MSE, (X, Y), batch_size=2, num_batches=1),
     errors.InvalidArgumentError, "num_batches must be an integer >= 2"),
    ("batch_size=0", lambda: GradientNoiseScale(_model(), MSE, (X, Y), batch_size=0),
     errors.InvalidArgumentError, "batch_size must be an integer >= 1"),
    ("pool too small", lambda: _attach(lambda m: GradientNoiseScale(m, MSE, (X, Y), batch_size=4)),
     errors.EmptyDataError, "pass more data or smaller batches"),
    ("one gradient row", lambda: noise_scale_from_gradients(torch.zeros(1, 3), 4),
     errors.ShapeMismatchError, "k >= 2 batch gradients"),
    ("noise scale batch_size=0", lambda: noise_scale_from_gradients(torch.zeros(2, 3), 0),
     errors.InvalidArgumentError, "batch_size must be an integer >= 1"),
    ("scale_lr new_batch_size=0", lambda: scale_lr(0.1, 32, 0), errors.InvalidArgumentError,
     "new_batch_size must be an integer >= 1"),
    ("scale_lr rule='cubic'", lambda: scale_lr(0.1, 32, 64, rule="cubic"),
     errors.InvalidArgumentError, "rule must be 'linear' (SGD) or 'sqrt'"),
    # NeuralCollapse
    ("NC features=None", lambda: NeuralCollapse(None, nn.Linear(3, 2), (X, Y)),
     errors.ArgumentTypeError, "feature-extractor callable"),
    ("NC classifier not Linear", lambda: NeuralCollapse(lambda x: x, nn.ReLU(), (X, Y)),
     errors.ArgumentTypeError, "final nn.Linear classifier"),
    # phenomena
    ("unknown phenomenon", lambda: run_phenomenon("eos2", "/nonexistent"),
     errors.InvalidArgumentError, "choose one of eos, subspace"),
    ("quick_config unknown", lambda: quick_config("nope"), errors.InvalidArgumentError,
     "unknown phenomenon 'nope'"),
    ("SubspaceConfig dataset", lambda: SubspaceConfig(dataset="cifar"), errors.InvalidArgumentError,
     "'fashion-mnist' or 'digits'"),
    ("SubspaceConfig steps=0", lambda: SubspaceConfig(steps=0), errors.InvalidArgumentError,
     "SubspaceConfig.steps must be > 0"),
    ("NeuralCollapseConfig loss", lambda: NeuralCollapseConfig(loss="hinge"),
     errors.InvalidArgumentError, "must be 'mse' or 'ce'"),
    ("NeuralCollapseConfig lr=0", lambda: NeuralCollapseConfig(lr=0.0), errors.InvalidArgumentError,
     "NeuralCollapseConfig.lr must be > 0"),
    ("EoSConfig etas=()", lambda: EoSConfig(etas=()), errors.InvalidArgumentError,
     "must be positive step sizes"),
    ("EoSConfig control_eta=-1", lambda: EoSConfig(control_eta=-1.0), errors.InvalidArgumentError,
     "must be positive step sizes"),
    ("EoSConfig every=0", lambda: EoSConfig(every=0), errors.InvalidArgumentError,
     "EoSConfig.every must be > 0"),
    ("DeepLinearConfig eta=0", lambda: DeepLinearConfig(eta=0.0), errors.InvalidArgumentError,
     "DeepLinearConfig.eta must be > 0"),
    ("DeepLinearConfig too many modes", lambda: DeepLinearConfig(dim=2), errors.InvalidArgumentError,
     "needs 1 to dim = 2 values"),
    ("MatrixSensingConfig k_over < r", lambda: MatrixSensingConfig(k_over=1),
     errors.InvalidArgumentError, "r <= k_over <= n"),
    ("MatrixSensingConfig m=0", lambda: MatrixSensingConfig(m=0), errors.InvalidArgumentError,
     "MatrixSensingConfig.m must be > 0"),
    # data sets and the zoo
    ("fashion_mnist split", lambda: fashion_mnist("val"), errors.InvalidArgumentError,
     "split must be 'train' or 'test'"),
    ("zoo unknown name", lambda: load_problem("digits-mpl"), errors.InvalidArgumentError,
     "Did you mean 'digits-mlp'?"),
    ("zoo missing module", lambda: load_problem("no_such_module_here:build"), errors.ModelLoadError,
     "cannot load no_such_module_here:build"),
    # schedules (already specific before this table)
    ("LinearWarmup(0)", lambda: LinearWarmup(0), errors.ParameterError, "must be an integer >= 1"),
    ("Cosine final=2", lambda: Cosine(10, final=2.0), errors.ParameterError, "final must be in [0, 1]"),
]
# fmt: on


@pytest.mark.parametrize(
    ("call", "error", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input(call: Callable[[], Any], error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)
    assert isinstance(info.value, errors.CurvlabError)
    assert isinstance(info.value, (ValueError, TypeError, RuntimeError))


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("def build():\n    raise RuntimeError('boom')\n", "raised RuntimeError: boom"),
        ("def build():\n    return 3\n", "must return a tuple (model, loss_fn, data)"),
        ("build = 3\n", "is not a function"),
        ("import no_such_dependency\n", "No module named 'no_such_dependency'"),
    ],
    ids=["raises", "returns the wrong thing", "not callable", "import fails"],
)
def test_user_model_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, fragment: str
) -> None:
    (tmp_path / "my_bad_model.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_bad_model", raising=False)
    with pytest.raises(errors.ModelLoadError) as info:
        load_problem("my_bad_model:build")
    assert fragment in str(info.value)


def test_user_model_is_imported_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_good_model.py").write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Linear(2, 1), torch.nn.MSELoss(), (torch.ones(3, 2), torch.ones(3, 1))\n"
    )
    monkeypatch.chdir(tmp_path)
    problem = load_problem("my_good_model:build")
    assert problem.name == "my_good_model:build" and problem.data[0].shape == (3, 2)
    assert str(tmp_path) not in sys.path
