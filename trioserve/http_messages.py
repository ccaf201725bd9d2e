"""HTTP/1.1 <-> ASGI translation, decided without I/O (layer 2: h11, never trio).

Theory of operation
-------------------
``http_connection`` owns the socket and the parser (h11's ``Connection`` or its
httptools twin, one interface: ``http_parser.HTTPParser``); this module holds
everything about a request/response pair that can be decided without awaiting:

* :func:`build_http_scope` turns an ``h11.Request`` into the ASGI ``http`` scope.
* :class:`ResponseWriter` is the response state machine. The app's ``http.response.start``
  is validated and *held*; the head leaves together with the first body chunk, and a
  complete small body (``more_body=False``) leaves as one byte string, so a hello-world
  response is a single ``send_all``::

      WAITING ──start──► STARTED ──body(more)──► STREAMING ──body(last)──► COMPLETE
         │                  └────────body(last)───────────────────────────►┘
         └── anything but start: AppProtocolError

  Bodies are dropped (never sent) for HEAD requests and 204/304 responses
  (RFC 9110 §9.3.2, §15.3.5, §15.4.5); h11 keeps the framing honest.
* :func:`error_response` renders the plain 4xx/5xx responses trioserve sends itself.

Messages from the app are untrusted: every field is type-checked here and violations raise
:class:`~trioserve.errors.AppProtocolError` (never ``KeyError`` or ``TypeError``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

import h11

from .errors import AppProtocolError
from .http_parser import FRAMING_FIELDS, FieldLines

if TYPE_CHECKING:
    from .http_parser import HTTPParser

ASGI_VERSION: Final = {"version": "3.0", "spec_version": "2.4"}
_EMPTY_BODY_STATUSES: Final = frozenset({204, 304})
_CLOSE_HEADER: Final = (b"connection", b"close")

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
    """Build the ASGI ``http`` connection scope for ``request``.

    ``path`` is percent-decoded UTF-8 and, like ``raw_path``, includes ``root_path``
    (the ASGI spec's clarification, followed by uvicorn). ``headers`` keeps order and
    duplicates; h11 has already lower-cased the names. Pass ``headers`` when the caller
    already made the list (see :func:`header_list`); the scope takes it as is.
    """
    raw_path, query_string = split_target(request.target)
    # Invalid UTF-8 after percent-decoding becomes U+FFFD (as uvicorn and hypercorn do):
    # a lone surrogate would make every app that encodes the path (a JSON echo of a path
    # parameter) fail with a 500 that any client can trigger. raw_path keeps the bytes.
    path = raw_path.decode("latin-1")
    if "%" in path:
        path = unquote(path, encoding="utf-8", errors="replace")
    if root_path:
        path = root_path + path
        raw_path = root_path.encode("utf-8") + raw_path
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": ASGI_VERSION,
        "http_version": "1.1" if request.http_version == b"1.1" else "1.0",
        "method": request.method.decode("ascii"),
        "scheme": scheme,
        "path": path,
        "raw_path": raw_path,
        "query_string": query_string,
        "root_path": root_path,
        "headers": header_list(request) if headers is None else headers,
        "client": client,
        "server": server,
        "extensions": {},
    }
    if state is not None:
        scope["state"] = state.copy()
    return scope


def header_list(request: h11.Request) -> list[tuple[bytes, bytes]]:
    """The request's headers as a plain list, made once per request.

    Iterating h11's ``Headers`` (a ``Sequence``) costs a generator, an indexing call per
    header and an IndexError at the end: the checks below and the scope share one list,
    made from the (name, lower-case name, value) triples the ``Headers`` keeps.
    """
    return [(name, value) for _, name, value in request.headers._full_items]


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Split a request-target into (path, query) (RFC 9112 §3.2).

    Absolute-form targets (``http://host/p?q``) are reduced to their path; the
    asterisk-form ``*`` is kept as the path.
    """
    if target[:1] != b"/" and b"://" in target:
        after_scheme = target.split(b"://", 1)[1]
        # The authority ends at the first "/" or "?" (RFC 3986 §3.2); an empty path is "/".
        end = len(after_scheme)
        for delimiter in (b"/", b"?"):
            found = after_scheme.find(delimiter)
            if 0 <= found < end:
                end = found
        target = after_scheme[end:]
        if target[:1] != b"/":
            target = b"/" + target
    path, _, query = target.partition(b"?")
    return path, query


# h11 accepts these requests, but each is a request-smuggling vector when a proxy in front
# of us reads the framing differently.
_HEAD_END: Final = re.compile(rb"\n\r?\n")  # the blank line ending a head, as h11 finds it
_OBS_FOLD: Final = re.compile(rb"\n[ \t]")


def check_request(
    request: h11.Request,
    *,
    max_head_size: int,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, str] | None:
    """Reject what h11 lets through: return ``(status, reason)`` or None when acceptable.

    * Content-Length together with Transfer-Encoding (RFC 9112 §6.3: "ought to be handled as
      an error"; h11 silently prefers chunked), and Transfer-Encoding in an HTTP/1.0 request
      (RFC 9112 §6.1: "MUST treat the message as if the framing is faulty").
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
    content_length = transfer_encoding = False
    for name, value in header_list(request) if headers is None else headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            content_length = True
        elif name == b"transfer-encoding":
            transfer_encoding = True
    if size > max_head_size:
        return 431, f"request head larger than {max_head_size} bytes"
    if transfer_encoding:
        if content_length:
            return 400, "both Content-Length and Transfer-Encoding"
        if version == b"1.0":
            return 400, "Transfer-Encoding in an HTTP/1.0 request"
    return None


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
    """Whether the request asks to switch to WebSocket (RFC 6455 §4.1)."""
    upgrade = False
    connection_upgrade = False
    for key, value in header_list(request) if headers is None else headers:
        if key == b"upgrade":
            upgrade = upgrade or b"websocket" in value.lower()
        elif key == b"connection":
            connection_upgrade = connection_upgrade or any(
                token.strip() == b"upgrade" for token in value.lower().split(b",")
            )
    return upgrade and connection_upgrade


# RFC 9110 §5.1 field-name (a token) and §5.5 field-value, exactly as strict as h11's own
# check (field-vchar is anything but NUL and whitespace; no CR/LF, no surrounding blanks).
_FIELD_NAME: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE: Final = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
MAX_CHECKED_FIELDS: Final = 1024  # (the size bound of a server's FieldLines)


def check_fields(headers: list[tuple[bytes, bytes]], checked: FieldLines) -> None:
    """Check response header names and values (no CR/LF/NUL injection, RFC 9110 syntax).

    ``checked`` remembers the fields that passed, with their encoded lines (see
    ``http_parser.FieldLines``); it is emptied when it grows too large.

    Raises:
        AppProtocolError: a name or value h11 would refuse.
    """
    for field in headers:
        if field in checked:
            continue
        name, value = field
        if _FIELD_NAME.fullmatch(name) is None:
            raise AppProtocolError(f"invalid response head: illegal header name {name!r}")
        if _FIELD_VALUE.fullmatch(value) is None:
            raise AppProtocolError(f"invalid response head: illegal header value {value!r}")
        if len(checked) >= MAX_CHECKED_FIELDS:
            checked.clear()
        lower = name.lower()
        checked[field] = (b"%s: %s\r\n" % field, lower if lower in FRAMING_FIELDS else None)


def validate_headers(raw: object, names: set[bytes] | None = None) -> list[tuple[bytes, bytes]]:
    """Check an app-provided header list: an iterable of ``[bytes, bytes]`` pairs.

    ``names``, when given, receives each field's lower-case name.
    """
    if raw is None:
        return []
    # (Lists and tuples first: isinstance() against the ABCs is dear, per response.)
    if (
        type(raw) is not list
        and type(raw) is not tuple
        and (isinstance(raw, (bytes, str, Mapping)) or not isinstance(raw, Iterable))
    ):
        raise AppProtocolError(f"'headers' must be an iterable of [name, value] pairs, got {raw!r}")
    out: list[tuple[bytes, bytes]] = []
    for pair in raw:
        try:
            name, value = pair
        except (TypeError, ValueError):
            raise AppProtocolError(f"header must be a [name, value] pair, got {pair!r}") from None
        if type(name) is bytes and type(value) is bytes:
            out.append(pair if type(pair) is tuple else (name, value))
        elif isinstance(name, bytes) and isinstance(value, bytes):
            out.append((bytes(name), bytes(value)))  # (subclasses: plain bytes from here on)
        else:
            raise AppProtocolError(f"header name and value must be bytes, got {pair!r}")
        if names is not None:
            names.add(name.lower())
    return out


def parse_body(message: Mapping[str, object]) -> tuple[bytes, bool]:
    """Validate an ``http.response.body`` message → (body, more_body)."""
    body = message.get("body", b"")
    more_body = message.get("more_body", False)
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise AppProtocolError(f"'body' must be bytes, got {type(body).__name__}")
    if not isinstance(more_body, bool):
        raise AppProtocolError(f"'more_body' must be a bool, got {more_body!r}")
    return bytes(body), more_body


class ResponseState(enum.Enum):
    WAITING = "waiting"
    STARTED = "started"
    STREAMING = "streaming"
    COMPLETE = "complete"


class ResponseWriter:
    """The response half of one request/response cycle (see module docstring).

    Args:
        conn: the connection's parser (``h11.Connection`` or its httptools twin); only its
            sans-IO ``send`` is used.
        method: the request method (HEAD responses carry no body).
        default_headers: encoded headers added unless the app sets the same name.
        checked_fields: header fields known to be valid (see :func:`check_fields`), shared
            by the writers of one server; a fresh set when omitted.
    """

    __slots__ = (
        "_checked_fields",
        "_conn",
        "_default_headers",
        "_framed",
        "_headers",
        "_no_body",
        "body_bytes",
        "state",
        "status",
    )

    def __init__(
        self,
        conn: HTTPParser,
        method: bytes,
        default_headers: tuple[tuple[bytes, bytes], ...],
        checked_fields: FieldLines | None = None,
    ) -> None:
        self._conn = conn
        self._checked_fields: FieldLines = {} if checked_fields is None else checked_fields
        self._no_body = method == b"HEAD"
        self._headers: list[tuple[bytes, bytes]] = []
        self._framed = False
        self._default_headers = default_headers
        self.state = ResponseState.WAITING
        self.status: int | None = None
        self.body_bytes = 0  # response body bytes handed to h11 (for the access log)

    @property
    def started(self) -> bool:
        """Whether the head has been handed to h11 (some bytes may be on the wire)."""
        return self.state is ResponseState.STREAMING or self.state is ResponseState.COMPLETE

    @property
    def complete(self) -> bool:
        return self.state is ResponseState.COMPLETE

    def start(self, message: Mapping[str, object], *, close: bool = False) -> None:
        """Validate and hold ``http.response.start``; nothing is written yet.

        Until the first body message the head is only held, so an app that fails between
        ``start`` and its first body still gets a clean 500.

        Args:
            message: the app's message (type already checked by the caller).
            close: add ``Connection: close`` (the server is draining).

        Raises:
            AppProtocolError: wrong state, bad status or bad headers.
        """
        if self.state is not ResponseState.WAITING:
            raise AppProtocolError("'http.response.start' sent twice")
        status = message.get("status")
        if type(status) is not int and (isinstance(status, bool) or not isinstance(status, int)):
            raise AppProtocolError(f"'status' must be an int, got {status!r}")
        if not 200 <= status <= 999:
            raise AppProtocolError(f"'status' must be a final status 200-999, got {status}")
        names: set[bytes] = set()
        headers = validate_headers(message.get("headers"), names)
        for default in self._default_headers:
            if default[0] not in names:
                headers.append(default)
        if close:
            headers.append(_CLOSE_HEADER)
        if status in _EMPTY_BODY_STATUSES:
            self._no_body = True
        self._headers = headers
        self._framed = b"content-length" in names or b"transfer-encoding" in names
        self.status = status
        self.state = ResponseState.STARTED

    def _head(self, body: bytes, more_body: bool) -> list[bytes]:
        """The head's bytes, handed to the parser (which applies the framing rules)."""
        headers = self._headers
        if (
            not more_body
            and not self._framed
            and (body or not self._no_body)
            and self.status not in _EMPTY_BODY_STATUSES
        ):
            # A complete body in one message: declare its length instead of chunking. For
            # HEAD that is the length a GET would have had (RFC 9110 §9.3.2).
            headers.append((b"content-length", str(len(body)).encode("ascii")))
        status = self.status
        assert status is not None  # set by start() before any body
        # Names and values are checked here, as strictly as h11 would (the parser is then
        # told they are clean: h11's own per-header regular expressions were a tenth of the
        # server's time on a small response). The parser still checks the framing headers.
        check_fields(headers, self._checked_fields)
        try:
            return self._conn.send_response_head(status, REASONS.get(status, b""), headers)
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

    def body_pieces(self, message: Mapping[str, object]) -> list[bytes]:
        """Like :meth:`body`, but the bytes stay in pieces (head, chunk framing, the app's
        body object itself), for a vectored write that copies no body.

        Raises:
            AppProtocolError: as :meth:`body`.
        """
        if self.state is ResponseState.WAITING:
            raise AppProtocolError("'http.response.body' sent before 'http.response.start'")
        if self.state is ResponseState.COMPLETE:
            raise AppProtocolError("'http.response.body' sent after the response completed")
        body, more_body = parse_body(message)
        conn = self._conn
        pieces: list[bytes]
        if self.state is ResponseState.STARTED:
            pieces = self._head(body, more_body)  # may raise before anything is written
            self.state = ResponseState.STREAMING
        else:
            pieces = []
        if self._no_body:
            body = b""
        try:
            if body or not more_body:
                pieces += conn.send_body(body, not more_body)
            self.body_bytes += len(body)
            if not more_body:
                self.state = ResponseState.COMPLETE
        except h11.LocalProtocolError as exc:
            raise AppProtocolError(f"invalid response body: {exc}") from None
        return pieces


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
