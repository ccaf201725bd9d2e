"""WebSocket <-> ASGI translation, decided without I/O (layer 2: wsproto and h11, never trio).

``connection.websocket`` owns the socket, the handshake and the engine (``ws_engine``:
wsproto or websockets); this module holds what can be decided without awaiting (the
``websocket`` scope is built in ``protocol.scope``, with :func:`parse_subprotocols` from
here):

* :class:`AppMessages` is the state machine of what the *app* sends. Messages are untrusted
  input: each is validated here and returned as a typed value, or rejected with
  :class:`~trioserve.errors.AppProtocolError`::

      CONNECTING ──accept──────────────────────────► ACCEPTED ──send*──┐
          │                                              │  ◄──────────┘
          │                                              └──close──► CLOSED
          ├──close──────────────────────────────────────────────────► REJECTED (403)
          └──http.response.start──► RESPONDING ──http.response.body(last)──► REJECTED

* :class:`MessageAssembler` reassembles fragmented frames into ``websocket.receive``
  messages and enforces ``--ws-max-size`` (RFC 6455 §5.4: fragments of one message are
  delivered as one).
* :func:`classify_close` tells a peer's Close frame, the end of our own close handshake, a
  lost connection and a frame wsproto refused (which it reports as a ``CloseConnection``
  too) apart (for ``ws_engine.WsprotoEngine``; websockets' engine tells them itself).

Close codes follow RFC 6455 §7.4.1; 1012 ("service restart") is the IANA-registered code
uvicorn also uses for a server going down.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, Union

import h11
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

from ..errors import AppProtocolError
from .response_heads import validate_headers

# RFC 6455 §7.4.1 status codes used by the server.
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_NO_STATUS: Final = 1005
CLOSE_ABNORMAL: Final = 1006
CLOSE_INVALID_PAYLOAD: Final = 1007
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_SERVICE_RESTART: Final = 1012

# Codes an endpoint may put in a Close frame (RFC 6455 §7.4.1-2; 1012-1014 are registered
# with IANA since). 1004-1006 and 1015 are reserved or local-only.
_SENDABLE_CODES: Final = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})

HTTP_RESPONSE_EXTENSION: Final = "websocket.http.response"


def parse_subprotocols(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """The subprotocols a client offers, in order (RFC 6455 §4.1, §11.3.4).

    ``Sec-WebSocket-Protocol`` may repeat and each value is a comma-separated list.
    """
    offered: list[str] = []
    for name, value in headers:
        if name == b"sec-websocket-protocol":
            for token in value.decode("latin-1").split(","):
                token = token.strip()
                if token:
                    offered.append(token)
    return offered


_DEFLATE: Final = "permessage-deflate"


def _deflate_offer_ok(params: list[str]) -> str | None:
    """Normalise one permessage-deflate offer's parameters, or None to decline it.

    RFC 7692 §5.1: an offer with an unknown or repeated parameter, or an invalid value, is
    declined. ``server_max_window_bits=8`` is declined too: zlib cannot compress with an
    8-bit raw-deflate window (and wsproto accepts 9-15 only).
    """
    seen: set[str] = set()
    out: list[str] = []
    for param in params:
        name, has_value, value = (p.strip() for p in param.partition("="))
        value = value.strip('"')
        if name in seen:
            return None
        seen.add(name)
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if has_value:
                return None
            out.append(name)
        elif name == "server_max_window_bits" or name == "client_max_window_bits":
            if has_value:
                if not (value.isdigit() and 9 <= int(value) <= 15 and value[0] != "0"):
                    return None
                out.append(f"{name}={value}")
            elif name == "client_max_window_bits":  # the client lets us choose
                out.append(name)
            else:
                return None
        else:
            return None
    return "; ".join([_DEFLATE, *out])


def handshake_headers(
    headers: Iterable[tuple[bytes, bytes]], *, per_message_deflate: bool
) -> list[tuple[bytes, bytes]]:
    """The request headers to give wsproto: at most one permessage-deflate offer.

    A client may offer permessage-deflate several times, best first (RFC 7692 §5). wsproto
    would run every offer through the *same* extension object, so parameters of a declined
    offer leak into the accepted one; handing it only the first acceptable offer keeps its
    state and our response in agreement. Other extensions are not supported and dropped.
    """
    out = [(name, value) for name, value in headers if name != b"sec-websocket-extensions"]
    if not per_message_deflate:
        return out
    for name, value in headers:
        if name != b"sec-websocket-extensions":
            continue
        for offer in value.decode("latin-1").split(","):
            kind, *params = (part.strip() for part in offer.split(";"))
            if kind == _DEFLATE and offer.isascii():
                normalised = _deflate_offer_ok(params)
                if normalised is not None:
                    out.append((b"sec-websocket-extensions", normalised.encode("ascii")))
                    return out
    return out


def connect_message() -> dict[str, Any]:
    return {"type": "websocket.connect"}


def disconnect_message(code: int, reason: str = "") -> dict[str, Any]:
    return {"type": "websocket.disconnect", "code": code, "reason": reason}


# -- messages from the app ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accept:
    """``websocket.accept``: validated subprotocol and extra response headers."""

    subprotocol: str | None
    headers: list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Send:
    """``websocket.send``: one complete message, text (``str``) or binary (``bytes``)."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class Close:
    """``websocket.close``; before the accept it means "reject with 403"."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ResponseStart:
    """``websocket.http.response.start`` (denial response); fields checked by the writer."""

    message: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class ResponseBody:
    """``websocket.http.response.body`` (denial response); ``last`` ends the response."""

    message: Mapping[str, object]
    last: bool


AppMessage = Union[Accept, Send, Close, ResponseStart, ResponseBody]


class Phase(enum.Enum):
    """Where the app is in the ASGI websocket protocol."""

    CONNECTING = "connecting"  # handshake pending: accept, close or a denial response
    RESPONDING = "responding"  # denial response started, body pending
    ACCEPTED = "accepted"
    CLOSED = "closed"  # the app sent websocket.close after accepting
    REJECTED = "rejected"  # the handshake was refused (403 or the app's own response)


_ACCEPTED: Final = Phase.ACCEPTED  # (bound once: a member lookup on an enum class is dear)


class AppMessages:
    """Validate what the app sends, in order (see the module docstring).

    Args:
        subprotocols: what the client offered; an accepted subprotocol must be one of them.
    """

    __slots__ = ("phase", "subprotocols")

    def __init__(self, subprotocols: Sequence[str]) -> None:
        self.phase = Phase.CONNECTING
        self.subprotocols = subprotocols

    def next(self, message: object) -> AppMessage:
        """Validate ``message`` against the current phase and advance.

        Raises:
            AppProtocolError: not a message, unknown type, wrong phase or bad fields. The
                phase is unchanged then.
        """
        if type(message) is not dict and not isinstance(message, Mapping):
            raise AppProtocolError(f"ASGI message must be a dict, got {message!r}")
        kind = message.get("type")
        phase = self.phase
        result: AppMessage
        if kind == "websocket.send":
            if phase is not _ACCEPTED:
                raise _out_of_order(kind, phase)
            return Send(message_data(message))
        if kind == "websocket.accept":
            if phase is not Phase.CONNECTING:
                raise _out_of_order(kind, phase)
            result = Accept(self._subprotocol(message), _accept_headers(message))
            self.phase = Phase.ACCEPTED
        elif kind == "websocket.close":
            if phase is not Phase.CONNECTING and phase is not Phase.ACCEPTED:
                raise _out_of_order(kind, phase)
            result = Close(*_close_fields(message))
            self.phase = Phase.REJECTED if phase is Phase.CONNECTING else Phase.CLOSED
        elif kind == "websocket.http.response.start":
            if phase is not Phase.CONNECTING:
                raise _out_of_order(kind, phase)
            result = ResponseStart(message)
            self.phase = Phase.RESPONDING
        elif kind == "websocket.http.response.body":
            if phase is not Phase.RESPONDING:
                raise _out_of_order(kind, phase)
            more_body = message.get("more_body", False)
            if not isinstance(more_body, bool):
                raise AppProtocolError(f"'more_body' must be a bool, got {more_body!r}")
            result = ResponseBody(message, last=not more_body)
            if not more_body:
                self.phase = Phase.REJECTED
        else:
            raise AppProtocolError(f"unexpected ASGI message type {kind!r} for websocket")
        return result

    def _subprotocol(self, message: Mapping[str, object]) -> str | None:
        subprotocol = message.get("subprotocol")
        if subprotocol is None:
            return None
        if not isinstance(subprotocol, str):
            raise AppProtocolError(f"'subprotocol' must be a str or None, got {subprotocol!r}")
        if subprotocol not in self.subprotocols:
            # RFC 6455 §4.2.2: the server selects one of the values the client offered.
            raise AppProtocolError(
                f"subprotocol {subprotocol!r} was not offered by the client "
                f"(offered: {list(self.subprotocols)!r})"
            )
        return subprotocol


def _out_of_order(kind: object, phase: Phase) -> AppProtocolError:
    return AppProtocolError(f"{kind!r} cannot be sent when the websocket is {phase.value}")


def message_data(message: Mapping[str, object]) -> str | bytes:
    """The payload of ``websocket.send``: exactly one of ``bytes`` and ``text``."""
    data = message.get("bytes")
    text = message.get("text")
    if data is not None and text is not None:
        raise AppProtocolError("'websocket.send' must have 'bytes' or 'text', not both")
    if text is not None:
        if not isinstance(text, str):
            raise AppProtocolError(f"'text' must be a str, got {type(text).__name__}")
        return text
    if data is not None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise AppProtocolError(f"'bytes' must be bytes, got {type(data).__name__}")
        return bytes(data)
    raise AppProtocolError("'websocket.send' needs 'bytes' or 'text'")


def _accept_headers(message: Mapping[str, object]) -> list[tuple[bytes, bytes]]:
    headers = validate_headers(message.get("headers"))
    if headers:
        # Check names and values now, before wsproto commits to the handshake.
        try:
            h11.InformationalResponse(status_code=101, headers=headers)
        except h11.LocalProtocolError as exc:
            raise AppProtocolError(f"invalid 'websocket.accept' headers: {exc}") from None
    return headers


def _close_fields(message: Mapping[str, object]) -> tuple[int, str]:
    code = message.get("code", CLOSE_NORMAL)
    reason = message.get("reason")
    if isinstance(code, bool) or not isinstance(code, int):
        raise AppProtocolError(f"'code' must be an int, got {code!r}")
    if code not in _SENDABLE_CODES and not 3000 <= code <= 4999:
        raise AppProtocolError(f"'code' {code} may not be sent in a Close frame (RFC 6455 §7.4)")
    if reason is None:
        reason = ""
    if not isinstance(reason, str):
        raise AppProtocolError(f"'reason' must be a str or None, got {reason!r}")
    return code, reason


# -- messages from the peer ---------------------------------------------------------------


class MessagePart(Protocol):
    """A message, or a fragment of one, as a WebSocket engine hands it out
    (``ws_engine``): text (already UTF-8-checked) or binary. wsproto's ``TextMessage`` and
    ``BytesMessage`` are ones."""

    @property
    def data(self) -> str | bytes | bytearray: ...

    @property
    def message_finished(self) -> bool: ...


class MessageTooBigError(Exception):
    """An incoming message exceeds ``--ws-max-size``; the connection closes with 1009."""


class MessageAssembler:
    """Join the fragments an engine yields into whole ``websocket.receive`` messages.

    The engines hand out each frame (wsproto even part of a frame) as soon as it is
    decoded, text already UTF-8-checked, so the size limit is enforced while a message
    grows, not after it has been buffered in full.

    Args:
        max_size: the largest message accepted, in bytes (UTF-8 bytes for text).
    """

    __slots__ = ("_max_size", "_parts", "_size")

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._parts: list[Any] = []  # str fragments or bytes fragments, never mixed
        self._size = 0

    def feed(self, event: MessagePart) -> dict[str, Any] | None:
        """Add a fragment; return the message when it is complete, else None.

        Raises:
            MessageTooBigError: the message grew past ``max_size``.
        """
        data = event.data
        if isinstance(data, str):
            self._size += len(data) if data.isascii() else len(data.encode("utf-8"))
        else:
            self._size += len(data)
        if self._size > self._max_size:
            raise MessageTooBigError(f"message of more than {self._max_size} bytes (--ws-max-size)")
        if not event.message_finished:
            self._parts.append(data)
            return None
        parts = self._parts
        self._parts = []
        self._size = 0
        if isinstance(data, str):
            return {"type": "websocket.receive", "text": "".join([*parts, data])}
        return {"type": "websocket.receive", "bytes": b"".join([*parts, data])}


class CloseKind(enum.Enum):
    """What a ``CloseConnection`` event from wsproto means (see :func:`classify_close`)."""

    PEER_CLOSING = "peer-closing"  # the peer started the close handshake: answer it
    HANDSHAKE_DONE = "handshake-done"  # the peer answered our Close frame
    LOST = "lost"  # the transport ended without a Close frame (code 1006)
    INVALID = "invalid"  # wsproto refused a frame: fail the connection with event.code


def classify_close(event: CloseConnection, state_after: ConnectionState) -> CloseKind:
    """Classify a ``CloseConnection`` by the connection state wsproto moved to.

    wsproto reports a frame it cannot accept (``ParseFailed``: bad opcode, bad UTF-8, bad
    close code...) as a ``CloseConnection`` carrying the code to fail with, without
    changing its state; a real Close frame moves the state on.
    """
    if state_after is ConnectionState.REMOTE_CLOSING:
        return CloseKind.PEER_CLOSING
    if state_after is ConnectionState.CLOSED:
        return CloseKind.LOST if event.code == CLOSE_ABNORMAL else CloseKind.HANDSHAKE_DONE
    return CloseKind.INVALID
