"""The httpx transports of :mod:`trioserve.testing`.

- The in-memory transport (``transport="memory"``): each request opens one memory-stream
  connection to the server (:meth:`trioserve.Server.open_stream`), written and parsed with
  an h11 client. It also shows what httpx's own transport drops (``server.client(h11=True)``
  uses it over a real socket too): the interim responses, 103 Early Hints among them, as
  ``response.extensions["informational_responses"]`` (a list of ``(status, headers)``) and
  the trailer fields, as ``response.extensions["trailers"]`` (a list of ``(name, value)``,
  filled once the body has been read; send ``TE: trailers`` to get any).
- The app-error transport, around the transport of every ``server.client()``: it tags
  each request with :data:`REQUEST_ID_HEADER` and raises the app's exception for that
  request at the test's call.

httpx is a test dependency, not one of trioserve: it is imported when a transport class
is first built.
"""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final

import h11
import trio

if TYPE_CHECKING:
    import httpx

    from ..server import Server

RECEIVE_SIZE: Final = 64 * 1024
# The header the testing clients number their requests with (the app never sees it).
REQUEST_ID_HEADER: Final = "x-trioserve-testing-request"


@functools.cache
def app_error_transport_class() -> Callable[
    [httpx.AsyncBaseTransport, Callable[[], str], Callable[[str], Exception | None]],
    httpx.AsyncBaseTransport,
]:
    """The transport that raises the app's exception at the call (built on first use)."""
    import httpx

    class AppErrorStream(httpx.AsyncByteStream):
        """A response body; a broken connection or its end raises the app's exception."""

        def __init__(
            self, inner: httpx.AsyncByteStream, take: Callable[[], Exception | None]
        ) -> None:
            self._inner = inner
            self._take = take

        async def __aiter__(self) -> AsyncIterator[bytes]:
            # Raised outside the except clause, so the app's exception keeps its own
            # __context__ (a raise inside one would replace it).
            failure: httpx.TransportError | None = None
            try:
                async for chunk in self._inner:
                    yield chunk
            except httpx.TransportError as exc:
                failure = exc
            if failure is not None:
                app_error = self._take()
                raise failure if app_error is None else app_error

        async def aclose(self) -> None:
            await self._inner.aclose()
            app_error = self._take()
            if app_error is not None:
                raise app_error

    class AppErrorTransport(httpx.AsyncBaseTransport):
        """Wraps ``inner``: numbers each request (``new_id``) in :data:`REQUEST_ID_HEADER`
        and raises what ``take(id)`` returns, the app's exception for that request, as
        soon as the answer (head, body end or broken connection) shows it."""

        def __init__(
            self,
            inner: httpx.AsyncBaseTransport,
            new_id: Callable[[], str],
            take: Callable[[str], Exception | None],
        ) -> None:
            self._inner = inner
            self._new_id = new_id
            self._take = take

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            request_id = self._new_id()
            request.headers[REQUEST_ID_HEADER] = request_id
            failure: httpx.TransportError | None = None
            try:
                response = await self._inner.handle_async_request(request)
            except httpx.TransportError as exc:
                failure = exc
            if failure is not None:
                app_error = self._take(request_id)
                raise failure if app_error is None else app_error
            app_error = self._take(request_id)
            if app_error is not None:  # it raised before (or while) answering: a 500
                await response.aclose()
                raise app_error
            assert isinstance(response.stream, httpx.AsyncByteStream)
            response.stream = AppErrorStream(
                response.stream, functools.partial(self._take, request_id)
            )
            return response

        async def aclose(self) -> None:
            await self._inner.aclose()

    return AppErrorTransport


@functools.cache
def memory_transport_class() -> Callable[[Server], httpx.AsyncBaseTransport]:
    """The httpx transport of in-memory mode (built on first use: httpx is optional)."""
    import httpx

    class MemoryResponseStream(httpx.AsyncByteStream):
        def __init__(
            self,
            conn: h11.Connection,
            stream: trio.abc.HalfCloseableStream,
            trailers: list[tuple[bytes, bytes]],
        ) -> None:
            self._conn = conn
            self._stream = stream
            self._trailers = trailers

        async def __aiter__(self) -> AsyncIterator[bytes]:
            while True:
                try:
                    event = await _next_client_event(self._conn, self._stream)
                except h11.RemoteProtocolError as exc:
                    raise httpx.RemoteProtocolError(str(exc)) from exc
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    self._trailers += event.headers.raw_items()
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
            interim: list[tuple[int, list[tuple[bytes, bytes]]]] = []
            try:
                response = await self._exchange(conn, stream, request, interim)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            trailers: list[tuple[bytes, bytes]] = []
            return httpx.Response(
                status_code=response.status_code,
                headers=list(response.headers),
                stream=MemoryResponseStream(conn, stream, trailers),
                extensions={
                    "http_version": b"HTTP/1.1",
                    "reason_phrase": response.reason,
                    "informational_responses": interim,
                    "trailers": trailers,
                },
            )

        async def _exchange(
            self,
            conn: h11.Connection,
            stream: trio.abc.Stream,
            request: httpx.Request,
            interim: list[tuple[int, list[tuple[bytes, bytes]]]],
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
                if isinstance(event, h11.InformationalResponse):
                    interim.append((event.status_code, event.headers.raw_items()))
                else:
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


@functools.cache
def memory_http2_transport_class() -> Callable[[Server], httpx.AsyncBaseTransport]:
    """The httpx transport of in-memory mode with ``http2=True``: httpx's own HTTP/2
    client (httpcore, prior knowledge) over memory-stream connections to the server.

    httpcore takes a network backend; this one's "connections" are
    :meth:`trioserve.Server.open_stream`. (httpx does not expose the backend, so the
    transport's connection pool is replaced: httpx's ``_pool``, stable since 0.18.)
    """
    import httpcore
    import httpx

    class MemoryNetworkStream(httpcore.AsyncNetworkStream):
        def __init__(self, stream: trio.abc.Stream) -> None:
            self._stream = stream

        async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            with trio.fail_after(math.inf if timeout is None else timeout):
                try:
                    return bytes(await self._stream.receive_some(max_bytes))
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise httpcore.ReadError(str(exc)) from exc

        async def write(self, buffer: bytes, timeout: float | None = None) -> None:
            with trio.fail_after(math.inf if timeout is None else timeout):
                try:
                    await self._stream.send_all(buffer)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise httpcore.WriteError(str(exc)) from exc

        async def aclose(self) -> None:
            await trio.aclose_forcefully(self._stream)

        def get_extra_info(self, info: str) -> Any:
            return None

    class MemoryNetworkBackend(httpcore.AsyncNetworkBackend):
        def __init__(self, server: Server) -> None:
            self._server = server

        async def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
            try:
                return MemoryNetworkStream(await self._server.open_stream())
            except OSError as exc:
                raise httpcore.ConnectError(str(exc)) from exc

        async def sleep(self, seconds: float) -> None:
            await trio.sleep(seconds)

    class MemoryHTTP2Transport(httpx.AsyncHTTPTransport):
        def __init__(self, server: Server) -> None:
            super().__init__(http1=False, http2=True)
            self._pool = httpcore.AsyncConnectionPool(
                http1=False, http2=True, network_backend=MemoryNetworkBackend(server)
            )

    return MemoryHTTP2Transport
