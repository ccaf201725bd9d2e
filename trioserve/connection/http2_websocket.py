"""A WebSocket over an HTTP/2 stream (RFC 8441) (layer 4).

A client that saw ``SETTINGS_ENABLE_CONNECT_PROTOCOL = 1`` (sent when ``--ws`` is not
``none``: ``protocol.h2_engine.h2_connection``) opens a WebSocket with an *extended CONNECT*:
``:method CONNECT``, ``:protocol websocket``, ``:scheme``, ``:path`` and ``:authority``,
without Upgrade, Connection or Sec-WebSocket-Key (RFC 8441 §4-5). The stream is then the
WebSocket's byte stream: its DATA frames carry the WebSocket frames, both ways.

Everything above the bytes is the HTTP/1.1 session's
(``connection.websocket.WebSocketSession``: the ASGI translation, the limits, keepalive,
permessage-deflate, closing); what differs lives here:

* :class:`StreamBytes` is the ``stream.ByteStream`` of a
  ``connection.http2_stream.HTTP2Stream``. A read takes the DATA the connection's reader
  buffered on the stream, credited back to the client only then (the stream's window is
  the WebSocket's backpressure); a write is DATA, flow-controlled; the close is
  END_STREAM, or RST_STREAM (CANCEL) for an abort. RFC 8441 §5: "orderly TCP-level
  closures are represented as END_STREAM flags; RST exceptions are represented with the
  RST_STREAM frame with the CANCEL error code". A client's RST_STREAM is the peer gone:
  the app gets ``websocket.disconnect`` with 1006.
* :class:`H2WebSocket` checks and answers the handshake: Sec-WebSocket-Version 13, the
  extensions (permessage-deflate) and the subprotocol negotiated as on HTTP/1.1, and an
  accept answered with HEADERS 200 (no Sec-WebSocket-Accept: RFC 8441 §5). A refusal
  (400, 403, 500, 501) and the app's denial response are ordinary HTTP/2 responses on
  the stream.

``connection.http2`` starts :meth:`H2WebSocket.run` as the stream's task (instead of the
request cycle) and asks it to close with 1012 when it drains.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import h2.exceptions
import trio
from h2.errors import ErrorCodes
from wsproto.extensions import Extension
from wsproto.handshake import server_extensions_handshake

from ..errors import ClientDisconnected
from ..protocol.http1_messages import REASONS
from ..protocol.http2 import RequestHead
from ..protocol.scope import ConnectionFacts, http_scope, websocket_scope
from ..protocol.ws_messages import handshake_headers
from .http2_stream import H2ResponseEncoder, HTTP2Stream
from .websocket import DenialWriter, Header, WebSocketSession

logger = logging.getLogger(__name__)


class StreamBytes:
    """The DATA frames of an HTTP/2 stream as a ``stream.ByteStream`` (see the module
    docstring). Not :attr:`fast`: reads wait on the stream's events, writes go through
    the session's outbox task and the flow-control windows.

    Args:
        stream: the stream (the connection's reader feeds it, as any stream).
    """

    fast = False

    def __init__(self, stream: HTTP2Stream) -> None:
        self._stream = stream
        self.peer_gone = False
        self._abort = False  # close with RST_STREAM, not END_STREAM
        self._writing = False  # a write did not finish (cancelled midway: a cut frame)
        self._closed = False

    @property
    def peer(self) -> str:
        return self._stream.peer

    async def receive(self, *, wait_first: bool = False) -> bytes:
        """The DATA received so far, waiting for some; b"" once the client ended the
        stream (END_STREAM) or reset it."""
        stream = self._stream
        await trio.lowlevel.checkpoint_if_cancelled()  # (before anything is taken)
        waited = False
        while True:
            data = b"" if stream.reset else stream.take_data()
            if data or stream.reset or stream.body_ended:
                break
            await stream.wait_changed()
            waited = True
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if not data:
            self.peer_gone = True
        return data

    def receive_nowait(self) -> bytes | None:
        return None  # (not fast: never called)

    def interrupt_read(self) -> None:
        """Nothing to do: a read here always runs in a cancel scope of the reader's
        (``ws_reader``: only fast streams read without one)."""

    def write_nowait(self, data: bytes | bytearray | memoryview) -> int:
        return 0  # (not fast: never called)

    async def write(self, data: bytes | list[bytes], *, last: bool = False) -> None:
        """Send ``data`` as DATA frames as the windows allow (``last``: unused here).

        Raises:
            ClientDisconnected: the client reset the stream (or the connection is gone).
        """
        self._writing = True
        await self._stream.send_data(data if isinstance(data, bytes) else b"".join(data))
        self._writing = False

    def owes_yield(self, size: int) -> bool:
        return False  # (every write goes through the outbox task: it yields)

    def linger_on_close(self) -> None:
        """Nothing to do: the connection lives on, and reads what the client still sends."""

    def abort_on_close(self) -> None:
        """End with RST_STREAM (CANCEL): a truncated response must not look complete."""
        self._abort = True

    async def abort(self) -> None:
        """Reset the stream now (CANCEL)."""
        self._abort = True
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """End our side of the stream: END_STREAM, or RST_STREAM (CANCEL) after an abort
        or a write cut short. Does nothing the second time, or once the client reset it."""
        if self._closed:
            return
        self._closed = True
        stream = self._stream
        conn = stream.conn
        if stream.reset or conn.broken:
            return
        if self._abort or self._writing:
            conn.reset_stream(stream.stream_id, ErrorCodes.CANCEL)
        elif not stream.ended_here:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                conn.h2.send_data(stream.stream_id, b"", end_stream=True)
                conn.wake_writer()


class _DenialWriter:
    """The app's denial response on the stream (``DenialWriter``): checked as any HTTP/2
    response (``H2ResponseEncoder``), its HEADERS queued with the first body message, the
    body returned for the session's outbox (DATA); the session's close ends the stream."""

    def __init__(self, stream: HTTP2Stream) -> None:
        self._stream = stream
        self._encoder = H2ResponseEncoder(stream.state.response_heads, b"GET", _no_hints)

    @property
    def status(self) -> int | None:
        return self._encoder.status

    @property
    def body_bytes(self) -> int:
        return self._encoder.body_bytes

    @property
    def started(self) -> bool:
        return self._encoder.started

    def start(self, message: Mapping[str, object], *, close: bool = False) -> None:
        self._encoder.start(message)

    def body(self, message: Mapping[str, object]) -> bytes:
        encoder = self._encoder
        first = not encoder.started
        pieces = encoder.body_pieces(message)
        stream = self._stream
        if first and not stream.reset:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                status = encoder.status or 500
                stream.send_head(status, [*stream.state.response_headers(), *encoder.headers])
        return b"".join(pieces)


def _no_hints(fields: list[Header]) -> None:
    """(A denial response has no early hints: its encoder never calls this.)"""


class H2WebSocket(WebSocketSession):
    """The WebSocket of one extended CONNECT stream (see the module docstring).

    Args:
        stream: the stream, admitted (``--limit-concurrency``) and counted among the
            connection's running streams; :meth:`run` gives both places back.
        head: its request head (``:protocol`` set).
        facts: the connection's facts, for the scope.
    """

    ACCEPT_STATUS = 200

    def __init__(self, stream: HTTP2Stream, head: RequestHead, facts: ConnectionFacts) -> None:
        self._bytes = StreamBytes(stream)
        super().__init__(self._bytes, stream.state)
        self._h2_stream = stream
        self._head = head
        self._facts = facts
        self._offers: list[str] = []  # the permessage-deflate offer we may accept

    async def run(self) -> None:
        """Serve the WebSocket until the app has returned and it is closed (within
        ``websocket.CLOSE_TIMEOUT`` of the app's return, as on HTTP/1.1), then end the
        stream and give its places back.

        Cancellation: the app call and the I/O tasks are cancelled together; the stream
        is still ended (RST_STREAM, if a write was cut short).
        """
        stream = self._h2_stream
        state = self._state
        head = self._head
        try:
            # (The handshake's access line, should it be refused right here.)
            self._scope = http_scope(b"CONNECT", head.target, b"2", head.headers, self._facts, None)
            refusal = self._check_request()
            if refusal is not None:
                await self._refuse(*refusal)
                return
            deflate = state.config.ws_per_message_deflate
            self._offers = [
                value.decode("ascii")
                for name, value in handshake_headers(head.headers, per_message_deflate=deflate)
                if name == b"sec-websocket-extensions"
            ]
            scope = websocket_scope(
                head.target, b"2", head.headers, self._facts, state.lifespan_state
            )
            await self._serve(scope)
        finally:
            self._bytes.close()
            stream.take_data()  # (what nobody read still counts on the connection's window)
            state.release()
            stream.conn.stream_exited(stream)

    def _check_request(self) -> tuple[int, str, list[Header]] | None:
        """Why the request cannot open a WebSocket: (status, reason, extra fields)."""
        head = self._head
        if head.protocol != b"websocket":
            return 501, f":protocol {head.protocol!r} is not supported", []
        version = None
        host = False
        for name, value in head.headers:
            if name == b"sec-websocket-version":
                version = value
            elif name == b"host":
                host = True
        if version != b"13":
            # RFC 6455 §4.2.2: tell the client which version we speak.
            reason = f"Sec-WebSocket-Version {version!r}, not 13"
            return 400, reason, [(b"sec-websocket-version", b"13")]
        if not host:
            return 400, "missing :authority", []
        return None

    async def _refuse(self, status: int, reason: str, extra: list[Header]) -> None:
        """Answer a request that cannot open a WebSocket (the peer's fault, INFO)."""
        stream = self._h2_stream
        logger.info(
            "%s - stream %d: invalid WebSocket request: %s (%d)",
            stream.peer,
            stream.stream_id,
            reason,
            status,
        )
        state = self._state
        if state.metrics is not None:
            state.metrics.protocol_error(status)
        self._log_handshake(status)
        body = self._error_answer(status, extra)
        with trio.move_on_after(state.config.timeout_request_header):
            with contextlib.suppress(ClientDisconnected):
                await stream.send_data(body, end_stream=True)

    # -- the session's answers -------------------------------------------------------------

    def _handshake_answer(
        self, subprotocol: str | None, extensions: list[Extension], headers: list[Header]
    ) -> bytes:
        """HEADERS 200 with the negotiated subprotocol and extensions (RFC 8441 §5: the
        fields of RFC 6455 §4.2.2 but Sec-WebSocket-Accept); no bytes to write."""
        fields: list[Header] = []
        if subprotocol is not None:
            fields.append((b"sec-websocket-protocol", subprotocol.encode("ascii")))
        if extensions and self._offers:
            # (wsproto's own negotiation, as its H11Handshake runs it on HTTP/1.1)
            accepted = server_extensions_handshake(self._offers, extensions)
            if accepted:
                fields.append((b"sec-websocket-extensions", accepted))
        stream = self._h2_stream
        if not stream.reset:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                stream.send_head(200, fields + headers)
        return b""

    def _error_answer(self, status: int, extra: list[Header] | None = None) -> bytes:
        """HEADERS of a plain-text ``status`` response; its body is returned (DATA)."""
        body = REASONS.get(status, b"Error") + b"\n"
        stream = self._h2_stream
        if stream.reset or stream.conn.broken:
            return b""
        fields = [
            *self._state.response_headers(),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
            *(extra or ()),
        ]
        try:
            stream.send_head(status, fields)
        except h2.exceptions.ProtocolError:
            return b""
        return body

    def _denial_writer(self) -> DenialWriter:
        return _DenialWriter(self._h2_stream)
