"""serve(): lifespan → listen → accept into the connections nursery → drain (layer 3).

The task tree (STYLE.md §1.4)::

    serve()
    └── async with lifespan(...)                 startup done before any accept
        └── nursery "connections"                drain: cancel_scope.deadline = now + grace
            ├── accepting (own cancel scope)     one accept loop per listener; cancelled first
            └── HTTPConnection.run() per client  owns stream + h11; app calls are its children

``serve()`` installs no signal handlers and never exits the process: embedders and the
runner ask for a graceful stop through :class:`Server` or ``shutdown_trigger``; cancelling
``serve()`` is the prompt hard stop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import sys
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from .asgi_types import ASGIApp
from .config import Config
from .http_connection import HTTPConnection
from .lifespan import lifespan
from .listeners import BoundSocket, bind_sockets, peer_addresses, to_listener
from .server_state import ServerState

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger(__name__)

# accept() errors that mean "out of resources right now": wait and retry, as trio does.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
ACCEPT_RETRY_SLEEP: Final = 0.1


class Server:
    """Handle to a running server, given by ``task_status.started()``.

    Attributes:
        urls: one URL per listening socket (``http://127.0.0.1:8000``, ``unix:/path``).
        addresses: the bound addresses; for TCP ``(host, port)`` with the real port.
        config: the configuration the server runs with.
    """

    def __init__(self, config: Config, bound: list[BoundSocket]) -> None:
        self.config = config
        self.urls: list[str] = [b.url for b in bound]
        self.addresses: list[tuple[str, int] | str] = [b.address for b in bound]
        self._drain = trio.Event()
        self._stopped = trio.Event()

    @property
    def url(self) -> str:
        """The first URL."""
        return self.urls[0]

    @property
    def port(self) -> int:
        """The TCP port of the first listener."""
        address = self.addresses[0]
        if isinstance(address, str):
            raise AttributeError("a UNIX socket server has no port")
        return address[1]

    def shutdown_nowait(self) -> None:
        """Ask for a graceful drain and return at once."""
        self._drain.set()

    async def shutdown(self) -> None:
        """Drain gracefully and wait until ``serve()`` has finished (lifespan shutdown too)."""
        self._drain.set()
        await self._stopped.wait()

    @property
    def draining(self) -> bool:
        return self._drain.is_set()


async def serve(
    app: ASGIApp,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    on_app_error: Callable[[BaseException], None] | None = None,
) -> None:
    """Serve ``app`` until a graceful shutdown completes or the call is cancelled.

    Example::

        async with trio.open_nursery() as nursery:
            server: trioserve.Server = await nursery.start(trioserve.serve, app, config)
            ...  # talk to server.url
            await server.shutdown()

    Args:
        app: an ASGI 3 application (see ``app_loading.load_app`` for import strings).
        config: the validated configuration.
        shutdown_trigger: an async callable; when it returns, the server drains.
        task_status: receives the :class:`Server` once lifespan startup is complete and
            every socket listens.
        on_app_error: called with every exception an app call raises (testing helpers).

    Returns:
        Only after the drain: no task, socket or app call outlives this call.

    Raises:
        LifespanError: lifespan startup failed.
        OSError: a socket could not be bound.

    Cancellation:
        A prompt hard stop: connections are closed forcefully; lifespan shutdown still
        runs, shielded and bounded by ``timeout_graceful_shutdown`` (5 s if unset).
    """
    server: Server | None = None
    limit = config.limit_max_requests
    if limit is not None and config.limit_max_requests_jitter:
        limit += random.randint(0, config.limit_max_requests_jitter)
    state = ServerState(config, app, max_requests=limit, on_app_error=on_app_error)
    bound: list[BoundSocket] = []
    try:
        async with lifespan(app, config, shutdown_timeout=config.timeout_graceful_shutdown) \
                as lifespan_state:
            state.lifespan_state = lifespan_state
            bound = bind_sockets(config)
            listeners = [to_listener(b) for b in bound]
            server = Server(config, bound)
            state.on_max_requests = _max_requests_reached(server)
            async with trio.open_nursery() as connections:
                accepting = trio.CancelScope()
                connections.start_soon(_accept_all, listeners, connections, state, accepting)
                if shutdown_trigger is not None:
                    connections.start_soon(_wait_trigger, shutdown_trigger, server, accepting)
                for url in server.urls:
                    logger.debug("listening on %s", url)
                task_status.started(server)
                await server._drain.wait()
                await _drain(state, connections, accepting, listeners)
    finally:
        for b in bound:
            b.sock.close()
            if config.uds is not None and isinstance(b.address, str):
                with contextlib.suppress(OSError):
                    os.unlink(b.address)
        if server is not None:
            server._stopped.set()


def _max_requests_reached(server: Server) -> Callable[[], None]:
    def reached() -> None:
        logger.info("Maximum request limit reached, shutting down gracefully.")
        server.shutdown_nowait()

    return reached


async def _drain(
    state: ServerState,
    connections: trio.Nursery,
    accepting: trio.CancelScope,
    listeners: list[trio.SocketListener],
) -> None:
    """Stop accepting, close idle connections, bound the rest by the graceful timeout."""
    logger.info("Shutting down")
    state.draining = True
    accepting.cancel()
    for listener in listeners:
        await trio.aclose_forcefully(listener)
    for conn in list(state.connections):
        conn.drain()
    grace = state.config.timeout_graceful_shutdown
    if grace is not None:
        connections.cancel_scope.deadline = trio.current_time() + grace
    if state.connections:
        logger.info("Waiting for %d connection(s) to close.", len(state.connections))


async def _wait_trigger(
    trigger: Callable[[], Awaitable[object]], server: Server, accepting: trio.CancelScope
) -> None:
    with accepting:  # ends with the accept loops
        await trigger()
        server.shutdown_nowait()


async def _accept_all(
    listeners: list[trio.SocketListener],
    connections: trio.Nursery,
    state: ServerState,
    accepting: trio.CancelScope,
) -> None:
    with accepting:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, connections, state)


async def _accept_loop(
    listener: trio.SocketListener, connections: trio.Nursery, state: ServerState
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except trio.ClosedResourceError:
            return
        except OSError as exc:
            if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                logger.warning("accept() failed (%s); retrying in %.1fs", exc, ACCEPT_RETRY_SLEEP)
                await trio.sleep(ACCEPT_RETRY_SLEEP)
                continue
            raise
        connections.start_soon(serve_connection, stream, state)


async def serve_connection(stream: trio.SocketStream, state: ServerState) -> None:
    """Serve one accepted stream; a bug here is logged and costs only this connection."""
    try:
        client, server = peer_addresses(stream)
    except OSError:  # the peer is already gone
        await trio.aclose_forcefully(stream)
        return
    conn = HTTPConnection(stream, state, client=client, server=server)
    if state.draining:
        conn.closing = True
    try:
        await conn.run()
    except Exception:
        logger.exception("%s - internal error in connection task", conn.peer)
    except BaseExceptionGroup as group:
        bugs, rest = group.split(Exception)
        if bugs is not None:
            logger.error("%s - internal error in connection task", conn.peer, exc_info=bugs)
        if rest is not None:
            raise rest from None


