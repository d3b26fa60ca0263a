"""Method registry: name -> protector class, and plugin loading.

A method is one module that defines a :class:`~uexamples.core.protector.Protector` subclass and
decorates it with :func:`register_method`. Built-in methods are imported by ``uexamples`` itself;
methods of other packages are found through the ``uexamples.methods`` entry-point group, and
``UEXAMPLES_PLUGINS`` (module names or ``.py`` files, separated by commas) loads more, e.g. for a
subprocess or ``hub_scripts/protect.py``. ``core`` never imports ``uexamples.methods``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path

_METHODS: dict[str, type] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
PLUGINS_ENV = "UEXAMPLES_PLUGINS"
ENTRY_POINT_GROUP = "uexamples.methods"
_plugins_loaded = False


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_method(cls: type) -> type:
    """Class decorator: make a protector reachable by its ``method`` name (CLI, from_pretrained, cards).

    The name must be lower-case letters, digits, ``-`` or ``_`` (it becomes a CLI choice and a Hub
    tag). A name already taken by another class is refused; re-registering the same class (a module
    reloaded) replaces it.
    """
    from .protector import Protector

    if not (isinstance(cls, type) and issubclass(cls, Protector)):
        raise TypeError(f"register_method expects a Protector subclass, got {cls!r}")
    name = cls.__dict__.get("method")
    if not isinstance(name, str) or not _NAME.match(name) or name == "base":
        raise ValueError(
            f"{cls.__qualname__} needs its own method name: a class attribute `method = \"...\"` of lower-case "
            f"letters, digits, '-' or '_' (got {name!r})"
        )
    existing = _METHODS.get(name)
    if existing is not None and existing is not cls and _qualified(existing) != _qualified(cls):
        raise ValueError(f"method name {name!r} is already registered by {_qualified(existing)}")
    _METHODS[name] = cls
    return cls


def _import_plugin(entry: str) -> None:
    path = Path(entry)
    if entry.endswith(".py"):
        resolved = str(path.resolve())
        if any(getattr(m, "__file__", None) == resolved for m in list(sys.modules.values())):
            return  # already imported under its own name
        spec = importlib.util.spec_from_file_location(f"uexamples_plugin_{path.stem}", resolved)
        if spec is None or spec.loader is None:
            raise ImportError(f"{PLUGINS_ENV}: cannot load {entry}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        importlib.import_module(entry)


def load_plugins() -> None:
    """Import the methods of installed plugins (entry points) and of ``UEXAMPLES_PLUGINS``, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    for entry in os.environ.get(PLUGINS_ENV, "").split(","):
        if entry.strip():
            _import_plugin(entry.strip())


def get_method(name: str) -> type:
    load_plugins()
    key = str(name).lower()
    if key not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def list_methods() -> list[str]:
    load_plugins()
    return sorted(_METHODS)


def methods_without(need: str) -> list[str]:
    """Registered methods that do not need ``need`` ("labels" or "texts")."""
    load_plugins()
    return sorted(n for n, c in _METHODS.items() if not getattr(c, f"needs_{need}", False))
