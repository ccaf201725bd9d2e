"""Turn ``"pkg.mod:attr.attr"`` into an ASGI 3 callable (layer 1).

Handles ``--app-dir``, ``--factory`` and ASGI 2 (double-callable) apps, which are wrapped
in a small adapter. Every failure is an :class:`AppLoadError` that names the failing part;
an ``ImportError`` raised *inside* the user's module is left intact (only a missing module
named by the import string itself becomes an ``AppLoadError``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, cast

from ..asgi_types import ASGIApp, ASGIReceive, ASGISend
from ..config import Config
from ..errors import AppLoadError


def import_from_string(import_str: str) -> Any:
    """Import ``"module:attribute"`` (attribute may be dotted) and return the object.

    Raises:
        AppLoadError: the string is malformed, the module does not exist, or the
            attribute is missing.
    """
    module_str, sep, attrs_str = import_str.partition(":")
    if not sep or not module_str or not attrs_str:
        raise AppLoadError(
            f'Import string "{import_str}" must be in format "<module>:<attribute>".'
        )
    try:
        module = importlib.import_module(module_str)
    except ModuleNotFoundError as exc:
        # Only our own target missing is a load error; a missing dependency of the
        # user's module propagates with its own traceback.
        if exc.name is None or not (
            module_str == exc.name or module_str.startswith(exc.name + ".")
        ):
            raise
        detail = "" if exc.name == module_str else f' (no module named "{exc.name}")'
        raise AppLoadError(f'Could not import module "{module_str}"{detail}.') from None
    instance: Any = module
    path = module_str
    for attr in attrs_str.split("."):
        try:
            instance = getattr(instance, attr)
        except AttributeError:
            if path == module_str:
                raise AppLoadError(
                    f'Attribute "{attr}" not found in module "{module_str}".'
                ) from None
            raise AppLoadError(
                f'Attribute "{attr}" not found in "{path}" (looking up "{import_str}").'
            ) from None
        path = f"{path}:{attr}" if path == module_str else f"{path}.{attr}"
    return instance


def load_app(app: str | Any, config: Config) -> ASGIApp:
    """Resolve ``app`` (import string or object) into an ASGI 3 callable.

    Args:
        app: ``"module:attr"`` or an app object.
        config: supplies ``app_dir``, ``factory`` and ``interface`` (``"auto"`` detects
            ASGI 2 apps and adapts them; ``"asgi2"``/``"asgi3"`` say which it is).

    Raises:
        AppLoadError: see :func:`import_from_string`; also when a factory fails or the
            result is not callable.
    """
    if isinstance(app, str):
        # Absolute, so the directory meant is the one at load time (the default ".": the
        # current directory, so `trioserve main:app` works where main.py is).
        app_dir = os.path.abspath(config.app_dir)
        if app_dir not in sys.path:
            sys.path.insert(0, app_dir)
        loaded = import_from_string(app)
    else:
        loaded = app
    if config.factory:
        if not callable(loaded):
            raise AppLoadError(f"Factory {app!r} is not callable.")
        try:
            inspect.signature(loaded).bind()
        except TypeError as exc:
            raise AppLoadError(
                f"Factory {app!r} cannot be called without arguments: {exc}."
            ) from None
        except ValueError:
            pass  # no signature available (a builtin): just call it
        # Errors raised by the factory itself are the user's: they keep their traceback.
        loaded = loaded()
    if not callable(loaded):
        raise AppLoadError(f"Application {app!r} is not callable (got {type(loaded).__name__}).")
    interface = config.interface
    if interface == "asgi2" or (interface == "auto" and is_asgi2(loaded)):
        return asgi2_adapter(loaded)
    # "wsgi": returned as it is; serve() runs it in worker threads (trioserve.wsgi).
    return cast(ASGIApp, loaded)


def is_asgi2(app: Any) -> bool:
    """Whether ``app`` follows the ASGI 2 double-callable style ``app(scope)(receive, send)``.

    A class is ASGI 2 unless its instances are awaitable (``App(scope, receive, send)``).
    A coroutine function (or an object whose ``__call__`` is one) is ASGI 3. Otherwise the
    signature decides: one positional parameter (``scope``) means ASGI 2; a plain function
    taking three that returns a coroutine (some middleware wrappers) is ASGI 3.
    """
    if inspect.isclass(app):
        return not hasattr(app, "__await__")
    call = getattr(app, "__call__", None)  # noqa: B004 - we need the bound method itself
    if inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(call):
        return False
    try:
        parameters = inspect.signature(app).parameters.values()
    except (TypeError, ValueError):
        return True  # no signature: uvicorn's rule (not a coroutine function: ASGI 2)
    kinds = [p.kind for p in parameters if p.default is inspect.Parameter.empty]
    if inspect.Parameter.VAR_POSITIONAL in (p.kind for p in parameters):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(kind in positional for kind in kinds) == 1


def asgi2_adapter(app: Any) -> ASGIApp:
    """Wrap an ASGI 2 application as an ASGI 3 callable."""

    async def asgi3(scope: Any, receive: ASGIReceive, send: ASGISend) -> None:
        instance = app(scope)
        await instance(receive, send)

    return asgi3
