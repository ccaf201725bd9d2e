"""Run an app inside a test, on a real socket or in memory (imports only ``config`` and ``server``).

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
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from .config import Config
from .server import Server, serve, serve_in_memory

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

RECEIVE_SIZE: Final = 64 * 1024
# The closing handshake of the WebSocket client waits this long for the server's answer.
WS_CLOSE_TIMEOUT: Final = 5.0
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

        address = self.server.addresses[0] if self.server.addresses else None
        if self.transport == "memory":
            kwargs.setdefault("transport", _memory_transport_class()(self.server))
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
        return _open_websocket(self, path, tuple(subprotocols), tuple(headers))

    def _host(self) -> str:
        address = self.server.addresses[0] if self.server.addresses else None
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


# -- WebSocket client ---------------------------------------------------------------------


class WebSocketClosed(Exception):
    """The server closed the WebSocket (or the connection dropped: code 1006).

    Attributes:
        code: the close code the server sent.
        reason: the close reason it sent.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed with code {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class WebSocketRejected(Exception):
    """The server answered the WebSocket handshake with an HTTP response.

    Attributes:
        status_code: the response status (403 when the app closed before accepting).
        headers: the response headers.
        body: the response body.
    """

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        super().__init__(f"WebSocket handshake rejected with HTTP {status_code}")
        self.status_code = status_code
        self.headers = headers
        self.body = body


@asynccontextmanager
async def _open_websocket(
    server: RunningServer,
    path: str,
    subprotocols: tuple[str, ...],
    headers: tuple[tuple[str | bytes, str | bytes], ...],
) -> AsyncIterator[WebSocketClient]:
    stream = await server.open_stream()
    ws = WebSocketClient(stream)
    try:
        await ws._handshake(server._host(), path, subprotocols, headers)
        yield ws
    finally:
        await ws.close()


class WebSocketClient:
    """A small WebSocket client over one stream, for tests (built on wsproto).

    Pings are answered automatically. Receiving after the server closed raises
    :class:`WebSocketClosed` carrying the close code.

    Attributes:
        subprotocol: the subprotocol the server accepted, if any.
        response_headers: the extra headers of the server's 101 response.
        close_code: the code of the server's close frame (1006 if the connection
            dropped without one); None while open.
        close_reason: the reason of the server's close frame.
    """

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self._stream = stream
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._events: deque[Event] = deque()
        self._eof = False
        self._stream_closed = False
        self.subprotocol: str | None = None
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.close_code: int | None = None
        self.close_reason = ""

    async def _handshake(
        self,
        host: str,
        path: str,
        subprotocols: tuple[str, ...],
        headers: tuple[tuple[str | bytes, str | bytes], ...],
    ) -> None:
        extra = [(_as_bytes(name), _as_bytes(value)) for name, value in headers]
        await self._write(
            self._ws.send(
                Request(
                    host=host, target=path, subprotocols=list(subprotocols), extra_headers=extra
                )
            )
        )
        event = await self._next_event()
        if isinstance(event, AcceptConnection):
            self.subprotocol = event.subprotocol
            self.response_headers = list(event.extra_headers)
            return
        if isinstance(event, RejectConnection):
            body = b""
            while event.has_body:
                data = await self._next_event()
                assert isinstance(data, RejectData)
                body += data.data
                if data.body_finished:
                    break
            await self._close_stream()
            self.close_code = 1006
            raise WebSocketRejected(event.status_code, list(event.headers), body)
        raise AssertionError(f"unexpected WebSocket handshake event {event!r}")

    async def send_text(self, text: str) -> None:
        """Send a text message."""
        await self._send_message(TextMessage(data=text))

    async def send_bytes(self, data: bytes) -> None:
        """Send a binary message."""
        await self._send_message(BytesMessage(data=data))

    async def send(self, data: str | bytes) -> None:
        """Send a text (``str``) or binary (``bytes``) message."""
        if isinstance(data, str):
            await self.send_text(data)
        else:
            await self.send_bytes(data)

    async def receive(self) -> str | bytes:
        """The next complete message: ``str`` for text, ``bytes`` for binary.

        Raises:
            WebSocketClosed: the server closed the connection (see :attr:`close_code`).
        """
        parts: list[Any] = []
        while True:
            event = await self._next_event()
            if isinstance(event, (TextMessage, BytesMessage)):
                parts.append(event.data)
                if event.message_finished:
                    if isinstance(event, TextMessage):
                        return "".join(parts)
                    return b"".join(parts)
            elif isinstance(event, Ping):
                # Events are parsed in batches: a Close later in the batch has already
                # moved wsproto on, and then there is nothing left to answer.
                if self._ws.state is ConnectionState.OPEN:
                    await self._write(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                await self._answer_close(event)
                raise WebSocketClosed(event.code, event.reason or "")
            # Pong and anything else: nothing to do.

    async def receive_text(self) -> str:
        """The next message, which must be text."""
        message = await self.receive()
        if not isinstance(message, str):
            raise TypeError(f"expected a text message, got bytes {message!r}")
        return message

    async def receive_bytes(self) -> bytes:
        """The next message, which must be binary."""
        message = await self.receive()
        if not isinstance(message, bytes):
            raise TypeError(f"expected a binary message, got text {message!r}")
        return message

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket: send a close frame, wait (bounded) for the server's, then
        close the connection. Safe to call more than once."""
        if self._stream_closed:
            return
        try:
            if self._ws.state is ConnectionState.OPEN and not self._eof:
                await self._write(self._ws.send(CloseConnection(code=code, reason=reason)))
                with trio.move_on_after(WS_CLOSE_TIMEOUT):
                    while True:
                        event = await self._next_event()
                        if isinstance(event, CloseConnection):
                            self.close_code = event.code
                            self.close_reason = event.reason or ""
                            break
        except WebSocketClosed:
            pass
        finally:
            await self._close_stream()

    # -- I/O ------------------------------------------------------------------------------

    async def _send_message(self, event: TextMessage | BytesMessage) -> None:
        if self._ws.state is not ConnectionState.OPEN or self._eof:
            raise WebSocketClosed(self.close_code or 1006, self.close_reason)
        await self._write(self._ws.send(event))

    async def _answer_close(self, event: CloseConnection) -> None:
        self.close_code = event.code
        self.close_reason = event.reason or ""
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            await self._write(self._ws.send(event.response()))
        await self._close_stream()

    async def _write(self, data: bytes) -> None:
        if self._eof:
            raise WebSocketClosed(self.close_code or 1006, self.close_reason)
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._eof = True
            if self.close_code is None:
                self.close_code = 1006
            raise WebSocketClosed(self.close_code, self.close_reason) from None

    async def _next_event(self) -> Event:
        while not self._events:
            if self._eof:
                if self.close_code is None:
                    self.close_code = 1006
                raise WebSocketClosed(self.close_code, self.close_reason)
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._eof = True
            self._ws.receive_data(bytes(data) or None)
            self._events.extend(self._ws.events())
        return self._events.popleft()

    async def _close_stream(self) -> None:
        if not self._stream_closed:
            self._stream_closed = True
            self._eof = True
            await trio.aclose_forcefully(self._stream)


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


# -- httpx over memory streams ------------------------------------------------------------


@functools.cache
def _memory_transport_class() -> Callable[[Server], httpx.AsyncBaseTransport]:
    """The httpx transport of in-memory mode (built on first use: httpx is optional)."""
    import httpx

    class MemoryResponseStream(httpx.AsyncByteStream):
        def __init__(self, conn: h11.Connection, stream: trio.abc.HalfCloseableStream) -> None:
            self._conn = conn
            self._stream = stream

        async def __aiter__(self) -> AsyncIterator[bytes]:
            while True:
                try:
                    event = await _next_client_event(self._conn, self._stream)
                except h11.RemoteProtocolError as exc:
                    raise httpx.RemoteProtocolError(str(exc)) from exc
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return
                else:
                    raise httpx.RemoteProtocolError(f"unexpected event in response: {event!r}")

        async def aclose(self) -> None:
            await trio.aclose_forcefully(self._stream)

    class MemoryTransport(httpx.AsyncBaseTransport):
        """One memory-stream connection per request, written and parsed with h11."""

        def __init__(self, server: Server) -> None:
            self._server = server

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            try:
                stream = await self._server.open_stream()
            except OSError as exc:
                raise httpx.ConnectError(str(exc), request=request) from exc
            conn = h11.Connection(h11.CLIENT)
            try:
                response = await self._exchange(conn, stream, request)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return httpx.Response(
                status_code=response.status_code,
                headers=list(response.headers),
                stream=MemoryResponseStream(conn, stream),
                extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason},
            )

        async def _exchange(
            self, conn: h11.Connection, stream: trio.abc.Stream, request: httpx.Request
        ) -> h11.Response:
            try:
                await stream.send_all(
                    conn.send(
                        h11.Request(
                            method=request.method,
                            target=request.url.raw_path,
                            headers=list(request.headers.raw),
                        )
                    )
                    or b""
                )
                assert isinstance(request.stream, httpx.AsyncByteStream)
                async for chunk in request.stream:
                    if chunk:
                        await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the server answered early and closed: read its response
            while True:
                try:
                    event = await _next_client_event(conn, stream)
                except h11.RemoteProtocolError as exc:
                    raise httpx.RemoteProtocolError(str(exc), request=request) from exc
                if isinstance(event, h11.Response):
                    return event
                if not isinstance(event, h11.InformationalResponse):
                    raise httpx.RemoteProtocolError(
                        "server closed the connection without a response", request=request
                    )

    return MemoryTransport


async def _next_client_event(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        conn.receive_data(bytes(data))
