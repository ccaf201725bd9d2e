"""HTTP/1.1 <-> ASGI translation, decided without I/O (layer 2: h11, never trio).

Theory of operation
-------------------
``connection.http1`` owns the socket and the parser (h11's ``Connection`` or its
httptools twin, one interface: ``http1_parser.HTTPParser``); this module holds
everything about a request/response pair that can be decided without awaiting:

* :func:`header_list` and :func:`screen_request` take an ``h11.Request`` apart and screen
  it (the scope itself is built in ``protocol.scope``; :func:`build_http_scope` adapts).
* :class:`ResponseWriter` is the response state machine. The app's ``http.response.start``
  is validated and *held*; the head leaves together with the first body chunk, and a
  complete small body (``more_body=False``) leaves with it, so a hello-world response is
  a single write::

      WAITING ──start──► STARTED ──body(more)──► STREAMING ──body(last)──► COMPLETE
         │                  └────────body(last)───────────────────────────►┘
         └── anything but start: AppProtocolError

  Bodies are dropped (never sent) for HEAD requests and 204/304 responses
  (RFC 9110 §9.3.2, §15.3.5, §15.4.5); the parser keeps the framing honest.
  The response extensions (``protocol.response_extensions``) fit in: an early hint is a
  103 written while WAITING; ``http.response.pathsend`` is a last body whose bytes are a
  ``FileRegion``; with trailers announced, the last body leads to TRAILERS and
  ``http.response.trailers`` (its last message) to COMPLETE.
* :class:`~trioserve.protocol.response_heads.ResponseHeads` (one per server, in
  ``response_heads``) checks and encodes each distinct header list an app sends once; the
  httptools parser takes the common head already encoded.
* :func:`error_response` renders the plain 4xx/5xx responses trioserve sends itself.

Messages from the app are untrusted: every field is type-checked here and violations raise
:class:`~trioserve.errors.AppProtocolError` (never ``KeyError`` or ``TypeError``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

import h11

from ..errors import AppProtocolError
from .response_extensions import FileRegion, early_hint_fields, trailer_fields
from .response_heads import ResponseFields, ResponseHeads, check_fields, parse_body
from .scope import ConnectionFacts, http_scope

if TYPE_CHECKING:
    from .http1_parser import HTTPParser

_EMPTY_BODY_STATUSES: Final = frozenset({204, 304})
_CLOSE_HEADER: Final = (b"connection", b"close")
_NO_MESSAGE: Final[Mapping[str, object]] = {}

REASONS: Final = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def build_http_scope(
    request: h11.Request,
    *,
    scheme: str,
    client: tuple[str, int] | None,
    server: tuple[str, int | None] | None,
    root_path: str,
    state: dict[str, Any] | None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> dict[str, Any]:
    """The ASGI ``http`` scope of ``request`` (:func:`trioserve.protocol.scope.http_scope`).

    For callers holding an ``h11.Request`` and loose connection facts (tests, tools); the
    server builds its scopes with ``http_scope`` directly, from a ``ConnectionFacts`` made
    once per connection. Pass ``headers`` when the caller already made the list (see
    :func:`header_list`); the scope takes it as is.
    """
    facts = ConnectionFacts(client, server, scheme, root_path)
    if headers is None:
        headers = header_list(request)
    return http_scope(request.method, request.target, request.http_version, headers, facts, state)


def header_list(request: h11.Request) -> list[tuple[bytes, bytes]]:
    """The request's headers as a plain list, made once per request.

    Iterating h11's ``Headers`` (a ``Sequence``) costs a generator, an indexing call per
    header and an IndexError at the end: the checks below and the scope share one list,
    made from the (name, lower-case name, value) triples the ``Headers`` keeps.
    """
    return [(name, value) for _, name, value in request.headers._full_items]


# h11 accepts these requests, but each is a request-smuggling vector when a proxy in front
# of us reads the framing differently.
_HEAD_END: Final = re.compile(rb"\n\r?\n")  # the blank line ending a head, as h11 finds it
_OBS_FOLD: Final = re.compile(rb"\n[ \t]")


def check_request(
    request: h11.Request,
    *,
    max_head_size: int,
    headers: list[tuple[bytes, bytes]] | None = None,
    max_body_size: int = 0,
) -> tuple[int, str] | None:
    """Reject what h11 lets through: return ``(status, reason)`` or None when acceptable
    (see :func:`screen_request`)."""
    result = screen_request(
        request, max_head_size=max_head_size, headers=headers, max_body_size=max_body_size
    )
    return None if type(result) is bool else result


def screen_request(
    request: h11.Request,
    *,
    max_head_size: int,
    headers: list[tuple[bytes, bytes]] | None = None,
    max_body_size: int = 0,
) -> tuple[int, str] | bool:
    """Reject what h11 lets through: return ``(status, reason)``; or, when the request is
    acceptable, whether it has an ``Upgrade`` field (then :func:`upgrade_offered` tells what
    it asks for: the common request, without one, is looked at once).

    * Content-Length together with Transfer-Encoding (RFC 9112 §6.3: "ought to be handled as
      an error"; h11 silently prefers chunked), and Transfer-Encoding in an HTTP/1.0 request
      (RFC 9112 §6.1: "MUST treat the message as if the framing is faulty").
    * A Content-Length over ``max_body_size`` (0: no limit), answered 413 before the app is
      called, as nginx's ``client_max_body_size`` does (RFC 9110 §15.5.14); a chunked body
      is counted as it arrives (``connection.http1_body``).
    * A major version other than 1 (RFC 9110 §15.6.6: 505).
    * ``CONNECT`` (501): ASGI has no tunnels, and h11 would turn the app's 2xx into one.
    * A head larger than ``max_head_size``: h11 only bounds heads that arrive in several
      reads (``max_incomplete_event_size``), so one large read must be bounded here.
    """
    version = request.http_version
    if version[:1] != b"1":
        return 505, f"unsupported HTTP version {version.decode('ascii', 'replace')}"
    if request.method == b"CONNECT":
        # A 2xx would switch the connection to a tunnel (h11), which ASGI cannot express.
        return 501, "CONNECT is not supported"
    size = len(request.method) + len(request.target) + 12
    content_length: bytes | None = None
    transfer_encoding = upgrade = False
    for name, value in header_list(request) if headers is None else headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            content_length = value
        elif name == b"transfer-encoding":
            transfer_encoding = True
        elif name == b"upgrade":
            upgrade = True
    if size > max_head_size:
        return 431, f"request head larger than {max_head_size} bytes"
    if transfer_encoding:
        if content_length is not None:
            return 400, "both Content-Length and Transfer-Encoding"
        if version == b"1.0":
            return 400, "Transfer-Encoding in an HTTP/1.0 request"
    # (Both parsers have checked that the value is one decimal number.)
    elif max_body_size and content_length is not None and int(content_length) > max_body_size:
        return 413, (
            f"request body too large: Content-Length {int(content_length)} over the "
            f"{max_body_size}-byte --limit-request-body"
        )
    return upgrade


def head_has_obs_fold(buffer: bytes) -> bool:
    """Whether the (possibly incomplete) request head at the start of ``buffer`` folds a line.

    h11 unfolds obs-fold silently; RFC 9112 §5.2 lets a server reject it with 400 instead,
    which is the safe choice when the head passes through other parsers (request smuggling).
    """
    # Bound the search to the head: ``buffer`` may also hold a large body (scanning 64 KiB
    # costs ~100x more than finding the blank line that ends the head).
    end = _HEAD_END.search(buffer)
    return _OBS_FOLD.search(buffer, 0, len(buffer) if end is None else end.start()) is not None


def is_websocket_upgrade(
    request: h11.Request, headers: list[tuple[bytes, bytes]] | None = None
) -> bool:
    """Whether the request is a WebSocket opening handshake (RFC 6455 §4.1).

    "The method of the request MUST be GET, and the HTTP version MUST be at least 1.1"
    (§4.1). Any other request offering the upgrade is plain HTTP: a server may ignore an
    Upgrade field (RFC 9110 §7.8; in an HTTP/1.0 request it MUST), so the app answers it
    as it answers that method on that path. (Not 405, as the ``websockets`` library
    answers: only the app's routing knows which methods the path allows.)
    """
    return upgrade_offered(request, headers) == b"websocket"


def upgrade_offered(
    request: h11.Request, headers: list[tuple[bytes, bytes]] | None = None
) -> bytes | None:
    """The protocol an HTTP/1.1 request asks to switch to, in one pass over its fields.

    ``b"websocket"``: a WebSocket opening handshake (see :func:`is_websocket_upgrade`).
    ``b"h2c"``: a GET or HEAD offering ``Upgrade: h2c`` (RFC 7540 §3.2; the caller checks
    ``HTTP2-Settings`` with ``protocol.http2.h2c_settings`` and that there is no body).
    None for any other request (the common case: one loop over the fields, no more).
    """
    method = request.method
    if (method != b"GET" and method != b"HEAD") or request.http_version != b"1.1":
        return None
    websocket = h2c = False
    connection_upgrade = False
    for key, value in header_list(request) if headers is None else headers:
        if key == b"upgrade":
            value = value.lower()
            websocket = websocket or b"websocket" in value
            h2c = h2c or any(token.strip() == b"h2c" for token in value.split(b","))
        elif key == b"connection":
            connection_upgrade = connection_upgrade or any(
                token.strip() == b"upgrade" for token in value.lower().split(b",")
            )
    if not connection_upgrade:
        return None
    if websocket and method == b"GET":
        return b"websocket"
    return b"h2c" if h2c else None


class ResponseState(enum.Enum):
    WAITING = "waiting"
    STARTED = "started"
    STREAMING = "streaming"
    TRAILERS = "trailers"  # the body has ended; the app's trailer fields end the response
    COMPLETE = "complete"


# (Bound once: an enum member looked up on its class costs as much as a small function
# call in Python 3.11, and the writer checks its state several times per response.)
_WAITING: Final = ResponseState.WAITING
_STARTED: Final = ResponseState.STARTED
_STREAMING: Final = ResponseState.STREAMING
_TRAILERS: Final = ResponseState.TRAILERS
_COMPLETE: Final = ResponseState.COMPLETE


class ResponseWriter:
    """The response half of one request/response cycle (see module docstring).

    Args:
        conn: the connection's parser (``h11.Connection`` or its httptools twin); only its
            sans-IO response half is used (``send_response_head``, ``send_encoded_head``,
            ``send_body``).
        method: the request method (HEAD responses carry no body).
        default_headers: encoded headers added unless the app sets the same name.
        heads: the server's :class:`ResponseHeads`, shared by the writers of one server; a
            fresh one when omitted.
    """

    # (No __slots__: what a writer starts with is a class attribute, so making one, once
    # per request, sets 4 attributes instead of 11.)
    _fields: ResponseFields | None = None
    _close = False
    state = _WAITING
    status: int | None = None
    body_bytes = 0  # response body bytes handed to the parser (for the access log)
    # (Plain attributes, not properties of ``state``: read several times per response.)
    started = False  # the head has been handed to the parser (maybe written)
    complete = False
    # The app announced trailers ("trailers": True in start): the body's last message
    # leaves the response open for http.response.trailers. They reach the wire only when
    # the client accepts them (accept_trailers), in a chunked body.
    trailers = False
    _send_trailers = False
    _trailer_fields: list[tuple[bytes, bytes]] | None = None

    def __init__(
        self,
        conn: HTTPParser,
        method: bytes,
        default_headers: tuple[tuple[bytes, bytes], ...],
        heads: ResponseHeads | None = None,
    ) -> None:
        self._conn = conn
        self._heads = ResponseHeads() if heads is None else heads
        self._no_body = method == b"HEAD"
        self._default_headers = default_headers

    def note_status(self, status: int) -> None:
        """Record the status of a response the server sent instead (an error answer, or
        499 for a client that left first), for the access log; no head of the app's left."""
        self.status = status

    def accept_trailers(self, accepted: bool) -> None:
        """Whether the client takes trailer fields (it sent ``TE: trailers``), told once
        the app announced some (:attr:`trailers`). They are sent only in a chunked body
        to an HTTP/1.1 client, for a response that has a body; the app's Content-Length
        then gives way to chunked framing. Otherwise they are dropped (RFC 9110 §6.5:
        trailer fields are optional metadata) and the body ends as usual."""
        if accepted and not self._no_body and self._conn.their_http_version == b"1.1":
            self._send_trailers = True
            fields = self._fields
            assert fields is not None  # (set by start())
            # Trailers follow the last chunk (RFC 9112 §7.1.2): the app's fields with
            # chunked framing instead of any Content-Length.
            chunked = [field for field in fields.fields if field[0].lower() != b"content-length"]
            if b"transfer-encoding" not in fields.names:
                chunked.append((b"transfer-encoding", b"chunked"))
            self._fields = self._heads.fields_of(chunked)

    def early_hint(self, message: Mapping[str, object]) -> bytes:
        """Apply ``http.response.early_hint``: the ``103 Early Hints`` response to write
        (RFC 8297), or b"" for an HTTP/1.0 client ("a server MUST NOT send a 1xx response
        to an HTTP/1.0 client", RFC 9110 §15.2).

        Raises:
            AppProtocolError: sent after ``http.response.start``, or invalid links.
        """
        if self.state is not _WAITING:
            raise AppProtocolError("'http.response.early_hint' sent after 'http.response.start'")
        fields = early_hint_fields(message, self._heads.checked)
        conn = self._conn
        if conn.their_http_version != b"1.1":
            return b""
        hint = h11.InformationalResponse(status_code=103, headers=fields, reason=b"Early Hints")
        return conn.send(hint) or b""

    def start(self, message: Mapping[str, object], *, close: bool = False) -> bool:
        """Validate and hold ``http.response.start``; nothing is written yet.

        Until the first body message the head is only held, so an app that fails between
        ``start`` and its first body still gets a clean 500.

        Returns whether the app announced trailers (``"trailers": True``): the caller
        then says whether the client takes them (:meth:`accept_trailers`). (Returned, not
        read from :attr:`trailers` after the call: the common response pays nothing.)

        Args:
            message: the app's message (type already checked by the caller).
            close: add ``Connection: close`` (the server is draining).

        Raises:
            AppProtocolError: wrong state, bad status or bad headers.
        """
        if self.state is not _WAITING:
            raise AppProtocolError("'http.response.start' sent twice")
        status = message.get("status")
        if type(status) is not int and (isinstance(status, bool) or not isinstance(status, int)):
            raise AppProtocolError(f"'status' must be an int, got {status!r}")
        if not 200 <= status <= 999:
            raise AppProtocolError(f"'status' must be a final status 200-999, got {status}")
        fields = self._heads.fields_of(message.get("headers"))
        if status in _EMPTY_BODY_STATUSES:
            self._no_body = True
        self._fields = fields
        self._close = close
        self.status = status
        self.state = _STARTED
        if "trailers" in message:  # (checked last: a bad value leaves the state as is)
            return self._announce_trailers(message["trailers"])
        return False

    def _announce_trailers(self, trailers: object) -> bool:
        """Note start's ``trailers`` (see :meth:`start`); a value that is not a bool
        leaves the writer WAITING, as if start had not come."""
        if trailers is not True and trailers is not False:
            self.state = _WAITING
            raise AppProtocolError(f"'trailers' must be a bool, got {trailers!r}")
        self.trailers = trailers
        return trailers

    def _head(self, body: bytes | FileRegion, more_body: bool) -> list[bytes]:
        """The head's bytes, handed to the parser (which applies the framing rules)."""
        fields = self._fields
        status = self.status
        assert status is not None  # (both set by start() before any body)
        assert fields is not None
        # A first body that already contradicts the declared length fails here, before
        # the head goes to the parser: it is unsent, so the client still gets a clean 500
        # (handed to the parser, it could never be replaced by one).
        declared = fields.declared
        if declared is not None and not self._no_body:
            sent = len(body)
            if sent > declared or (sent < declared and not more_body):  # (no call if it fits)
                raise AppProtocolError(_length_mismatch(sent, declared, more_body) or "")
        # A complete body in one message: declare its length instead of chunking. For HEAD
        # that is the length a GET would have had (RFC 9110 §9.3.2).
        add_length = (
            not more_body
            and not fields.framed
            and (body or not self._no_body or type(body) is FileRegion)  # (a file's size)
            and status not in _EMPTY_BODY_STATUSES
        )
        reason = REASONS.get(status, b"")
        conn = self._conn
        if conn.takes_encoded_heads and not self._close:
            # The common case: the encoded head, if the parser can take it as it is.
            lines = self._heads.lines(fields, self._default_headers)
            if lines is not None:
                length = len(body) if add_length else fields.length
                if add_length:
                    lines += b"content-length: %d\r\n" % len(body)
                if length is not None:
                    head = conn.send_encoded_head(status, reason, lines, length)
                    if head is not None:
                        return head
        names = fields.names
        headers = list(fields.fields)
        for default in self._default_headers:
            if default[0] not in names:
                headers.append(default)
        if self._close:
            headers.append(_CLOSE_HEADER)
        if add_length:
            headers.append((b"content-length", str(len(body)).encode("ascii")))
        # Names and values are checked here, as strictly as h11 would (the parser is then
        # told they are clean: h11's own per-header regular expressions were a tenth of the
        # server's time on a small response). The parser still checks the framing headers.
        check_fields(headers, self._heads.checked)
        try:
            return conn.send_response_head(status, reason, headers)
        except h11.LocalProtocolError as exc:
            raise AppProtocolError(f"invalid response head: {exc}") from None

    def body(self, message: Mapping[str, object]) -> bytes:
        """Apply ``http.response.body`` and return the bytes to write (maybe empty).

        Raises:
            AppProtocolError: body before start or after the end, bad field types, or a
                body that contradicts the declared Content-Length.
        """
        pieces = self.body_pieces(message)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def body_pieces(
        self, message: Mapping[str, object], region: FileRegion | None = None
    ) -> list[Any]:
        """Like :meth:`body`, but the bytes stay in pieces (head, chunk framing, the app's
        body object itself), for a vectored write that copies no body.

        ``region``: instead of the message's body, this file is the body's last piece
        (:meth:`file_pieces`).

        Raises:
            AppProtocolError: as :meth:`body`.
        """
        state = self.state
        if state is not _STREAMING:  # (one check for every chunk after the first)
            if state is _WAITING:
                raise AppProtocolError("'http.response.body' sent before 'http.response.start'")
            if state is _COMPLETE:
                raise AppProtocolError("'http.response.body' sent after the response completed")
            if state is _TRAILERS:
                raise AppProtocolError("response body sent after its last message")
        body: Any
        if region is None:
            body = message.get("body", b"")
            more_body = message.get("more_body", False)
            if type(body) is not bytes or (more_body is not False and more_body is not True):
                body, more_body = parse_body(message)
        else:
            # (A FileRegion passes where the parser and the checks take bytes: they only
            # take its len().)
            body, more_body = region, False
        conn = self._conn
        pieces: list[Any]
        if state is _STARTED:
            pieces = self._head(body, more_body)  # may raise before anything is written
            self.state = _STREAMING
            self.started = True
        else:
            pieces = []
        if self._no_body:
            body = b""
        try:
            if more_body:
                if body:
                    pieces += conn.send_body(body, False)
            elif self.trailers:
                # The last body; the trailers end the response (trailer_pieces).
                if body:
                    pieces += conn.send_body(body, False)
                self.state = _TRAILERS
            else:
                pieces += conn.send_body(body, True)
                self.state = _COMPLETE
                self.complete = True
            self.body_bytes += len(body)
        except h11.LocalProtocolError as exc:
            declared = self._fields.declared if self._fields is not None else None
            mismatch = None
            if declared is not None:
                mismatch = _length_mismatch(self.body_bytes + len(body), declared, more_body)
            raise AppProtocolError(mismatch or f"invalid response body: {exc}") from None
        return pieces

    def file_pieces(self, region: FileRegion) -> list[bytes | FileRegion]:
        """Apply ``http.response.pathsend``: the file (``region``) is the rest of the body.

        The region stands in for its bytes (see ``protocol.response_extensions``): the
        pieces hold it, framed like any body piece; a response without a declared length
        gets the file's size as its Content-Length, like a complete body.

        Raises:
            AppProtocolError: as :meth:`body` (a file longer or shorter than the declared
                Content-Length is refused before the head is handed over).
        """
        if self.state is _WAITING:
            raise AppProtocolError("'http.response.pathsend' sent before 'http.response.start'")
        if self.state is _COMPLETE:
            raise AppProtocolError("'http.response.pathsend' sent after the response completed")
        return self.body_pieces(_NO_MESSAGE, region)

    def trailer_pieces(self, message: Mapping[str, object]) -> list[bytes]:
        """Apply ``http.response.trailers``: the bytes that end the response (maybe
        none yet, while ``more_trailers``), with the trailer fields when the client takes
        them (:meth:`accept_trailers`).

        Raises:
            AppProtocolError: trailers not announced, sent before the body's last message
                or after the end, or invalid fields (see
                ``response_extensions.trailer_fields``).
        """
        if not self.trailers:
            raise AppProtocolError(
                "'http.response.trailers' sent without 'trailers': True in 'http.response.start'"
            )
        if self.state is not _TRAILERS:
            raise AppProtocolError(
                "'http.response.trailers' sent before the body's last message"
                if self.state is not _COMPLETE
                else "'http.response.trailers' sent after the response completed"
            )
        fields, more = trailer_fields(message, self._heads.checked)
        if self._send_trailers:
            self._trailer_fields = (self._trailer_fields or []) + fields
        if more:
            return []
        conn = self._conn
        try:
            if self._trailer_fields:
                pieces = conn.send_trailers(self._trailer_fields)
            else:
                pieces = conn.send_body(b"", True)
        except h11.LocalProtocolError as exc:
            raise AppProtocolError(f"invalid response end: {exc}") from None
        self.state = _COMPLETE
        self.complete = True
        return pieces


def _length_mismatch(sent: int, declared: int, more_body: bool) -> str | None:
    """How ``sent`` body bytes so far contradict a declared Content-Length, or None."""
    if sent > declared:
        return f"response body longer than its Content-Length {declared} ({sent} bytes sent)"
    if sent < declared and not more_body:
        return f"response body ended at {sent} bytes, short of its Content-Length {declared}"
    return None


def error_response(
    conn: HTTPParser,
    status: int,
    default_headers: tuple[tuple[bytes, bytes], ...],
    *,
    method: bytes = b"GET",
) -> bytes:
    """Render a plain-text error response that closes the connection.

    Returns b"" when h11 can no longer send a response (the head already left).
    """
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return b""
    reason = REASONS.get(status, b"Error")
    body = reason + b"\n"
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        _CLOSE_HEADER,
        *default_headers,
    ]
    try:
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
        if method != b"HEAD":
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:
        return b""
    return out
