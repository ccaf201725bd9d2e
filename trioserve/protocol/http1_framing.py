"""HTTP/1.1 message framing for the httptools parser (layer 2: sans-IO, never trio).

Where a message's body ends, and how a response's head frames its body, decided as h11
decides them, so that :mod:`.httptools_parser` produces and consumes exactly h11's bytes:

* the request side: :class:`BodyEnd` finds where the body of an upgrade request ends
  (Content-Length or chunked), so that no byte after it is parsed before the server has
  answered (``HttptoolsConnection._unskip_body``); :func:`primed_parser` is the llhttp
  parser both use to read such a body on its own.
* the response side: :class:`ResponseSide` is the parser's response half (states and
  serialising); :func:`framing_fields` applies h11's checks to the framing fields an
  app sent (one Content-Length, a lone "chunked" transfer coding; h11's error messages and
  status hints); :func:`response_head` decides the body's framing and whether the
  connection stays open (chunked or Content-Length, HTTP/1.0 peers, HEAD/204/304,
  ``Connection: close``), and :func:`encode_head` writes the head as h11 does (a Host field
  first).

The functions are imported by name (``from .http1_framing import ...``): a call costs what
it cost when they lived in the parser's module.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Final

import h11
import httptools

from .response_extensions import FileRegion

# Body framing of the response being sent (what send_body does with each piece).
FRAMED_BY_LENGTH: Final = 0
CHUNKED: Final = 1
UNTIL_CLOSE: Final = 2  # an HTTP/1.0 peer and no Content-Length: the close ends the body
EMPTY_BODY: Final = (204, 304)  # statuses without a body (RFC 9110 §15.3.5, §15.4.5)
# (h11's names bound once: the hot paths below look each up per request.)
_IDLE: Final = h11.IDLE
_SEND_BODY: Final = h11.SEND_BODY
_SEND_RESPONSE: Final = h11.SEND_RESPONSE
_DONE: Final = h11.DONE
_DATA: Final = h11.Data
_END: Final = h11.EndOfMessage
_LAST_CHUNK: Final = b"0\r\n\r\n"
# The status line of each registered status with its reason phrase (send_encoded_head).
_STATUS_LINES: Final = {
    status.value: (phrase, b"HTTP/1.1 %d %s\r\n" % (status.value, phrase))
    for status in HTTPStatus
    for phrase in [status.phrase.encode("ascii")]
}


def primed_parser(protocol: object, length: int) -> httptools.HttpRequestParser:
    """A new llhttp parser for ``protocol``, fed a head whose body is framed by
    Content-Length ``length`` or, if 0, chunked: it goes on to parse such a body."""
    parser = httptools.HttpRequestParser(protocol)
    framing = b"Content-Length: %d" % length if length else b"Transfer-Encoding: chunked"
    parser.feed_data(b"PUT / HTTP/1.1\r\nHost: _\r\n%s\r\n\r\n" % framing)
    return parser


class BodyEnd:
    """Where the body of an upgrade request ends, so that no byte after it is parsed.

    llhttp tells a body's end only by going on to parse what follows it as the next
    message, which must wait here (see ``HttptoolsConnection._unskip_body``). A
    Content-Length body ends after as many bytes. A chunked body ends right after a
    CRLF CRLF (its last chunk, "0" and maybe extensions, then trailer fields, each line
    ended by CRLF: llhttp refuses a bare LF), and llhttp finds which: two silent llhttp
    parsers, primed alike, are fed each read. The one ahead takes it whole and tells
    whether the body ends in it; the one behind follows, in one piece while it does not
    and, in the read where it does, piece by piece, each piece ending after a CRLF CRLF,
    until it too has seen the end (at most one piece per two bytes of that one read, all
    in C). They judge nothing: a broken body is refused by the parser that reads it.
    """

    __slots__ = ("_ahead", "_ahead_ends", "_behind", "_behind_ends", "_left", "_tail", "ended")

    def __init__(self, length: int) -> None:
        self.ended = False
        self._left = length  # (0: chunked)
        self._ahead_ends = _Ends()
        self._behind_ends = _Ends()
        self._ahead = self._behind = None
        if not length:
            self._ahead = primed_parser(self._ahead_ends, 0)
            self._behind = primed_parser(self._behind_ends, 0)
        self._tail = b""  # the last 3 bytes measured (a CRLF CRLF may span two reads)

    def measure(self, data: bytes | bytearray) -> int:
        """How many bytes of ``data`` belong to the body (all, until ``ended``)."""
        ahead, behind = self._ahead, self._behind
        if ahead is None or behind is None:
            size = min(self._left, len(data))
            self._left -= size
            self.ended = not self._left
            return size
        tail = self._tail
        joined = tail + data
        self._tail = joined[-3:]
        try:
            ahead.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if not self._ahead_ends.count:
                return len(data)  # (a broken body: the parser that reads it refuses it too)
            # (else what follows the body is not HTTP: no matter)
        if not self._ahead_ends.count:
            behind.feed_data(data)  # (kept level: the same bytes, parsed without error)
            return len(data)
        view = memoryview(joined)
        start = len(tail)
        at = joined.find(b"\r\n\r\n")
        while at != -1:
            behind.feed_data(view[start : at + 4])  # (the body's bytes: no error)
            start = at + 4
            if self._behind_ends.count:
                self.ended = True
                return start - len(tail)
            at = joined.find(b"\r\n\r\n", at + 1)
        return len(data)  # (not reached: the end follows a CRLF CRLF)


class _Ends:
    """A silent llhttp protocol: counts the messages that ended."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def on_message_complete(self) -> None:
        self.count += 1


