"""Loss landscapes: linear interpolation between two models and filter-normalised random slices.

``interpolate`` evaluates the loss along θ(α) = (1 − α)θ_A + αθ_B, for the whole model and, with
``layerwise=True``, for one layer at a time (that layer interpolated, every other layer kept at
θ_A). The barrier of a curve is max_α [L(θ(α)) − ((1 − α)L(θ(0)) + αL(θ(1)))]: zero for a convex
loss, positive when the straight path climbs over a ridge (linear mode connectivity fails).

``slice_1d`` / ``slice_2d`` evaluate L(θ + a·d) and L(θ + a·d₁ + b·d₂) along random Gaussian
directions with Li et al.'s (2018) filter normalisation: each filter (a slice along dim 0 of a
weight: a row of a Linear weight, an output channel of a conv kernel) of the direction is rescaled
to the norm of the corresponding filter of the weight. One-dimensional parameters (biases, norm
layers' gains and shifts) get a zero direction by default (``keep_vectors=False``, as Li et al.'s
``ignore='biasbn'``); with ``keep_vectors=True`` each is treated as one filter.

Every evaluation runs under ``torch.no_grad`` through ``torch.func.functional_call``: the models
are never modified. Floating buffers (BatchNorm running statistics) are interpolated with the
parameters; integer buffers are taken from model A. Evaluate in the mode the models are in (call
``model.eval()`` first for BatchNorm/Dropout models).

Paper: Li, Xu, Taylor, Studer & Goldstein, "Visualizing the Loss Landscape of Neural Nets", NeurIPS
2018; Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvlab.errors import InvalidArgumentError, ShapeMismatchError
from curvlab.operators._checks import check_choice

__all__ = [
    "InterpolationResult",
    "SliceResult",
    "barrier",
    "interpolate",
    "random_direction",
    "slice_1d",
    "slice_2d",
]

State = dict[str, Tensor]
Data = tuple[Any, Any] | Iterable[tuple[Any, Any]]
NORMALIZATIONS = ("filter", "layer", "none")


@dataclass
class InterpolationResult:
    """Losses along θ(α) and their barriers.

    Attributes:
        alphas: the interpolation coefficients (0 = model A, 1 = model B).
        losses: the loss at each α for the whole-model path.
        barrier: the whole-model barrier (see :func:`barrier`).
        layer_losses: layer name -> losses with only that layer interpolated (``layerwise=True``).
        layer_barriers: layer name -> the barrier of that curve.
    """

    alphas: list[float]
    losses: list[float]
    barrier: float
    layer_losses: dict[str, list[float]] = field(default_factory=dict)
    layer_barriers: dict[str, float] = field(default_factory=dict)


@dataclass
class SliceResult:
    """A 1-D or 2-D loss slice: ``losses[i]`` (1-D) or ``losses[i][j]`` at (xs[i], ys[j]) (2-D)."""

    xs: list[float]
    losses: list[float] | list[list[float]]
    directions: list[State]
    ys: list[float] | None = None


def barrier(losses: list[float]) -> float:
    """max over the curve of L(α) − ((1 − α)L(0) + αL(1)), for equally spaced α from 0 to 1.

    Zero when the curve never rises above the chord between its endpoints (e.g. a convex loss).

    Example:
        >>> barrier([0.0, 0.5, 0.0])
        0.5
    """
    n = len(losses) - 1
    return max(loss - ((n - i) * losses[0] + i * losses[-1]) / n for i, loss in enumerate(losses))


def _state(model: nn.Module) -> State:
    return {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}


def _batches(data: Data) -> list[tuple[Any, Any]]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        return [data]
    batches = list(data)
    if not batches:
        raise InvalidArgumentError(
            "data is empty; pass (inputs, targets) or a list of such batches"
        )
    return batches


def _evaluate(
    model: nn.Module, state: State, loss_fn: Callable[[Tensor, Any], Tensor], batches: list[Any]
) -> float:
    """Mean loss over ``batches`` (weighted by batch size) with the model's tensors set to ``state``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            n = len(x)
            total += float(loss_fn(functional_call(model, state, (x,)), y)) * n
            count += n
    return total / count


def _check_num(num: int) -> None:
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise InvalidArgumentError(f"num must be an integer >= 2 (points on the path), got {num!r}")


def _mix(a: Tensor, b: Tensor, alpha: float) -> Tensor:
    return a + alpha * (b - a) if a.is_floating_point() else a


def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor],
    data: Data,
    num: int = 21,
    layerwise: bool = False,
) -> InterpolationResult:
    """Loss along θ(α) = (1 − α)θ_A + αθ_B at ``num`` equally spaced α in [0, 1], and its barrier.

    With ``layerwise=True`` each layer (the module owning a group of parameters, e.g. ``"0"`` for
    ``0.weight`` and ``0.bias``; ``""`` for the root's own) is also interpolated on its own,
    every other layer at θ_A.

    Args:
        model_a: the model at α = 0 (also the one evaluated, with its tensors replaced).
        model_b: the model at α = 1; same architecture (same state-dict names and shapes).
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar mean loss.
        data: ``(inputs, targets)`` or an iterable of such batches (averaged by batch size).
        num: number of α values, >= 2.
        layerwise: also compute the layer-wise curves and barriers.

    Returns:
        An :class:`InterpolationResult`.

    Raises:
        ShapeMismatchError: the models' state dicts differ in names or shapes.
        InvalidArgumentError: ``num`` < 2 or ``data`` empty.
    """
    _check_num(num)
    sa, sb = _state(model_a), _state(model_b)
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise ShapeMismatchError(
            "model_a and model_b must have the same state-dict names and shapes to interpolate; "
            "build both from the same architecture"
        )
    batches = _batches(data)
    alphas = [i / (num - 1) for i in range(num)]

    def curve(keys: Iterable[str]) -> list[float]:
        chosen = set(keys)
        return [
            _evaluate(
                model_a,
                {k: _mix(sa[k], sb[k], a) if k in chosen else sa[k] for k in sa},
                loss_fn,
                batches,
            )
            for a in alphas
        ]

    losses = curve(sa)
    result = InterpolationResult(alphas, losses, barrier(losses))
    if layerwise:
        layers: dict[str, list[str]] = {}
        for name, _ in model_a.named_parameters():
            layers.setdefault(_layer_of(name), []).append(name)
        for layer, names in layers.items():
            result.layer_losses[layer] = curve(names)
            result.layer_barriers[layer] = barrier(result.layer_losses[layer])
    return result


