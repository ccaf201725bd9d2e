"""The WebSocket client of :mod:`trioserve.testing` (built on wsproto; no trioserve imports).

:meth:`trioserve.testing.RunningServer.websocket` opens one with :func:`open_websocket`;
tests use :class:`WebSocketClient` and catch :class:`WebSocketClosed` /
:class:`WebSocketRejected`, all importable from ``trioserve.testing``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

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

RECEIVE_SIZE: Final = 64 * 1024
# The closing handshake of the WebSocket client waits this long for the server's answer.
WS_CLOSE_TIMEOUT: Final = 5.0


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
async def open_websocket(
    open_stream: Callable[[], Awaitable[trio.abc.HalfCloseableStream]],
    host: str,
    path: str,
    subprotocols: tuple[str, ...],
    headers: tuple[tuple[str | bytes, str | bytes], ...],
    *,
    app_error: Callable[[], Exception | None] | None = None,
) -> AsyncIterator[WebSocketClient]:
    """Open a stream, do the WebSocket handshake on it, and close it when the block ends.

    This is what :meth:`trioserve.testing.RunningServer.websocket` returns.

    Args:
        app_error: asked when the server rejects or closes the WebSocket; an exception
            it returns (what the app raised) is raised instead of
            :class:`WebSocketRejected` / :class:`WebSocketClosed`.

    Raises:
        WebSocketRejected: the server answered the handshake with an HTTP response.
    """
    stream = await open_stream()
    ws = WebSocketClient(stream, app_error=app_error)
    try:
        await ws._handshake(host, path, subprotocols, headers)
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

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        *,
        app_error: Callable[[], Exception | None] | None = None,
    ) -> None:
        self._stream = stream
        self._app_error = app_error
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
            rejected = WebSocketRejected(event.status_code, list(event.headers), body)
            raise self._failure(rejected)
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
        try:
            return await self._receive()
        except WebSocketClosed as exc:
            failure = exc
        raise self._failure(failure)

    async def _receive(self) -> str | bytes:
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
            raise self._failure(WebSocketClosed(self.close_code or 1006, self.close_reason))
        try:
            await self._write(self._ws.send(event))
            return
        except WebSocketClosed as exc:
            failure = exc
        raise self._failure(failure)

    def _failure(self, exc: WebSocketClosed | WebSocketRejected) -> Exception:
        """What to raise for ``exc``: the app's own exception, if it raised one.

        Raise the result outside any ``except`` clause: raising inside one would replace
        the app exception's ``__context__``.
        """
        app_error = self._app_error() if self._app_error is not None else None
        return exc if app_error is None else app_error

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
