"""serve(): lifespan → listen → accept into the connections nursery → drain (layer 3).

The task tree (STYLE.md §1.4)::

    serve()
    └── async with lifespan(...)                 startup done before any accept
        └── nursery "connections"                drain: cancel_scope.deadline = now + grace
            ├── accepting (own cancel scope)     one accept loop per listener; cancelled first
            └── HTTPConnection.run() per client  owns stream + parser; calls the apps itself; when
                                                 an app call waits, serving moves on to a new
                                                 task here (the connection closes once both end)

``serve()`` installs no signal handlers and never exits the process: embedders and the
runner ask for a graceful stop through :class:`Server` or ``shutdown_trigger``; cancelling
``serve()`` is the prompt hard stop.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from .app.asyncio_bridge import open_app_loop
from .app.lifespan import lifespan
from .app.loading import load_app
from .asgi_types import ASGIApp
from .compiled import build_description
from .config import Config, http_implementation, ws_implementation
from .connection.edge import prepare_connection
from .connection.http1 import HTTPConnection
from .connection.http2 import HTTP2Connection
from .connection.listeners import (
    BoundSocket,
    MemoryListener,
    SocketListener,
    bind_sockets,
    close_sockets,
    local_address,
    to_listener,
)
from .connection.state import ServerState
from .message_trace import TRACE_LOG_LEVEL, peer_name, traced_app
from .metrics import ServerMetrics
from .wsgi import WSGIMiddleware

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger(__name__)

# accept() errors that mean "out of resources right now": wait and retry, as trio does.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
ACCEPT_RETRY_SLEEP: Final = 0.1
# The connection tasks' name, given as a constant: trio would build the same string once
# per task (~80 bytes per connection).
_CONNECTION_TASK_NAME: Final = "trioserve.server.serve_connection"


class Server:
    """Handle to a running server, given by ``task_status.started()``.

    Attributes:
        urls: one URL per listening socket (``http://127.0.0.1:8000``, ``unix:/path``);
            ``http://testserver`` for an in-memory server.
        addresses: the bound addresses; for TCP ``(host, port)`` with the real port
            (empty for an in-memory server).
        sockets: the listening sockets (closed when ``serve()`` returns).
        config: the configuration the server runs with.
        metrics: the server's counters (``trioserve.metrics``) when ``config.metrics`` or
            an admin listener asks for them, else None.
    """

    def __init__(
        self,
        config: Config,
        bound: list[BoundSocket],
        *,
        memory: MemoryListener | None = None,
    ) -> None:
        self.config = config
        self.urls: list[str] = [b.url for b in bound] if memory is None else [memory.url]
        if config.is_ssl:
            self.urls = [url.replace("http://", "https://", 1) for url in self.urls]
        self.addresses: list[tuple[str, int] | str] = [b.address for b in bound]
        self.sockets: list[socket.socket] = [b.sock for b in bound]
        self._memory = memory
        self._grace = config.timeout_graceful_shutdown
        self._drain = trio.Event()
        self._stopped = trio.Event()
        self.metrics: ServerMetrics | None = None

    @property
    def url(self) -> str:
        """The first URL."""
        return self.urls[0]

    @property
    def port(self) -> int:
        """The TCP port of the first listener."""
        if not self.addresses:
            raise AttributeError("an in-memory server has no port")
        address = self.addresses[0]
        if isinstance(address, str):
            raise AttributeError("a UNIX socket server has no port")
        return address[1]

    def shutdown_nowait(self, *, grace: float | None = None) -> None:
        """Ask for a graceful drain (what SIGTERM does) and return at once.

        Args:
            grace: seconds in-flight connections get before they are cancelled; None
                keeps ``timeout_graceful_shutdown``, ``math.inf`` waits as long as needed.
                Only the first request for a drain sets it.
        """
        if not self._drain.is_set():
            if grace is not None:
                self._grace = grace
            self._drain.set()

    async def shutdown(self, *, grace: float | None = None) -> None:
        """Drain gracefully and wait until ``serve()`` has finished (lifespan shutdown too).

        Args:
            grace: as for :meth:`shutdown_nowait`.
        """
        self.shutdown_nowait(grace=grace)
        await self._stopped.wait()

    @property
    def draining(self) -> bool:
        return self._drain.is_set()

    async def wait_draining(self) -> None:
        """Return once a graceful drain has been requested (signal, trigger, max requests)."""
        await self._drain.wait()

    async def wait_stopped(self) -> None:
        """Return once ``serve()`` has finished: drained, lifespan shut down, sockets closed.

        Unlike :meth:`shutdown` it does not ask for the drain; whoever watches a server
        that something else stops (a signal, ``--limit-max-requests``) waits with it.
        """
        await self._stopped.wait()

    async def open_stream(self) -> trio.abc.HalfCloseableStream:
        """Open a client connection to this server (a memory stream when in-memory).

        Raises:
            OSError: the server does not accept connections (any more).
        """
        if self._memory is not None:
            return await self._memory.connect()
        address = self.addresses[0]
        if isinstance(address, str):
            return await trio.open_unix_socket(address)
        host, port = address
        # A wildcard address is not something to connect to: use the loopback instead.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        return await trio.open_tcp_stream(host, port)


async def serve(
    app: ASGIApp | str,
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
        app: an ASGI 3 application, or its import string (``"main:app"``, loaded as
            :func:`trioserve.run` loads it: ``app_dir``, ``factory``, ASGI 2).
        config: the validated configuration.
        shutdown_trigger: an async callable; when it returns, the server drains.
        task_status: receives the :class:`Server` once lifespan startup is complete and
            every socket listens.
        on_app_error: called with every exception an app call raises (testing helpers).

    Returns:
        Only after the drain: no task, socket or app call outlives this call.

    Raises:
        AppLoadError: ``app`` is an import string that does not load.
        TypeError: ``app`` is neither callable nor a string.
        LifespanError: lifespan startup failed.
        OSError: a socket could not be bound.
        KeyboardInterrupt: a Ctrl-C that trio delivered inside one of the server's tasks
            comes out bare, not wrapped in the server's own exception groups.

    Cancellation:
        A prompt hard stop: connections are closed forcefully; lifespan shutdown still
        runs, shielded and bounded by ``timeout_graceful_shutdown`` (5 s if unset).

    With ``config.app_loop == "asyncio"`` the app runs on a trio-asyncio loop that lives
    as long as this call (an already open one is reused); see ``asyncio_bridge``.
    With ``config.interface == "wsgi"``, ``app`` is a WSGI app, run in worker threads
    (``trioserve.wsgi``).
    """
    await _serve(app, config, None, shutdown_trigger, task_status, on_app_error)


async def serve_in_memory(
    app: ASGIApp | str,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    on_app_error: Callable[[BaseException], None] | None = None,
) -> None:
    """Like :func:`serve`, but with no socket: clients connect with ``server.open_stream()``.

    The same connection code (HTTP/1.1, WebSocket, timeouts, drain) runs over
    ``trio.testing`` memory streams; ``trioserve.testing`` uses this for
    ``transport="memory"``. ``config``'s binding options are ignored.
    """
    await _serve(app, config, MemoryListener(), shutdown_trigger, task_status, on_app_error)


async def _serve(
    app: ASGIApp | str,
    config: Config,
    memory: MemoryListener | None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None,
    task_status: trio.TaskStatus[Server],
    on_app_error: Callable[[BaseException], None] | None,
) -> None:
    server: Server | None = None
    app = resolve_app(app, config)
    if config.interface == "wsgi":
        app = WSGIMiddleware(app)  # type: ignore[arg-type]  # a PEP 3333 app, not ASGI
    limit = config.limit_max_requests
    if limit is not None and config.limit_max_requests_jitter:
        limit += random.randint(0, config.limit_max_requests_jitter)
    state = ServerState(config, app, max_requests=limit, on_app_error=on_app_error)
    if state.trace:
        app = traced_app(app)  # (inside the asyncio bridge, if any: it sees the app's view)
    bound: list[BoundSocket] = []
    try:
        # --app-loop asyncio: the app (lifespan, http, websocket) is called through the
        # bridge; the loop outlives every app call.
        async with (
            open_app_loop(app, config) as called_app,
            lifespan(
                called_app, config, shutdown_timeout=config.timeout_graceful_shutdown
            ) as lifespan_state,
        ):
            listeners: list[SocketListener | MemoryListener]
            if memory is None:
                bound = bind_sockets(config)
                # An inherited socket (--fd; every --workers process gets one) may have
                # other processes accepting on it.
                shared = config.fd is not None
                listeners = [to_listener(b, shared=shared) for b in bound]
            else:
                listeners = [memory]
            server = Server(config, bound, memory=memory)
            server.metrics = state.metrics
            state.start_serving(called_app, lifespan_state, _max_requests_reached(server))
            async with trio.open_nursery() as connections:
                accepting = trio.CancelScope()
                connections.start_soon(_accept_all, listeners, connections, state, accepting)
                if shutdown_trigger is not None:
                    connections.start_soon(_wait_trigger, shutdown_trigger, server)
                for url in server.urls:
                    logger.debug("listening on %s", url)
                logger.debug("HTTP/1.1 parser: %s", http_implementation(config.http))
                if config.ws != "none":
                    logger.debug("WebSocket engine: %s", ws_implementation(config.ws))
                logger.debug("hot path: %s", build_description())
                task_status.started(server)
                await server._drain.wait()
                if server.metrics is not None:
                    server.metrics.draining = 1
                if config.shutdown_delay:
                    await _delay_drain(server, config.shutdown_delay)
                await _drain(state, connections, accepting, listeners, server._grace)
    except BaseExceptionGroup as group:
        # trio raises a Ctrl-C in whichever task runs when it arrives; out of our
        # nurseries it would come wrapped, so an embedder's `except KeyboardInterrupt`
        # (or trio.run's caller) would miss it. Alone, it is raised as itself.
        interrupt = _lone_keyboard_interrupt(group)
        if interrupt is None:
            raise
        raise interrupt from None
    finally:
        if memory is not None:
            memory.close()
        close_sockets(bound, config)
        if server is not None:
            server._stopped.set()


def resolve_app(app: ASGIApp | str, config: Config) -> ASGIApp:
    """The ASGI callable to serve: an import string is loaded as ``run()`` loads it.

    An app object is served as it is (``factory`` applies to import strings only: the
    runner hands over apps it already loaded).

    Raises:
        AppLoadError: the import string does not load.
        TypeError: ``app`` is neither a string nor callable (caught here rather than as a
            500 on every request).
    """
    if isinstance(app, str):
        return load_app(app, config)
    if not callable(app):
        raise TypeError(
            "serve() needs an ASGI app (an async callable) or its import string such as "
            f"'main:app', got {type(app).__name__} {app!r:.80}"
        )
    return app


def _lone_keyboard_interrupt(
    group: BaseExceptionGroup[BaseException],
) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that is all ``group`` holds (nested groups included), if so."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1 and isinstance(leaves[0], KeyboardInterrupt):
        return leaves[0]
    return None


def _max_requests_reached(server: Server) -> Callable[[], None]:
    def reached() -> None:
        logger.info("Maximum request limit reached, shutting down gracefully.")
        server.shutdown_nowait()

    return reached


async def _delay_drain(server: Server, delay: float) -> None:
    """``--shutdown-delay``: the drain was asked for and readiness is off (``/readyz``
    answers 503 from now on), but keep serving normally for ``delay`` seconds, so that load
    balancers stop sending new connections before the listeners close."""
    logger.info("Not ready any more; serving %.1fs more before shutting down", delay)
    await trio.sleep(delay)


async def _drain(
    state: ServerState,
    connections: trio.Nursery,
    accepting: trio.CancelScope,
    listeners: list[SocketListener | MemoryListener],
    grace: float | None,
) -> None:
    """Stop accepting, tell each connection to end after at most one more request (an
    idle one once idle for a moment: ``HTTPConnection.drain``), bound all by ``grace``."""
    logger.info("Shutting down")
    state.begin_drain()
    accepting.cancel()
    for listener in listeners:
        await trio.aclose_forcefully(listener)
    for conn in list(state.connections):
        conn.drain()
    if grace is not None:
        connections.cancel_scope.deadline = trio.current_time() + grace
    if state.connections:
        logger.info("Waiting for %d connection(s) to close.", len(state.connections))


async def _wait_trigger(trigger: Callable[[], Awaitable[object]], server: Server) -> None:
    """Drain when ``trigger()`` returns; stop waiting for it once a drain has begun."""

    async def fire() -> None:
        await trigger()
        server.shutdown_nowait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fire)
        await server._drain.wait()
        nursery.cancel_scope.cancel()


