"""HTTP/1.1 <-> ASGI translation, decided without I/O (layer 2: h11, never trio).

Theory of operation
-------------------
``http_connection`` owns the socket and the parser (h11's ``Connection`` or its
httptools twin, one interface: ``http_parser.HTTPParser``); this module holds
everything about a request/response pair that can be decided without awaiting:

* :func:`build_http_scope` turns an ``h11.Request`` into the ASGI ``http`` scope.
* :class:`ResponseWriter` is the response state machine. The app's ``http.response.start``
  is validated and *held*; the head leaves together with the first body chunk, and a
  complete small body (``more_body=False``) leaves with it, so a hello-world response is
  a single write::

      WAITING ──start──► STARTED ──body(more)──► STREAMING ──body(last)──► COMPLETE
         │                  └────────body(last)───────────────────────────►┘
         └── anything but start: AppProtocolError

  Bodies are dropped (never sent) for HEAD requests and 204/304 responses
  (RFC 9110 §9.3.2, §15.3.5, §15.4.5); the parser keeps the framing honest.
* :class:`ResponseHeads` (one per server) checks and encodes each distinct header list an
  app sends once; the httptools parser takes the common head already encoded.
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

from ..errors import AppProtocolError

if TYPE_CHECKING:
    from .http1_parser import HTTPParser

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
    target = request.target
    if target[:1] == b"/":  # (origin-form: the common case, split here)
        raw_path, _, query_string = target.partition(b"?")
    else:
        raw_path, query_string = split_target(target)
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
    max_body_size: int = 0,
) -> tuple[int, str] | None:
    """Reject what h11 lets through: return ``(status, reason)`` or None when acceptable.

    * Content-Length together with Transfer-Encoding (RFC 9112 §6.3: "ought to be handled as
      an error"; h11 silently prefers chunked), and Transfer-Encoding in an HTTP/1.0 request
      (RFC 9112 §6.1: "MUST treat the message as if the framing is faulty").
    * A Content-Length over ``max_body_size`` (0: no limit), answered 413 before the app is
      called, as nginx's ``client_max_body_size`` does (RFC 9110 §15.5.14); a chunked body
      is counted as it arrives (``http_connection``).
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
    transfer_encoding = False
    for name, value in header_list(request) if headers is None else headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            content_length = value
        elif name == b"transfer-encoding":
            transfer_encoding = True
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
    """Whether the request is a WebSocket opening handshake (RFC 6455 §4.1).

    "The method of the request MUST be GET, and the HTTP version MUST be at least 1.1"
    (§4.1). Any other request offering the upgrade is plain HTTP: a server may ignore an
    Upgrade field (RFC 9110 §7.8; in an HTTP/1.0 request it MUST), so the app answers it
    as it answers that method on that path. (Not 405, as the ``websockets`` library
    answers: only the app's routing knows which methods the path allows.)
    """
    if request.method != b"GET" or request.http_version != b"1.1":
        return False
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
MAX_CHECKED_FIELDS: Final = 1024  # (the size bound of a server's checked fields)
# The largest header list (names and values, in bytes) a server remembers: larger ones (big
# cookies, say, which also tend to differ per response) are checked every time, so the
# cache stays within a few MiB.
MAX_KNOWN_SIZE: Final = 4096
# Response fields h11's framing rules act on.
FRAMING_FIELDS: Final = frozenset({b"content-length", b"transfer-encoding", b"connection", b"host"})


def check_fields(headers: list[tuple[bytes, bytes]], checked: set[tuple[bytes, bytes]]) -> None:
    """Check response header names and values (no CR/LF/NUL injection, RFC 9110 syntax).

    ``checked`` remembers the fields that passed (apps send the same fields over and over:
    a lookup then replaces two regular expressions); it is emptied when it grows too large.

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
        checked.add(field)


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


# (Bound once: an enum member looked up on its class costs as much as a small function
# call in Python 3.11, and the writer checks its state several times per response.)
_WAITING: Final = ResponseState.WAITING
_STARTED: Final = ResponseState.STARTED
_STREAMING: Final = ResponseState.STREAMING
_COMPLETE: Final = ResponseState.COMPLETE


class ResponseFields:
    """An app's response header fields, type-checked once per distinct field list (see
    :class:`ResponseHeads`).

    Attributes:
        fields: the fields as plain ``(bytes, bytes)`` tuples, in the app's order.
        names: their lower-case names.
        framed: whether Content-Length or Transfer-Encoding is among them.
        plain: None until the fields' syntax was checked (at the first response that sends
            them); then whether none is a framing field but one plain Content-Length.
        lines: the encoded fields, when ``plain``.
        length: that Content-Length, if any.
        declared: the body length the fields declare, for the writer to check before the
            head goes to the parser: one Content-Length (repeats must agree), no
            Transfer-Encoding (chunked framing wins); else None.
    """

    __slots__ = (
        "_defaults",
        "_head_lines",
        "declared",
        "fields",
        "framed",
        "length",
        "lines",
        "names",
        "plain",
    )

    def __init__(self, fields: list[tuple[bytes, bytes]], names: set[bytes]) -> None:
        self.fields = tuple(fields)
        self.names = frozenset(names)
        self.framed = b"content-length" in names or b"transfer-encoding" in names
        self.declared = _declared_length(self.fields) if self.framed else None
        self.plain: bool | None = None
        self.lines = b""
        self.length: int | None = None
        # (ResponseHeads.lines for the last defaults, kept: the same until the next Date.)
        self._defaults: tuple[tuple[bytes, bytes], ...] | None = None
        self._head_lines: bytes | None = None


class ResponseHeads:
    """What one server knows about the response heads its apps send.

    Apps send the same header lists over and over. Each distinct list is type-checked,
    then syntax-checked and encoded, once; a response that repeats it costs a dict lookup
    instead of a pass per field. Both caches are bounded: they are emptied when they grow
    past ``MAX_CHECKED_FIELDS`` entries (an app whose headers vary per response), and a
    list larger than ``MAX_KNOWN_SIZE`` bytes is not kept.

    Attributes:
        checked: header fields known to be valid (see :func:`check_fields`).
    """

    __slots__ = ("_defaults", "_defaults_lines", "_defaults_names", "_known", "checked")

    def __init__(self) -> None:
        self.checked: set[tuple[bytes, bytes]] = set()
        self._known: dict[tuple[Any, ...], ResponseFields] = {}
        self._defaults: tuple[tuple[bytes, bytes], ...] | None = None
        self._defaults_lines: bytes | None = None
        self._defaults_names: frozenset[bytes] = frozenset()

    def fields_of(self, raw: object) -> ResponseFields:
        """The app's ``headers`` (from ``http.response.start``), type-checked.

        Raises:
            AppProtocolError: not an iterable of ``[bytes, bytes]`` pairs.
        """
        key: tuple[Any, ...] | None
        if type(raw) is list:
            key = tuple(raw)
        elif type(raw) is tuple:
            key = raw
        else:
            key = () if raw is None else None
        if key is not None:
            try:
                known = self._known.get(key)
            except TypeError:  # pairs that are lists (or anything unhashable)
                known = key = None
            if known is not None:
                return known
        names: set[bytes] = set()
        fields = ResponseFields(validate_headers(raw, names), names)
        if key is not None and sum(len(n) + len(v) for n, v in fields.fields) <= MAX_KNOWN_SIZE:
            if len(self._known) >= MAX_CHECKED_FIELDS:
                self._known.clear()
            self._known[key] = fields
        return fields

    def lines(
        self, fields: ResponseFields, defaults: tuple[tuple[bytes, bytes], ...]
    ) -> bytes | None:
        """The encoded head fields: the app's, then the server's ``defaults`` (in their
        order, as :class:`ResponseWriter` adds them); None unless all are plain (no
        framing field but one Content-Length) and no default is overridden by the app.

        Raises:
            AppProtocolError: a name or value h11 would refuse (see :func:`check_fields`).
        """
        if defaults is fields._defaults:
            return fields._head_lines
        if fields.plain is None:
            _encode(fields, self.checked)
        if not fields.plain:
            return None
        if defaults is not self._defaults:  # (a new Date each second)
            self._defaults_lines = _plain_lines(list(defaults), self.checked)
            self._defaults_names = frozenset(name for name, _ in defaults)
            self._defaults = defaults
        lines = None
        if self._defaults_lines is not None and fields.names.isdisjoint(self._defaults_names):
            lines = fields.lines + self._defaults_lines
        fields._defaults = defaults
        fields._head_lines = lines
        return lines


def _declared_length(fields: tuple[tuple[bytes, bytes], ...]) -> int | None:
    """The Content-Length ``fields`` frame the body with (see ``ResponseFields.declared``);
    None when Transfer-Encoding frames it, or when the value is one the parser refuses (it
    then names the fault)."""
    declared = None
    for name, value in fields:
        name = name.lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            values = {part.strip() for part in value.split(b",")}  # (h11 merges "5, 5")
            if len(values) != 1:
                return None
            number = values.pop()
            if not (number.isdigit() and number.isascii() and len(number) <= 20):
                return None
            if declared is not None and declared != int(number):
                return None
            declared = int(number)
    return declared


def _encode(fields: ResponseFields, checked: set[tuple[bytes, bytes]]) -> None:
    """Check ``fields`` (raises AppProtocolError) and note whether and how they encode."""
    lines = _plain_lines(list(fields.fields), checked)
    length = None
    if lines is not None:
        for name, value in fields.fields:
            if name.lower() == b"content-length":
                if length is not None or not (
                    value.isdigit() and value.isascii() and len(value) <= 20
                ):
                    lines = None
                    break
                length = int(value)
    fields.plain = lines is not None
    fields.lines = lines or b""
    fields.length = length


def _plain_lines(
    headers: list[tuple[bytes, bytes]], checked: set[tuple[bytes, bytes]]
) -> bytes | None:
    """``headers`` checked and encoded; None if one is a framing field other than
    Content-Length (the parser's general path then applies h11's rules to it).

    Raises:
        AppProtocolError: a name or value h11 would refuse.
    """
    check_fields(headers, checked)
    out = []
    for field in headers:
        name = field[0].lower()
        if name in FRAMING_FIELDS and name != b"content-length":
            return None
        out.append(b"%s: %s\r\n" % field)
    return b"".join(out)


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

    def _head(self, body: bytes, more_body: bool) -> list[bytes]:
        """The head's bytes, handed to the parser (which applies the framing rules)."""
        fields = self._fields
        status = self.status
        assert status is not None  # (both set by start() before any body)
        assert fields is not None
        # A first body that already contradicts the declared length fails here, before
        # the head goes to the parser: it is unsent, so the client still gets a clean 500
        # (handed to the parser, it could never be replaced by one).
        if fields.declared is not None and not self._no_body:
            mismatch = _length_mismatch(len(body), fields.declared, more_body)
            if mismatch is not None:
                raise AppProtocolError(mismatch)
        # A complete body in one message: declare its length instead of chunking. For HEAD
        # that is the length a GET would have had (RFC 9110 §9.3.2).
        add_length = (
            not more_body
            and not fields.framed
            and (body or not self._no_body)
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

    def body_pieces(self, message: Mapping[str, object]) -> list[bytes]:
        """Like :meth:`body`, but the bytes stay in pieces (head, chunk framing, the app's
        body object itself), for a vectored write that copies no body.

        Raises:
            AppProtocolError: as :meth:`body`.
        """
        if self.state is _WAITING:
            raise AppProtocolError("'http.response.body' sent before 'http.response.start'")
        if self.state is _COMPLETE:
            raise AppProtocolError("'http.response.body' sent after the response completed")
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        if type(body) is not bytes or (more_body is not False and more_body is not True):
            body, more_body = parse_body(message)
        conn = self._conn
        pieces: list[bytes]
        if self.state is _STARTED:
            pieces = self._head(body, more_body)  # may raise before anything is written
            self.state = _STREAMING
            self.started = True
        else:
            pieces = []
        if self._no_body:
            body = b""
        try:
            if body or not more_body:
                pieces += conn.send_body(body, not more_body)
            self.body_bytes += len(body)
            if not more_body:
                self.state = _COMPLETE
                self.complete = True
        except h11.LocalProtocolError as exc:
            declared = self._fields.declared if self._fields is not None else None
            mismatch = None
            if declared is not None:
                mismatch = _length_mismatch(self.body_bytes + len(body), declared, more_body)
            raise AppProtocolError(mismatch or f"invalid response body: {exc}") from None
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
