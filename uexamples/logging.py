"""The ``uexamples`` logger and its verbosity, the way ``transformers.utils.logging`` works.

Messages go to the ``uexamples`` logger (and its children, ``uexamples.methods.sem`` ...). The library
shows warnings and errors by default; ``set_verbosity_info()`` (or ``UEXAMPLES_VERBOSITY=info``, or the
command line's ``--verbose``) also shows what a fit decided and measured.

>>> import uexamples as ue
>>> ue.logging.set_verbosity_info()
>>> ue.logging.get_verbosity() == ue.logging.INFO
True
>>> ue.logging.set_verbosity_warning()
"""

from __future__ import annotations

import logging as _logging
import os
import sys

DEBUG, INFO, WARNING, ERROR = _logging.DEBUG, _logging.INFO, _logging.WARNING, _logging.ERROR
ROOT = "uexamples"
_LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
_handler: _logging.Handler | None = None


def _root() -> _logging.Logger:
    """The library's root logger, given a stderr handler once (only the library's, never the root logger)."""
    global _handler
    logger = _logging.getLogger(ROOT)
    if _handler is None:
        _handler = _logging.StreamHandler(sys.stderr)
        _handler.setFormatter(_logging.Formatter("[uexamples] %(levelname)s: %(message)s"))
        logger.addHandler(_handler)
        logger.propagate = False  # an application's root handlers would print every message twice
        env = os.environ.get("UEXAMPLES_VERBOSITY", "").lower()
        logger.setLevel(_LEVELS.get(env, WARNING))
    return logger


def get_logger(name: str | None = None) -> _logging.Logger:
    """The ``uexamples`` logger, or its child ``name`` (a module's ``__name__``)."""
    root = _root()
    if not name or name == ROOT:
        return root
    return _logging.getLogger(name if name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def get_verbosity() -> int:
    return _root().getEffectiveLevel()


def set_verbosity(level: int) -> None:
    """Show messages of ``level`` and above (``uexamples.logging.INFO`` ...)."""
    _root().setLevel(level)


def set_verbosity_debug() -> None:
    set_verbosity(DEBUG)


def set_verbosity_info() -> None:
    set_verbosity(INFO)


def set_verbosity_warning() -> None:
    set_verbosity(WARNING)


def set_verbosity_error() -> None:
    set_verbosity(ERROR)


__all__ = ["DEBUG", "INFO", "WARNING", "ERROR", "get_logger", "get_verbosity", "set_verbosity", "set_verbosity_debug",
           "set_verbosity_info", "set_verbosity_warning", "set_verbosity_error"]  # fmt: skip
