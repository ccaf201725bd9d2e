"""The frames of an open WebSocket, behind one interface: wsproto or websockets (layer 2,
sans-IO).

``--ws`` picks the engine behind :class:`WebSocketEngine` (``connection.state``):
:class:`WsprotoEngine` (wsproto, pure Python) or ``ws_websockets.WebsocketsEngine``
(websockets' sans-IO protocol, with its C speedups), the way ``--http`` picks the parser
behind ``http1_parser.HTTPParser``.
Everything above it (``connection.websocket``: one connection task, the ASGI translation
of ``ws_messages``, the limits, keepalive, close handling) is shared.

An engine starts *after* the opening handshake, whatever carried it: the HTTP/1.1 upgrade
(``connection.websocket``, with wsproto's handshake) or an HTTP/2 stream (RFC 8441). It
takes the message size limit and the negotiated permessage-deflate (a
``ws_deflate.BoundedPerMessageDeflate`` that accepted the client's offer, or None), and
knows nothing of HTTP.

The interface is wsproto's shape, made smaller:

* :meth:`WebSocketEngine.receive_data` takes bytes (None at EOF);
  :meth:`WebSocketEngine.receive_message` takes bytes too, and returns the
  ``websocket.receive`` message itself when they held one whole message and nothing else
  (websockets' engine; wsproto's always returns None): the common case then skips
  :meth:`~WebSocketEngine.events`;
  :meth:`WebSocketEngine.events` hands out what they held, one event at a time, so a
  caller that stops early (the app's inbox is full) leaves the rest undecoded, and a
  peer's Close takes effect only when its turn comes (messages before it are still read,
  and still answered).
* events: a data fragment (:class:`MessagePart`: ``data`` and ``message_finished``,
  reassembled by ``ws_messages.MessageAssembler``), or a whole message as its
  ``websocket.receive`` dict (websockets' engine, for a message in one frame: already
  bounded by ``max_size``, it needs no reassembly and costs no fragment object),
  :class:`PingReceived` (with the pong to write), :class:`PongReceived`, :class:`Closed`
  (a ``ws_messages.CloseKind``, the code and reason, and the Close frame that answers the
  peer's).
* ``send_*`` return the bytes to write. :attr:`WebSocketEngine.open` says whether
  messages and a Close may still be sent.

A frame the engine refuses (1002, 1007, 1009) is a :class:`Closed` of kind ``INVALID``:
the caller chooses when its Close leaves (``connection.ws_reader``), so neither engine
writes it by itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, Union

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from .ws_deflate import BoundedPerMessageDeflate
from .ws_messages import CloseKind, MessagePart, classify_close


@dataclass(slots=True)  # (not frozen: one is made per message, and frozen costs 3x)
class Part:
    """A :class:`MessagePart` made by an engine whose library has no such event."""

    data: str | bytes
    message_finished: bool


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; ``reply`` is the pong to write (b"" once our Close is sent)."""

    reply: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer's bytes end here (see ``ws_messages.CloseKind``).

    ``reply`` is our Close frame answering a ``PEER_CLOSING`` one (RFC 6455 §5.5.1, the
    status code echoed), else b"". For ``INVALID``, ``code`` and ``reason`` are what to
    fail the connection with.
    """

    kind: CloseKind
    code: int
    reason: str
    reply: bytes = b""


# (A dict: a whole ``websocket.receive`` message.)
Event = Union[MessagePart, PingReceived, PongReceived, Closed, dict[str, Any]]


class WebSocketEngine(Protocol):
    """The frames of one open WebSocket, server side (see the module docstring)."""

    @property
    def open(self) -> bool: ...  # (messages and a Close may still be sent)

    def receive_data(self, data: bytes | None) -> None: ...  # (None: the peer's EOF)

    def receive_message(self, data: bytes) -> dict[str, Any] | None: ...

    def events(self) -> Iterator[Event]: ...

    def send_message(self, data: str | bytes) -> bytes: ...

    def send_ping(self, payload: bytes) -> bytes: ...

    def send_close(self, code: int, reason: str) -> bytes: ...


# ``factory(max_size, deflate)``: an engine class (``connection.state`` picks one by --ws).
EngineFactory = Callable[[int, Union[BoundedPerMessageDeflate, None]], WebSocketEngine]


class WsprotoEngine:
    """:class:`WebSocketEngine` on wsproto's frame protocol.

    Args:
        max_size: ``--ws-max-size`` (enforced by ``ws_messages.MessageAssembler``, and by
            the bounded deflate while inflating).
        deflate: the negotiated permessage-deflate, or None.
    """

    __slots__ = ("_ws",)

    def __init__(self, max_size: int, deflate: BoundedPerMessageDeflate | None) -> None:
        del max_size  # (the caller's MessageAssembler counts every fragment wsproto yields)
        self._ws = Connection(ConnectionType.SERVER, [deflate] if deflate is not None else None)

    @property
    def open(self) -> bool:
        return self._ws.state is ConnectionState.OPEN

    def receive_data(self, data: bytes | None) -> None:
        self._ws.receive_data(data)

    def receive_message(self, data: bytes) -> dict[str, Any] | None:
        self._ws.receive_data(data)
        return None  # (wsproto's events hand out even a whole message in parts)

    def events(self) -> Iterator[Event]:
        ws = self._ws
        for event in ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                yield event
            elif isinstance(event, Ping):
                open_ = ws.state is ConnectionState.OPEN
                yield PingReceived(ws.send(event.response()) if open_ else b"")
            elif isinstance(event, Pong):
                yield PongReceived(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                kind = classify_close(event, ws.state)
                reply = ws.send(event.response()) if kind is CloseKind.PEER_CLOSING else b""
                yield Closed(kind, int(event.code), event.reason or "", reply)
            else:  # the frame protocol yields nothing else
                raise AssertionError(f"unexpected wsproto event {event!r}")

    def send_message(self, data: str | bytes) -> bytes:
        if isinstance(data, str):
            return self._ws.send(TextMessage(data=data))
        return self._ws.send(BytesMessage(data=data))

    def send_ping(self, payload: bytes) -> bytes:
        return self._ws.send(Ping(payload=payload))

    def send_close(self, code: int, reason: str) -> bytes:
        return self._ws.send(CloseConnection(code=code, reason=reason))
