"""Turn ``"pkg.mod:attr.attr"`` into an ASGI 3 callable (layer 1).

Handles ``--app-dir``, ``--factory`` and ASGI 2 (double-callable) apps, which are wrapped
in a small adapter. Every failure is an :class:`AppLoadError` that names the failing part;
an ``ImportError`` raised *inside* the user's module is left intact (only a missing module
named by the import string itself becomes an ``AppLoadError``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any, cast

from .asgi_types import ASGIApp, ASGIReceive, ASGISend
from .config import Config
from .errors import AppLoadError


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
        raise AppLoadError(f'Could not import module "{module_str}".') from None
    instance: Any = module
    try:
        for attr in attrs_str.split("."):
            instance = getattr(instance, attr)
    except AttributeError:
        raise AppLoadError(
            f'Attribute "{attrs_str}" not found in module "{module_str}".'
        ) from None
    return instance


def load_app(app: str | Any, config: Config) -> ASGIApp:
    """Resolve ``app`` (import string or object) into an ASGI 3 callable.

    Args:
        app: ``"module:attr"`` or an app object.
        config: supplies ``app_dir`` and ``factory``.

    Raises:
        AppLoadError: see :func:`import_from_string`; also when a factory fails or the
            result is not callable.
    """
    if isinstance(app, str):
        if config.app_dir and config.app_dir not in sys.path:
            sys.path.insert(0, config.app_dir)
        loaded = import_from_string(app)
    else:
        loaded = app
    if config.factory:
        if not callable(loaded):
            raise AppLoadError(f"Factory {app!r} is not callable.")
        try:
            loaded = loaded()
        except TypeError as exc:
            raise AppLoadError(f"Error calling the app factory: {exc}") from exc
    if not callable(loaded):
        raise AppLoadError(f"Application {app!r} is not callable (got {type(loaded).__name__}).")
    if is_asgi2(loaded):
        return asgi2_adapter(loaded)
    return cast(ASGIApp, loaded)


def is_asgi2(app: Any) -> bool:
    """Whether ``app`` follows the ASGI 2 double-callable style ``app(scope)(receive, send)``."""
    if inspect.isclass(app):
        return not hasattr(app, "__await__")
    if inspect.isfunction(app) or inspect.ismethod(app):
        return not inspect.iscoroutinefunction(app)
    call = getattr(app, "__call__", None)  # noqa: B004 - we need the bound method itself
    return not inspect.iscoroutinefunction(call)


def asgi2_adapter(app: Any) -> ASGIApp:
    """Wrap an ASGI 2 application as an ASGI 3 callable."""

    async def asgi3(scope: Any, receive: ASGIReceive, send: ASGISend) -> None:
        instance = app(scope)
        await instance(receive, send)

    return asgi3
