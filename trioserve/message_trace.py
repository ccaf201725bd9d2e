"""``--log-level trace``: log every ASGI call and message, bodies elided (layer 1, stdlib only).

What uvicorn users expect from its trace level, in the same shape::

    TRACE:    127.0.0.1:50312 - HTTP connection made
    TRACE:    127.0.0.1:50312 - ASGI [3] Started scope={'type': 'http', 'method': 'GET', ...}
    TRACE:    127.0.0.1:50312 - ASGI [3] Receive {'type': 'http.request', 'body': '<0 bytes>', ...}
    TRACE:    127.0.0.1:50312 - ASGI [3] Send {'type': 'http.response.start', 'status': 200, ...}
    TRACE:    127.0.0.1:50312 - ASGI [3] Completed
    TRACE:    127.0.0.1:50312 - HTTP connection lost

Message contents are never logged: bodies, WebSocket payloads and headers become their
size (``'<12 bytes>'``, ``'<3 headers>'``); the scope's ``state`` and ``extensions`` (the
app's own objects, certificates) become ``'<...>'``.

Tracing costs nothing when it is off: ``serve()`` decides once, when it starts, whether
the ``trioserve`` logger is enabled for TRACE. Only then is the app wrapped by
:func:`traced_app` (so no request pays for a check) and ``ServerState.trace`` set, the one
boolean the connection code looks at, once per connection, for the connection lines.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sized
from typing import Any, Final

from .asgi_types import ASGIApp, ASGIReceive, ASGISend

# Below DEBUG, named "TRACE" by logs.configure_logging (uvicorn's value).
TRACE_LOG_LEVEL: Final = 5

logger = logging.getLogger(__name__)

# Message keys whose values are replaced by a placeholder (what the value is, not what it
# holds): payloads by their size, header lists by their length, app objects by "<...>".
_BYTES_KEYS: Final = frozenset({"body", "bytes"})
_OPAQUE_KEYS: Final = frozenset({"state", "extensions"})


def tracing_enabled() -> bool:
    """Whether trioserve's loggers log at TRACE (``--log-level trace``)."""
    return logging.getLogger("trioserve").isEnabledFor(TRACE_LOG_LEVEL)


def peer_name(client: tuple[str, int] | None) -> str:
    """The client as connection log lines name it: ``host:port``, or ``unix`` (the only
    kind of connection without a client address)."""
    return f"{client[0]}:{client[1]}" if client else "unix"


def traced_app(app: ASGIApp) -> ASGIApp:
    """Wrap ``app`` so that each call, each message it receives or sends, and how the call
    ended are logged at TRACE, numbered per call (``ASGI [n]``), lifespan included.

    Exceptions pass through unchanged (``call_app`` logs them); the wrapper only notes
    that the call raised.
    """
    # (An embedding program that set the level by number gets "TRACE", not "Level 5".)
    logging.addLevelName(TRACE_LOG_LEVEL, "TRACE")
    calls = itertools.count(1)

    async def traced(scope: Any, receive: ASGIReceive, send: ASGISend) -> None:
        number = next(calls)
        if scope.get("type") == "lifespan":
            prefix = f"ASGI [{number}]"
        else:
            prefix = f"{peer_name(scope.get('client'))} - ASGI [{number}]"
        logger.log(TRACE_LOG_LEVEL, "%s Started scope=%s", prefix, elided(scope))

        async def traced_receive() -> Any:
            message = await receive()
            logger.log(TRACE_LOG_LEVEL, "%s Receive %s", prefix, elided(message))
            return message

        async def traced_send(message: Any) -> None:
            logger.log(TRACE_LOG_LEVEL, "%s Send %s", prefix, elided(message))
            await send(message)

        completed = False
        try:
            await app(scope, traced_receive, traced_send)
            completed = True
        finally:
            outcome = "Completed" if completed else "Raised exception"
            logger.log(TRACE_LOG_LEVEL, "%s %s", prefix, outcome)

    return traced


def elided(message: object) -> object:
    """``message`` (a scope or an ASGI message) as a dict safe to log: payloads, headers
    and app objects replaced by placeholders. Anything but a mapping is returned as is
    (the app may send garbage; ``send()`` rejects it after this logged it)."""
    if not isinstance(message, Mapping):
        return message
    shown: dict[object, object] = {}
    for key, value in message.items():
        if key in _BYTES_KEYS and isinstance(value, (bytes, bytearray, memoryview)):
            shown[key] = f"<{len(value)} bytes>"
        elif key == "text" and isinstance(value, str):
            shown[key] = f"<{len(value)} chars>"
        elif key == "headers" and isinstance(value, Sized):
            shown[key] = f"<{len(value)} headers>"
        elif key in _OPAQUE_KEYS:
            shown[key] = "<...>"
        else:
            shown[key] = value
    return shown
