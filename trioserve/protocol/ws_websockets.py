"""The ``WebSocketEngine`` on websockets' sans-IO protocol (layer 2, sans-IO; ``--ws
websockets``, trioserve's ``[fast]`` extra).

websockets' ``ServerProtocol`` (started in its OPEN state: the handshake is done) parses
frames with its C speedups (unmasking) and bounds every message, compressed or not, by
``max_size`` before buffering it. Its reflexes would change what trioserve does on the
wire, so :class:`_Protocol` defers them to the moment :meth:`WebsocketsEngine.events`
hands out the frame, which is when wsproto's engine takes the same steps:

* a peer's Close is answered (and ``open`` turns False) only when its turn comes: the
  messages before it in the same read are still delivered, and still answered;
* a Ping is answered when handed out, and not once our Close is sent;
* a refused frame (1002, 1007, 1009) sends no Close at once: it becomes a ``Closed``
  event of kind ``INVALID`` and the session sends the Close when the app has read the
  messages before it (``connection.ws_reader``).

and a Close between the fragments of a message is answered as any Close (RFC 6455 §5.4
allows control frames there; websockets fails the connection with 1002, Autobahn 7.1.5).

websockets checks text only when its own connection classes assemble a message; here
text is decoded frame by frame (an incremental decoder across fragments), so invalid
UTF-8 fails the connection with 1007 at the frame that holds it.
"""

from __future__ import annotations

import codecs
from collections.abc import Generator, Iterator
from typing import Any, Final, TypeVar, cast

from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import OPEN, State
from websockets.server import ServerProtocol

from .ws_deflate import BoundedPerMessageDeflate
from .ws_engine import Closed, Event, Part, PingReceived, PongReceived
from .ws_messages import CLOSE_ABNORMAL, CLOSE_INVALID_PAYLOAD, CloseKind

_TEXT: Final = Opcode.TEXT
_BINARY: Final = Opcode.BINARY
_CONT: Final = Opcode.CONT
_PING: Final = Opcode.PING
_PONG: Final = Opcode.PONG
_CLOSE: Final = Opcode.CLOSE
_UTF8Decoder: Final = codecs.getincrementaldecoder("utf-8")
_RECV_FRAME: Final = ServerProtocol.recv_frame
_C = TypeVar("_C", bound=type)


def _interpreted(cls: _C) -> _C:
    """(A class decorator mypyc does not know keeps the class an ordinary Python class in
    the compiled build: websockets' own interpreted code reads and writes its attributes
    per frame, and its base class is an interpreted one.)"""
    return cls


@_interpreted
class _Protocol(ServerProtocol):
    """websockets' server protocol with the Close, the pong and the failure deferred
    (see the module docstring)."""

    failure: tuple[int, str] | None = None

    def recv_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is _PING:
            self.events.append(frame)  # answered by WebsocketsEngine.events
        elif opcode is _CLOSE:
            # Its checks now (they may fail the connection: 1002, 1007); its effects, and
            # close_rcvd, when handed out (until then we may still send our own Close).
            # A Close inside a fragmented message is a valid Close (RFC 6455 §5.4: control
            # frames may come between fragments); the message is never finished, as with
            # wsproto (websockets would fail the connection with 1002).
            Close.parse(frame.data)
            self.events.append(frame)
            self.stop_parsing()  # RFC 6455 §1.4: nothing after a Close is read
        else:
            _RECV_FRAME(self, frame)  # (super().recv_frame without building a super object)

    def fail(self, code: int, reason: str = "") -> None:
        """Record the failure, send nothing: the session sends the Close."""
        self.failure = (int(code), reason)
        self.stop_parsing()

    def stop_parsing(self) -> None:
        """Parse nothing more (a Close, or a failure)."""
        self.parser = self._drop()
        next(self.parser)

    def _drop(self) -> Generator[None]:
        """The parser from now on: received bytes are dropped (none should come)."""
        while True:
            self.reader.discard()
            yield