def has_token(value: bytes, token: bytes) -> bool:
    """Whether the comma-separated, case-insensitive ``value`` lists ``token``."""
    return any(part.strip() == token for part in value.lower().split(b","))


def without(fields: list[tuple[bytes, bytes]], name: bytes) -> list[tuple[bytes, bytes]]:
    return [field for field in fields if field[0].lower() != name]


def framing_fields(
    fields: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], bytes | None, bool, list[bytes] | None, bool]:
    """Check a response's framing headers as h11 does, and find what framing needs.

    Returns:
        The fields (Content-Length normalised and kept once, Transfer-Encoding lower-case),
        the Content-Length, whether the body is chunked, the Connection values, and
        whether there is a Host field.

    Raises:
        h11.LocalProtocolError: a bad or conflicting Content-Length, or a transfer coding
            other than one "chunked" (h11's messages).
    """
    length: bytes | None = None
    chunked = False
    connection: list[bytes] | None = None
    host = False
    out: list[tuple[bytes, bytes]] | None = None  # made only when a field changes
    for index, (raw_name, value) in enumerate(fields):
        name = raw_name.lower()
        if name == b"content-length":
            if value.isdigit() and value.isascii() and len(value) <= 20 and length is None:
                length = value  # (the common case: one plain number)
                if out is not None:
                    out.append((raw_name, value))
                continue
            lengths = {part.strip() for part in value.split(b",")}
            if len(lengths) != 1:
                raise h11.LocalProtocolError("conflicting Content-Length headers")
            normal = lengths.pop()
            if not normal.isdigit() or not normal.isascii():
                raise h11.LocalProtocolError("bad Content-Length")
            if len(normal) > 20:
                raise h11.LocalProtocolError("Content-Length too long")
            if length is not None and length != normal:
                raise h11.LocalProtocolError("conflicting Content-Length headers")
            if normal != value or length is not None:
                out = fields[:index] if out is None else out
                if length is None:
                    out.append((raw_name, normal))
                length = normal
                continue
            length = normal
        elif name == b"transfer-encoding":
            if chunked:
                raise h11.LocalProtocolError(
                    "multiple Transfer-Encoding headers", error_status_hint=501
                )
            if value.lower() != b"chunked":
                raise h11.LocalProtocolError(
                    "Only Transfer-Encoding: chunked is supported", error_status_hint=501
                )
            chunked = True
            if value != b"chunked":
                out = fields[:index] if out is None else out
                out.append((raw_name, b"chunked"))
                continue
        elif name == b"connection":
            connection = [value] if connection is None else [*connection, value]
        elif name == b"host":
            host = True
        if out is not None:
            out.append((raw_name, value))
    return (fields if out is None else out), length, chunked, connection, host


