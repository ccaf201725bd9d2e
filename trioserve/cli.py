"""The ``trioserve`` command: argv → Config → runner (layer 4; the only click user).

Options are generated from :class:`~trioserve.Config`'s fields (their ``metadata`` holds
the help text), so the option list exists once. Every option also reads
``TRIOSERVE_<OPTION>`` from the environment (``--workers`` also ``WEB_CONCURRENCY``).
This is the only module that turns exceptions into exit codes.

Users switch from uvicorn by changing one word, so every ``uvicorn --help`` option means
the same here or is answered: the uvicorn options and values trioserve has no field for
are the two small tables below (:data:`UVICORN_ONLY_OPTIONS`, :data:`UVICORN_ONLY_VALUES`).
Each is either already trioserve's behaviour (accepted, a no-op) or refused with one line
saying what to use instead (exit 2), never click's bare "No such option". ``UVICORN_*``
environment variables are not read; one warning names the ``TRIOSERVE_*`` ones to use.

``--config FILE`` (or ``[tool.trioserve]`` in ./pyproject.toml, read by
:mod:`trioserve.config_file`) fills in what neither the command line nor the environment
set: click's ``ParameterSource`` tells which values were given, so the precedence is
command line > ``TRIOSERVE_*`` > file > defaults. ``--print-config`` shows the result and
where each value came from, and exits without serving.
"""

from __future__ import annotations

import dataclasses
import json
import os
import ssl
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

import click
from click.core import ParameterSource

from . import __version__
from .compiled import build_description
from .config import Config
from .config_file import read_config_file
from .errors import AppLoadError, BindError, ConfigError, LifespanError

EXIT_RUNTIME: Final = 1
EXIT_USAGE: Final = 2
EXIT_STARTUP: Final = 3


class UvicornOnly(NamedTuple):
    """A uvicorn option trioserve has no field for."""

    flag: str
    is_flag: bool
    # Values (a flag: "True") that are already trioserve's behaviour: accepted, a no-op.
    no_op: tuple[str, ...]
    # Any other value is refused with this, after "Error: <flag> <value>: ".
    advice: str


UVICORN_ONLY_OPTIONS: Final = (
    UvicornOnly(
        "--loop",
        False,
        # uvicorn's default ("pick the best loop"): here that is trio, so nothing to do.
        ("auto",),
        "trioserve runs on trio, not on an asyncio event loop: drop --loop (apps that need "
        "asyncio-only libraries: --app-loop asyncio; for speed: --http httptools)",
    ),
    UvicornOnly(
        "--ssl-version",
        False,
        (str(int(ssl.PROTOCOL_TLS_SERVER)),),  # uvicorn's default, what tls.py always uses
        f"trioserve always uses ssl.PROTOCOL_TLS_SERVER ({int(ssl.PROTOCOL_TLS_SERVER)}, "
        "uvicorn's default), which negotiates the newest TLS version both sides support: "
        "drop --ssl-version",
    ),
    UvicornOnly(
        "--reset-contextvars",
        True,
        # Each request already runs in a copy of its connection's context, and the lifespan
        # runs in a task of its own: context set there never reaches a request.
        ("True",),
        "",
    ),
)
# (option, value) → advice, for values of trioserve's own choice options.
UVICORN_ONLY_VALUES: Final[dict[str, dict[str, str]]] = {
    "ws": {
        "websockets-sansio": "use --ws websockets: trioserve drives websockets' sans-IO "
        "protocol (what uvicorn's websockets-sansio is)",
    },
    "http": {"zttp": "use --http httptools (the fast C parser) or --http h11"},
}


def _refuse(ctx: click.Context, what: str, advice: str) -> typing.NoReturn:
    """One line on stderr and exit 2: no usage text, no traceback."""
    click.echo(f"Error: {what}: {advice}", err=True)
    ctx.exit(EXIT_USAGE)


class _Choice(click.Choice):  # type: ignore[type-arg]  # Choice[str] fails on click 8.1
    """``click.Choice`` that answers a uvicorn-only value with :func:`_refuse`."""

    def __init__(self, choices: tuple[str, ...], refused: Mapping[str, str]) -> None:
        super().__init__(choices)
        self.refused = refused

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if ctx is not None and param is not None and value in self.refused:
            _refuse(ctx, f"{param.opts[0]} {value}", self.refused[value])
        return super().convert(value, param, ctx)


