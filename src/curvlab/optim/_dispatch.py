"""The functional entry point's choice of path, written once for the element-wise optimizers.

The functional API of ADOPT, AdaHessian and Sophia is ``<name>(*lists, **options)``: ``lists``
are the equally long per-parameter lists (``params``, ``grads``, the state lists, ``state_steps``,
in the order the module's docstring names), ``options`` the step's hyper-parameters (the
optimizer's ``<Name>Hyper``, keyed like its param groups) plus the :class:`KernelChoice`
(``foreach``, ``fused``, ``scratch``). :func:`dispatch` picks the path as torch's functional
``adamw`` does: ``fused=True`` the compiled kernel, ``foreach=False`` the single-tensor reference,
otherwise (``None`` or ``True``) the multi-tensor path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict

from torch import Tensor

__all__ = ["KernelChoice", "dispatch", "split_choice"]


class KernelChoice(TypedDict, total=False):
    """Which path a functional optimizer step takes (every key optional)."""

    foreach: bool | None
    """``False``: the single-tensor reference; ``None``/``True``: the multi-tensor path."""
    fused: bool | None
    """``True``: one compiled call per bucket of tensors (overrides ``foreach``)."""
    scratch: object | None
    """The owner of the reusable buffers of the multi-tensor path (the optimizer); ``None``
    allocates them per call."""


_CHOICE_KEYS = frozenset(KernelChoice.__optional_keys__)


def split_choice(options: Mapping[str, Any]) -> tuple[KernelChoice, dict[str, Any]]:
    """``options`` split into the :class:`KernelChoice` and the hyper-parameters.

    Example:
        >>> split_choice({"lr": 0.1, "foreach": False})
        ({'foreach': False}, {'lr': 0.1})
    """
    choice: KernelChoice = {k: v for k, v in options.items() if k in _CHOICE_KEYS}  # type: ignore[assignment]
    return choice, {k: v for k, v in options.items() if k not in _CHOICE_KEYS}


def dispatch(
    lists: Sequence[list[Tensor]],
    options: Mapping[str, Any],
    *,
    single: Callable[..., None],
    multi: Callable[..., None],
    fused: Callable[..., None],
) -> None:
    """Run one step on ``lists`` by the path ``options`` chooses (see the module docstring).

    ``single(*lists, **hyper)``, ``multi(*lists, scratch=scratch, **hyper)`` and
    ``fused(*lists, **hyper)`` receive the hyper-parameters without the :class:`KernelChoice` keys.

    Example:
        >>> calls = []
        >>> paths = {name: (lambda *ls, name=name, **kw: calls.append((name, kw)))
        ...          for name in ("single", "multi", "fused")}
        >>> dispatch([[], []], {"lr": 0.1, "foreach": False}, **paths)
        >>> dispatch([[], []], {"lr": 0.1, "scratch": None}, **paths)
        >>> calls
        [('single', {'lr': 0.1}), ('multi', {'scratch': None, 'lr': 0.1})]
    """
    choice, hyper = split_choice(options)
    if choice.get("fused"):
        fused(*lists, **hyper)
    elif choice.get("foreach") is False:
        single(*lists, **hyper)
    else:
        multi(*lists, scratch=choice.get("scratch"), **hyper)
