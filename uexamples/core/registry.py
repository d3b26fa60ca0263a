"""Method registry: name -> protector class."""

from __future__ import annotations

_METHODS: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: make a protector reachable by its ``method`` name (CLI, from_pretrained)."""
    _METHODS[cls.method] = cls
    return cls


def get_method(name: str) -> type:
    from .. import methods  # noqa: F401  (importing registers every built-in method)

    key = str(name).lower()
    if key not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def list_methods() -> list[str]:
    from .. import methods  # noqa: F401

    return sorted(_METHODS)
