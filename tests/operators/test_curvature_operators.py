"""Every operator against a dense float64 matrix built independently (tests/reference/dense.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from curvlab.operators import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from tests.reference.dense import (
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
)


@pytest.fixture(autouse=True)
def float64_default():
    """float64 by default inside this module only (restored after each test)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class Tied(nn.Module):
    """A shared (tied) weight used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


class TiedOutput(nn.Module):
    """Input embedding reused (transposed) as the output layer, as in language models."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(5, 4, bias=False)
        self.mid = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mid(self.emb(x))) @ self.emb.weight[:, :3]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 4, 4)),
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(2, 2, 2, stride=2),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def layernorm() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


def batchnorm_eval() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():  # non-trivial running statistics, then leave it in TRAINING mode
        for _ in range(3):
            model(torch.randn(20, 5) * 2 + 1)
    return model


MODELS = {
    "mlp": mlp,
    "cnn": cnn,
    "layernorm": layernorm,
    "tied": Tied,
    "tied-output": TiedOutput,
    "batchnorm-eval": batchnorm_eval,
}


def make(name: str, in_dim: int = 5, sizes=(7, 5, 3), classes: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS[name]().double()
    d_in = 16 if name == "cnn" else in_dim
    batches = []
    for n in sizes:
        x = torch.randn(n, d_in)
        y = torch.randint(0, 3, (n,)) if classes else torch.randn(n, 3)
        batches.append((x, y))
    return model, batches


def reference(model, fn):
    """Evaluate a dense oracle with the model in eval mode (the operators' default)."""
    was = model.training
    model.eval()
    try:
        return fn()
    finally:
        model.train(was)


@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_matches_dense_on_unequal_batches(name):
    model, batches = make(name)
    names = [n for n, _ in model.named_parameters()]
    ref = reference(model, lambda: dense_hessian(model, nn.CrossEntropyLoss(), batches, names))
    H = HessianOperator(model, nn.CrossEntropyLoss(), batches)
    assert H.shape == ref.shape
    torch.testing.assert_close(H.to_dense(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn", "batchnorm-eval", "tied"])
def test_every_input_form(name):
    model, batches = make(name)
    names = [n for n, _ in model.named_parameters()]
    ref = reference(model, lambda: dense_hessian(model, nn.CrossEntropyLoss(), batches, names))
    # one batch holding all the data must give the same matrix as the three unequal batches
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    n = H.shape[0]
    g = torch.Generator().manual_seed(1)
    v = torch.randn(n, generator=g)
    V = torch.randn(n, 4, generator=g)
    torch.testing.assert_close(H @ v, ref @ v)
    torch.testing.assert_close(H @ V, ref @ V)
    torch.testing.assert_close(v @ H, v @ ref)
    torch.testing.assert_close(H.T @ v, ref.T @ v)
    sp = H.to_scipy()
    np.testing.assert_allclose(sp @ v.numpy(), (ref @ v).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sp.matmat(V.numpy()), (ref @ V).numpy(), rtol=1e-9, atol=1e-12)
    assert H.is_symmetric and not H.is_psd


@pytest.mark.parametrize("name", ["mlp", "cnn", "layernorm", "tied", "batchnorm-eval"])
def test_ggn_cross_entropy_matches_dense(name):
    model, batches = make(name)
    names = [n for n, _ in model.named_parameters()]
    ref = reference(model, lambda: dense_ggn(model, "ce", batches, names))
    G = GGNOperator(model, nn.CrossEntropyLoss(), batches)
    torch.testing.assert_close(G.to_dense(), ref, rtol=1e-10, atol=1e-12)
    assert G.is_psd


@pytest.mark.parametrize(
    ("loss_fn", "kind"),
    [(nn.MSELoss(), "mse"), (nn.BCEWithLogitsLoss(), "bce")],
)
def test_ggn_regression_losses_match_dense(loss_fn, kind):
    model, batches = make("mlp", classes=False)
    if kind == "bce":
        batches = [(x, (y > 0).double()) for x, y in batches]
    names = [n for n, _ in model.named_parameters()]
    ref = dense_ggn(model, kind, batches, names)
    G = GGNOperator(model, loss_fn, batches)
    torch.testing.assert_close(G.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_ggn_equals_hessian_for_a_model_linear_in_its_parameters():
    _model, batches = make("mlp", classes=False)
    lin = nn.Linear(5, 3).double()
    H = HessianOperator(lin, nn.MSELoss(), batches).to_dense()
    G = GGNOperator(lin, nn.MSELoss(), batches).to_dense()
    torch.testing.assert_close(G, H, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["mlp", "cnn", "tied"])
def test_empirical_fisher_matches_per_sample_gradients(name):
    model, batches = make(name)
    names = [n for n, _ in model.named_parameters()]
    ref = dense_empirical_fisher(model, "ce", batches, names)
    E = EmpiricalFisherOperator(model, nn.CrossEntropyLoss(), batches)
    torch.testing.assert_close(E.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_fisher_converges_to_ggn_at_the_monte_carlo_rate():
    model, batches = make("mlp")
    names = [n for n, _ in model.named_parameters()]
    G = dense_ggn(model, "ce", batches, names)
    errs = []
    for m in (16, 1024):
        F = FisherOperator(
            model,
            nn.CrossEntropyLoss(),
            batches,
            mc_samples=m,
            generator=torch.Generator().manual_seed(3),
        ).to_dense()
        assert torch.allclose(F, F.T, atol=1e-14)
        assert torch.linalg.eigvalsh(F).min() > -1e-12
        errs.append(float((F - G).norm() / G.norm()))
    # error ~ 1/sqrt(M): 64x more samples should cut it by ~8x; require at least 4x
    assert errs[1] < errs[0] / 4
    assert errs[1] < 0.05


def test_fisher_is_a_fixed_matrix_and_reproducible():
    model, batches = make("mlp")
    mk = lambda: FisherOperator(  # noqa: E731
        model, nn.CrossEntropyLoss(), batches, generator=torch.Generator().manual_seed(5)
    )
    F1, F2 = mk(), mk()
    v = torch.randn(F1.shape[0])
    torch.testing.assert_close(F1 @ v, F1 @ v, rtol=0, atol=0)
    torch.testing.assert_close(F1 @ v, F2 @ v, rtol=0, atol=0)


def test_sum_reduction():
    model, batches = make("mlp")
    names = [n for n, _ in model.named_parameters()]
    loss = nn.CrossEntropyLoss(reduction="sum")
    ref = dense_hessian(model, loss, batches, names, reduction="sum")
    torch.testing.assert_close(HessianOperator(model, loss, batches).to_dense(), ref)


def test_parameter_subset_and_blocks_are_sub_blocks_of_the_full_matrix():
    model, batches = make("mlp")
    full = HessianOperator(model, nn.CrossEntropyLoss(), batches)
    dense = full.to_dense()
    assert full.blocks() == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    for block, members in full.blocks().items():
        sl = [full.param_space.slice_of(m) for m in members]
        idx = torch.cat([torch.arange(s.start, s.stop) for s in sl])
        torch.testing.assert_close(full.block(block).to_dense(), dense[idx][:, idx])
    sub = HessianOperator(model, nn.CrossEntropyLoss(), batches, params=[model[2].weight])
    s = full.param_space.slice_of("2.weight")
    torch.testing.assert_close(sub.to_dense(), dense[s, s])


def test_float32_agrees_with_float64():
    model, batches = make("mlp")
    ref = HessianOperator(model, nn.CrossEntropyLoss(), batches).to_dense()
    model32 = model.float()
    b32 = [(x.float(), y) for x, y in batches]
    H32 = HessianOperator(model32, nn.CrossEntropyLoss(), b32)
    assert H32.dtype == torch.float32
    out = H32.to_dense()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_cached_graph_is_rebuilt_after_an_in_place_parameter_update():
    model, batches = make("mlp", sizes=(9,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), batches[0])
    assert H.cache_graph
    v = torch.randn(H.shape[0])
    before = H @ v
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    after = H @ v
    fresh = HessianOperator(model, nn.CrossEntropyLoss(), batches[0], cache_graph=False) @ v
    torch.testing.assert_close(after, fresh)
    assert not torch.allclose(before, after)


def test_dataloader_is_accepted():
    model, batches = make("mlp", sizes=(10,))
    x, y = batches[0]
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)  # 4 + 4 + 2
    H = HessianOperator(model, nn.CrossEntropyLoss(), loader)
    ref = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    torch.testing.assert_close(H.to_dense(), ref.to_dense())


def test_eval_mode_by_default_and_mode_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double()
    model.train()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), cache_graph=False)
    v = torch.randn(H.shape[0])
    torch.testing.assert_close(H @ v, H @ v, rtol=0, atol=0)  # dropout off: a fixed matrix
    assert model.training and model[1].training  # the user's mode is restored
    with pytest.warns(UserWarning, match="not a fixed matrix"):
        HessianOperator(model, nn.CrossEntropyLoss(), (x, y), mode="as-is")


@pytest.mark.parametrize(
    "cls", [HessianOperator, GGNOperator, EmpiricalFisherOperator, FisherOperator]
)
def test_vectorized_products_equal_the_column_loop(cls):
    model, batches = make("cnn")
    loop = cls(model, nn.CrossEntropyLoss(), batches)
    vec = cls(model, nn.CrossEntropyLoss(), batches, vectorize=True)
    V = torch.randn(loop.shape[0], 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vec @ V, loop @ V, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("change", ["assign-data", "replace-parameter", "in-place"])
@pytest.mark.parametrize("cache_graph", [True, False])
def test_products_follow_a_changed_parameter(change, cache_graph):
    model, batches = make("mlp", sizes=(9,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), batches[0], cache_graph=cache_graph)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    before = H @ v
    new = model[0].weight.detach() * 1.5
    if change == "assign-data":
        model[0].weight.data = new
    elif change == "replace-parameter":
        model[0].weight = nn.Parameter(new)
    else:
        with torch.no_grad():
            model[0].weight.copy_(new)
    fresh = HessianOperator(model, nn.CrossEntropyLoss(), batches[0], cache_graph=False) @ v
    torch.testing.assert_close(H @ v, fresh, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(before, fresh)


def test_a_replaced_parameter_of_another_shape_is_refused():
    from curvlab import ShapeMismatchError

    model, batches = make("mlp", sizes=(9,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), batches[0])
    model[2].weight = nn.Parameter(torch.zeros(3, 7))
    with pytest.raises(ShapeMismatchError, match="build a new operator"):
        H @ torch.ones(H.shape[0])


@pytest.mark.parametrize("mode", ["train", "as-is"])
def test_train_mode_leaves_batchnorm_statistics_alone(mode):
    import warnings

    model, batches = make("batchnorm-eval")  # BatchNorm in training mode, non-trivial stats
    bn = model[1]
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ops = [
            cls(model, nn.CrossEntropyLoss(), batches, mode=mode, cache_graph=cache)
            for cls in (HessianOperator, GGNOperator)
            for cache in (True, False)
        ]
    for op in ops:
        op @ torch.ones(op.shape[0])
        op.loss_and_gradient()
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(value, stats[key], rtol=0, atol=0)
    assert bn.training and bn.track_running_stats


def test_train_mode_uses_batch_statistics():
    """Still the training-mode matrix: batch statistics, as the model computes in training."""
    import warnings

    model, batches = make("batchnorm-eval", sizes=(9,))
    names = [n for n, _ in model.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        H = HessianOperator(model, nn.CrossEntropyLoss(), batches[0], mode="train")
    untracked = copy.deepcopy(model)  # the same layers with no running statistics at all
    untracked[1].track_running_stats = False
    untracked[1].running_mean = untracked[1].running_var = None
    ref = dense_hessian(untracked, nn.CrossEntropyLoss(), batches, names)  # training forward
    torch.testing.assert_close(H.to_dense(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("cls", "loss_fn"),
    [
        (HessianOperator, nn.MSELoss()),
        (HessianOperator, nn.L1Loss()),
        (HessianOperator, nn.functional.mse_loss),
        (GGNOperator, nn.MSELoss()),
        (GGNOperator, nn.functional.mse_loss),
    ],
)
def test_a_target_that_only_broadcasts_is_refused(cls, loss_fn):
    from curvlab import ShapeMismatchError

    model, batches = make("mlp", sizes=(6,), classes=False)
    x, y = batches[0]
    with pytest.raises(ShapeMismatchError, match=r"\(6, 3\) and targets \(6, 1\) differ.*reshape"):
        cls(model, loss_fn, (x, y[:, :1]))


def test_writes_through_data_need_clear_cache():
    """``p.data.copy_`` bypasses version counters (documented): clear_cache() rebuilds."""
    model, batches = make("mlp", sizes=(9,))
    H = HessianOperator(model, nn.CrossEntropyLoss(), batches[0])
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    H @ v
    model[0].weight.data.copy_(model[0].weight.detach() * 1.5)
    H.clear_cache()
    fresh = HessianOperator(model, nn.CrossEntropyLoss(), batches[0], cache_graph=False) @ v
    torch.testing.assert_close(H @ v, fresh, rtol=1e-12, atol=1e-14)
