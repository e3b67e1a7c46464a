"""Bad input gets a specific CurvlabError whose message says what to do; never a silent NaN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab import (
    CurvlabError,
    EmptyDataError,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    LossNotScalarError,
    NonFiniteError,
    ParameterError,
    ShapeMismatchError,
    UnsupportedLossError,
)
from curvlab.errors import (
    DistributedError,
    DTypeError,
    InvalidArgumentError,
    NoExactDiagonalError,
    UnknownOptionError,
)
from curvlab.operators import DenseOperator


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


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


_X = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
_Y = torch.tensor([0, 1, 2, 0, 1, 2])
_CE = nn.CrossEntropyLoss()


def _distributed(local):
    from curvlab.distributed import DistributedOperator

    return DistributedOperator(local)


def _exact_diagonal_in_train_mode():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        G = GGNOperator(_model(), _CE, (_X, _Y), mode="train")
    return G.exact_diagonal()


OPERATOR_CASES = {
    "loss_fn=None": (
        lambda: HessianOperator(_model(), None, (_X, _Y)),
        UnsupportedLossError,
        "loss_fn must be a callable",
    ),
    "reduction='none'": (
        lambda: HessianOperator(_model(), nn.CrossEntropyLoss(reduction="none"), (_X, _Y)),
        LossNotScalarError,
        "use reduction='mean' or 'sum'",
    ),
    "reduction argument unknown": (
        lambda: HessianOperator(_model(), _CE, (_X, _Y), reduction="avg"),
        UnknownOptionError,
        "unknown reduction 'avg'; use one of 'mean', 'sum'",
    ),
    "mode typo": (
        lambda: HessianOperator(_model(), _CE, (_X, _Y), mode="evl"),
        UnknownOptionError,
        "Did you mean 'eval'?",
    ),
    "model is not a module": (
        lambda: HessianOperator(lambda x: x, _CE, (_X, _Y)),
        InvalidArgumentError,
        "model must be a torch.nn.Module",
    ),
    "features of different shapes across batches": (
        lambda: HessianOperator(
            _model(), _CE, [(_X[:3], _Y[:3]), (torch.randn(3, 7, dtype=torch.float64), _Y[3:])]
        ),
        ShapeMismatchError,
        "batch 1 has inputs of shapes ((7,),), batch 0 ((4,),)",
    ),
    "MSE target that only broadcasts": (
        lambda: HessianOperator(_model(), nn.MSELoss(), (_X, torch.randn(6, 1))),
        ShapeMismatchError,
        "reshape the targets",
    ),
    "every target ignored": (
        lambda: GGNOperator(_model(), _CE, (_X, torch.full((6,), -100))),
        EmptyDataError,
        "every target is ignored",
    ),
    "mc_samples=0": (
        lambda: FisherOperator(_model(), _CE, (_X, _Y), mc_samples=0),
        InvalidArgumentError,
        "mc_samples must be >= 1",
    ),
    "mc_samples=1.5": (
        lambda: FisherOperator(_model(), _CE, (_X, _Y), mc_samples=1.5),
        InvalidArgumentError,
        "mc_samples must be an integer",
    ),
    "exact_diagonal chunk_size=0": (
        lambda: GGNOperator(_model(), _CE, (_X, _Y)).exact_diagonal(chunk_size=0),
        InvalidArgumentError,
        "chunk_size must be >= 1",
    ),
    "exact_diagonal in train mode": (
        _exact_diagonal_in_train_mode,
        NoExactDiagonalError,
        "mode='eval'",
    ),
    "exact diagonal of the Hessian": (
        lambda: HessianOperator(_model(), _CE, (_X, _Y)).exact_diagonal(),
        NoExactDiagonalError,
        "use method='hutchinson'",
    ),
    "blocks by an unknown grouping": (
        lambda: HessianOperator(_model(), _CE, (_X, _Y)).blocks("layer"),
        UnknownOptionError,
        "unknown block grouping 'layer'",
    ),
    "DistributedOperator of a matrix": (
        lambda: _distributed(DenseOperator(torch.eye(3))),
        InvalidArgumentError,
        "wraps a rank-local curvature operator",
    ),
    "DistributedOperator without a process group": (
        lambda: _distributed(HessianOperator(_model(), _CE, (_X, _Y))),
        DistributedError,
        "init_process_group",
    ),
    "integer matrix": (
        lambda: DenseOperator(torch.eye(3, dtype=torch.int64)),
        DTypeError,
        "floating-point dtype",
    ),
}


@pytest.mark.parametrize("case", list(OPERATOR_CASES))
def test_bad_operator_input_gets_a_specific_error_that_says_what_to_do(case):
    import re

    call, cls, fragment = OPERATOR_CASES[case]
    with pytest.raises(cls, match=re.escape(fragment)) as info:
        call()
    assert isinstance(info.value, CurvlabError)


def _mlp32():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


_Y16 = torch.arange(16) % 2
MODEL_REJECTS_DATA = {
    "features of the wrong width": (
        (torch.randn(16, 5), _Y16),
        ShapeMismatchError,
        "the model raised on batch 0: mat1 and mat2 shapes cannot be multiplied (16x5 and 3x4); "
        "give inputs of the shape the model takes (these have shapes ((16, 5),))",
    ),
    "integer features": (
        (torch.randint(0, 3, (16, 3)), _Y16),
        DTypeError,
        "its inputs are torch.int64: convert integer features to the model's float dtype "
        "(x.to(torch.float32))",
    ),
    "float64 features, float32 model": (
        (torch.randn(16, 3, dtype=torch.float64), _Y16),
        DTypeError,
        "its inputs are torch.float64 and the model's parameters torch.float32: convert the "
        "inputs (x.to(torch.float32))",
    ),
    "wrong width in batch 1 only": (
        [(torch.randn(8, 3), _Y16[:8]), (torch.randn(8, 5), _Y16[8:])],
        ShapeMismatchError,
        "the model raised on batch 1: mat1 and mat2 shapes cannot be multiplied (8x5 and 3x4); "
        "batch 1 has inputs of shapes ((5,),), batch 0 ((3,),)",
    ),
    "dict batch of the wrong width": (
        [
            {"input": torch.randn(16, 3), "labels": _Y16},
            {"input": torch.randn(4, 5), "labels": _Y16[:4]},
        ],
        ShapeMismatchError,
        "the model raised on batch 1: mat1 and mat2 shapes cannot be multiplied (4x5 and 3x4)",
    ),
}


@pytest.mark.parametrize("op", [HessianOperator, GGNOperator, FisherOperator])
@pytest.mark.parametrize("cache_graph", [None, False])
@pytest.mark.parametrize("case", list(MODEL_REJECTS_DATA))
def test_data_the_model_cannot_take_names_the_batch(op, cache_graph, case):
    import re

    data, cls, fragment = MODEL_REJECTS_DATA[case]
    with pytest.raises(cls, match=re.escape(fragment)) as info:  # dicts: model(input=x)
        op(_mlp32(), _CE, data, cache_graph=cache_graph)
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's error is kept as the cause


def test_a_later_batch_of_another_dtype_is_refused_at_its_first_forward():
    # without a graph cache only batch 0 runs at construction; batch 1 fails at the first product
    data = [(torch.randn(8, 3), _Y16[:8]), (torch.randn(8, 3, dtype=torch.float64), _Y16[8:])]
    H = HessianOperator(_mlp32(), _CE, data, cache_graph=False)
    with pytest.raises(DTypeError, match="the model raised on batch 1: mat1 and mat2 must have"):
        H @ torch.ones(H.shape[0])


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("out of memory"), ShapeMismatchError("nested operator")]
)
def test_out_of_memory_and_curvlab_errors_from_the_model_pass_unchanged(error):
    class Raises(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            raise error

    with pytest.raises(type(error)) as info:
        HessianOperator(Raises(), _CE, (torch.randn(4, 3), _Y16[:4]))
    assert info.value is error
