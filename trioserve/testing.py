"""Run an app on a real socket inside a test (imports only ``config`` and ``server``).

Example::

    async def test_home() -> None:
        async with trioserve.testing.running(app) as server:
            ...  # connect to server.url

The block owns a nursery running :func:`trioserve.serve`; leaving it (normally, by an
exception or by cancellation) stops the server and closes every socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from .config import Config
from .server import Server, serve


@asynccontextmanager
async def running(app: Any, **options: Any) -> AsyncIterator[Server]:
    """Serve ``app`` on a free port of 127.0.0.1 for the duration of the block.

    Args:
        app: an ASGI 3 app.
        **options: :class:`Config` fields; ``port`` defaults to 0, ``access_log`` to False.
    """
    options.setdefault("port", 0)
    options.setdefault("access_log", False)
    config = Config(**options)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, app, config)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
