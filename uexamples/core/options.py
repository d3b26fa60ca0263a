"""Config fields that describe themselves: help text, visibility and secrecy live beside the default.

A method's config is a dataclass; each field is declared with :func:`option` so that the command
line (``uexamples protect --method NAME --help``), the documentation and the save/restore path all
read one description, the way peft's configs carry ``metadata={"help": ...}``.

>>> import dataclasses
>>> @dataclasses.dataclass
... class Cfg:
...     steps: int = option(100, "optimisation steps")
...     token: str | None = option(None, "private token", secret=True, env="MY_TOKEN")
>>> [f.name for f in cli_fields(Cfg)], [f.name for f in secret_fields(Cfg)]
(['steps'], ['token'])
>>> field_type(dataclasses.fields(Cfg)[0])
<class 'int'>
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    cli: bool = True,
    secret: bool = False,
    env: str | None = None,
    choices: tuple | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A dataclass field with its documentation.

    help: one line for ``--help`` and the docs. cli: False hides the field from the command line.
    secret: the value never reaches a saved config, a log, a card or a fingerprint (a salted hash of
    it is stored instead, and ``from_pretrained`` asks for it again); ``env`` names the environment
    variable the command line reads it from (a secret is never a visible command-line option).
    choices: allowed values. parse: how the command line turns the string into a value.
    """
    meta = {"help": help, "cli": cli and not secret, "secret": secret, "env": env, "choices": choices, "parse": parse}
    return dataclasses.field(default=default, metadata=meta)


def check_int(config: Any, name: str, minimum: int = 1, optional: bool = False) -> None:
    """Refuse a config field that is not an integer >= ``minimum`` (bools refused; ``None`` if ``optional``)."""
    value = getattr(config, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_non_negative(config: Any, *names: str) -> None:
    """Refuse config fields that are not numbers >= 0 (weights, radii, decays; NaN refused)."""
    for name in names:
        value = getattr(config, name)
        if not float(value) >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_choices(config: Any) -> None:
    """Refuse any field declared with ``choices=`` whose value is not one of them (a saved config or a
    Python caller is checked as the command line checks its flags)."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(config, f.name) not in choices:
            raise ValueError(f"{f.name} must be one of {choices}, got {getattr(config, f.name)!r}")


def cli_fields(config_class: type) -> list[dataclasses.Field]:
    """The fields a command line exposes as options (not secrets, not ``cli=False``)."""
    return [f for f in dataclasses.fields(config_class) if f.metadata.get("cli", True) and not f.metadata.get("secret")]


def secret_fields(config_class: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_class) if f.metadata.get("secret")]


def field_help(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help") or "")


def field_type(f: dataclasses.Field) -> Callable[[str], Any]:
    """The command-line converter of a field: its ``parse``, else read from its annotation."""
    parse = f.metadata.get("parse")
    if parse is not None:
        return parse
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    first = kind.split("|")[0].strip()  # "int | None" -> int
    return {"bool": bool, "int": int, "float": number}.get(first, str)


def number(text: str) -> float:
    """A float from the command line, fractions included: ``"8/255"``, ``"0.03"``, ``"1e-3"`` (as ``evaluate``
    reads ``adv:8/255``).

    >>> number("8/255") == 8 / 255, number("0.5")
    (True, 0.5)
    """
    try:
        return float(text)
    except ValueError:
        from fractions import Fraction

        try:
            return float(Fraction(str(text).strip()))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"not a number: {text!r}") from None


__all__ = ["option", "check_int", "cli_fields", "secret_fields", "field_help", "field_type", "number"]
