"""Run one app call and classify how it ended (layer 3).

This is one of the two places allowed to catch ``Exception`` (STYLE.md §1.8): whatever
the app raises is logged here, exactly once, with its traceback, and returned to the
caller, which decides the wire behaviour (500, close 1011, startup failure...).
Cancellation is never swallowed: from an exception group, only the ``Exception`` part is
the app's; the rest is re-raised.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from .asgi_types import ASGIApp, ASGIReceive, ASGISend
from .errors import ClientDisconnected

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger(__name__)


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
        return exc
    except BaseExceptionGroup as group:
        app_errors, rest = group.split(Exception)
        if app_errors is not None and log_errors:
            logger.error("Exception in ASGI application", exc_info=app_errors)
        if rest is not None:
            raise rest from None
        assert isinstance(app_errors, Exception)
        return app_errors
    return None
