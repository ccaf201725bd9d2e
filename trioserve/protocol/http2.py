"""HTTP/2 without I/O: settings, request and response heads, h2c, limits (layer 2, never trio).

The connection task (``connection/http2.py``) owns an ``h2.connection.H2Connection`` and
does the I/O; everything here is a pure function of bytes, headers, numbers and a clock
reading passed in, so it is tested with tables, as h11 is.

What is decided here:

* **Settings** (``h2_engine.h2_connection`` applies them): receive windows larger than the
  RFC 9113 default of 65,535 bytes (``--h2-initial-window-size``; one upload is otherwise
  capped at 64 KiB per round trip), ``SETTINGS_MAX_CONCURRENT_STREAMS``,
  ``SETTINGS_MAX_HEADER_LIST_SIZE`` and ``SETTINGS_MAX_FRAME_SIZE`` from the config. h2's
  own inbound header validation is off: it raises a *connection* error for a malformed
  request, where RFC 9113 §8.1.1 asks for a *stream* error, so :func:`request_head` does
  the checks instead.
* **Negotiation** on a cleartext port: :func:`preface_state` recognises prior knowledge
  (RFC 9113 §3.4), :func:`h2c_settings` an ``Upgrade: h2c`` request (RFC 7540 §3.2, kept
  by clients though RFC 9113 deprecates it).
* **Heads**: request pseudo-headers → the scope's fields (:class:`RequestHead`), response
  fields → h2's header list without HTTP/1.1's connection-specific fields
  (:func:`response_header_list`).
* **Defences** against the 2023-2025 HTTP/2 attacks, as numbers and a budget
  (:class:`ResetBudget`); the connection task applies them.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from h2.errors import ErrorCodes

if TYPE_CHECKING:
    from ..config import Config

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PREFACE_FIRST: Final = PREFACE[0]

# RFC 9113 §8.2.2: fields that only mean something to one HTTP/1.1 connection. A request
# carrying one is malformed; a response field with one of these names is dropped.
CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":path", b":authority", b":protocol"})

# -- defences (CVE numbers name the attack each bound answers) --------------------------------
# Rapid reset (CVE-2023-44487) and MadeYouReset (CVE-2025-8671): every reset, whether the
# client sent it or the server was tricked into sending it, spends one token of a bucket
# that refills at RESET_REFILL_PER_SECOND up to RESET_BURST. An empty bucket ends the
# connection with GOAWAY ENHANCE_YOUR_CALM. A browser cancelling a few fetches never gets
# near it; a client resetting thousands of streams a second is cut off within RESET_BURST.
RESET_BURST: Final = 200
RESET_REFILL_PER_SECOND: Final = 50.0
# PING / SETTINGS floods without reading the answers: the reader stops reading while more
# than this many bytes wait to be sent, so the outbound backlog (and memory) stays bounded.
MAX_OUTBOUND_BACKLOG: Final = 1024 * 1024
# A client that never opens its window: a stream's send() waits at most this long for
# window before the stream is reset (CANCEL) and the app gets ClientDisconnected.
SEND_WINDOW_TIMEOUT: Final = 60.0
# A stream queues up to this many bytes of DATA frames (as the windows allow) before it
# wakes the writer and yields: one socket write per batch instead of one per frame. It is
# also what one stream may add to the backlog past MAX_OUTBOUND_BACKLOG.
SEND_BATCH_BYTES: Final = 64 * 1024
# CONTINUATION flood (CVE-2024-27316 class): h2 buffers at most 64 CONTINUATION frames
# (h2.frame_buffer.CONTINUATION_BACKLOG) before END_HEADERS, however large each is (64 of
# 16 MiB would be 1 GiB); h2_engine's frame buffer also bounds the open header block in bytes, by
# --h2-max-header-list-size, and refuses a frame as soon as its header announces it too long.


def connection_window_increment(config: Config) -> int:
    """How much to add to the connection's receive window right after the preface.

    The connection window starts at 65,535 whatever SETTINGS say; giving it room for
    every stream's initial window would let a client pin ``streams * window`` bytes, so
    it gets room for four streams' windows (uploads on a few streams at full speed).
    """
    return min(4 * config.h2_initial_window_size, 2**31 - 1) - 65535


def preface_state(data: bytes | bytearray) -> Literal["h2", "http1", "undecided"]:
    """Whether the first bytes of a cleartext connection are the HTTP/2 preface.

    ``undecided`` while ``data`` is a proper prefix of the preface (read more). An
    HTTP/1.1 request can never be a prefix: ``PRI`` with target ``*`` and version
    ``HTTP/2.0`` is not one h11 would serve.
    """
    if data and data[0] != PREFACE_FIRST:  # (one comparison for the common case: HTTP/1.1)
        return "http1"
    if data[: len(PREFACE)] == PREFACE:
        return "h2"
    if PREFACE.startswith(data):
        return "undecided"
    return "http1"


class StreamError(Exception):
    """A malformed request on one stream: reset that stream with ``code``, log ``reason``."""

    def __init__(self, reason: str, code: ErrorCodes = ErrorCodes.PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request head as the scope wants it.

    Attributes:
        method: ``:method``.
        scheme: ``:scheme`` (``http``/``https``; the connection's own scheme applies when
            the client sends something else).
        target: ``:path`` as sent (path and query, split by the scope builder).
        headers: the regular fields in order, lower-case names; ``host`` first when the
            request had only ``:authority`` (RFC 9113 §8.3.1), split ``cookie`` fields
            joined into one with ``"; "`` (§8.2.3).
        protocol: ``:protocol`` of an extended CONNECT (RFC 8441), else None.
    """

    method: bytes
    scheme: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    protocol: bytes | None = None


