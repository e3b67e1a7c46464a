"""Bad input gets a specific CurvlabError whose message says what to do; never a silent NaN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab import (
    CurvlabError,
    EmptyDataError,
    GGNOperator,
    HessianOperator,
    LossNotScalarError,
    NonFiniteError,
    ParameterError,
    ShapeMismatchError,
    UnsupportedLossError,
)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    return model, x, y


def test_non_scalar_loss(setup):
    model, x, y = setup
    with pytest.raises(LossNotScalarError, match="not a scalar"):
        HessianOperator(
            model,
            lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"),
            (x, y),
            reduction="mean",
        )


def test_reduction_none_is_refused(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        HessianOperator(model, nn.CrossEntropyLoss(reduction="none"), (x, y))


def test_non_finite_loss(setup):
    model, x, y = setup
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        HessianOperator(model, nn.CrossEntropyLoss(), (x, y))


def test_non_finite_product_is_never_silent(setup):
    model, x, y = setup
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    v = torch.zeros(H.shape[0], dtype=torch.float64)
    v[0] = float("inf")
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        H @ v


def test_empty_data(setup):
    model, x, y = setup
    with pytest.raises(EmptyDataError, match="no batch"):
        HessianOperator(model, nn.CrossEntropyLoss(), [])
    with pytest.raises(EmptyDataError, match="no example"):
        HessianOperator(model, nn.CrossEntropyLoss(), (x[:0], y[:0]))


def test_parameters_that_do_not_require_grad(setup):
    model, x, y = setup
    model[0].weight.requires_grad_(False)
    with pytest.raises(ParameterError, match="does not require grad"):
        HessianOperator(model, nn.CrossEntropyLoss(), (x, y), params=["0.weight"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ParameterError, match="no parameter that requires grad"):
        HessianOperator(model, nn.CrossEntropyLoss(), (x, y))


def test_unknown_or_foreign_parameters(setup):
    model, x, y = setup
    with pytest.raises(ParameterError, match="no parameter named"):
        HessianOperator(model, nn.CrossEntropyLoss(), (x, y), params=["0.wieght"])
    with pytest.raises(ParameterError, match="not a parameter of the model"):
        HessianOperator(
            model, nn.CrossEntropyLoss(), (x, y), params=[torch.zeros(3, requires_grad=True)]
        )


def test_output_that_does_not_fit_the_loss(setup):
    model, x, _ = setup
    with pytest.raises(ShapeMismatchError, match="fits the loss"):
        HessianOperator(model, nn.CrossEntropyLoss(), (x, torch.randint(0, 3, (5,))))
    with pytest.raises(ShapeMismatchError, match="differ in shape"):
        GGNOperator(model, nn.MSELoss(), (x, torch.randn(6, 1, dtype=torch.float64)))


def test_unsupported_loss_names_the_supported_ones(setup):
    model, x, y = setup
    with pytest.raises(
        UnsupportedLossError, match=r"MSELoss, nn\.CrossEntropyLoss, nn\.BCEWithLogitsLoss"
    ):
        GGNOperator(model, nn.NLLLoss(), (x, y))
    with pytest.raises(UnsupportedLossError, match="label smoothing"):
        GGNOperator(model, nn.CrossEntropyLoss(label_smoothing=0.1), (x, y))
    with pytest.raises(UnsupportedLossError, match="non-negative class weights"):
        GGNOperator(model, nn.CrossEntropyLoss(weight=torch.tensor([1.0, -1.0, 1.0])), (x, y))


def test_wrong_vector_shape(setup):
    model, x, y = setup
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ShapeMismatchError, match=f"shape \\[{H.shape[0]}\\]"):
        H @ torch.ones(3, dtype=torch.float64)


def test_all_errors_are_curvlab_errors():
    for cls in (
        EmptyDataError,
        LossNotScalarError,
        NonFiniteError,
        ParameterError,
        ShapeMismatchError,
    ):
        assert issubclass(cls, CurvlabError)


def test_check_deterministic_catches_dropout_in_training_mode(setup):
    from curvlab import NonDeterministicError

    _, x, y = setup
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    HessianOperator(model, nn.CrossEntropyLoss(), (x, y)).check_deterministic()  # eval: fine
    with pytest.warns(UserWarning, match="not a fixed matrix"):
        H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), mode="train", cache_graph=False)
    with pytest.raises(NonDeterministicError, match="not deterministic"):
        H.check_deterministic()
