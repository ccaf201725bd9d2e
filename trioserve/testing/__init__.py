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
and closes every socket.

An exception the app raises for a request made with :meth:`RunningServer.client` or
:meth:`RunningServer.websocket` is raised at that call, as Starlette's ``TestClient``
does, so ``pytest.raises`` works around it. To know which request failed, these clients
tag each request with a header (:data:`REQUEST_ID_HEADER`) and the app is wrapped in a
thin layer that files the exception under that id and hides the header from the app
(see ``_AppErrors``). What the app raised for any other request (raw
:meth:`RunningServer.open_stream` bytes, a background task) is raised when the block
ends: bare if it is the only one, else in an ``ExceptionGroup``.

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
import itertools
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, Literal

import trio

from ..config import Config
from ..server import Server, resolve_app, serve, serve_in_memory
from .transport import (
    REQUEST_ID_HEADER,
    app_error_transport_class,
    memory_http2_transport_class,
    memory_transport_class,
)
from .ws_client import WebSocketClient, WebSocketClosed, WebSocketRejected, open_websocket

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

if TYPE_CHECKING:
    import httpx

    from ..asgi_types import ASGIApp, ASGIReceive, ASGISend

__all__ = [
    "REQUEST_ID_HEADER",
    "RunningServer",
    "ServerFactory",
    "WebSocketClient",
    "WebSocketClosed",
    "WebSocketRejected",
    "running",
]

Transport = Literal["socket", "memory"]

# httpx.AsyncClient arguments that configure its default transport: server.client()
# builds that transport itself (to wrap it), so they go there.
_TRANSPORT_OPTIONS: Final = ("verify", "cert", "http1", "http2", "limits")

# Closing the httpx clients a test forgot to close, when the block ends cancelled.
CLIENT_CLOSE_TIMEOUT: Final = 1.0


def running(
    app: Any,
    *,
    transport: Transport = "socket",
    raise_app_exceptions: bool = True,
    **options: Any,
) -> AbstractAsyncContextManager[RunningServer]:
    """Serve ``app`` for the duration of the block.

    Args:
        app: an ASGI 3 app, or its import string (``"main:app"``; the ``app_dir`` and
            ``factory`` options apply, as for :func:`trioserve.run`).
        transport: ``"socket"`` (a free port of 127.0.0.1) or ``"memory"`` (no socket:
            the same HTTP/1.1 and WebSocket code over ``trio.testing`` memory streams;
            reach it with :meth:`RunningServer.client`, :meth:`RunningServer.websocket`
            or :meth:`RunningServer.open_stream`).
        raise_app_exceptions: raise what the app raised: at the call of
            :meth:`RunningServer.client` / :meth:`RunningServer.websocket` that made the
            failing request, else when the block exits (bare if it is the only
            exception, else an ``ExceptionGroup``, with the block's own exception if
            any). Exceptions a test expects at block exit can be removed from
            :attr:`RunningServer.app_exceptions` before the block ends. False: the
            clients get the server's answer (500, close 1011) and nothing is raised.
        **options: :class:`~trioserve.Config` fields; ``port`` defaults to 0 and
            ``access_log`` to False. ``http2=True`` (given explicitly) also makes
            :meth:`RunningServer.client` speak HTTP/2: httpx with ``http2=True``, by prior
            knowledge on cleartext and in memory, by ALPN over TLS.

    Raises:
        AppLoadError: ``app`` is an import string that does not load (on entry).
        TypeError: ``app`` is neither callable nor a string (on entry).
        LifespanError: lifespan startup failed (raised on entry).
        OSError: the socket could not be bound (raised on entry).
        Exception: what the app raised (see ``raise_app_exceptions``).
    """
    return _running(
        app,
        transport,
        raise_at_call=raise_app_exceptions,
        raise_at_exit=raise_app_exceptions,
        options=options,
    )