def request_head(fields: list[tuple[bytes, bytes]]) -> RequestHead:
    """Check a decoded request header block and map it to a :class:`RequestHead`.

    Raises:
        StreamError: the request is malformed (RFC 9113 §8.1.1): a pseudo-header after a
            regular field, unknown, repeated or missing; an upper-case name; a
            connection-specific field; ``te`` other than ``trailers``.
    """
    pseudo: dict[bytes, bytes] = {}
    headers: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    host_seen = False
    for name, value in fields:
        if name[:1] == b":":
            if headers or cookies:
                raise StreamError(f"pseudo-header {name!r} after a regular field")
            if name not in _REQUEST_PSEUDO:
                raise StreamError(f"unknown pseudo-header {name!r}")
            if name in pseudo:
                raise StreamError(f"repeated pseudo-header {name!r}")
            pseudo[name] = value
            continue
        if name != name.lower() or not name:
            raise StreamError(f"header name {name!r} is not lower-case")
        if name in CONNECTION_SPECIFIC:
            raise StreamError(f"connection-specific header {name!r}")
        if name == b"te" and value.lower() != b"trailers":
            raise StreamError(f"te: {value!r} (only 'trailers' is allowed)")
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            host_seen = True
        headers.append((name, value))
    method = pseudo.get(b":method")
    if method is None:
        raise StreamError("missing :method")
    protocol = pseudo.get(b":protocol")
    if method == b"CONNECT" and protocol is None:
        # Plain CONNECT (a tunnel, §8.5) is not an ASGI request.
        raise StreamError("CONNECT without :protocol is not supported", ErrorCodes.REFUSED_STREAM)
    if protocol is not None and method != b"CONNECT":
        raise StreamError(":protocol on a request that is not CONNECT")
    for required in (b":scheme", b":path"):
        if not pseudo.get(required):
            raise StreamError(f"missing {required.decode()}")
    authority = pseudo.get(b":authority")
    if authority is not None and not host_seen:
        headers.insert(0, (b"host", authority))
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    return RequestHead(method, pseudo[b":scheme"], pseudo[b":path"], headers, protocol)


def response_header_list(
    status: int, fields: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]
) -> list[tuple[bytes, bytes]]:
    """``:status`` and the app's (and server's default) fields as h2 sends them.

    Names are lower-cased (RFC 9113 §8.2.1); connection-specific fields are dropped
    (§8.2.2: an HTTP/1.1 app or middleware may well set ``Connection: keep-alive`` or
    ``Transfer-Encoding: chunked``). Values were checked by ``http1_messages.check_fields``.
    """
    out = [(b":status", str(status).encode("ascii"))]
    for name, value in fields:
        name = name.lower()
        if name not in CONNECTION_SPECIFIC:
            out.append((name, value))
    return out


def h2c_settings(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The ``HTTP2-Settings`` value when an HTTP/1.1 request asks for ``Upgrade: h2c``.

    None when it does not ask, or asks wrongly (then HTTP/1.1 answers it, as RFC 7540
    §3.2 allows): the ``Connection`` field must name both ``Upgrade`` and
    ``HTTP2-Settings``, and there must be exactly one ``HTTP2-Settings`` field. The caller
    also requires a bodiless request (a body would have to be read before switching).
    """
    upgrade = False
    connection_tokens: set[bytes] = set()
    settings: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"upgrade":
            upgrade = upgrade or any(token.strip().lower() == b"h2c" for token in value.split(b","))
        elif lname == b"connection":
            connection_tokens.update(token.strip().lower() for token in value.split(b","))
        elif lname == b"http2-settings":
            settings.append(value)
    if not upgrade or len(settings) != 1:
        return None
    if not {b"upgrade", b"http2-settings"} <= connection_tokens:
        return None
    value = settings[0].strip()
    try:
        # token68 in base64url, padding optional (RFC 7540 §3.2.1): h2 decodes it again.
        base64.b64decode(value + b"=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
    return value


H2C_SWITCHING: Final = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
)


class ResetBudget:
    """The per-connection reset budget against rapid reset and MadeYouReset.

    A token bucket: each reset spends one token, tokens come back at ``refill_per_second``
    up to ``burst``. Pure: the caller passes the clock reading.
    """

    __slots__ = ("_last", "_tokens", "burst", "refill_per_second")

    def __init__(
        self, burst: int = RESET_BURST, refill_per_second: float = RESET_REFILL_PER_SECOND
    ) -> None:
        self.burst = burst
        self.refill_per_second = refill_per_second
        self._tokens = float(burst)
        self._last: float | None = None

    def spend(self, now: float) -> bool:
        """Count one reset at time ``now``; False once the budget is exhausted."""
        if self._last is not None:
            self._tokens = min(
                float(self.burst), self._tokens + (now - self._last) * self.refill_per_second
            )
        self._last = now
        self._tokens -= 1.0
        return self._tokens >= 0.0
