"""Shared pieces of the phenomenon reproductions: the result record, JSON and figure writing."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["PhenomenonResult", "progress", "write_json"]

T = TypeVar("T")


@dataclass
class PhenomenonResult:
    """What a phenomenon function returns.

    Attributes:
        name: the phenomenon's id (``"eos"``, ``"matrix-sensing"``, ...).
        numbers: the measured numbers (JSON-serialisable), including ``"config"``.
        reproduced: whether the paper's qualitative claim held in this run (``None``: not checked).
        note: one or two sentences on the outcome, including an honest "not reproduced" message.
        caption: two lines for the index page: what the figure shows, what the paper predicts.
        figure: path of the PNG (``None`` when no folder was given).
        json_path: path of the JSON (``None`` when no folder was given).
    """

    name: str
    numbers: dict[str, Any]
    reproduced: bool | None
    note: str
    caption: tuple[str, str]
    figure: Path | None = None
    json_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

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
    result: PhenomenonResult, out_dir: str | os.PathLike[str] | None, figure_fn: Any
) -> PhenomenonResult:
    """Write the figure (via ``figure_fn(path)``) and the JSON into ``out_dir`` when given."""
    if out_dir is None:
        return result
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = result.name.replace("-", "_")
    result.figure = folder / f"{stem}.png"
    figure_fn(result.figure)
    result.json_path = write_json(folder / f"{stem}.json", result.to_json())
    return result


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def progress(iterable: Iterable[T], total: int, desc: str, enabled: bool) -> Iterator[T]:
    """tqdm to stderr when enabled and stderr is a TTY; the bare iterable otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield from iterable
        return
    from tqdm import tqdm

    yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)
