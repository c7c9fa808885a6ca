"""A registry of named plug-ins (training methods, pruning criteria): what the config's
choices, the CLI's `--help` and the figures' method styles are read from, so that a new
method or criterion is one class and one `register` call."""

from __future__ import annotations

from typing import Generic, Iterator, Protocol, TypeVar

from .errors import UserError


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Plug-ins by name, in registration order (the order `--help` lists them and legends
    draw them)."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, item: T) -> T:
        if item.name in self._items:
            raise ValueError(f"a {self.what} named {item.name!r} is registered already")
        self._items[item.name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove a plug-in registered for a while (a notebook's experiment, a test)."""
        del self._items[name]

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(f"unknown {self.what} {name!r}; choose one of {', '.join(self._items)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(tuple(self._items.values()))
