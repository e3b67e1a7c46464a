"""What curvlab's hook handles share: remove the hook once, by hand or on leaving a ``with``."""

from __future__ import annotations

from typing import Any, TypeVar

__all__ = ["HookHandle"]

_H = TypeVar("_H", bound="HookHandle")


class HookHandle:
    """A registered hook (``self._hook``, set by the subclass) that ``remove()`` takes off once.

    A subclass undoes the rest of what attaching did in :meth:`_detached`, which runs once,
    right after the hook is removed.
    """

    _hook: Any

    @property
    def attached(self) -> bool:
        """Whether the hook is still registered."""
        return self._hook is not None

    def remove(self) -> None:
        """Remove the hook and undo what attaching did (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            self._detached()

    def _detached(self) -> None:
        """Undo, after the hook's removal, the rest of what attaching did (nothing here)."""

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
