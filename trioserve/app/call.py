"""Run one app call and classify how it ended (layer 3).

This is one of the two places allowed to catch ``Exception`` (STYLE.md §1.8): whatever
the app raises is logged here, exactly once, with its traceback, and returned to the
caller, which decides the wire behaviour (500, close 1011, startup failure...).
Cancellation is never swallowed: from an exception group, only the ``Exception`` part is
the app's; the rest is re-raised. An app on trio that failed for want of an asyncio loop
gets a one-line hint naming ``--app-loop asyncio``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final

import sniffio

from ..asgi_types import ASGIApp, ASGIReceive, ASGISend
from ..errors import ClientDisconnected
from .asyncio_bridge import AsyncioApp

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger(__name__)

# What asyncio-only code raises when it runs on trio: asyncio.get_running_loop() and the
# loop-bound primitives, and trio's reply to an awaited asyncio Future.
_ASYNCIO_NEEDED_MESSAGES: Final = (
    "no running event loop",
    "no current event loop",
    "attached to a different loop",
    "bound to a different event loop",
    "unrecognized yield message",
)


async def call_app(
    app: ASGIApp,
    scope: Any,
    receive: ASGIReceive,
    send: ASGISend,
    *,
    log_errors: bool = True,
) -> Exception | None:
    """Await ``app(scope, receive, send)``.

    Returns:
        None if the app returned, else the ``Exception`` it raised (already logged at
        ERROR with traceback when ``log_errors``).

    Raises:
        trio.Cancelled and other ``BaseException`` s: never swallowed.
    """
    try:
        await app(scope, receive, send)
    except ClientDisconnected as exc:
        # The peer left and the app let send()'s error escape: not an app bug.
        logger.debug("ASGI application stopped: %s", exc)
        return exc
    except Exception as exc:
        if log_errors:
            logger.error("Exception in ASGI application", exc_info=exc)
        _hint_app_loop(app, exc)
        return exc
    except BaseExceptionGroup as group:
        app_errors, rest = group.split(Exception)
        if app_errors is not None and log_errors:
            logger.error("Exception in ASGI application", exc_info=app_errors)
        if app_errors is not None:
            _hint_app_loop(app, app_errors)
        if rest is not None:
            raise rest from None
        assert isinstance(app_errors, Exception)
        return app_errors
    return None


def _hint_app_loop(app: ASGIApp, exc: BaseException) -> None:
    """Suggest ``--app-loop asyncio`` when an app on trio failed for want of asyncio.

    Logged also when the error itself is not (lifespan ``auto`` treats an app that raises
    during startup as "lifespan unsupported", which would otherwise hide the cause).
    """
    if isinstance(app, AsyncioApp):
        return
    cause = needs_asyncio(exc)
    if cause is not None:
        logger.warning(
            "The app needs an asyncio event loop (%s: %s); run it with --app-loop asyncio "
            "(app_loop='asyncio').",
            type(cause).__name__,
            cause,
        )


def needs_asyncio(exc: BaseException) -> BaseException | None:
    """The exception in ``exc`` (its groups, causes, contexts) that says "asyncio needed"."""
    pending = [exc]
    seen: set[int] = set()
    while pending and len(seen) < 100:  # bounded: chains can be long or cyclic
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, sniffio.AsyncLibraryNotFoundError):
            return current
        if isinstance(current, (RuntimeError, TypeError)):
            text = str(current)
            if any(message in text for message in _ASYNCIO_NEEDED_MESSAGES):
                return current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)
    return None