def _uvicorn_only_option(option: UvicornOnly) -> Callable[[Any], Any]:
    def check(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is None or value is False or str(value) in option.no_op:
            return
        _refuse(ctx, option.flag if option.is_flag else f"{option.flag} {value}", option.advice)

    return click.option(
        option.flag,
        is_flag=option.is_flag,
        default=None,
        hidden=True,
        expose_value=False,
        callback=check,
    )


def uvicorn_variables_warning(environ: Mapping[str, str]) -> str | None:
    """The one-line warning about ``UVICORN_<OPTION>`` variables trioserve does not read.

    Only options trioserve has, and only when no ``TRIOSERVE_*`` variable of that option is
    set (then the user has already switched). None when there is nothing to say.
    """
    ignored = []
    for param in main.params:
        if not param.expose_value:
            continue
        envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
        ours = [name for name in envvars if name.startswith("TRIOSERVE_")]
        theirs = "UVICORN_" + str(param.name).upper()
        if theirs in environ and ours and not any(name in environ for name in ours):
            ignored.append(f"{theirs} (use {ours[0]})")
    if not ignored:
        return None
    return f"trioserve does not read UVICORN_* variables; ignoring {', '.join(ignored)}."


def _param_type(field: dataclasses.Field[Any], hints: dict[str, Any]) -> Any:
    choices = field.metadata.get("choices")
    if choices:
        return _Choice(choices, UVICORN_ONLY_VALUES.get(field.name, {}))
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
    for decorator in reversed(
        [*_options(), *(_uvicorn_only_option(o) for o in UVICORN_ONLY_OPTIONS)]
    ):
        func = decorator(func)
    func = click.argument("app", envvar="TRIOSERVE_APP", required=False)(func)
    # Not Config fields: kept out of the function's arguments (ctx.meta holds them).
    func = click.option(
        "--config",
        metavar="FILE",
        envvar="TRIOSERVE_CONFIG",
        show_envvar=True,
        expose_value=False,
        callback=_keep_in_meta,
        help="Read options from this TOML file (default: [tool.trioserve] in ./pyproject.toml); "
        "the command line and TRIOSERVE_* variables override it.",
    )(func)
    func = click.option(
        "--print-config",
        is_flag=True,
        expose_value=False,
        callback=_keep_in_meta,
        help="Show the resolved configuration and where each value came from, and exit.",
    )(func)
    func = click.version_option(
        __version__,
        "--version",
        message=f"trioserve %(version)s (Python {sys.version.split()[0]}, {build_description()})",
    )(func)
    return click.command(
        cls=_ProcessCommand, context_settings={"help_option_names": ["-h", "--help"]}
    )(func)


class _ProcessCommand(click.Command):
    """The command as the process runs it (the console script, ``python -m trioserve``).

    Calling the command is what those entry points do (click's tests call ``main()``):
    as the process is about to exit, :func:`~trioserve.workers.serving.arm_exit_watchdog` bounds
    how long a thread the app left running can hold the exit.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.main(*args, **kwargs)
        except SystemExit as exc:
            from .workers.serving import arm_exit_watchdog

            code = exc.code
            arm_exit_watchdog(code if isinstance(code, int) else int(code is not None))
            raise


def _keep_in_meta(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    ctx.meta[f"trioserve.{param.name}"] = value


def _with_config_file(
    ctx: click.Context, app: str | None, options: dict[str, Any]
) -> tuple[str, dict[str, str]]:
    """Fill ``options`` from the config file where nothing was given; returns the app and
    where each value came from (``cli``, ``env NAME``, ``file PATH``, ``default``).

    Raises:
        ConfigError: the file is unreadable or has a bad key or value.
    """
    file = read_config_file(ctx.meta.get("trioserve.config"))
    params = {str(p.name): p for p in ctx.command.params}
    sources: dict[str, str] = {}
    for name in ("app", *options):
        source = ctx.get_parameter_source(name)
        if source is ParameterSource.COMMANDLINE:
            sources[name] = "cli"
        elif source is ParameterSource.ENVIRONMENT:
            envvar = params[name].envvar
            names = [envvar] if isinstance(envvar, str) else list(envvar or [])
            sources[name] = "env " + next(n for n in names if n in os.environ)
        elif file is not None and name in file.values:
            sources[name] = f"file {file.path}"
            if name == "app":
                app = file.values[name]
            else:
                options[name] = file.values[name]
        else:
            sources[name] = "default"
    if app is None:
        raise click.UsageError("Missing argument 'APP' (or app = ... in the config file).", ctx)
    return app, sources


def _toml_value(value: object) -> str:
    """``value`` as TOML, so that a printed configuration can be pasted into a file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        items = (f"{v[0]}: {v[1]}" if isinstance(v, tuple) else v for v in value)  # headers
        return "[" + ", ".join(_toml_value(v) for v in items) + "]"
    if isinstance(value, dict):
        pairs = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }"
    return json.dumps(value)  # strings (JSON escapes are TOML's), int, float


def print_config(app: str, config: Config, sources: Mapping[str, str]) -> None:
    """One line per option: ``name = value  # source``; unset ones (None) commented out."""
    click.echo(f"app = {_toml_value(app)}  # {sources['app']}")
    for name, value in config.to_dict().items():
        if value is None:
            click.echo(f"# {name} is not set  # {sources[name]}")
        else:
            click.echo(f"{name} = {_toml_value(value)}  # {sources[name]}")


def _main(app: str | None, **options: Any) -> None:
    """Run the ASGI application APP ("module:attribute") with trioserve."""
    from .runner import run_config

    ctx = click.get_current_context()
    try:
        app, sources = _with_config_file(ctx, app, options)
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        config = Config(**options)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if ctx.meta.get("trioserve.print_config"):
        print_config(app, config, sources)
        ctx.exit(0)
    warning = uvicorn_variables_warning(os.environ)
    try:
        run_config(app, config, warnings=[warning] if warning else [])
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
