"""Shared pieces of the phenomenon reproductions: the result record, JSON and figure writing,
seeded models and configuration checks."""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from curvlab.errors import InvalidArgumentError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "PhenomenonConfig",
    "PhenomenonResult",
    "SeededConfig",
    "failed_checks",
    "finish",
    "loglog_slope",
    "minibatch_backward",
    "progress",
    "seeded_mlp",
    "write_json",
]

T = TypeVar("T")


def loglog_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (NaN with fewer than two points).

    Example:
        >>> round(loglog_slope([1.0, 2.0, 4.0], [1.0, 0.25, 0.0625]), 6)
        -2.0
    """
    if len(x) < 2:
        return math.nan
    lx = torch.tensor(x, dtype=torch.float64).log()
    ly = torch.tensor(y, dtype=torch.float64).log()
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def failed_checks(checks: Mapping[str, Any]) -> list[str]:
    """The names of the checks that do not hold, in their order."""
    return [name for name, ok in checks.items() if not ok]


@dataclass
class PhenomenonResult:
    """What a phenomenon function returns.

    Attributes:
        name: the phenomenon's id (``"eos"``, ``"matrix-sensing"``, ...).
        numbers: the measured numbers (JSON-serialisable), including ``"config"``.
        reproduced: whether the paper's claim held in this run: ``True``, ``"partly"`` (the core
            checks held, the full claim did not), ``False``, or ``None`` (not checked).
        note: one or two sentences on the outcome, including an honest "not reproduced" message.
        caption: two lines for the index page: what the figure shows, what the paper predicts.
        figure: path of the PNG (``None`` when no folder was given).
        json_path: path of the JSON (``None`` when no folder was given).
    """

    name: str
    numbers: dict[str, Any]
    reproduced: bool | str | None
    note: str
    caption: tuple[str, str]
    figure: Path | None = None
    json_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_checks(
        cls,
        name: str,
        numbers: dict[str, Any],
        note: str,
        caption: tuple[str, str],
        full_claim: Collection[str] = (),
    ) -> PhenomenonResult:
        """A result graded by ``numbers["checks"]``.

        ``reproduced`` is ``True`` when every check holds, ``"partly"`` when only checks named in
        ``full_claim`` (the parts of the paper's claim beyond the core) fail, ``False`` otherwise.
        """
        checks = numbers["checks"]
        failed = set(failed_checks(checks))
        grade: bool | str = not failed or (
            "partly" if failed <= set(full_claim) and len(failed) < len(checks) else False
        )
        return cls(name, numbers, grade, note, caption)

    @property
    def status(self) -> str:
        """``"reproduced"``, ``"partly reproduced"``, ``"NOT reproduced"`` or ``"not checked"``."""
        if self.reproduced is None:
            return "not checked"
        if self.reproduced == "partly":
            return "partly reproduced"
        return "reproduced" if self.reproduced else "NOT reproduced"

    def to_json(self) -> dict[str, Any]:
        """The JSON document written next to the figure."""
        return {
            "phenomenon": self.name,
            "reproduced": self.reproduced,
            "note": self.note,
            "caption": list(self.caption),
            "figure": self.figure.name if self.figure is not None else None,
            "numbers": self.numbers,
        }


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, document: dict[str, Any]) -> Path:
    """Write ``document`` (non-finite floats as strings) with 2-space indentation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(document), indent=2) + "\n", encoding="utf-8")
    return path


def finish(
    result: PhenomenonResult,
    out_dir: str | os.PathLike[str] | None,
    draw: Callable[[Any], None],
    figsize: tuple[float, float] = (8.0, 5.0),
) -> PhenomenonResult:
    """Write the figure and the JSON into ``out_dir`` when given; return ``result``.

    ``draw(fig)`` fills a new matplotlib figure (Agg backend, imported only here); the figure is
    then laid out, saved as ``<name>.png`` at 110 dpi and closed.
    """
    if out_dir is None:
        return result
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = result.name.replace("-", "_")
    result.figure = folder / f"{stem}.png"
    fig = plt.figure(figsize=figsize)
    try:
        draw(fig)
        fig.tight_layout()
        fig.savefig(result.figure, dpi=110)
    finally:
        plt.close(fig)
    result.json_path = write_json(folder / f"{stem}.json", result.to_json())
    return result


