"""The value checks Config's validation is made of (layer 1, stdlib only).

Each function checks one value and raises :class:`~trioserve.errors.ConfigError` naming the
field and the bad value; ``config.Config.__post_init__`` decides which field gets which check.
Kept apart from ``config.py`` so that the field list there stays readable.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import re
from typing import Any, Final

from .errors import ConfigError

# Annotations (strings, as every module uses ``from __future__ import annotations``) whose
# values are checked generically: new fields of these types are validated for free.
_SIMPLE_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "str": (str,),
    "str | None": (str, type(None)),
    "bool": (bool,),
    "bool | None": (bool, type(None)),
}
# RFC 9110 §5.6.2 token characters.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def check_simple_types(config: Any) -> None:
    """Check every field whose annotation is in ``_SIMPLE_TYPES`` (a dataclass instance)."""
    for f in dataclasses.fields(config):
        allowed = _SIMPLE_TYPES.get(f.type) if isinstance(f.type, str) else None
        value = getattr(config, f.name)
        if allowed is None or isinstance(value, allowed):
            continue
        kind = "True or False" if bool in allowed else "a string"
        if type(None) in allowed:
            kind += " or None"
        raise ConfigError(f"{f.name} must be {kind}, got {value!r}")


def parse_header(value: object) -> tuple[str, str]:
    if isinstance(value, str):
        name, sep, rest = value.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"header must be NAME:VALUE, got {value!r}")
        return check_header(name.strip(), rest.strip())
    if isinstance(value, (tuple, list)) and len(value) == 2:
        name, val = value
        if isinstance(name, str) and isinstance(val, str) and name:
            return check_header(name, val)
    raise ConfigError(f"header must be NAME:VALUE or a (name, value) pair, got {value!r}")


def check_header(name: str, value: str) -> tuple[str, str]:
    if not _TOKEN.fullmatch(name):
        raise ConfigError(f"header name must be a token, got {name!r}")
    if any(c in value for c in "\r\n\0"):
        raise ConfigError(f"header value must not contain CR, LF or NUL, got {value!r}")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ConfigError(f"header value must be latin-1, got {value!r}") from None
    return name, value


def check_range(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")


def check_positive(name: str, value: object, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero) or math.isnan(value):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# The oldest websockets whose sans-IO protocol ``protocol.ws_websockets`` drives.
WEBSOCKETS_MIN_VERSION: Final = 14


def websockets_installed() -> bool:
    """Whether a websockets new enough for ``--ws websockets`` is installed."""
    try:
        version = importlib.metadata.version("websockets")
    except importlib.metadata.PackageNotFoundError:
        return False
    major = version.split(".", 1)[0]
    return major.isdigit() and int(major) >= WEBSOCKETS_MIN_VERSION


def check_ws_engine(ws: str) -> None:
    """``--ws websockets`` needs websockets installed (``auto`` falls back to wsproto)."""
    if ws == "websockets" and not websockets_installed():
        raise ConfigError(
            f"--ws websockets needs websockets>={WEBSOCKETS_MIN_VERSION}: "
            "pip install websockets (trioserve's [fast] extra)"
        )
