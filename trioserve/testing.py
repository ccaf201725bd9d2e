"""Run an app inside a test, on a real socket or in memory (the public testing module).

Example::

    async def test_home() -> None:
        async with trioserve.testing.running(app) as server:
            async with server.client() as client:
                response = await client.get("/")
            assert response.status_code == 200

    async def test_echo(trioserve_server) -> None:     # the pytest fixture factory
        server = await trioserve_server(app, transport="memory")
        async with server.websocket("/ws") as ws:
            await ws.send_text("hi")
            assert await ws.receive_text() == "echo: hi"

The block owns a nursery running :func:`trioserve.serve` (``nursery.start`` returns once
lifespan startup is done and the socket listens); leaving it, normally, by an exception
or by cancellation, stops the server (lifespan shutdown still runs, shielded and bounded)
and closes every socket. Exceptions the app raised meanwhile are re-raised at the end.

This module is also the pytest plugin (entry point ``pytest11``) that provides the
``trioserve_server`` fixture. ``httpx`` (for :meth:`RunningServer.client`) is imported
only when used: it is a test dependency, not a dependency of trioserve.

Of trioserve it imports only ``config``, ``server`` and its two parts: the WebSocket
client (``testing_ws_client``) and the in-memory httpx transport (``testing_transport``),
whose public names are importable from here.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal

import trio

from .config import Config
from .server import Server, serve, serve_in_memory
from .testing_transport import memory_transport_class
from .testing_ws_client import (
    WebSocketClient,
    WebSocketClosed,
    WebSocketRejected,
    open_websocket,
)

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

if TYPE_CHECKING:
    import httpx

__all__ = [
    "RunningServer",
    "ServerFactory",
    "WebSocketClient",
    "WebSocketClosed",
    "WebSocketRejected",
    "running",
]

Transport = Literal["socket", "memory"]

# Closing the httpx clients a test forgot to close, when the block ends cancelled.
CLIENT_CLOSE_TIMEOUT: Final = 1.0


@asynccontextmanager
async def running(
    app: Any,
    *,
    transport: Transport = "socket",
    raise_app_exceptions: bool = True,
    **options: Any,
) -> AsyncIterator[RunningServer]:
    """Serve ``app`` for the duration of the block.

    Args:
        app: an ASGI 3 app.
        transport: ``"socket"`` (a free port of 127.0.0.1) or ``"memory"`` (no socket:
            the same HTTP/1.1 and WebSocket code over ``trio.testing`` memory streams;
            reach it with :meth:`RunningServer.client`, :meth:`RunningServer.websocket`
            or :meth:`RunningServer.open_stream`).
        raise_app_exceptions: re-raise what the app raised while serving when the block
            exits, as an ``ExceptionGroup`` (together with the block's own exception, if
            any). Exceptions a test expects can be removed from
            :attr:`RunningServer.app_exceptions` before the block ends.
        **options: :class:`~trioserve.Config` fields; ``port`` defaults to 0 and
            ``access_log`` to False.

    Raises:
        LifespanError: lifespan startup failed (raised on entry).
        OSError: the socket could not be bound (raised on entry).
        ExceptionGroup: the app raised (on exit, with ``raise_app_exceptions``).
    """
    options.setdefault("port", 0)
    options.setdefault("access_log", False)
    config = Config(**options)
    if transport not in ("socket", "memory"):
        raise ValueError(f"transport must be 'socket' or 'memory', got {transport!r}")
    target = serve if transport == "socket" else serve_in_memory
    app_exceptions: list[Exception] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, Exception):
            app_exceptions.append(exc)

    start_error: Exception | None = None
    body_error: Exception | None = None
    # Exceptions are kept and raised after the nursery so that trio does not wrap them.
    async with trio.open_nursery() as nursery:
        try:
            server: Server = await nursery.start(
                functools.partial(target, app, config, on_app_error=collect)
            )
        except Exception as exc:  # LifespanError / OSError, already unwrapped by start()
            start_error = exc
        else:
            handle = RunningServer(server, transport, app_exceptions)
            try:
                yield handle
            except Exception as exc:
                body_error = exc
            finally:
                await handle._close_clients()
                nursery.cancel_scope.cancel()
    if start_error is not None:
        raise start_error
    if raise_app_exceptions and app_exceptions:
        errors = list(app_exceptions)
        if body_error is not None:
            errors.append(body_error)
        raise ExceptionGroup(
            f"the app raised {len(app_exceptions)} exception(s) while serving", errors
        )
    if body_error is not None:
        raise body_error


class RunningServer:
    """What :func:`running` and the ``trioserve_server`` fixture give a test.

    Attributes:
        server: the :class:`~trioserve.Server` handle from ``serve()``.
        transport: ``"socket"`` or ``"memory"``.
        app_exceptions: what the app raised so far (re-raised at the end unless
            ``raise_app_exceptions=False``; remove the ones the test expects).
    """

    def __init__(
        self, server: Server, transport: Transport, app_exceptions: list[Exception]
    ) -> None:
        self.server = server
        self.transport = transport
        self.app_exceptions = app_exceptions
        self._clients: list[httpx.AsyncClient] = []

    @property
    def config(self) -> Config:
        return self.server.config

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (``http://testserver`` in memory, ``unix:...``)."""
        return self.server.url

    @property
    def ws_url(self) -> str:
        """The WebSocket URL of the server root (``ws://127.0.0.1:<port>``)."""
        url = self.server.url
        return "ws" + url[4:] if url.startswith("http") else url

    @property
    def addresses(self) -> list[tuple[str, int] | str]:
        return self.server.addresses

    @property
    def port(self) -> int:
        return self.server.port

    async def open_stream(self) -> trio.abc.HalfCloseableStream:
        """A raw client connection (TCP, UNIX socket or memory stream); the caller closes it."""
        return await self.server.open_stream()

    async def drain(self, grace: float | None = None) -> None:
        """Shut down gracefully, as on SIGTERM, and wait until the server has stopped.

        New connections are refused at once; in-flight requests get ``grace`` seconds
        (default: the ``timeout_graceful_shutdown`` option, None meaning no limit);
        then lifespan shutdown runs.
        """
        await self.server.shutdown(grace=grace)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` bound to this server (``base_url`` is set).

        Use it as ``async with server.client() as client:``; clients left open are closed
        when the block ends. ``kwargs`` go to ``httpx.AsyncClient``.
        """
        import httpx

        address = self._address()
        if self.transport == "memory":
            kwargs.setdefault("transport", memory_transport_class()(self.server))
            kwargs.setdefault("base_url", self.url)
        elif isinstance(address, str):
            kwargs.setdefault("transport", httpx.AsyncHTTPTransport(uds=address))
            kwargs.setdefault("base_url", "http://localhost")
        else:
            kwargs.setdefault("base_url", self.url)
        client = httpx.AsyncClient(**kwargs)
        self._clients.append(client)
        return client

    def websocket(
        self,
        path: str = "/",
        *,
        subprotocols: Iterable[str] = (),
        headers: Iterable[tuple[str | bytes, str | bytes]] = (),
    ) -> AbstractAsyncContextManager[WebSocketClient]:
        """Open a WebSocket to ``path``: ``async with server.websocket("/ws") as ws:``.

        Raises:
            WebSocketRejected: the server answered the handshake with an HTTP response.
        """
        return open_websocket(
            self.open_stream, self._host(), path, tuple(subprotocols), tuple(headers)
        )

    def _address(self) -> tuple[str, int] | str | None:
        """The first listening address (None in memory)."""
        return self.server.addresses[0] if self.server.addresses else None

    def _host(self) -> str:
        address = self._address()
        if address is None or isinstance(address, str):
            return "testserver" if address is None else "localhost"
        host, port = address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _close_clients(self) -> None:
        with trio.move_on_after(CLIENT_CLOSE_TIMEOUT, shield=True):
            for client in self._clients:
                await client.aclose()
        self._clients.clear()


# -- the pytest plugin ------------------------------------------------------------------


class ServerFactory:
    """The value of the ``trioserve_server`` fixture: ``await trioserve_server(app, **opts)``.

    Every server runs in a nursery owned by the fixture, so it is stopped when the test
    ends however it ends (passes, fails, times out under ``trio.fail_after``, is
    cancelled). App exceptions of all servers are raised by the fixture's teardown, which
    pytest-trio (and anyio's plugin) run as part of the test.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._watched: list[RunningServer] = []

    async def __call__(self, app: Any, **options: Any) -> RunningServer:
        """Start ``app`` (options as for :func:`running`) and return once it serves."""
        server: RunningServer = await self._nursery.start(
            functools.partial(self._run, app, options)
        )
        return server

    async def _run(
        self,
        app: Any,
        options: dict[str, Any],
        *,
        task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        raise_app_exceptions = options.pop("raise_app_exceptions", True)
        async with running(app, raise_app_exceptions=False, **options) as server:
            if raise_app_exceptions:
                self._watched.append(server)
            task_status.started(server)
            await trio.sleep_forever()

    def app_exceptions(self) -> list[Exception]:
        return [exc for server in self._watched for exc in server.app_exceptions]


class PytestTimeoutNear(TimeoutError):
    """The test was about to hit its pytest-timeout; the fixture cancelled it first.

    pytest-timeout's default method raises from a signal handler, in the middle of trio's
    run loop, which abandons the run and with it every ``finally`` block. So the fixture
    watches the same deadline and crashes slightly earlier: pytest-trio (or anyio) then
    cancels the test and tears every server down cleanly.
    """


async def _watchdog(delay: float, timeout: float) -> None:
    """Raise :class:`PytestTimeoutNear` after ``delay`` seconds of *real* time.

    Real time, so that a ``MockClock`` jumping ahead does not fire it; a timer thread, so
    that it costs nothing while the test runs.
    """
    fired = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def fire() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(fired.set)

    timer = threading.Timer(delay, fire)
    timer.daemon = True
    timer.start()
    try:
        await fired.wait()
    finally:
        timer.cancel()
    raise PytestTimeoutNear(
        f"the test is about to exceed its pytest-timeout of {timeout:g}s: cancelled so that "
        "its trioserve servers shut down cleanly"
    )


try:
    import pytest
except ImportError:  # pragma: no cover - running() works without pytest
    pass
else:
    _TIMEOUT_KEY = pytest.StashKey[tuple[float, float]]()

    @pytest.hookimpl(optionalhook=True)
    def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
        """Note when pytest-timeout will fire (observe only: its own timer still runs)."""
        if settings.timeout:
            item.stash[_TIMEOUT_KEY] = (time.monotonic() + settings.timeout, settings.timeout)

    @pytest.fixture(name="trioserve_server")
    async def trioserve_server(request: pytest.FixtureRequest) -> AsyncIterator[ServerFactory]:
        """Fixture factory: ``server = await trioserve_server(app, **options)``.

        Options are those of :func:`running`. Every server stops when the test ends; app
        exceptions fail the test at teardown. Works in pytest-trio tests (``trio_mode`` or
        the ``trio`` mark) and in ``@pytest.mark.anyio`` tests with the trio backend.
        """
        timeout = request.node.stash.get(_TIMEOUT_KEY, None)
        if "anyio_backend" in request.fixturenames:
            # anyio runs fixtures and the test in one task, inside this nursery: a crash
            # here would cancel its runner loop too. No early watchdog there.
            timeout = None
        async with trio.open_nursery() as nursery:
            factory = ServerFactory(nursery)
            if timeout is not None:
                deadline, seconds = timeout
                # Leave time for teardown (lifespan shutdown is bounded by 5 s by default).
                delay = deadline - time.monotonic() - min(5.0, seconds * 0.2)
                nursery.start_soon(_watchdog, max(delay, 0.0), seconds)
            try:
                yield factory
            finally:
                nursery.cancel_scope.cancel()
        errors = factory.app_exceptions()
        if errors:
            raise ExceptionGroup(f"the app raised {len(errors)} exception(s) while serving", errors)
