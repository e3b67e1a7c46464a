"""Width parametrisations (SP, NTK, μP): per-layer init scales and learning-rate multipliers.

``curvlab.parametrize(model, "mup", base_width=64, lr=1e-3, optimizer="adam")`` re-initialises the
model's Linear/Conv layers in place and returns optimizer param groups (one per parameter) whose
``lr`` is ``lr`` times the layer's multiplier. The first weight layer is the *input* layer, the last
the *output* layer, the others *hidden*; a width ratio m = fan / ``base_width`` is taken for every
dimension that is a width (fan-out of input and hidden layers, fan-in of hidden and output layers),
so every parametrisation coincides with SP at ``base_width``. Rules (Yang & Hu et al., Tensor
Programs V, table 3 in its base-width form, table 8; no forward multipliers):

=============  =================  =====================  =================  =======================
param.         init variance      SGD lr multiplier      Adam lr multiplier  applies to
=============  =================  =====================  =================  =======================
SP             1/fan_in           1                      1                  every weight
μP input       1/fan_in           m_out                  1                  input weight, biases*
μP hidden      1/fan_in           1                      1/m_in             hidden weights
μP output      1/(fan_in·m_in)    1/m_in                 1/m_in             output weight
NTK            1/fan_in           1/m_in (hidden, out)   1/√m_in (hidden,   (input weight and
                                                         out)               biases: 1)
=============  =================  =====================  =================  =======================

(*) Biases of input and hidden layers take the input-weight rule with m_out = their width ratio;
the output bias has multiplier 1. Weights are drawn N(0, variance); biases start at zero. The NTK
row is the NTK parametrisation W = w/√n expressed on W (same function, same training).
"""

from __future__ import annotations

import math
import sys
import types
from typing import Any, cast

import torch
from torch import Tensor, nn

from curvlab.errors import InvalidArgumentError
from curvlab.operators._checks import check_choice, check_positive_float, check_positive_int

__all__ = ["PARAMETRIZATIONS", "parametrize"]

PARAMETRIZATIONS = ("sp", "ntk", "mup")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _layers(model: nn.Module) -> list[nn.Module]:
    layers: list[nn.Module] = [m for m in model.modules() if isinstance(m, _LAYERS)]
    owned = {id(p) for m in layers for p in m.parameters(recurse=False)}
    stray = [n for n, p in model.named_parameters() if id(p) not in owned]
    if stray or len(layers) < 2:
        raise InvalidArgumentError(
            "parametrize needs a model whose parameters all belong to at least two nn.Linear / "
            f"nn.ConvNd layers (input ... output); found {len(layers)} such layers and other "
            f"parameters {stray}"
        )
    return layers


def _multipliers(
    kind: str, role: str, optimizer: str, m_in: float, m_out: float
) -> tuple[float, float, float]:
    """(init-variance factor on 1/fan_in, weight lr multiplier, bias lr multiplier)."""
    bias = m_out if (kind == "mup" and optimizer == "sgd" and role != "output") else 1.0
    if kind == "sp" or (role == "input" and kind == "ntk"):
        return 1.0, 1.0, 1.0
    if kind == "ntk":
        return 1.0, (1 / m_in if optimizer == "sgd" else 1 / math.sqrt(m_in)), 1.0
    if role == "input":
        return 1.0, (m_out if optimizer == "sgd" else 1.0), bias
    if role == "hidden":
        return 1.0, (1.0 if optimizer == "sgd" else 1 / m_in), bias
    return 1 / m_in, 1 / m_in, bias


def parametrize(
    model: nn.Module,
    kind: str,
    base_width: int,
    lr: float,
    optimizer: str = "adam",
    generator: torch.Generator | None = None,
) -> list[dict[str, Any]]:
    """Re-initialise ``model`` in place under ``kind`` and return its per-layer param groups.

    Args:
        model: a network whose parameters all belong to nn.Linear / nn.ConvNd layers, in forward
            order (first = input layer, last = output layer).
        kind: ``"sp"``, ``"ntk"`` or ``"mup"`` (see the module docstring's table).
        base_width: the width at which every parametrisation equals SP.
        lr: the base learning rate (the one tuned at ``base_width``).
        optimizer: ``"adam"`` (also AdamW, RMSProp-like) or ``"sgd"``: the rules differ.
        generator: for the re-initialisation.

    Returns:
        One dict per parameter: ``params``, ``lr`` (= ``lr`` × ``lr_multiplier``),
        ``lr_multiplier``, ``init_std``, ``role`` and ``name``; pass it to the optimizer.

    Raises:
        UnknownOptionError: an unknown ``kind`` or ``optimizer``.
        InvalidArgumentError: a bad ``base_width`` or ``lr``, or a model with parameters outside
            Linear/Conv layers or with fewer than two of them.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))
        >>> groups = parametrize(net, "mup", base_width=64, lr=1e-2)
        >>> [g["lr_multiplier"] for g in groups]
        [1.0, 1.0, 0.25, 1.0]
        >>> opt = torch.optim.Adam(groups)
    """
    check_choice(kind, PARAMETRIZATIONS, "parametrization")
    check_choice(optimizer, ("adam", "sgd"), "optimizer")
    base = check_positive_int(base_width, "base_width")
    lr = check_positive_float(lr, "lr")
    layers = _layers(model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups: list[dict[str, Any]] = []
    for i, layer in enumerate(layers):
        role = "input" if i == 0 else "output" if i == len(layers) - 1 else "hidden"
        weight = cast(Tensor, layer.weight)
        bias = cast(Tensor | None, layer.bias)
        fan_in = weight[0].numel()
        m_in = fan_in / base if role != "input" else 1.0
        m_out = weight.shape[0] / base if role != "output" else 1.0
        var, w_mult, b_mult = _multipliers(kind, role, optimizer, m_in, m_out)
        std = math.sqrt(var / fan_in)
        with torch.no_grad():
            weight.normal_(0.0, std, generator=generator)
            if bias is not None:
                bias.zero_()
        pairs = [(weight, w_mult, std)]
        if bias is not None:
            pairs.append((bias, b_mult, 0.0))
        for p, mult, init_std in pairs:
            groups.append(
                {
                    "params": [p],
                    "lr": lr * mult,
                    "lr_multiplier": mult,
                    "init_std": init_std,
                    "role": role,
                    "name": names[id(p)],
                }
            )
    return groups


class _CallableModule(types.ModuleType):
    """Lets ``curvlab.parametrize(model, ...)`` call :func:`parametrize` on the module itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        return parametrize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
