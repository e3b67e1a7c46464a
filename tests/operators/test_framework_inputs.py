"""Operators on what training frameworks hand them: dict batches, model outputs that are not
tensors, compiled and wrapped models, and products called inside autocast."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from curvlab.errors import MissingLabelsError, NoExactDiagonalError, ShapeMismatchError
from curvlab.operators import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    UnwrappedModelWarning,
)

OPERATORS = [HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator]


class Keywords(nn.Module):
    """A tagger called with keyword inputs (``model(x=..., scale=...)``), per-token logits
    ``[N, C, T]``, its output wrapped as ``kind`` says (tensor, dict, or an object with logits)."""

    def __init__(self, kind: str = "tensor") -> None:
        super().__init__()
        self.kind = kind
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> object:
        logits = self.fc2(torch.tanh(self.fc1(x * scale[:, None, None]))).transpose(1, 2)
        if self.kind == "dict":
            return {"loss": logits.sum(), "logits": logits}
        if self.kind == "object":
            return SimpleNamespace(logits=logits)
        return logits


class Positional(nn.Module):
    """The same function as :class:`Keywords`, called with one ``(x, scale)`` tuple."""

    def __init__(self, inner: Keywords) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.inner(*xs)


def tagged_batches():
    g = torch.Generator().manual_seed(0)
    sizes = (4, 3)
    x = torch.randn(sum(sizes), 5, 3, generator=g, dtype=torch.float64)
    scale = 1 + torch.rand(sum(sizes), generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(sizes), 5), generator=g)
    y[torch.rand(y.shape, generator=g) < 0.4] = -100
    dicts = [
        {"x": xb, "scale": sb, "labels": yb}
        for xb, sb, yb in zip(x.split(sizes), scale.split(sizes), y.split(sizes))
    ]
    pairs = [((d["x"], d["scale"]), d["labels"]) for d in dicts]
    return dicts, pairs


def model(kind: str = "tensor") -> Keywords:
    torch.manual_seed(0)
    return Keywords(kind).double()


@pytest.mark.parametrize("kind", ["tensor", "dict", "object"])
@pytest.mark.parametrize("cls", OPERATORS)
def test_dict_batches_and_model_outputs_give_the_matrix_of_plain_batches(cls, kind):
    dicts, pairs = tagged_batches()
    m = model(kind)
    want = cls(Positional(model()), nn.CrossEntropyLoss(), pairs).to_dense()
    got = cls(m, nn.CrossEntropyLoss(), dicts).to_dense()
    assert float((got - want).norm() / want.norm()) < 1e-12
    single = cls(m, nn.CrossEntropyLoss(), dicts[0]).to_dense()
    alone = cls(Positional(model()), nn.CrossEntropyLoss(), [pairs[0]]).to_dense()
    assert float((single - alone).norm() / alone.norm()) < 1e-12


def test_output_fn_and_target_fn_reshape_what_the_loss_sees():
    # [N, C, T] logits flattened to [N T, C] rows and labels to [N T]: the same loss, the same matrix
    dicts, _ = tagged_batches()
    m = model()
    want = HessianOperator(m, nn.CrossEntropyLoss(), dicts).to_dense()
    got = HessianOperator(
        m,
        nn.CrossEntropyLoss(),
        dicts,
        output_fn=lambda out: out.transpose(1, 2).reshape(-1, 3),
        target_fn=lambda y: y.reshape(-1),
    )
    assert float((got.to_dense() - want).norm() / want.norm()) < 1e-12
    with pytest.raises(NoExactDiagonalError, match="output_fn"):
        GGNOperator(m, nn.CrossEntropyLoss(), dicts, output_fn=lambda out: out).exact_diagonal()


def test_a_dict_batch_without_labels_is_refused():
    dicts, _ = tagged_batches()
    batch = {k: v for k, v in dicts[0].items() if k != "labels"}
    for data in (batch, [batch]):
        with pytest.raises(MissingLabelsError, match="'labels'"):
            HessianOperator(model(), nn.CrossEntropyLoss(), data)


def test_an_output_the_loss_cannot_take_names_output_fn():
    dicts, _ = tagged_batches()

    class NoLogits(Keywords):
        def forward(self, x, scale):
            return (super().forward(x, scale),)

    with pytest.raises(ShapeMismatchError, match="output_fn="):
        HessianOperator(NoLogits().double(), nn.CrossEntropyLoss(), dicts)
    with pytest.raises(ShapeMismatchError, match="output_fn="):  # [N, T, C] is not what CE takes
        HessianOperator(
            model(), nn.CrossEntropyLoss(), dicts, output_fn=lambda out: out.transpose(1, 2)
        )
    with pytest.raises(ShapeMismatchError, match="output_fn returned"):
        HessianOperator(model(), nn.CrossEntropyLoss(), dicts, output_fn=lambda out: [out])


def classifier():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = (
        torch.randn(9, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (9,), generator=g),
    )
    return net, data


@pytest.mark.parametrize(
    "wrap", [lambda m: torch.compile(m), nn.DataParallel], ids=["compiled", "DataParallel"]
)
def test_a_compiled_or_wrapped_model_is_unwrapped_with_one_warning(wrap):
    net, data = classifier()
    want = HessianOperator(net, nn.CrossEntropyLoss(), data).to_dense()
    wrapped = wrap(net)
    with pytest.warns(UnwrappedModelWarning, match="wrapped module") as record:
        H = HessianOperator(wrapped, nn.CrossEntropyLoss(), data)
        assert torch.equal(H.to_dense(), want)
        H.block("0").to_dense()
    assert len(record) == 1
    prefix = "_orig_mod." if hasattr(wrapped, "_orig_mod") else "module."
    with pytest.warns(UnwrappedModelWarning):
        sub = HessianOperator(wrapped, nn.CrossEntropyLoss(), data, params=[prefix + "2.bias"])
    assert torch.equal(sub.to_dense(), want[-3:, -3:])


@pytest.mark.parametrize("cls", OPERATORS)
def test_products_inside_autocast_are_the_full_precision_products(cls):
    net, data = classifier()
    net.float()
    data = (data[0].float(), data[1])
    op = cls(net, nn.CrossEntropyLoss(), data)
    V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(2))
    want = op @ V
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = cls(net, nn.CrossEntropyLoss(), data, cache_graph=False)
        got, got_fresh = op @ V, fresh @ V
        assert torch.is_autocast_enabled("cpu")  # the caller's setting is left as it was
    assert got.dtype == got_fresh.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_fresh, want, rtol=1e-6, atol=1e-7)


def test_the_exact_ggn_diagonal_of_dict_inputs_needs_linear_layers():
    dicts, _ = tagged_batches()

    class Scaled(Keywords):  # an elementwise parameter: not a Linear/Conv layer
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

        def forward(self, x, scale):
            return super().forward(x * self.gain, scale)[:, :, 0]

    data = {"x": dicts[0]["x"], "scale": dicts[0]["scale"], "labels": torch.tensor([0, 1, 2, 0])}
    with pytest.raises(NoExactDiagonalError, match="tensor inputs"):
        GGNOperator(Scaled().double(), nn.CrossEntropyLoss(), data).exact_diagonal()


def test_warnings_are_not_raised_for_a_plain_model():
    net, data = classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HessianOperator(net, nn.CrossEntropyLoss(), data) @ torch.ones(43, dtype=torch.float64)


def test_the_users_attention_kernel_choice_is_restored():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flags = torch.backends.cuda
    net, data = classifier()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        HessianOperator(net, nn.CrossEntropyLoss(), data, cache_graph=False).to_dense()
        assert flags.flash_sdp_enabled() and flags.mem_efficient_sdp_enabled()
        assert not flags.math_sdp_enabled()
    assert flags.math_sdp_enabled()