def seeded_mlp(sizes: Sequence[int], activation: type[nn.Module], seed: int) -> nn.Sequential:
    """An MLP ``sizes[0] - ... - sizes[-1]`` with ``activation`` between layers.

    Weights and biases are drawn as torch's default initialisation (uniform in ±1/sqrt(fan_in)),
    but from a generator seeded with ``seed``, so the model does not depend on the global RNG.
    """
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if i > 0:
            layers.append(activation())
        layer = nn.Linear(fan_in, fan_out)
        bound = 1.0 / fan_in**0.5
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
        layers.append(layer)
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class PhenomenonConfig:
    """Base of the phenomenon configurations: each numeric field is checked when one is built.

    How a configuration uses it: ``@dataclass(frozen=True) class FooConfig(PhenomenonConfig)`` with
    its fields and their defaults. Every int or float field (each value of a tuple; ``bool``,
    ``None`` and strings are not numbers here) must then be finite and > 0, except the names in
    ``_nonnegative`` (finite and >= 0; ``seed`` by default) and ``_unchecked`` (ranges the config
    checks itself). Rules that tie fields together go into ``_check``; ``quick()`` gives the tests' size.

    Raises:
        InvalidArgumentError: a field is out of its range (the message names the field).
    """

    _nonnegative: ClassVar[tuple[str, ...]] = ("seed",)
    _unchecked: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in self._unchecked:
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                for i, item in enumerate(value):
                    self._check_number(f"{f.name}[{i}]", item)
            else:
                self._check_number(f.name, value)
        self._check()

    def _check_number(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        nonnegative = name.split("[")[0] in self._nonnegative
        if not math.isfinite(value) or value < 0 or (value == 0 and not nonnegative):
            cls = type(self).__name__
            raise InvalidArgumentError(
                f"{cls}.{name} must be {'>=' if nonnegative else '>'} 0 and finite, got "
                f"{value!r}; see the defaults of {cls}()"
            )

    def _check(self) -> None:
        """Rules between fields; a configuration that has some overrides this."""

    def _require_values(self, name: str, limit: str) -> None:
        """Raise unless the tuple field ``name`` holds 1 to ``limit`` (another field) values."""
        values, most = getattr(self, name), getattr(self, limit)
        if not 0 < len(values) <= most:
            raise InvalidArgumentError(
                f"{type(self).__name__}.{name} needs 1 to {limit} = {most} values, got {values!r}"
            )

    def _require_choice(self, name: str, choices: tuple[str, ...]) -> None:
        """Raise unless the field ``name`` is one of ``choices``."""
        value = getattr(self, name)
        if value not in choices:
            raise InvalidArgumentError(
                f"{type(self).__name__}.{name} must be {' or '.join(map(repr, choices))}, got "
                f"{value!r}"
            )

    @classmethod
    def quick(cls) -> Self:
        """The tests' size (seconds); the defaults unless a configuration overrides this."""
        return cls()


@dataclass(frozen=True)
class SeededConfig(PhenomenonConfig):
    """A :class:`PhenomenonConfig` whose run draws its random numbers from ``seed``.

    Attributes:
        seed: the seed of the run's generators, >= 0 (keyword-only, so that a configuration's own
            fields keep their positions).
    """

    seed: int = field(default=0, kw_only=True)


def minibatch_backward(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[Tensor, Tensor],
    batch_size: int,
    generator: torch.Generator,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
) -> Tensor:
    """Back-propagate the loss of one minibatch drawn with replacement; the caller then steps.

    ``batch_size`` indices are drawn uniformly from ``generator``; the optimizer's gradients are
    zeroed and ``loss_fn(model(x[idx]), y[idx])`` is back-propagated. Returns that loss.
    """
    x, y = data
    idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
    optimizer.zero_grad()
    loss = loss_fn(model(x[idx]), y[idx])
    loss.backward()
    return loss


def progress(iterable: Iterable[T], total: int, desc: str, enabled: bool) -> Iterator[T]:
    """tqdm to stderr when enabled and stderr is a TTY; the bare iterable otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield from iterable
        return
    from tqdm import tqdm

    yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)
