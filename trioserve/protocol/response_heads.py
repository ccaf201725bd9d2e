"""Checking and encoding the response heads apps send (layer 2: sans-IO, never trio).

Every ``http.response.start`` carries an app's header list, and it is untrusted input: it
must be an iterable of ``[bytes, bytes]`` pairs (:func:`validate_headers`), and each name and
value must be one h11 would accept, so that no CR, LF or NUL reaches the wire
(:func:`check_fields`, RFC 9110 §5.1 and §5.5). Apps send the same few lists over and over,
so :class:`ResponseHeads` (one per server) does that work once per distinct list and keeps
the result, encoded, in a :class:`ResponseFields`; the httptools parser then sends the
common head without looking at a field again. Both caches are bounded.

:class:`~trioserve.protocol.http1_messages.ResponseWriter` is the only caller on the
response path; ``ws_messages`` validates a WebSocket denial's headers with
:func:`validate_headers` too. Violations raise :class:`~trioserve.errors.AppProtocolError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from ..errors import AppProtocolError

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
        self.declared = declared_length(self.fields) if self.framed else None
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
        order, as :class:`~.http1_messages.ResponseWriter` adds them); None unless all are plain (no
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


def declared_length(fields: Sequence[tuple[bytes, bytes]]) -> int | None:
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
