"""Flat coordinates over a chosen set of parameters, and their split into blocks.

Every curvature operator acts on one flat vector ``[n]`` that concatenates the chosen parameters
in the model's ``named_parameters()`` order. :class:`ParamSpace` converts between that vector and
named tensors, and groups parameters into blocks (per parameter or per module).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from curvlab.errors import ParameterError, ShapeMismatchError
from curvlab.operators._checks import check_choice

__all__ = ["ParamSpace", "select_parameters"]


def select_parameters(
    model: nn.Module, params: Iterable[Tensor | str] | None = None
) -> tuple[list[str], list[Tensor]]:
    """Resolve ``params`` to the model's ``(names, tensors)``, in the model's parameter order.

    Args:
        model: the module the parameters belong to.
        params: ``None`` for every parameter that requires grad; otherwise parameter tensors of
            ``model`` and/or their names (as in ``model.named_parameters()``). Tied (shared)
            parameters appear once, under their first name.

    Raises:
        ParameterError: a named parameter does not exist, a tensor is not one of the model's,
            a chosen parameter does not require grad, or nothing is chosen.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ParameterError(
                "the model has no parameter that requires grad; call p.requires_grad_(True) on "
                "the parameters whose curvature you want"
            )
        return [n for n, _ in chosen], [p for _, p in chosen]

    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    wanted: set[str] = set()
    for item in params:
        if isinstance(item, str):
            if item not in by_name:
                close = [n for n in by_name if item in n or n in item][:5]
                hint = f" Did you mean one of {close}?" if close else ""
                raise ParameterError(f"the model has no parameter named {item!r}.{hint}")
            wanted.add(item)
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise ParameterError(
                    f"a tensor of shape {tuple(item.shape)} passed in params is not a parameter "
                    "of the model; pass the model's own parameters (or their names)"
                )
            wanted.add(by_id[id(item)])
        else:
            raise ParameterError(f"params must hold tensors or names, got {type(item).__name__}")
    if not wanted:
        raise ParameterError("params is empty; pass None for all parameters that require grad")
    names = [n for n, _ in named if n in wanted]
    for n in names:
        if not by_name[n].requires_grad:
            raise ParameterError(
                f"parameter {n!r} does not require grad, so it has no curvature; call "
                f"requires_grad_(True) on it or leave it out of params"
            )
    return names, [by_name[n] for n in names]


@dataclass(frozen=True)
class ParamSpace:
    """The flat coordinate system of a list of named parameters.

    Attributes:
        names: parameter names, in order.
        shapes: their shapes.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Number of elements of each parameter."""
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each parameter in the flat vector, and the total ``n`` last."""
        out = [0]
        for s in self.sizes:
            out.append(out[-1] + s)
        return tuple(out)

    @cached_property
    def dim(self) -> int:
        """Total number of coordinates ``n``."""
        return self.offsets[-1]

    def slice_of(self, name: str) -> slice:
        """The slice of the flat vector that holds parameter ``name``."""
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i + 1])

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat ``[n]`` vector (or ``[n, k]`` matrix) shaped like each parameter.

        For a matrix, each piece has shape ``[*param.shape, k]``.
        """
        if flat.shape[0] != self.dim:
            raise ShapeMismatchError(
                f"expected leading dimension {self.dim}, got {tuple(flat.shape)}"
            )
        extra = tuple(flat.shape[1:])
        pieces = torch.split(flat, list(self.sizes), dim=0)
        return [p.reshape(*s, *extra) for p, s in zip(pieces, self.shapes)]

    def flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        """Concatenate per-parameter tensors into one flat vector (``None`` counts as zeros)."""
        ref = next((t for t in tensors if t is not None), None)
        if ref is None:
            raise ShapeMismatchError("nothing to flatten: every tensor is None")
        parts = [
            (t.reshape(-1) if t is not None else ref.new_zeros(size))
            for t, size in zip(tensors, self.sizes)
        ]
        return torch.cat(parts)

    def groups(self, by: str = "module") -> dict[str, list[str]]:
        """Group parameter names into blocks.

        Args:
            by: ``"module"`` groups parameters by the module that owns them (``fc1.weight`` and
                ``fc1.bias`` form block ``fc1``); ``"param"`` makes one block per parameter.
        """
        if check_choice(by, ("module", "param"), "block grouping") == "param":
            return {n: [n] for n in self.names}
        out: dict[str, list[str]] = {}
        for n in self.names:
            owner = n.rsplit(".", 1)[0] if "." in n else "(root)"
            out.setdefault(owner, []).append(n)
        return out
