"""A registry is a dict of named builders; its keys are the command-line vocabulary."""
from __future__ import annotations

from typing import Any, Callable, Iterable


class UnknownNameError(KeyError):
    """A name that no builder of a registry has (an option's value, a config's key): bad input."""

    def __str__(self) -> str:  # the message, without KeyError's quotes
        return str(self.args[0]) if self.args else ""


class Registry(dict):
    """``dict`` from name to class or function, filled by the :meth:`register` decorator.

    >>> POOLING = Registry("pooling")
    >>> @POOLING.register("mac")
    ... class MAC: ...
    >>> POOLING.get_class("mac") is MAC
    True
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str | None = None, *aliases: str) -> Callable:
        def wrap(obj):
            for key in (name or obj.__name__,) + aliases:
                if key in self:
                    raise KeyError(f"{self.kind} {key!r} is registered twice")
                self[key] = obj
            return obj

        return wrap

    def get_class(self, name_or_obj: Any) -> Any:
        """The registered object for ``name``; a class or callable is passed through as is."""
        if not isinstance(name_or_obj, str):
            return name_or_obj
        try:
            return self[name_or_obj]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name_or_obj!r}; choose one of: {', '.join(sorted(self))}"
            ) from None

    def build(self, name_or_obj: Any, **kwargs: Any) -> Any:
        return self.get_class(name_or_obj)(**kwargs)

    def names(self) -> Iterable[str]:
        return sorted(self)


__all__ = ["Registry", "UnknownNameError"]
