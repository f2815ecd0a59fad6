"""A small name -> object registry with aliases, used for variants, datasets, models, attacks.

Names are case-insensitive; ``-`` and ``_`` are interchangeable. Unknown names fail with the list
of known ones, so a typo on the command line says what would have worked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


class Registry(Generic[T]):
    """Objects registered under a canonical name and optional aliases.

    Args:
        what: what is registered (``"variant"``, ``"attack"``...), used in error messages.

    Example::

        >>> attacks = Registry[int]("attack")
        >>> attacks.register("lira-online", 1, aliases=("lira",))
        >>> attacks.get("LIRA")
        1
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(
        self, name: str, item: T, *, aliases: tuple[str, ...] = (), overwrite: bool = False
    ) -> T:
        """Register ``item`` under ``name`` (and ``aliases``); returns ``item``."""
        key = _key(name)
        taken = [k for k in (key, *map(_key, aliases)) if k in self._items or k in self._aliases]
        if taken and not overwrite:
            raise ValueError(
                f"{self.what} name(s) {taken} already registered; pass overwrite=True to replace"
            )
        self._items[key] = item
        self._aliases.pop(key, None)
        for alias in aliases:
            self._aliases[_key(alias)] = key
        return item

    def canonical(self, name: str) -> str:
        """The canonical name of ``name`` (an alias or a name); raises ``KeyError`` if unknown."""
        key = _key(name)
        key = self._aliases.get(key, key)
        if key not in self._items:
            known = ", ".join(self.names())
            aliases = ", ".join(f"{a}->{c}" for a, c in sorted(self._aliases.items()))
            raise KeyError(
                f"unknown {self.what} {name!r}; known {self.what}s: {known}"
                + (f" (aliases: {aliases})" if aliases else "")
            )
        return key

    def get(self, name: str) -> T:
        """The object registered as ``name`` or under an alias of it."""
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        """Canonical names, in registration order."""
        return list(self._items)

    def aliases_of(self, name: str) -> list[str]:
        """The aliases of the canonical ``name``."""
        key = self.canonical(name)
        return sorted(a for a, c in self._aliases.items() if c == key)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = _key(name)
        return key in self._items or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
