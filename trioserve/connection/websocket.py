"""The task serving an upgraded WebSocket connection (layer 4).

:class:`WebSocketConnection` takes over a connection whose request asked for a WebSocket
upgrade, handed over by ``connection.http1`` as a :class:`WebSocketHandoff` (the stream,
the bytes already read, the connection facts). It answers the handshake with wsproto's
``H11Handshake`` (set up from the already-parsed request with
``initiate_upgrade_connection``), then speaks WebSocket through the engine ``--ws`` chose
(``protocol.ws_engine``: wsproto or websockets, one interface), runs the app call
in a task of the session's nursery, and closes the WebSocket within a bound however the
app, the peer or the server ends it.

What does not depend on the carrier of the handshake is :class:`WebSocketSession`'s (the
app's receive and send, the accept, the denial response, closing, keepalive): an HTTP/2
stream carries a WebSocket too (RFC 8441, ``connection.http2_websocket``), its DATA frames
being the bytes (a ``stream.ByteStream``) and its answer 200 instead of 101.

Task tree (everything inside ``run()``'s nursery)::

    HTTPConnection task ── WebSocketConnection.run()
        ├── _run_app          the app call (receive() reads, send() writes), then the
        │                     close; a task of its own: its stack is what every message
        │                     crosses twice on its way to the scheduler, and the
        │                     connection task's (server, HTTP/1.1, upgrade) is deep
        ├── Outbox.run        writes what the socket did not take at once (backpressure)
        ├── _watch            reads for an app that stays away from receive(); close and
        │                     failure deadlines
        └── _keepalive        pings every --ws-ping-interval, drops a silent peer

Reading (and the watcher) is ``connection.ws_reader``'s; writing, one writer at a time
without locks, is ``connection.ws_outbox``'s: every producer hands its bytes to the
``Outbox`` synchronously. The app's ``send()`` writes the frame to the socket at once when
nothing else is queued. The one write outside the outbox is the 400 answer to an invalid
upgrade, made by the connection task before any other task exists.

Closing
-------
Every close we start (app ``websocket.close``, app return → 1000, app error → 1011, drain →
1012) sets the close deadline to now + :data:`CLOSE_TIMEOUT`: a peer that never answers the
Close frame cannot keep the connection (``_watch`` ends a read still waiting then). A
peer's Close is answered at once (RFC 6455 §5.5.1). A failed connection (1002, 1007, 1009)
sends its Close once the app has read the messages before the bad frame
(``ws_reader.FAILURE_CLOSE_DELAY`` at the latest).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol

import h11
import trio
from typing_extensions import assert_never
from wsproto import ConnectionType
from wsproto.events import AcceptConnection
from wsproto.extensions import Extension
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from ..app.call import call_app
from ..compiled import mypyc_attr
from ..errors import ClientDisconnected
from ..protocol.http1_messages import ResponseWriter, error_response
from ..protocol.http1_parser import HTTPParser
from ..protocol.scope import ConnectionFacts, http_scope, websocket_scope
from ..protocol.ws_deflate import BoundedPerMessageDeflate
from ..protocol.ws_engine import Closed
from ..protocol.ws_messages import (
    CLOSE_ABNORMAL,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_SERVICE_RESTART,
    Accept,
    AppMessage,
    AppMessages,
    Close,
    CloseKind,
    Phase,
    ResponseBody,
    ResponseStart,
    Send,
    handshake_headers,
    message_data,
)
from .state import ServerState, log_access
from .stream import ByteStream, ConnectionStream
from .ws_outbox import Outbox
from .ws_reader import WebSocketReader

logger = logging.getLogger(__name__)

Header = tuple[bytes, bytes]

# How long we wait for the peer's answer to our Close frame (and for our last bytes to
# leave) before dropping the TCP connection.
CLOSE_TIMEOUT: Final = 5.0
# A dropped (keepalive-timed-out) peer gets this long to take our Close frame.
ABORT_FLUSH_TIMEOUT: Final = 1.0

_ACCEPTED: Final = Phase.ACCEPTED  # (bound once: a member lookup on an enum class is dear)


@dataclass(frozen=True, slots=True)
class WebSocketHandoff:
    """What an HTTP/1.1 connection hands a WebSocket session (``connection.http1``)."""

    stream: ConnectionStream  # I/O, linger/abort, peer; the HTTP connection still closes it
    facts: ConnectionFacts  # for the scope
    state: ServerState  # app, config, lifespan state, response headers, access log
    request: h11.Request  # target and headers for wsproto's initiate_upgrade_connection
    headers: list[tuple[bytes, bytes]]  # the request's header list (made once)
    received: bytes  # bytes that arrived after the request head: the first frames, if the
    eof: bool  # client did not wait for the 101 (nothing else reads until the accept)
    parser: HTTPParser  # only for HTTP answers before the accept: 400, 403, 500, denial


class DenialWriter(Protocol):
    """The response state machine of a denial response (``websocket.http.response``):
    HTTP/1.1's ``ResponseWriter``, or ``http2_websocket``'s for an HTTP/2 stream."""

    @property
    def status(self) -> int | None: ...
    @property
    def body_bytes(self) -> int: ...
    @property
    def started(self) -> bool: ...

    def start(self, message: Mapping[str, object], *, close: bool = False) -> object: ...
    def body(self, message: Mapping[str, object]) -> bytes: ...


# (Compiled, a native class: http2_websocket's H2WebSocket, interpreted, subclasses it.)
@mypyc_attr(allow_interpreted_subclasses=True)
class WebSocketSession(WebSocketReader):
    """One WebSocket session, from its handshake request to its close, whatever carried
    the handshake (see the module docstring).

    A subclass knows the carrier: it checks the handshake request and builds the scope,
    then calls :meth:`_serve`, and it answers the handshake
    (:meth:`_handshake_answer`, :meth:`_error_answer`, :meth:`_denial_writer`).

    Args:
        stream: the bytes the WebSocket's frames travel in.
        state: the server's shared state.
    """

    # The status of an accepted handshake, for the access line.
    ACCEPT_STATUS: ClassVar[int] = 101

    def __init__(self, stream: ByteStream, state: ServerState) -> None:
        self._stream = stream
        self._state = state
        config = state.config
        self._outbox = Outbox(stream, self._stop_reading)
        super().__init__(stream, self._outbox, config.ws_max_size, config.ws_max_queue)
        self._app_messages = AppMessages(())
        self._response: DenialWriter | None = None
        # The handshake: resolved by an accept or by any HTTP answer.
        self._handshake_done = trio.Event()
        self._accepted = False
        self._connect_delivered = False
        self._scope: dict[str, Any] = {}
        self._start_time = time.perf_counter() if self._state.access_log_enabled() else 0.0
        self._draining = False
        # Keepalive.
        self._ping_payload = b""
        self._pong = trio.Event()

    # -- what the carrier supplies --------------------------------------------------------

    def _handshake_answer(
        self, subprotocol: str | None, extensions: list[Extension], headers: list[Header]
    ) -> bytes:
        """Accept the handshake (negotiating ``extensions``); the bytes to write."""
        raise NotImplementedError

    def _error_answer(self, status: int) -> bytes:
        """The server's own refusal of the handshake (403, 500); the bytes to write."""
        raise NotImplementedError

    def _denial_writer(self) -> DenialWriter:
        """The writer of the app's denial response (``websocket.http.response``)."""
        raise NotImplementedError

    # -- the session ------------------------------------------------------------------------

    async def _serve(self, scope: dict[str, Any]) -> None:
        """Run the app on ``scope`` with the session's I/O tasks beside it; return once
        the app has returned and the WebSocket is closed (bounded: see :meth:`run`)."""
        self._scope = scope
        state = self._state
        config = state.config
        self._app_messages = AppMessages(scope["subprotocols"])
        try:
            async with trio.open_nursery() as io:
                io.start_soon(self._outbox.run)
                io.start_soon(self._watch)
                if config.ws_ping_interval:
                    io.start_soon(self._keepalive, config.ws_ping_interval, config.ws_ping_timeout)
                io.start_soon(self._run_app, io.cancel_scope)
        finally:
            if self._accepted and state.metrics is not None:
                state.metrics.websockets_in_flight -= 1  # (counted in by _accept)

    async def _run_app(self, io: trio.CancelScope) -> None:
        """The app call, then the end of the session (``io``: the session's tasks).

        (A task of its own rather than the connection's: see the module docstring.)
        """
        state = self._state
        app_exc = await call_app(state.app, self._scope, self.receive, self.send)
        if app_exc is not None:
            state.report_app_error(app_exc)
        await self._after_app(app_exc)
        io.cancel()

    async def _after_app(self, exc: Exception | None) -> None:
        """The app returned (or raised): end the handshake or the WebSocket, bounded."""
        app_failed = exc is not None and not isinstance(exc, ClientDisconnected)
        if self._accepted:
            self._send_failure()
            self._start_close(CLOSE_INTERNAL_ERROR if app_failed else CLOSE_NORMAL)
            await self._finish_reading()  # bounded by the close deadline
        elif self._handshake_done.is_set():
            pass  # refused with 403 or the app's complete denial response
        elif self._response is not None and self._response.started:
            if exc is None:
                logger.error("ASGI callable returned without completing response")
            self._stream.abort_on_close()  # a truncated denial response: abort the connection
            self._outbox.give_up()
        else:
            if exc is None:
                logger.error("ASGI callable returned without sending handshake")
            self._answer_http(500)
        self._handshake_done.set()
        await self._outbox.flush(CLOSE_TIMEOUT)
        if not self._outbox.gone:
            self._stream.linger_on_close()

    # -- the app's receive and send -------------------------------------------------------

    async def send(self, message: Any) -> None:
        """The app's ``send``: validate, write (or queue) the bytes, wait for room.

        Raises:
            AppProtocolError: invalid or out-of-order message.
            ClientDisconnected: ``websocket.send`` after the WebSocket closed or the peer
                left (ASGI spec 2.4).
        """
        if (
            type(message) is dict
            and message.get("type") == "websocket.send"
            and self._app_messages.phase is _ACCEPTED
        ):
            # A message on an open WebSocket, the common case, checked here without
            # AppMessages.next's dispatch (the same checks).
            data = message.get("text")
            if type(data) is not str or message.get("bytes") is not None:
                data = message_data(message)
        else:
            action = self._app_messages.next(message)
            if type(action) is not Send:
                await self._send_other(action)
                return
            data = action.data
        outbox = self._outbox
        engine = self.engine
        if outbox.gone or not engine.open:
            raise ClientDisconnected(f"{self._stream.peer} WebSocket is closed")
        frame = engine.send_message(data)
        if not outbox.send(frame):
            await outbox.wait_below()
        elif self._stream.owes_yield(len(frame)):
            # Fairness: an app sending faster than anything else lets the other tasks run
            # (once per stream.FAIR_SHARE_BYTES written without waiting).
            await trio.lowlevel.cancel_shielded_checkpoint()
        if outbox.gone:
            raise ClientDisconnected(f"{self._stream.peer} disconnected")

    async def _send_other(self, action: AppMessage) -> None:
        """``send()`` of anything but a message (accept, close, a denial response)."""
        match action:
            case Send():
                raise AssertionError("send() sends the messages")
            case Accept():
                self._accept(action)
                await self._outbox.wait_below()
            case Close(code=code, reason=reason):
                if self._app_messages.phase is Phase.REJECTED:
                    self._answer_http(403)  # close before accept (ASGI spec)
                else:
                    self._start_close(code, reason)
                await self._outbox.wait_below()
            case ResponseStart(message=start):
                self._response = self._denial_writer()
                self._response.start(start, close=True)
            case ResponseBody(message=body, last=last):
                assert self._response is not None
                data = self._response.body(body)
                if last:
                    response = self._response
                    self._log_handshake(response.status or 0, response.body_bytes)
                    self._stream.linger_on_close()
                    self._handshake_done.set()
                self._outbox.send(data)
                await self._outbox.wait_below()
            case _:
                assert_never(action)

    def _accept(self, action: Accept) -> None:
        state = self._state
        names = {name.lower() for name, _ in action.headers}
        headers = action.headers + [
            header for header in state.response_headers() if header[0] not in names
        ]
        config = state.config
        deflate = None
        if config.ws_per_message_deflate:
            deflate = BoundedPerMessageDeflate(config.ws_max_size)
        extensions: list[Extension] = [deflate] if deflate is not None else []
        handshake = self._handshake_answer(action.subprotocol, extensions, headers)
        if deflate is not None and deflate.enabled():
            deflate.accept_any_client_window()
        else:
            deflate = None
        self.engine = state.new_ws_engine(config.ws_max_size, deflate)
        self._accepted = True
        if state.metrics is not None:
            state.metrics.websocket_sessions += 1
            state.metrics.websockets_in_flight += 1
        self._log_handshake(self.ACCEPT_STATUS)
        self._handshake_done.set()
        self._outbox.send(handshake)
        self._arm_idle_check()
        if self._draining:
            self._start_close(CLOSE_SERVICE_RESTART)

    def _answer_http(self, status: int) -> None:
        """Refuse the handshake with a plain HTTP response (403 or 500)."""
        data = self._error_answer(status)
        if data:
            self._log_handshake(status)
            self._outbox.send(data)
        self._stream.linger_on_close()
        self._handshake_done.set()

    def _log_handshake(self, status: int, body_bytes: int = 0) -> None:
        """The access line of the handshake: 101, 403, 400, 500 or the app's denial status."""
        if self._start_time:
            log_access(
                self._state,
                self._scope,
                status,
                body_bytes,
                time.perf_counter() - self._start_time,
            )

    # -- closing --------------------------------------------------------------------------

    def drain(self) -> None:
        """Graceful shutdown: close with 1012 now (or right after the accept)."""
        self._draining = True
        if self._accepted:
            self._start_close(CLOSE_SERVICE_RESTART)

    def _start_close(self, code: int, reason: str = "") -> None:
        """Send our Close frame if the WebSocket is open; bound the wait for the answer."""
        if self.engine.open and not self._outbox.gone:
            self._outbox.send(self.engine.send_close(code, reason))
            deadline = trio.current_time() + CLOSE_TIMEOUT
            if deadline < self._close_deadline:
                self._close_deadline = deadline
                if self._read_cancel is not None:
                    self._read_cancel.deadline = min(self._read_cancel.deadline, deadline)
                self._rewatch()

    def _send_failure(self) -> None:
        if self._failure is not None:
            code, reason = self._failure
            self._failure = None
            self._failure_deadline = math.inf
            self._start_close(code, reason)

    async def _abort(self, code: int, reason: str) -> None:
        """Drop the peer now: a last Close frame (briefly), then an abortive close."""
        self._set_disconnect(code, reason)
        self._start_close(code, reason)
        self._stop_reading()
        await self._outbox.flush(ABORT_FLUSH_TIMEOUT)
        self._outbox.give_up()
        await self._stream.abort()

    def _on_close(self, event: Closed) -> None:
        kind = event.kind
        if kind is CloseKind.PEER_CLOSING:
            # RFC 6455 §5.5.1: answer with a Close frame, echoing the status code.
            self._outbox.send(event.reply)
            self._set_disconnect(event.code, event.reason)
        elif kind is CloseKind.HANDSHAKE_DONE:
            self._set_disconnect(event.code, event.reason)
        elif kind is CloseKind.LOST:
            logger.debug("%s - WebSocket peer closed the connection", self._stream.peer)
            self._set_disconnect(CLOSE_ABNORMAL)
        else:
            self._fail(event.code, event.reason)

    def _on_pong(self, payload: bytes) -> None:
        if self._ping_payload and payload == self._ping_payload:
            self._pong.set()

    # -- keepalive ------------------------------------------------------------------------

    async def _keepalive(self, interval: float, timeout: float | None) -> None:
        """Ping every ``interval``; drop the peer if a pong takes longer than ``timeout``."""
        await self._handshake_done.wait()
        if not self._accepted:
            return
        while True:
            await trio.sleep(interval)
            if self._outbox.gone or not self.engine.open:
                return
            self._ping_payload = os.urandom(4)
            self._pong = trio.Event()
            self._outbox.send(self.engine.send_ping(self._ping_payload))
            if not timeout:
                continue
            with trio.move_on_after(timeout):
                await self._pong.wait()
            if self._pong.is_set():
                continue
            if self._outbox.gone or not self.engine.open:
                return
            logger.info(
                "%s - WebSocket keepalive ping not answered within %.1fs, dropping the peer",
                self._stream.peer,
                timeout,
            )
            await self._abort(CLOSE_INTERNAL_ERROR, "keepalive ping timeout")
            return