@asynccontextmanager
async def _running(
    app: Any,
    transport: Transport,
    *,
    raise_at_call: bool,
    raise_at_exit: bool,
    options: dict[str, Any],
) -> AsyncIterator[RunningServer]:
    """:func:`running`; the fixture raises at its teardown, not at each block's exit."""
    options.setdefault("port", 0)
    options.setdefault("access_log", False)
    config = Config(**options)
    if transport not in ("socket", "memory"):
        raise ValueError(f"transport must be 'socket' or 'memory', got {transport!r}")
    target = serve if transport == "socket" else serve_in_memory
    app_errors = _AppErrors(raise_at_call=raise_at_call)
    tagged_app = app_errors.wrap(resolve_app(app, config))

    start_error: Exception | None = None
    body_error: Exception | None = None
    # Exceptions are kept and raised after the nursery so that trio does not wrap them.
    async with trio.open_nursery() as nursery:
        try:
            server: Server = await nursery.start(
                functools.partial(target, tagged_app, config, on_app_error=app_errors.collect)
            )
        except Exception as exc:  # LifespanError / OSError, already unwrapped by start()
            start_error = exc
        else:
            handle = RunningServer(server, transport, app_errors)
            handle.http2 = options.get("http2") is True
            try:
                yield handle
            except Exception as exc:
                body_error = exc
            finally:
                await handle._close_clients()
                nursery.cancel_scope.cancel()
    if start_error is not None:
        raise start_error
    if raise_at_exit and app_errors.all:
        raise_app_errors(app_errors.all, body_error)
    if body_error is not None:
        raise body_error


def raise_app_errors(app_exceptions: list[Exception], other: Exception | None = None) -> None:
    """Raise what the app raised: a lone exception as itself, several (or one beside
    the test's own failure ``other``) in an ``ExceptionGroup``; nothing if there are none."""
    if not app_exceptions:
        return
    if len(app_exceptions) == 1 and other is None:
        raise app_exceptions[0]
    errors = [*app_exceptions, *([other] if other is not None else [])]
    raise ExceptionGroup(f"the app raised {len(app_exceptions)} exception(s) while serving", errors)


class _AppErrors:
    """What the app raised while serving, and for which of the test's requests.

    The server hands every app exception to :meth:`collect` (its ``on_app_error``): that
    list, :attr:`all`, is ``RunningServer.app_exceptions`` and is raised when the block
    ends. :meth:`wrap` puts a thin layer around the app that also files the exception
    under the request id the testing clients send in :data:`REQUEST_ID_HEADER` (and
    takes that header out of the scope: the app sees the request the test made). Both
    happen before the server answers (500, close 1011, abort), so a client that gets
    that answer can :meth:`take` the exception and raise it at the test's call; once
    taken, it is no longer raised at the block's end.
    """

    def __init__(self, *, raise_at_call: bool) -> None:
        self.all: list[Exception] = []
        self._raise_at_call = raise_at_call
        self._by_request: dict[bytes, Exception] = {}
        self._ids = itertools.count(1)

    def new_request_id(self) -> str:
        return str(next(self._ids))

    def collect(self, exc: BaseException) -> None:
        if isinstance(exc, Exception):
            self.all.append(exc)

    def take(self, request_id: str) -> Exception | None:
        """The exception the app raised for ``request_id``, to raise at the test's call.

        None if there is none, if it was not an app error the server reported (the app
        let the client's own disconnect escape) or if raising at the call is off.
        """
        exc = self._by_request.pop(request_id.encode(), None)
        if exc is None or not self._raise_at_call:
            return None
        for index, reported in enumerate(self.all):
            if reported is exc:
                del self.all[index]
                return exc
        return None

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """``app``, filing what it raises under the request id of the scope's header."""
        by_request = self._by_request

        async def tagged_app(scope: Any, receive: ASGIReceive, send: ASGISend) -> None:
            request_id = _pop_request_id(scope)
            try:
                await app(scope, receive, send)
            except Exception as exc:  # noted, then left to the server to handle as ever
                if request_id is not None:
                    by_request[request_id] = exc
                raise

        return tagged_app


_REQUEST_ID_HEADER_BYTES: Final = REQUEST_ID_HEADER.encode("latin-1")


def _pop_request_id(scope: Any) -> bytes | None:
    """Remove the testing clients' request-id header from ``scope``; return its value."""
    headers = scope.get("headers")
    if not headers:
        return None
    request_id: bytes | None = None
    kept = []
    for name, value in headers:
        if name == _REQUEST_ID_HEADER_BYTES:
            request_id = value
        else:
            kept.append((name, value))
    if request_id is not None:
        scope["headers"] = kept
    return request_id