def encode_head(status: int, reason: bytes, fields: list[tuple[bytes, bytes]], host: bool) -> bytes:
    """A status line and header fields, as h11 writes them (a Host field first)."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    if host:
        lines += [b"%s: %s\r\n" % field for field in fields if field[0].lower() == b"host"]
        lines += [b"%s: %s\r\n" % field for field in fields if field[0].lower() != b"host"]
    else:
        lines += [b"%s: %s\r\n" % field for field in fields]
    lines.append(b"\r\n")
    return b"".join(lines)


def response_head(
    status: int,
    reason: bytes,
    fields: list[tuple[bytes, bytes]],
    length: bytes | None,
    chunked: bool,
    connection: list[bytes] | None,
    host: bool,
    method: bytes | None,
    version: bytes | None,
    keep_alive: bool,
) -> tuple[bytes, int, int, bool]:
    """A response head with h11's framing rules applied.

    Args:
        status, reason: the status line's.
        fields, length, chunked, connection, host: what :func:`framing_fields` returned.
        method, version: the request's method and HTTP version.
        keep_alive: whether the connection could stay open before this response.

    Returns:
        The head's bytes; the body's framing (``FRAMED_BY_LENGTH``, ``CHUNKED`` or
        ``UNTIL_CLOSE``); the body's length when framed by length (0 for HEAD, 204, 304);
        and whether the connection stays open after the response.
    """
    closes = connection is not None and any(has_token(v, b"close") for v in connection)
    need_close = False
    framing = FRAMED_BY_LENGTH
    body_left = 0
    if status in EMPTY_BODY:
        pass
    elif chunked or length is None:
        # A body of unknown length: chunked for HTTP/1.1, the close for HTTP/1.0.
        fields = without(fields, b"content-length")
        fields = without(fields, b"transfer-encoding") if chunked else fields
        if version is None or version < b"1.1":
            framing = UNTIL_CLOSE
            if method != b"HEAD":
                need_close = True
        else:
            fields.append((b"Transfer-Encoding", b"chunked"))
            framing = CHUNKED
    else:
        body_left = int(length)
    if method == b"HEAD":  # the framing headers a GET would have had, and no body
        framing = FRAMED_BY_LENGTH
        body_left = 0
    elif status in EMPTY_BODY:
        framing = FRAMED_BY_LENGTH
    # (The app's own "Connection: close" ends keep-alive only after this rewrite, as in h11:
    # its fields are then sent as they are.)
    if not keep_alive or need_close:
        tokens = {b"close"}
        for value in connection or ():
            tokens.update(t.strip() for t in value.lower().split(b",") if t.strip())
        tokens.discard(b"keep-alive")
        fields = without(fields, b"connection") + [(b"Connection", t) for t in sorted(tokens)]
        closes = True
    return encode_head(status, reason, fields, host), framing, body_left, keep_alive and not closes


class ResponseSide:
    """The response half of the httptools parser's ``h11.Connection`` (its base class): h11's
    states for both sides, and the serialising of a response with h11's framing rules
    (:func:`framing_fields`, :func:`response_head`), producing the bytes h11 would. The
    reading half (``httptools_parser.HttptoolsConnection``) moves the states as requests
    arrive."""

    __slots__ = (
        "_body_left",
        "_framing",
        "_keep_alive",
        "_request_method",
        "our_state",
        "their_http_version",
        "their_state",
        "they_are_waiting_for_100_continue",
    )

    def __init__(self) -> None:
        self._request_method: bytes | None = None
        self._keep_alive = True
        self._framing = FRAMED_BY_LENGTH
        self._body_left = 0
        self.our_state: Any = _IDLE
        self.their_state: Any = _IDLE
        self.their_http_version: bytes | None = None
        self.they_are_waiting_for_100_continue = False

    def send(self, event: Any) -> bytes | None:
        """Serialise ``event`` (a response head, body data or its end) as h11 would."""
        pieces = self.send_with_data_passthrough(event)
        if pieces is None:
            return None
        return b"".join(pieces)

    def send_with_data_passthrough(self, event: Any) -> list[Any] | None:
        """Like :meth:`send`, leaving body data uncopied in the returned pieces.

        Raises:
            h11.LocalProtocolError: an event the state does not allow, or a body that
                contradicts its Content-Length; our state is then ERROR, as in h11.
        """
        try:
            kind = type(event)
            state = self.our_state
            if kind is _DATA:
                return self.send_body(event.data, False)
            if kind is _END:
                return self.send_body(b"", True)
            if kind is h11.Response:  # (h11 validated the event's fields)
                return self.send_response_head(
                    event.status_code, event.reason, event.headers.raw_items()
                )
            if kind is h11.InformationalResponse:
                if state is not _SEND_RESPONSE:
                    raise h11.LocalProtocolError(f"can't send a 1xx response in state {state}")
                self.they_are_waiting_for_100_continue = False
                return [
                    encode_head(event.status_code, event.reason, event.headers.raw_items(), True)
                ]
            raise h11.LocalProtocolError(f"can't send {kind.__name__}")
        except BaseException:
            self.our_state = h11.ERROR
            raise

    def send_body(self, data: bytes | FileRegion, end: bool) -> list[Any]:
        """Body bytes and, if ``end``, the response's end (``HTTPParser``'s addition)."""
        state = self.our_state
        if state is not _SEND_BODY:
            self.our_state = h11.ERROR
            raise h11.LocalProtocolError(f"can't send a body in state {state}")
        framing = self._framing
        if framing is CHUNKED:
            pieces = [b"%x\r\n" % len(data), data, b"\r\n"] if data else []
        else:
            pieces = [data] if data else []
            if framing is FRAMED_BY_LENGTH:
                left = self._body_left - len(data)
                if left < 0 or (end and left):
                    self.our_state = h11.ERROR
                    raise h11.LocalProtocolError(
                        "Too much data for declared Content-Length"
                        if left < 0
                        else "Too little data for declared Content-Length"
                    )
                self._body_left = left
        if end:
            self.our_state = _DONE
            if not self._keep_alive:
                self._must_close()
            if framing is CHUNKED:
                pieces.append(_LAST_CHUNK)
        return pieces

    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> list[Any]:
        """The end of a chunked body with trailer fields (``HTTPParser``'s addition)."""
        if self._framing is not CHUNKED:
            raise h11.LocalProtocolError("trailers require a chunked response body")
        pieces = self.send_body(b"", True)
        pieces[-1] = b"0\r\n%s\r\n" % b"".join(b"%s: %s\r\n" % field for field in fields)
        return pieces

    def _must_close(self) -> None:
        """h11's rule once keep-alive is off: a side whose message is DONE must close."""
        if self.our_state is _DONE:
            self.our_state = h11.MUST_CLOSE
        if self.their_state is _DONE:
            self.their_state = h11.MUST_CLOSE

    def send_encoded_head(
        self, status: int, reason: bytes, lines: bytes, length: int
    ) -> list[Any] | None:
        """A head of plain fields with one Content-Length, already encoded (``HTTPParser``'s
        addition); None when h11's rules would change it (the caller then sends it through
        :meth:`send_response_head`).

        The common case: an HTTP/1.1 exchange, a response that is neither to HEAD nor a 204
        or 304, whose fields h11 leaves as they are but for "Connection: close" when the
        client asked for it.
        """
        if (
            self.our_state is not _SEND_RESPONSE
            or self._request_method == b"HEAD"
            or self.their_http_version != b"1.1"
            or status in EMPTY_BODY
        ):
            return None
        self._framing = FRAMED_BY_LENGTH
        self._body_left = length
        self.our_state = _SEND_BODY
        self.they_are_waiting_for_100_continue = False
        end = b"\r\n" if self._keep_alive else b"Connection: close\r\n\r\n"
        known = _STATUS_LINES.get(status)
        if known is not None and known[0] == reason:  # (concatenated: a third of a format)
            return [known[1] + lines + end]
        return [b"HTTP/1.1 %d %s\r\n%s%s" % (status, reason, lines, end)]

    def send_response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> list[Any]:
        """The head's bytes, h11's framing rules applied (``HTTPParser``'s addition).

        Raises:
            h11.LocalProtocolError: bad framing headers (nothing changed), or a response the
                state does not allow (our state is then ERROR).
        """
        state = self.our_state
        framing = framing_fields(headers)  # (raises before any state changes)
        if state is not _IDLE and state is not _SEND_RESPONSE:
            self.our_state = h11.ERROR
            raise h11.LocalProtocolError(f"can't send a response in state {state}")
        head, self._framing, self._body_left, self._keep_alive = response_head(
            status,
            reason,
            *framing,
            self._request_method,
            self.their_http_version,
            self._keep_alive,
        )
        self.our_state = _SEND_BODY
        self.they_are_waiting_for_100_continue = False
        return [head]

    def send_failed(self) -> None:
        """A write failed part-way: nothing more can be sent (as ``h11.Connection``)."""
        self.our_state = h11.ERROR