class WebSocketConnection(WebSocketSession):
    """Serve one WebSocket upgrade on an accepted HTTP/1.1 connection (wsproto's
    ``H11Handshake`` answers it with 101).

    Args:
        handoff: the upgrade request and the connection it arrived on.
    """

    def __init__(self, handoff: WebSocketHandoff) -> None:
        super().__init__(handoff.stream, handoff.state)
        self.handoff = handoff
        self._connection_stream = handoff.stream
        self._handshake = H11Handshake(ConnectionType.SERVER)

    async def run(self) -> None:
        """Serve the upgrade until the app has returned and the WebSocket is closed.

        Returns within :data:`CLOSE_TIMEOUT` (plus the write of our last bytes, equally
        bounded) of the app returning. The stream itself is closed by the caller.

        Cancellation: the app call and the I/O tasks are cancelled together.
        """
        handoff = self.handoff
        state = self._state
        config = state.config
        request = handoff.request
        target, version, headers = request.target, request.http_version, handoff.headers
        # (The handshake's access line, should it be refused right here.)
        self._scope = http_scope(b"GET", target, version, headers, handoff.facts, None)
        try:
            self._handshake.initiate_upgrade_connection(
                handshake_headers(
                    request.headers, per_message_deflate=config.ws_per_message_deflate
                ),
                request.target,
            )
            for _ in self._handshake.events():  # the Request: wsproto keeps what it needs
                pass
        except (RemoteProtocolError, h11.LocalProtocolError, ValueError) as exc:
            await self._reject_upgrade(exc)
            return
        await self._serve(
            websocket_scope(target, version, headers, handoff.facts, state.lifespan_state)
        )

    async def _reject_upgrade(self, exc: Exception) -> None:
        """Answer an invalid upgrade request with 400 (the peer's fault, INFO)."""
        logger.info("%s - invalid WebSocket upgrade request: %s (400)", self._stream.peer, exc)
        if self._state.metrics is not None:
            self._state.metrics.protocol_error(400)
        extra: tuple[tuple[bytes, bytes], ...] = ()
        if isinstance(exc, RemoteProtocolError) and "Version" in str(exc):
            # RFC 6455 §4.2.2: tell the client which version we speak.
            extra = ((b"sec-websocket-version", b"13"),)
        self._log_handshake(400)
        state = self._state
        data = error_response(self.handoff.parser, 400, extra + state.response_headers())
        await self._connection_stream.send_last(data, state.config.timeout_request_header)

    def _handshake_answer(
        self, subprotocol: str | None, extensions: list[Extension], headers: list[Header]
    ) -> bytes:
        handoff = self.handoff
        self._unread += handoff.received  # bytes that arrived with the handshake
        self._eof = handoff.eof
        return self._handshake.send(
            AcceptConnection(subprotocol=subprotocol, extensions=extensions, extra_headers=headers)
        )

    def _error_answer(self, status: int) -> bytes:
        return error_response(self.handoff.parser, status, self._state.response_headers())

    def _denial_writer(self) -> DenialWriter:
        state = self._state
        return ResponseWriter(
            self.handoff.parser, b"GET", state.response_headers(), state.response_heads
        )
