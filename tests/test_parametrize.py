"""SP / NTK / μP: the per-layer init scales and learning-rate multipliers of Tensor Programs V."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvlab
from curvlab.errors import InvalidArgumentError, UnknownOptionError
from curvlab.parametrize import parametrize


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
    )


# (kind, optimizer) -> multipliers of [in.w, in.b, hid.w, hid.b, out.w, out.b] at m = width/base = 4
EXPECTED = {
    ("sp", "adam"): [1, 1, 1, 1, 1, 1],
    ("sp", "sgd"): [1, 1, 1, 1, 1, 1],
    ("mup", "adam"): [1, 1, 1 / 4, 1, 1 / 4, 1],
    ("mup", "sgd"): [4, 4, 1, 4, 1 / 4, 1],
    ("ntk", "adam"): [1, 1, 1 / 2, 1, 1 / 2, 1],
    ("ntk", "sgd"): [1, 1, 1 / 4, 1, 1 / 4, 1],
}


@pytest.mark.parametrize(("kind", "optimizer"), list(EXPECTED))
def test_lr_multipliers_follow_the_table(kind: str, optimizer: str) -> None:
    groups = parametrize(_mlp(256), kind, base_width=64, lr=0.1, optimizer=optimizer)
    assert [g["name"] for g in groups] == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
        "4.weight",
        "4.bias",
    ]
    assert [g["lr_multiplier"] for g in groups] == pytest.approx(EXPECTED[kind, optimizer])
    assert [g["lr"] for g in groups] == pytest.approx([0.1 * m for m in EXPECTED[kind, optimizer]])
    assert [g["role"] for g in groups[::2]] == ["input", "hidden", "output"]


@pytest.mark.parametrize("kind", ["sp", "ntk", "mup"])
def test_init_scales(kind: str) -> None:
    torch.manual_seed(0)
    net = _mlp(1024)
    groups = parametrize(
        net, kind, base_width=64, lr=1.0, generator=torch.Generator().manual_seed(0)
    )
    out_var = 1 / (1024 * 16) if kind == "mup" else 1 / 1024
    stds = [math.sqrt(1 / 8), math.sqrt(1 / 1024), math.sqrt(out_var)]
    assert [g["init_std"] for g in groups[::2]] == pytest.approx(stds)
    for layer, std in zip((net[0], net[2], net[4]), stds):
        assert float(layer.weight.detach().std()) == pytest.approx(
            std, rel=0.05
        )  # drawn at that scale
        assert not layer.bias.any()


def test_every_parametrisation_is_sp_at_base_width() -> None:
    sp = parametrize(_mlp(64), "sp", base_width=64, lr=1.0)
    for kind in ("ntk", "mup"):
        for opt in ("adam", "sgd"):
            other = parametrize(_mlp(64), kind, base_width=64, lr=1.0, optimizer=opt)
            assert [(g["lr"], g["init_std"]) for g in other] == [
                (g["lr"], g["init_std"]) for g in sp
            ]


def test_module_is_callable_and_groups_feed_an_optimizer() -> None:
    net = _mlp(128)
    groups = curvlab.parametrize(net, "mup", base_width=32, lr=1e-2)
    opt = torch.optim.Adam(groups)
    net(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert opt.param_groups[2]["lr"] == pytest.approx(1e-2 / 4)


def test_bad_inputs() -> None:
    with pytest.raises(UnknownOptionError, match="unknown parametrization 'mu'"):
        parametrize(_mlp(8), "mu", base_width=8, lr=1.0)
    with pytest.raises(UnknownOptionError, match="unknown optimizer 'adamw'"):
        parametrize(_mlp(8), "mup", base_width=8, lr=1.0, optimizer="adamw")
    with pytest.raises(InvalidArgumentError, match="base_width must be >= 1"):
        parametrize(_mlp(8), "mup", base_width=0, lr=1.0)
    with pytest.raises(InvalidArgumentError, match="lr must be finite and > 0"):
        parametrize(_mlp(8), "mup", base_width=8, lr=-1.0)
    with pytest.raises(InvalidArgumentError, match=r"at least two nn\.Linear"):
        parametrize(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 3)), "sp", 3, 1.0)