def random_direction(
    model: nn.Module,
    normalization: str = "filter",
    keep_vectors: bool = False,
    generator: torch.Generator | None = None,
) -> State:
    """A Gaussian direction over the model's parameters, normalised as Li et al. (2018).

    ``"filter"``: each filter (slice along dim 0) rescaled to the norm of the weight's filter;
    ``"layer"``: each parameter rescaled to the parameter's norm; ``"none"``: raw N(0, 1).
    One-dimensional parameters are zero unless ``keep_vectors=True`` (then each is one filter).

    Raises:
        UnknownOptionError: an unknown ``normalization``.
    """
    check_choice(normalization, NORMALIZATIONS, "normalization")
    direction: State = {}
    for name, p in model.named_parameters():
        w = p.detach()
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        if w.dim() <= 1 and not keep_vectors:
            d.zero_()
        elif normalization == "layer" or (normalization == "filter" and w.dim() <= 1):
            d *= w.norm() / (d.norm() + 1e-12)
        elif normalization == "filter":
            shape = (-1,) + (1,) * (w.dim() - 1)
            w_norm, d_norm = w.flatten(1).norm(dim=1), d.flatten(1).norm(dim=1)
            d *= (w_norm / (d_norm + 1e-12)).reshape(shape)
        direction[name] = d
    return direction


def _directions(
    model: nn.Module,
    given: list[Mapping[str, Tensor]] | None,
    count: int,
    normalization: str,
    keep_vectors: bool,
    seed: int,
) -> list[State]:
    if given is None:
        gen = torch.Generator().manual_seed(seed)
        return [random_direction(model, normalization, keep_vectors, gen) for _ in range(count)]
    params = dict(model.named_parameters())
    out = []
    for d in given:
        if d.keys() != params.keys() or any(d[k].shape != params[k].shape for k in params):
            raise ShapeMismatchError(
                "a direction must map every parameter name of the model to a tensor of its shape; "
                "build one with curvlab.landscape.random_direction(model)"
            )
        out.append({k: v.detach() for k, v in d.items()})
    return out


def _span(span: tuple[float, float], num: int) -> list[float]:
    _check_num(num)
    lo, hi = span
    if not lo < hi:
        raise InvalidArgumentError(f"span must be (low, high) with low < high, got {span!r}")
    return [lo + (hi - lo) * i / (num - 1) for i in range(num)]


def _shifted(state: State, directions: list[State], coefs: tuple[float, ...]) -> State:
    out = dict(state)
    for d, c in zip(directions, coefs):
        for k, v in d.items():
            out[k] = out[k] + c * v
    return out


def slice_1d(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor],
    data: Data,
    direction: Mapping[str, Tensor] | None = None,
    span: tuple[float, float] = (-1.0, 1.0),
    num: int = 41,
    normalization: str = "filter",
    keep_vectors: bool = False,
    seed: int = 0,
) -> SliceResult:
    """L(θ + a·d) for ``num`` equally spaced a in ``span``.

    Args:
        model, loss_fn, data: as :func:`interpolate`.
        direction: parameter name -> tensor; a filter-normalised random one (seeded) by default.
            A given direction is used as is.
        span: the range of a.
        num: number of points, >= 2.
        normalization, keep_vectors: of the random direction (see :func:`random_direction`).
        seed: the random direction's seed.

    Raises:
        ShapeMismatchError: ``direction`` does not match the model's parameters.
        InvalidArgumentError: ``num`` < 2, an empty ``span`` or empty ``data``.
        UnknownOptionError: an unknown ``normalization``.
    """
    xs = _span(span, num)
    given = None if direction is None else [direction]
    dirs = _directions(model, given, 1, normalization, keep_vectors, seed)
    state, batches = _state(model), _batches(data)
    losses = [_evaluate(model, _shifted(state, dirs, (a,)), loss_fn, batches) for a in xs]
    return SliceResult(xs, losses, dirs)


def slice_2d(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Any], Tensor],
    data: Data,
    directions: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
    span: tuple[float, float] = (-1.0, 1.0),
    num: int = 21,
    normalization: str = "filter",
    keep_vectors: bool = False,
    seed: int = 0,
) -> SliceResult:
    """L(θ + a·d₁ + b·d₂) on a ``num`` × ``num`` grid over ``span`` × ``span``.

    Arguments and errors as :func:`slice_1d`; ``losses[i][j]`` is at (a, b) = (xs[i], ys[j]).
    """
    xs = _span(span, num)
    given = None if directions is None else list(directions)
    dirs = _directions(model, given, 2, normalization, keep_vectors, seed)
    state, batches = _state(model), _batches(data)
    grid = [
        [_evaluate(model, _shifted(state, dirs, (a, b)), loss_fn, batches) for b in xs] for a in xs
    ]
    return SliceResult(xs, grid, dirs, ys=list(xs))
