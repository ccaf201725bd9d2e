"""Read the configuration file: ``--config FILE`` or ``[tool.trioserve]`` (layer 1, stdlib only).

The file holds the same keys as :class:`~trioserve.Config`'s fields, in ``snake_case`` or
``kebab-case`` (as the command line spells them), plus ``app = "main:app"``::

    # trioserve.toml                     # or, in ./pyproject.toml:
    app = "main:app"                     # [tool.trioserve]
    host = "0.0.0.0"                     # app = "main:app"
    workers = 4                          # workers = 4
    timeout-graceful-shutdown = 30.0
    header = ["X-Frame-Options: DENY"]

This module only reads and type-checks: :func:`read_config_file` returns field name →
value, and ``cli.py`` puts them below the command line and the environment (precedence:
command line > ``TRIOSERVE_*`` > file > defaults). Ranges and combinations are checked once,
by ``Config`` itself, after merging. Each value's type is derived from ``Config``'s
annotations, so a new field is readable from the file with no change here.

An unknown key or a value of the wrong type raises :class:`~trioserve.errors.ConfigError`
naming the file, the key and the type expected (the CLI prints it in one line, exit 2).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Final

from .config import Config
from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PYPROJECT: Final = "pyproject.toml"
# Keys that are not Config fields: the import string, which the command line takes as APP.
EXTRA_KEYS: Final = ("app",)


@dataclass(frozen=True)
class ConfigFile:
    """The values read from one configuration file."""

    path: str
    # Config field name (or "app") → value, type-checked; floats given as integers are floats.
    values: dict[str, Any]


def read_config_file(path: str | None, directory: str = ".") -> ConfigFile | None:
    """Read ``path``, or ``[tool.trioserve]`` of ``pyproject.toml`` in ``directory``.

    A file named ``pyproject.toml`` (given or found) is read from its ``[tool.trioserve]``
    table; any other file from its top level.

    Returns:
        None when ``path`` is None and there is no ``pyproject.toml`` with a
        ``[tool.trioserve]`` table in ``directory``.

    Raises:
        ConfigError: the file cannot be read or parsed, has an unknown key, or a value of
            the wrong type.
    """
    if path is None:
        found = os.path.join(directory, PYPROJECT)
        if not os.path.isfile(found):
            return None
        document = _load(found)
        table = document.get("tool", {}).get("trioserve")
        if table is None:
            return None
        return ConfigFile(found, check_table(table, f"{found} [tool.trioserve]"))
    document = _load(path)
    if os.path.basename(path) == PYPROJECT:
        table = document.get("tool", {}).get("trioserve")
        if table is None:
            raise ConfigError(f"{path}: no [tool.trioserve] table")
        return ConfigFile(path, check_table(table, f"{path} [tool.trioserve]"))
    return ConfigFile(path, check_table(document, path))


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def check_table(table: object, where: str) -> dict[str, Any]:
    """Check the keys and value types of a parsed table; returns field name → value.

    Raises:
        ConfigError: naming ``where``, the key and the expected type.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of options, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in EXTRA_KEYS:
            hint: Any = str
        elif name in fields:
            # Repeatable options (--header) are lists of the strings the command line takes.
            hint = tuple[str, ...] if fields[name].metadata.get("multiple") else hints[name]
        else:
            raise ConfigError(f"{where}: unknown key {key!r} (not a trioserve option)")
        if name in values:
            raise ConfigError(f"{where}: key {key!r} is given twice (snake_case and kebab-case)")
        if not _matches(value, hint):
            raise ConfigError(f"{where}: key {key!r} must be {describe(hint)}, got {value!r}")
        values[name] = float(value) if _is_float_field(hint) and isinstance(value, int) else value
    return values


def _matches(value: object, hint: Any) -> bool:
    """Whether a TOML value fits a ``Config`` annotation (TOML has no null: ``None`` never)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(item, args[0]) for item in value)
        return len(value) == len(args) and all(map(_matches, value, args))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return False


def _is_float_field(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


def describe(hint: Any) -> str:
    """The TOML type a ``Config`` annotation asks for, in words (``"an integer"``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args if arg is not type(None))
    if origin is typing.Literal:
        return "one of " + ", ".join(f'"{arg}"' for arg in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list (each {describe(args[0])})"
        return f"a list of {len(args)} ({', '.join(describe(arg) for arg in args)})"
    if origin is dict or hint is dict:
        return "a table"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return words.get(hint, str(hint))
