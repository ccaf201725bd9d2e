"""The task serving an upgraded WebSocket connection (layer 3).

:class:`WebSocketConnection` takes over a connection whose request asked for a WebSocket
upgrade. It owns the ``wsproto.WSConnection`` (set up from the already-parsed request with
``initiate_upgrade_connection``), runs the app call in the connection task itself, and
closes the WebSocket within a bound however the app, the peer or the server ends it.

Task tree (everything inside ``run()``'s nursery)::

    HTTPConnection task ── WebSocketConnection.run()
        ├── app call          (in the connection task: receive() reads, send() writes)
        ├── _write_loop       writes what the socket did not take at once (backpressure)
        ├── _watch            reads for an app that stays away from receive(); close and
        │                     failure deadlines
        └── _keepalive        pings every --ws-ping-interval, drops a silent peer

A message costs one task switch
-------------------------------
As on the HTTP path, the app's ``receive()`` reads the socket on demand: it waits until
the socket is readable (the peer usually answers what the app just sent), reads, and
decodes (wsproto) in the app's own task. The app's ``send()`` writes the frame to the
socket at once when nothing else is queued.

Reading when the app does not
-----------------------------
Pings must be answered and a peer's Close seen even while the app is busy elsewhere (an
app that only sends). ``_watch`` wakes :data:`IDLE_READ_DELAY` after the app left
``receive()``; if the app has not been back since, it becomes the reader, queueing up to
``--ws-max-queue`` messages for the app and then stopping: TCP then pushes back on the
peer instead of memory growing. Only one task ever reads: an app calling ``receive()``
while ``_watch`` reads waits for it to hand the reader role back after its next read.

One writer at a time, without locks
-----------------------------------
Several parties produce bytes: the app (messages, close, denial responses), the reader
(pongs, close replies), the keepalive task (pings) and the server (drain: close 1012). All
of them produce bytes *synchronously* (wsproto, or h11 for plain HTTP answers) and hand
them to :meth:`WebSocketConnection._send_bytes`, which writes them to the socket without
waiting when nothing is queued, and otherwise appends them to the ``outbox`` that only
``_write_loop`` writes with ``send_all``. Consequences:

* bytes leave in exactly the order they were produced, which permessage-deflate's shared
  compressor and the close handshake both depend on;
* wsproto's state never changes across an ``await``, so it stays truthful;
* a cancelled app never leaves a frame half-written: its writes never wait;
* backpressure is explicit: the app's ``send()`` waits while more than
  :data:`OUTBOX_HIGH_WATER` bytes are unsent, and reading pauses while more than
  :data:`READER_PAUSE_OUTBOX` are (a peer that floods pings but never reads cannot make us
  buffer pongs without bound).

The one write outside this scheme is the 400 answer to an invalid upgrade, made by the
connection task before any other task exists.

Closing
-------
Every close we start (app ``websocket.close``, app return → 1000, app error → 1011, drain →
1012) sets the close deadline to now + :data:`CLOSE_TIMEOUT`: a peer that never answers the
Close frame cannot keep the connection (``_watch`` ends a read still waiting then). A
peer's Close is answered at once (RFC 6455 §5.5.1). A frame wsproto rejects (1002, 1007) or
a message over ``--ws-max-size`` (1009) fails the connection (§7.1.7): the messages
received before it are still delivered, and the Close frame is sent once the app has read
them (so its replies to them are not lost), or after :data:`FAILURE_CLOSE_DELAY` at the
latest.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import h11
import trio
from typing_extensions import assert_never
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol
from wsproto.utilities import RemoteProtocolError

from ..app.call import call_app
from ..errors import ClientDisconnected
from ..protocol.http1_messages import ResponseWriter, build_http_scope, error_response
from ..protocol.ws_messages import (
    CLOSE_ABNORMAL,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_SERVICE_RESTART,
    CLOSE_TOO_BIG,
    Accept,
    AppMessages,
    Close,
    CloseKind,
    MessageAssembler,
    MessageTooBigError,
    Phase,
    ResponseBody,
    ResponseStart,
    Send,
    build_websocket_scope,
    classify_close,
    connect_message,
    disconnect_message,
    handshake_headers,
)
from .state import log_access

if TYPE_CHECKING:
    from .http1 import HTTPConnection

logger = logging.getLogger(__name__)

# How long we wait for the peer's answer to our Close frame (and for our last bytes to
# leave) before dropping the TCP connection.
CLOSE_TIMEOUT: Final = 5.0
# After a protocol failure, how long the Close frame waits for the app to read the
# messages that arrived before the bad frame.
FAILURE_CLOSE_DELAY: Final = 1.0
# A dropped (keepalive-timed-out) peer gets this long to take our Close frame.
ABORT_FLUSH_TIMEOUT: Final = 1.0
# The app's send() returns once at most this many bytes are still unsent.
OUTBOX_HIGH_WATER: Final = 64 * 1024
# The reader pauses while this many bytes are unsent.
READER_PAUSE_OUTBOX: Final = 1024 * 1024
# An app that has stayed away from receive() this long gets a reader of its own.
IDLE_READ_DELAY: Final = 0.25
# Fairness: an app sending faster than anything else lets the other tasks run once per
# this many bytes written without waiting.
WRITE_YIELD_BYTES: Final = 64 * 1024


class BoundedPerMessageDeflate(PerMessageDeflate):
    """wsproto's permessage-deflate, never inflating a message past ``--ws-max-size``.

    wsproto (1.x) inflates each received chunk of a compressed frame whole, with zlib's
    ``decompress`` and no ``max_length``: deflate reaches ~1000:1, so one 64 KiB read of a
    crafted message would become ~64 MiB before :class:`MessageAssembler` could count it.
    Here every chunk is inflated to at most the room left in the message plus one byte;
    reaching that byte fails the connection with 1009 at once, so no message ever holds
    more than ``max_size + 1`` inflated bytes. (This overrides wsproto's payload hook and
    reads its decompression state; tests/test_websocket_wire.py pins the behaviour.)
    """

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self._max_size = max_size
        self._inflated = 0  # bytes inflated so far in the current message

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        room = self._max_size - self._inflated
        try:  # max_length >= 1 (0 would mean "unbounded")
            inflated = self._decompressor.decompress(bytes(data), room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if len(inflated) > room:
            return CloseReason.MESSAGE_TOO_BIG
        self._inflated += len(inflated)
        return inflated

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if fin:
            self._inflated = 0
        return super().frame_inbound_complete(proto, fin)


class WebSocketConnection:
    """Serve one WebSocket upgrade on an accepted HTTP connection.

    Args:
        http: the connection the upgrade request arrived on; its stream, its ``parser``
            (whose ``trailing_data`` holds bytes already received after the
            request head: the first frames, if the client did not wait for the 101) and its
            write/read helpers are used.
        request: the upgrade request.
    """

    def __init__(self, http: HTTPConnection, request: h11.Request) -> None:
        self.http = http
        self.request = request
        self.ws = WSConnection(ConnectionType.SERVER)
        config = http.state.config
        self._assembler = MessageAssembler(config.ws_max_size)
        self._app_messages = AppMessages(())
        self._response: ResponseWriter | None = None
        stream = http.stream
        # The socket's descriptor for writes that never wait; -1 for other streams (TLS,
        # PROXY-protocol wrappers), whose bytes all go through _write_loop.
        self._fd = stream.socket.fileno() if type(stream) is trio.SocketStream else -1
        # The outbox (see the module docstring).
        self._outbox = bytearray()
        self._in_flight = 0
        self._has_output = trio.Event()
        self._written = trio.Event()  # replaced after every completed (or failed) write
        self._written_since_yield = 0
        self._gone = False  # the transport is unusable: send() raises ClientDisconnected
        # The handshake: resolved by an accept or by any HTTP answer.
        self._handshake_done = trio.Event()
        self._accepted = False
        self._connect_delivered = False
        self._scope: dict[str, Any] = {}
        self._start_time = time.perf_counter() if http.state.access_log_enabled() else 0.0
        # Reading (see the module docstring).
        self._unread = bytearray()  # received, not yet handed to wsproto
        self._events: Iterator[Event] | None = None  # a wsproto events() not yet exhausted
        self._inbox: deque[dict[str, Any]] = deque()  # messages ready for the app
        self._max_queue = config.ws_max_queue
        self._eof = False  # the peer closed its side (or the read failed)
        self._read_done = False  # no more reading: close, EOF, failure, timeout or drop
        self._reading = False  # a read is in progress (the app's or _watch's)
        # Around _watch's reads, or a read on a stream other than a plain socket.
        self._read_cancel: trio.CancelScope | None = None
        self._in_receive = False  # the app waits in receive()
        self._handover: trio.Event | None = None  # the app waits for _watch to stop reading
        self._receives = 0  # messages the app has received
        self._receives_at_check = -1
        # Closing, failing, watching.
        self._disconnect: dict[str, Any] | None = None
        self._failure: tuple[int, str] | None = None
        self._close_deadline = math.inf
        self._failure_deadline = math.inf
        self._idle_check_at = math.inf
        self._watch_scope: trio.CancelScope | None = None  # _watch's sleep
        self._draining = False
        # Keepalive.
        self._ping_payload = b""
        self._pong = trio.Event()

    # -- the connection task --------------------------------------------------------------

    async def run(self) -> None:
        """Serve the upgrade until the app has returned and the WebSocket is closed.

        Returns within :data:`CLOSE_TIMEOUT` (plus the write of our last bytes, equally
        bounded) of the app returning. The stream itself is closed by the caller.

        Cancellation: the app call and the I/O tasks are cancelled together.
        """
        http = self.http
        state = http.state
        config = state.config
        request = self.request
        self._scope = build_http_scope(
            request,
            scheme=http.scheme,
            client=http.client,
            server=http.server,
            root_path=config.root_path,
            state=state.lifespan_state,
        )
        try:
            self.ws.initiate_upgrade_connection(
                handshake_headers(
                    request.headers, per_message_deflate=config.ws_per_message_deflate
                ),
                request.target,
            )
            for _ in self.ws.events():  # the Request event: wsproto keeps what it needs
                pass
        except (RemoteProtocolError, h11.LocalProtocolError, ValueError) as exc:
            await self._reject_upgrade(exc)
            return
        scope = self._scope = build_websocket_scope(self._scope)
        if http.completes_scope:  # TLS extension, trusted proxy headers
            http.complete_scope(scope)
        self._app_messages = AppMessages(scope["subprotocols"])
        async with trio.open_nursery() as io:
            io.start_soon(self._write_loop)
            io.start_soon(self._watch)
            if config.ws_ping_interval:
                io.start_soon(self._keepalive, config.ws_ping_interval, config.ws_ping_timeout)
            app_exc = await call_app(state.app, scope, self.receive, self.send)
            if app_exc is not None:
                state.report_app_error(app_exc)
            await self._after_app(app_exc)
            io.cancel_scope.cancel()

    async def _reject_upgrade(self, exc: Exception) -> None:
        """Answer an invalid upgrade request with 400 (the peer's fault, INFO)."""
        http = self.http
        logger.info("%s - invalid WebSocket upgrade request: %s (400)", http.peer, exc)
        extra: tuple[tuple[bytes, bytes], ...] = ()
        if isinstance(exc, RemoteProtocolError) and "Version" in str(exc):
            # RFC 6455 §4.2.2: tell the client which version we speak.
            extra = ((b"sec-websocket-version", b"13"),)
        self._log_handshake(400)
        await http.answer_and_close(400, extra_headers=extra)

    async def _after_app(self, exc: Exception | None) -> None:
        """The app returned (or raised): end the handshake or the WebSocket, bounded."""
        http = self.http
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
            http.linger = False  # a truncated denial response: abort the connection
            self._gone = True
        else:
            if exc is None:
                logger.error("ASGI callable returned without sending handshake")
            self._answer_http(500)
        self._handshake_done.set()
        await self._flush(CLOSE_TIMEOUT)
        if not self._gone:
            http.linger = True

    async def _finish_reading(self) -> None:
        """Read (and drop) what the peer still sends until its Close or the close deadline."""
        self._idle_check_at = math.inf  # nobody to read for any more
        with trio.CancelScope(deadline=self._close_deadline) as scope:
            while not self._read_done:
                self._inbox.clear()
                await self._fill_inbox()
        self._inbox.clear()
        if scope.cancelled_caught:
            self._stop_reading()

    # -- the app's receive and send -------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        """The app's ``receive``: ``websocket.connect``, messages, ``websocket.disconnect``."""
        if not self._connect_delivered:
            self._connect_delivered = True
            return connect_message()
        if not self._accepted:
            await self._handshake_done.wait()
            if not self._accepted:
                return disconnect_message(CLOSE_ABNORMAL)
        inbox = self._inbox
        await trio.lowlevel.checkpoint_if_cancelled()
        if not inbox:
            self._in_receive = True
            try:
                await self._fill_inbox()
            finally:
                self._in_receive = False
                if self._idle_check_at == math.inf and not self._read_done:
                    self._arm_idle_check()  # (also when cancelled)
            if not inbox:
                # The app has read everything: a pending failure Close may go now.
                self._send_failure()
                return self._disconnect or disconnect_message(CLOSE_ABNORMAL)
        self._receives += 1
        if self._idle_check_at == math.inf and not self._read_done:
            self._arm_idle_check()
        return inbox.popleft()

    async def send(self, message: Any) -> None:
        """The app's ``send``: validate, write (or queue) the bytes, wait for room.

        Raises:
            AppProtocolError: invalid or out-of-order message.
            ClientDisconnected: ``websocket.send`` after the WebSocket closed or the peer
                left (ASGI spec 2.4).
        """
        action = self._app_messages.next(message)
        ws = self.ws
        match action:
            case Send(data=data):
                if self._gone or ws.state is not ConnectionState.OPEN:
                    raise ClientDisconnected(f"{self.http.peer} WebSocket is closed")
                if isinstance(data, str):
                    frame = ws.send(TextMessage(data=data))
                else:
                    frame = ws.send(BytesMessage(data=data))
                self._send_bytes(frame)
                if self._outbox or self._in_flight:
                    await self._wait_writable()
                else:
                    self._written_since_yield += len(frame)
                    if self._written_since_yield >= WRITE_YIELD_BYTES:
                        self._written_since_yield = 0
                        await trio.lowlevel.cancel_shielded_checkpoint()
                if self._gone:
                    raise ClientDisconnected(f"{self.http.peer} disconnected")
            case Accept():
                self._accept(action)
                await self._wait_writable()
            case Close(code=code, reason=reason):
                if self._app_messages.phase is Phase.REJECTED:
                    self._answer_http(403)  # close before accept (ASGI spec)
                else:
                    self._start_close(code, reason)
                await self._wait_writable()
            case ResponseStart(message=start):
                http = self.http
                state = http.state
                self._response = ResponseWriter(
                    http.parser, b"GET", state.response_headers(), state.response_heads
                )
                self._response.start(start, close=True)
            case ResponseBody(message=body, last=last):
                assert self._response is not None
                data = self._response.body(body)
                if last:
                    response = self._response
                    self._log_handshake(response.status or 0, response.body_bytes)
                    self.http.linger = True
                    self._handshake_done.set()
                self._send_bytes(data)
                await self._wait_writable()
            case _:
                assert_never(action)

    def _accept(self, action: Accept) -> None:
        http = self.http
        names = {name.lower() for name, _ in action.headers}
        headers = action.headers + [
            header for header in http.state.response_headers() if header[0] not in names
        ]
        config = http.state.config
        deflate = None
        if config.ws_per_message_deflate:
            deflate = BoundedPerMessageDeflate(config.ws_max_size)
        extensions: list[Extension] = [deflate] if deflate is not None else []
        handshake = self.ws.send(
            AcceptConnection(
                subprotocol=action.subprotocol, extensions=extensions, extra_headers=headers
            )
        )
        if deflate is not None and deflate.enabled():
            # Inflating with the largest window decodes any smaller window too, so a
            # client that cannot honour a small client_max_window_bits is still read.
            deflate.client_max_window_bits = 15
        data, eof = http.parser.trailing_data  # bytes that arrived with the handshake
        self._unread += data
        self._eof = eof
        self._accepted = True
        self._log_handshake(101)
        self._handshake_done.set()
        self._send_bytes(handshake)
        self._arm_idle_check()
        if self._draining:
            self._start_close(CLOSE_SERVICE_RESTART)

    def _answer_http(self, status: int) -> None:
        """Refuse the handshake with a plain HTTP response (403 or 500)."""
        http = self.http
        data = error_response(http.parser, status, http.state.response_headers())
        if data:
            self._log_handshake(status)
            self._send_bytes(data)
        http.linger = True
        self._handshake_done.set()

    def _log_handshake(self, status: int, body_bytes: int = 0) -> None:
        """The access line of the handshake: 101, 403, 400, 500 or the app's denial status."""
        if self._start_time:
            log_access(
                self.http.state,
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
        if self.ws.state is ConnectionState.OPEN and not self._gone:
            self._send_bytes(self.ws.send(CloseConnection(code=code, reason=reason)))
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

    def _set_disconnect(self, code: int, reason: str = "") -> None:
        if self._disconnect is None:
            self._disconnect = disconnect_message(int(code), reason or "")

    def _stop_reading(self) -> None:
        """End reading now (close timeout, peer gone or dropped); a waiting read ends too."""
        if self._read_done:
            return
        self._read_done = True
        self._set_disconnect(CLOSE_ABNORMAL)
        if not self._reading:
            return
        if self._read_cancel is not None:
            self._read_cancel.cancel()
        elif self._fd >= 0:
            # The app waits in a plain read (no cancel scope: one per read would cost more
            # than the read): wake it as if the socket were closed; it then sees EOF.
            trio.lowlevel.notify_closing(self._fd)

    async def _abort(self, code: int, reason: str) -> None:
        """Drop the peer now: a last Close frame (briefly), then an abortive close."""
        self._set_disconnect(code, reason)
        self._start_close(code, reason)
        self._stop_reading()
        await self._flush(ABORT_FLUSH_TIMEOUT)
        self._gone = True
        self.http.linger = False
        await trio.aclose_forcefully(self.http.stream)

    # -- writing --------------------------------------------------------------------------

    def _send_bytes(self, data: bytes | bytearray) -> None:
        """Write ``data`` now as far as the socket takes it without waiting; queue the rest.

        Never waits, so every producer (any task, or a synchronous caller such as
        :meth:`drain`) can call it and a cancellation can never cut a frame in two.
        """
        if not data or self._gone:
            return
        if self._outbox or self._in_flight or self._fd < 0:
            self._outbox += data
            self._has_output.set()
            return
        try:
            sent = self.http.write_nowait(data)
        except ClientDisconnected:
            self._lost_while_writing()
            return
        if sent < len(data):
            self._outbox += memoryview(data)[sent:]
            self._has_output.set()

    def _lost_while_writing(self) -> None:
        logger.debug("%s - WebSocket peer gone while writing", self.http.peer)
        self._gone = True
        self._outbox.clear()
        self._stop_reading()

    def _pending(self) -> int:
        return len(self._outbox) + self._in_flight

    async def _wait_writable(self, limit: int = OUTBOX_HIGH_WATER) -> None:
        while not self._gone and self._pending() > limit:
            await self._written.wait()

    async def _flush(self, timeout: float) -> None:
        with trio.move_on_after(timeout):
            await self._wait_writable(0)

    async def _write_loop(self) -> None:
        """Write what the socket did not take at once, until cancelled or the peer is gone."""
        while True:
            if not self._outbox:
                await self._has_output.wait()
                self._has_output = trio.Event()
                continue
            data = bytes(self._outbox)
            self._outbox.clear()
            self._in_flight = len(data)
            try:
                await self.http.write(data)
            except ClientDisconnected:
                self._lost_while_writing()
                return
            finally:
                self._in_flight = 0
                self._written.set()
                self._written = trio.Event()

    # -- reading --------------------------------------------------------------------------

    async def _fill_inbox(self) -> None:
        """Read and decode until a message is in the inbox or reading has ended."""
        inbox = self._inbox
        while True:
            self._decode(1)
            if inbox or self._read_done:
                return
            if self._reading:
                # Another task reads (_watch, or a second app task): it hands the reader
                # role over after its read.
                if self._handover is None:
                    self._handover = trio.Event()
                await self._handover.wait()
                continue
            self._reading = True
            try:
                data = await self._read()
            finally:
                self._reading = False
                self._hand_over()
            self._received(data)

    def _hand_over(self) -> None:
        handover = self._handover
        if handover is not None:
            self._handover = None
            handover.set()

    async def _read(self) -> bytes:
        """One read from the socket (b"" at EOF), once our unsent bytes have shrunk."""
        if self._pending() > READER_PAUSE_OUTBOX:
            await self._wait_writable(READER_PAUSE_OUTBOX)
            if self._read_done:  # stopped meanwhile (_stop_reading)
                return b""
        # Everything received so far is handled: the peer's next frame (often a reply to
        # what the app just sent) has usually not arrived yet. Under load it has once the
        # other connections had their turn: yield first, then read without registering
        # with epoll (one epoll_ctl per wait otherwise); wait only when it has not.
        if self._fd >= 0:
            await trio.lowlevel.checkpoint()
            if self._read_done:  # stopped meanwhile (_stop_reading)
                return b""
            data = self.http.receive_nowait()
            if data is not None:
                return data
            return await self.http.receive_bytes(wait_first=True)
        if self._read_cancel is not None:
            return await self.http.receive_bytes(wait_first=True)
        with trio.CancelScope(deadline=self._close_deadline) as self._read_cancel:  # not plain
            try:
                return await self.http.receive_bytes(wait_first=True)
            finally:
                self._read_cancel = None
        return b""  # cancelled by _stop_reading

    def _received(self, data: bytes) -> None:
        if self._read_done:
            return
        if data:
            self._unread += data
        else:
            self._eof = True

    def _decode(self, limit: int) -> None:
        """Decode received bytes until the inbox holds ``limit`` messages or input runs out.

        wsproto's events are taken one at a time (its generator stays suspended in
        ``_events``): a compressed frame is only inflated when the app wants more.
        """
        inbox = self._inbox
        ws = self.ws
        while len(inbox) < limit and not self._read_done:
            events = self._events
            if events is not None:
                for event in events:
                    self._on_event(event)
                    if len(inbox) >= limit or self._read_done:
                        return
                self._events = None
            unread = self._unread
            if unread:
                ws.receive_data(bytes(unread))
                unread.clear()
            elif self._eof:
                ws.receive_data(None)  # yields the 1006 CloseConnection
            else:
                return
            self._events = ws.events()

    def _on_event(self, event: Event) -> None:
        ws = self.ws
        if isinstance(event, (TextMessage, BytesMessage)):
            try:
                message = self._assembler.feed(event)
            except MessageTooBigError as exc:
                self._fail(CLOSE_TOO_BIG, str(exc))
                return
            if message is not None:
                self._inbox.append(message)
        elif isinstance(event, Ping):
            if ws.state is ConnectionState.OPEN:
                self._send_bytes(ws.send(event.response()))
        elif isinstance(event, Pong):
            if self._ping_payload and event.payload == self._ping_payload:
                self._pong.set()
        elif isinstance(event, CloseConnection):
            self._on_close(event)
            self._end_reading()
        else:  # handshake events cannot follow the accept
            assert isinstance(event, (Request, AcceptConnection, RejectConnection, RejectData)), (
                event
            )
            raise AssertionError(f"unexpected wsproto event {event!r}")

    def _end_reading(self) -> None:
        """The peer's bytes are done with (close, EOF or failure)."""
        self._read_done = True
        self._events = None
        self._set_disconnect(CLOSE_ABNORMAL)

    def _on_close(self, event: CloseConnection) -> None:
        kind = classify_close(event, self.ws.state)
        if kind is CloseKind.PEER_CLOSING:
            # RFC 6455 §5.5.1: answer with a Close frame, echoing the status code.
            self._send_bytes(self.ws.send(event.response()))
            self._set_disconnect(event.code, event.reason or "")
        elif kind is CloseKind.HANDSHAKE_DONE:
            self._set_disconnect(event.code, event.reason or "")
        elif kind is CloseKind.LOST:
            logger.debug("%s - WebSocket peer closed the connection", self.http.peer)
            self._set_disconnect(CLOSE_ABNORMAL)
        else:
            self._fail(event.code, event.reason or "")

    def _fail(self, code: int, reason: str) -> None:
        """A bad frame or an oversized message: fail the WebSocket (RFC 6455 §7.1.7)."""
        logger.info("%s - WebSocket protocol error: %s (%d)", self.http.peer, reason, code)
        self._set_disconnect(code, reason)
        self._end_reading()
        self._failure = (int(code), reason)
        self._failure_deadline = trio.current_time() + FAILURE_CLOSE_DELAY
        self._rewatch()

    # -- the watcher ----------------------------------------------------------------------

    def _arm_idle_check(self) -> None:
        self._receives_at_check = self._receives
        self._idle_check_at = trio.current_time() + IDLE_READ_DELAY
        self._rewatch()

    def _rewatch(self) -> None:
        if self._watch_scope is not None:
            self._watch_scope.deadline = min(
                self._idle_check_at, self._close_deadline, self._failure_deadline
            )

    async def _watch(self) -> None:
        """Read for an app that stays away from receive(); enforce the close deadlines.

        Returns once reading has ended and no failure Close is pending.
        """
        await self._handshake_done.wait()
        if not self._accepted:
            return
        while not self._read_done or self._failure is not None:
            deadline = min(self._idle_check_at, self._close_deadline, self._failure_deadline)
            with trio.CancelScope(deadline=deadline) as self._watch_scope:
                await trio.sleep_forever()
            self._watch_scope = None
            now = trio.current_time()
            if now >= self._failure_deadline:
                self._send_failure()  # the app did not read the earlier messages in time
            if now >= self._close_deadline and not self._read_done:
                logger.debug("%s - WebSocket close handshake timed out", self.http.peer)
                self._stop_reading()
            if now >= self._idle_check_at:
                self._idle_check_at = math.inf
                if self._in_receive or self._reading or self._read_done:
                    continue  # the app reads; its next message re-arms the check
                if self._receives != self._receives_at_check:
                    self._arm_idle_check()  # the app is busy but still receiving
                    continue
                await self._read_for_app()

    async def _read_for_app(self) -> None:
        """Be the reader until the app comes back to receive() or its queue is full."""
        self._reading = True
        try:
            with trio.CancelScope(deadline=self._close_deadline) as self._read_cancel:
                while self._handover is None:
                    self._decode(self._max_queue)
                    if self._read_done or len(self._inbox) >= self._max_queue:
                        break  # a full queue: stop reading, TCP pushes back on the peer
                    self._received(await self._read())
        finally:
            self._read_cancel = None
            self._reading = False
            self._hand_over()

    # -- keepalive ------------------------------------------------------------------------

    async def _keepalive(self, interval: float, timeout: float | None) -> None:
        """Ping every ``interval``; drop the peer if a pong takes longer than ``timeout``."""
        await self._handshake_done.wait()
        if not self._accepted:
            return
        while True:
            await trio.sleep(interval)
            if self._gone or self.ws.state is not ConnectionState.OPEN:
                return
            self._ping_payload = os.urandom(4)
            self._pong = trio.Event()
            self._send_bytes(self.ws.send(Ping(payload=self._ping_payload)))
            if not timeout:
                continue
            with trio.move_on_after(timeout):
                await self._pong.wait()
            if self._pong.is_set():
                continue
            if self._gone or self.ws.state is not ConnectionState.OPEN:
                return
            logger.info(
                "%s - WebSocket keepalive ping not answered within %.1fs, dropping the peer",
                self.http.peer,
                timeout,
            )
            await self._abort(CLOSE_INTERNAL_ERROR, "keepalive ping timeout")
            return
