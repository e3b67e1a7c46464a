"""Shared pieces of the phenomenon reproductions: the result record, JSON and figure writing,
seeded models and configuration checks."""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from curvlab.errors import InvalidArgumentError

__all__ = [
    "PhenomenonResult",
    "check_positive",
    "finish",
    "progress",
    "seeded_mlp",
    "write_json",
]

T = TypeVar("T")


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
        failed = {k for k, ok in checks.items() if not ok}
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


def check_positive(config: Any, *names: str) -> None:
    """Raise :class:`~curvlab.errors.InvalidArgumentError` unless every named field is > 0."""
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise InvalidArgumentError(
                f"{type(config).__name__}.{name} must be > 0, got {value!r}; see the defaults of "
                f"{type(config).__name__}()"
            )


def progress(iterable: Iterable[T], total: int, desc: str, enabled: bool) -> Iterator[T]:
    """tqdm to stderr when enabled and stderr is a TTY; the bare iterable otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield from iterable
        return
    from tqdm import tqdm

    yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)
