"""The ``trioserve`` command: argv → Config → runner (layer 4; the only click user).

Options are generated from :class:`~trioserve.Config`'s fields (their ``metadata`` holds
the help text), so the option list exists once. Every option also reads
``TRIOSERVE_<OPTION>`` from the environment (``--workers`` also ``WEB_CONCURRENCY``).
This is the only module that turns exceptions into exit codes.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Final

import click

from . import __version__
from .config import Config
from .errors import AppLoadError, BindError, ConfigError, LifespanError

EXIT_RUNTIME: Final = 1
EXIT_USAGE: Final = 2
EXIT_STARTUP: Final = 3


def _param_type(field: dataclasses.Field[Any], hints: dict[str, Any]) -> Any:
    choices = field.metadata.get("choices")
    if choices:
        return click.Choice(choices)
    hint = hints[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = args[0] if args and is_union else hint
    if base is bool:
        return bool
    if base is int:
        return int
    if base is float:
        return float
    return str


def _options() -> list[Callable[[Any], Any]]:
    hints = typing.get_type_hints(Config)
    decorators = []
    for field in dataclasses.fields(Config):
        meta = field.metadata
        name = field.name
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        kwargs: dict[str, Any] = {
            "help": meta.get("help"),
            # TRIOSERVE_<OPTION> first (it wins), then conventional names (WEB_CONCURRENCY).
            "envvar": list(dict.fromkeys([*_envvars(name, flag), *(meta.get("envvar") or ())])),
            "show_envvar": True,
            "default": default if not meta.get("multiple") else (),
            "show_default": default not in (None, (), ""),
        }
        ptype = _param_type(field, hints)
        if meta.get("multiple"):
            kwargs["multiple"] = True
            kwargs["type"] = str
        elif ptype is bool and ("/" in flag or default is False):
            kwargs["is_flag"] = True
            kwargs["type"] = bool
        elif ptype is bool:
            # On by default with no --no-... form: take a value, as uvicorn does
            # (--ws-per-message-deflate false).
            kwargs["type"] = click.BOOL
        else:
            kwargs["type"] = ptype
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        decorators.append(click.option(flag, name, **kwargs))
    return decorators


def _envvars(name: str, flag: str) -> list[str]:
    """``TRIOSERVE_<FIELD>`` and, where the flag differs (``--header``), ``TRIOSERVE_<FLAG>``."""
    names = [f"TRIOSERVE_{name.upper()}"]
    flag_name = "TRIOSERVE_" + flag.split("/")[0].lstrip("-").replace("-", "_").upper()
    if flag_name not in names:
        names.append(flag_name)
    return names


def _command(func: Callable[..., Any]) -> click.Command:
    for decorator in reversed(_options()):
        func = decorator(func)
    func = click.argument("app", envvar="TRIOSERVE_APP")(func)
    func = click.version_option(
        __version__, "--version", message=f"trioserve %(version)s (Python {sys.version.split()[0]})"
    )(func)
    return click.command(context_settings={"help_option_names": ["-h", "--help"]})(func)


def _main(app: str, **options: Any) -> None:
    """Run the ASGI application APP ("module:attribute") with trioserve."""
    from .runner import run_config

    try:
        config = Config(**options)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        run_config(app, config)
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except AppLoadError as exc:
        click.echo(f"Error loading ASGI app. {exc}", err=True)
        sys.exit(EXIT_RUNTIME)
    except LifespanError:
        # The app's error has been logged once, with its traceback, by the lifespan module.
        click.echo("Application startup failed. Exiting.", err=True)
        sys.exit(EXIT_STARTUP)
    except BindError as exc:  # not any OSError: the app's own keep their traceback
        click.echo(f"Error: {exc.strerror or exc}", err=True)
        sys.exit(EXIT_RUNTIME)


main: click.Command = _command(_main)