class RunningServer:
    """What :func:`running` and the ``trioserve_server`` fixture give a test.

    Attributes:
        server: the :class:`~trioserve.Server` handle from ``serve()``.
        transport: ``"socket"`` or ``"memory"``.
        app_exceptions: what the app raised so far (re-raised at the end unless
            ``raise_app_exceptions=False``; remove the ones the test expects).
    """

    http2 = False  # the clients speak HTTP/2 (running(..., http2=True))

    def __init__(self, server: Server, transport: Transport, app_errors: _AppErrors) -> None:
        self.server = server
        self.transport = transport
        self.app_exceptions = app_errors.all
        self._app_errors = app_errors
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

        ``h11=True``: the requests go through trioserve's own h11 client over
        :meth:`open_stream` (as they always do in memory mode), which shows what httpx's
        transport drops: 1xx responses and trailer fields (see
        ``trioserve.testing.transport``).

        A request the app raised for raises the app's exception at the call (the
        response, or the broken connection, is dropped), unless ``raise_app_exceptions``
        is False. An exception the app raises only after the response was read is left
        for the end of the block.
        """
        import httpx

        address = self._address()
        transport = kwargs.pop("transport", None)
        # What httpx would have given its own default transport.
        options: dict[str, Any] = {
            key: kwargs.pop(key) for key in _TRANSPORT_OPTIONS if key in kwargs
        }
        if "trust_env" in kwargs:
            options["trust_env"] = kwargs["trust_env"]
        own_h11 = kwargs.pop("h11", False)
        if self.http2 and not own_h11:
            # HTTP/2 only: httpx would otherwise stay on HTTP/1.1 without TLS (no h2c).
            options.setdefault("http2", True)
            options.setdefault("http1", False)
        if self.transport == "memory" and options.get("http2") and not own_h11:
            transport = transport or memory_http2_transport_class()(self.server)
            kwargs.setdefault("base_url", self.url)
        elif self.transport == "memory" or own_h11:
            transport = transport or memory_transport_class()(self.server)
            kwargs.setdefault("base_url", self.url)
        elif isinstance(address, str):
            transport = transport or httpx.AsyncHTTPTransport(uds=address, **options)
            kwargs.setdefault("base_url", "http://localhost")
        else:
            transport = transport or httpx.AsyncHTTPTransport(**options)
            kwargs.setdefault("base_url", self.url)
        errors = self._app_errors
        kwargs["transport"] = app_error_transport_class()(
            transport, errors.new_request_id, errors.take
        )
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
            Exception: what the app raised for this WebSocket, from the call that found
                the connection rejected or closed (unless ``raise_app_exceptions`` is
                False; then ``WebSocketRejected`` / ``WebSocketClosed`` as the server
                answered).
        """
        request_id = self._app_errors.new_request_id()
        return open_websocket(
            self.open_stream,
            self._host(),
            path,
            tuple(subprotocols),
            (*headers, (REQUEST_ID_HEADER, request_id)),
            app_error=functools.partial(self._app_errors.take, request_id),
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
        transport = options.pop("transport", "socket")
        # Exceptions the test's calls did not raise are raised by the fixture's teardown,
        # not here: this task's failure would crash the fixture.
        async with _running(
            app,
            transport,
            raise_at_call=raise_app_exceptions,
            raise_at_exit=False,
            options=options,
        ) as server:
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
    watches the same deadline and, slightly earlier, cancels the scope it yielded in:
    pytest-trio takes that as the fixture crashing and cancels the test. Only once the
    test has ended does the fixture's teardown stop the servers (so a request the test
    was waiting on ends as cancelled, not as a connection closed under it) and raise this.
    """


async def _watchdog(delay: float, fixture_scope: trio.CancelScope) -> None:
    """Cancel ``fixture_scope`` after ``delay`` seconds of *real* time.

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
    fixture_scope.cancel()


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
            # The watchdog cancels only this scope (the fixture's wait for the test), not
            # the servers: they are stopped by the teardown, after the test has ended.
            with trio.CancelScope() as fixture_scope:
                if timeout is not None:
                    deadline, seconds = timeout
                    # Leave time for teardown (lifespan shutdown is bounded by 5 s by default).
                    delay = deadline - time.monotonic() - min(5.0, seconds * 0.2)
                    nursery.start_soon(_watchdog, max(delay, 0.0), fixture_scope)
                try:
                    yield factory
                finally:
                    nursery.cancel_scope.cancel()
        timed_out: PytestTimeoutNear | None = None
        if fixture_scope.cancel_called and timeout is not None:
            timed_out = PytestTimeoutNear(
                f"the test is about to exceed its pytest-timeout of {timeout[1]:g}s: "
                "cancelled so that its trioserve servers shut down cleanly"
            )
        raise_app_errors(factory.app_exceptions(), timed_out)
        if timed_out is not None:
            raise timed_out
