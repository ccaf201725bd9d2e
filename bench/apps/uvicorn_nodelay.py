"""uvicorn's 2-worker benchmark line with TCP_NODELAY restored (bench-only).

With ``--workers``, uvicorn binds its socket as ``socket.socket(AF_INET)``, whose ``proto``
is 0; asyncio only sets TCP_NODELAY on accepted sockets when ``proto == IPPROTO_TCP``, so
the workers serve with Nagle's algorithm on and a response written in two pieces waits for
the client's delayed ACK (about 40 ms). Importing this module in the worker (it is the app
module) makes asyncio set TCP_NODELAY on every TCP socket, then re-exports the bench apps:
``apps.uvicorn_nodelay:raw`` and ``apps.uvicorn_nodelay:fastapi``.
"""

from __future__ import annotations

import asyncio.base_events
import socket
from typing import Any


def _set_nodelay(sock: Any) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


asyncio.base_events._set_nodelay = _set_nodelay  # type: ignore[attr-defined]

from .asgi_app import app as raw  # noqa: E402
from .fastapi_app import app as fastapi  # noqa: E402

__all__ = ["fastapi", "raw"]