async def _accept_all(
    listeners: list[SocketListener | MemoryListener],
    connections: trio.Nursery,
    state: ServerState,
    accepting: trio.CancelScope,
) -> None:
    with accepting:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, connections, state)


async def _accept_loop(
    listener: SocketListener | MemoryListener, connections: trio.Nursery, state: ServerState
) -> None:
    while True:
        try:
            stream, client = await listener.accept_with_client()
        except trio.ClosedResourceError:
            return
        except OSError as exc:
            if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                logger.warning("accept() failed (%s); retrying in %.1fs", exc, ACCEPT_RETRY_SLEEP)
                await trio.sleep(ACCEPT_RETRY_SLEEP)
                continue
            raise
        connections.start_soon(
            serve_connection, stream, client, state, connections, name=_CONNECTION_TASK_NAME
        )


async def serve_connection(
    stream: trio.abc.HalfCloseableStream,
    client: tuple[str, int] | None,
    state: ServerState,
    connections: trio.Nursery,
) -> None:
    """Serve one accepted stream; a bug here is logged and costs only this connection.

    ``client`` is the peer address the listener's accept reported (None on UNIX sockets).
    ``connections`` is the nursery this task runs in: the connection moves on to a new task
    there when an app call waits (see ``HTTPConnection.run``).
    """
    if state.trace:
        logger.log(TRACE_LOG_LEVEL, "%s - HTTP connection made", peer_name(client))
    metrics = state.metrics
    if metrics is not None:
        metrics.connections += 1
        # Open from now on; once set up, it counts as one of state.connections (it joins
        # them in its run(), with no checkpoint in between).
        metrics.connections_setting_up += 1
    try:
        server = local_address(stream)
    except OSError:  # the socket is unusable already
        await trio.aclose_forcefully(stream)
        prepared = None
    else:
        prepared = await prepare_connection(stream, client, server, state.edge)
    finally:
        if metrics is not None:
            metrics.connections_setting_up -= 1
    if prepared is None:  # unusable socket, no valid PROXY header, failed TLS handshake
        if state.trace:
            logger.log(TRACE_LOG_LEVEL, "%s - HTTP connection lost", peer_name(client))
        return
    if prepared.http2:  # (ALPN h2, or the prior-knowledge preface: connection.edge)
        h2_conn = HTTP2Connection(
            prepared.stream, state, prepared.facts, received=prepared.leftover
        )
        del prepared
        if state.draining:
            h2_conn.drain()
        await h2_conn.run()  # (logs a bug of its own rather than raising it)
        return
    conn = HTTPConnection(prepared.stream, state, prepared.facts)
    serving = conn.run(connections, prepared.leftover)
    del prepared  # (not kept for the connection's whole life)
    if state.draining:
        conn.drain()  # (before run(): its first request is answered with Connection: close)
    await serving  # (logs a bug of its own rather than raising it)