class WebsocketsEngine:
    """:class:`~trioserve.protocol.ws_engine.WebSocketEngine` on websockets' protocol.

    Args:
        max_size: ``--ws-max-size``: longer messages fail with 1009 (also compressed ones,
            inflated no further than that).
        deflate: the negotiated permessage-deflate, or None: its parameters configure
            websockets' own extension.
    """

    __slots__ = ("_decoder", "_protocol", "_text", "open")

    def __init__(self, max_size: int, deflate: BoundedPerMessageDeflate | None) -> None:
        protocol = self._protocol = _Protocol(state=State.OPEN, max_size=max_size)
        protocol.debug = False  # (no log call per frame: the session logs what matters)
        if deflate is not None:
            protocol.extensions = [
                PerMessageDeflate(
                    remote_no_context_takeover=deflate.client_no_context_takeover,
                    local_no_context_takeover=deflate.server_no_context_takeover,
                    # (any client window is read: see accept_any_client_window)
                    remote_max_window_bits=15,
                    local_max_window_bits=deflate.server_max_window_bits,
                )
            ]
        # Messages and a Close may still be sent (the protocol's state is OPEN: kept here,
        # as only send_close and a peer's Close change it, for a cheaper check per message).
        self.open = True
        self._text = False  # the fragmented message being received is text
        self._decoder: codecs.IncrementalDecoder | None = None  # its UTF-8 decoder

    def receive_data(self, data: bytes | None) -> None:
        protocol = self._protocol
        if data is None:
            protocol.receive_eof()  # (fails with 1006: "unexpected end of stream")
        else:
            protocol.receive_data(data)
        protocol.data_to_send()  # (nothing to write: the EOF marker, if any, is ours to drop)

    def receive_message(self, data: bytes) -> dict[str, Any] | None:
        protocol = self._protocol
        protocol.receive_data(data)
        if protocol.writes:
            protocol.data_to_send()  # (none are made: see receive_data)
        frames = protocol.events
        if len(frames) != 1 or protocol.failure is not None:
            return None
        frame = cast("Frame", frames[0])
        if not frame.fin:
            return None
        opcode = frame.opcode
        payload = frame.data
        if type(payload) is not bytes:
            payload = bytes(payload)
        message: dict[str, Any]
        if opcode is _TEXT:
            try:
                message = {"type": "websocket.receive", "text": payload.decode()}
            except UnicodeDecodeError:
                return None  # (events() fails the connection)
        elif opcode is _BINARY:
            message = {"type": "websocket.receive", "bytes": payload}
        else:
            return None
        frames.clear()
        return message

    def events(self) -> Iterator[Event]:
        protocol = self._protocol
        # (After the handshake a protocol's events are frames.)
        for frame in cast("list[Frame]", protocol.events_received()):
            opcode = frame.opcode
            if opcode is _CONT or not frame.fin:
                part = self._part(frame, opcode)
                yield part
                if type(part) is Closed:
                    return
            elif opcode is _TEXT:
                # A whole message in one frame (the common case): the ASGI message itself.
                data = frame.data
                try:
                    text = (data if type(data) is bytes else bytes(data)).decode()
                except UnicodeDecodeError as exc:
                    yield self._invalid_utf8(exc)
                    return
                yield {"type": "websocket.receive", "text": text}
            elif opcode is _BINARY:
                data = frame.data
                yield {
                    "type": "websocket.receive",
                    "bytes": data if type(data) is bytes else bytes(data),
                }
            elif opcode is _PING:
                reply = b""
                if protocol.state is OPEN:
                    protocol.send_pong(frame.data)
                    reply = self._output()
                yield PingReceived(reply)
            elif opcode is _PONG:
                yield PongReceived(bytes(frame.data))
            else:
                yield self._closed(frame)
                return
        failure = protocol.failure
        if failure is not None:
            protocol.failure = None
            code, reason = failure
            if code == CLOSE_ABNORMAL:
                yield Closed(CloseKind.LOST, CLOSE_ABNORMAL, "")
            else:
                yield Closed(CloseKind.INVALID, code, reason)

    def _part(self, frame: Frame, opcode: Opcode) -> Part | Closed:
        data = frame.data
        if type(data) is not bytes:
            data = bytes(data)
        fin = frame.fin
        if opcode is _CONT:
            text = self._text
        else:
            text = self._text = opcode is _TEXT
        if not text:
            return Part(data, fin)
        try:
            decoder = self._decoder
            if decoder is None:
                if fin:
                    return Part(data.decode(), True)
                decoder = self._decoder = _UTF8Decoder()
            decoded = decoder.decode(data, fin)
        except UnicodeDecodeError as exc:
            return self._invalid_utf8(exc)
        if fin:
            self._decoder = None
        return Part(decoded, fin)

    def _invalid_utf8(self, exc: UnicodeDecodeError) -> Closed:
        self._protocol.stop_parsing()
        reason = f"invalid UTF-8: {exc.reason} at position {exc.start}"
        return Closed(CloseKind.INVALID, CLOSE_INVALID_PAYLOAD, reason)

    def _closed(self, frame: Frame) -> Closed:
        """The peer's Close, now that its turn came: answer it, or end our handshake."""
        protocol = self._protocol
        close = protocol.close_rcvd = Close.parse(frame.data)  # (checked by recv_frame)
        code, reason = int(close.code), close.reason
        if protocol.state is not OPEN:
            protocol.close_rcvd_then_sent = False
            return Closed(CloseKind.HANDSHAKE_DONE, code, reason)
        # RFC 6455 §5.5.1: echo the frame (an empty one stays empty: 1005 is not sent).
        protocol.send_frame(Frame(_CLOSE, frame.data))
        protocol.close_sent = close
        protocol.close_rcvd_then_sent = True
        protocol.state = State.CLOSING
        self.open = False
        return Closed(CloseKind.PEER_CLOSING, code, reason, self._output())

    def _output(self) -> bytes:
        writes = self._protocol.data_to_send()
        return writes[0] if len(writes) == 1 else b"".join(writes)

    def send_message(self, data: str | bytes) -> bytes:
        # websockets' Frame serializes (and compresses); send_text's checks are the
        # caller's: the engine is open (WebSocketEngine.open), and no message is sent in
        # fragments.
        frame = Frame(_TEXT, data.encode()) if isinstance(data, str) else Frame(_BINARY, data)
        return frame.serialize(mask=False, extensions=self._protocol.extensions)

    def send_ping(self, payload: bytes) -> bytes:
        self._protocol.send_ping(payload)
        return self._output()

    def send_close(self, code: int, reason: str) -> bytes:
        self._protocol.send_close(code, reason)
        self.open = False
        return self._output()
