"""HTTP/2 without I/O: settings, request and response heads, h2c, limits (layer 2, never trio).

The connection task (``connection/http2.py``) owns an ``h2.connection.H2Connection`` and
does the I/O; everything here is a pure function of bytes, headers, numbers and a clock
reading passed in, so it is tested with tables, as h11 is.

What is decided here:

* **Settings** (:func:`h2_connection`): receive windows larger than the RFC 9113 default
  of 65,535 bytes (``--h2-initial-window-size``; one upload is otherwise capped at 64 KiB
  per round trip), ``SETTINGS_MAX_CONCURRENT_STREAMS``, ``SETTINGS_MAX_HEADER_LIST_SIZE``
  and ``SETTINGS_MAX_FRAME_SIZE`` from the config. h2's own inbound header validation is
  off: it raises a *connection* error for a malformed request, where RFC 9113 §8.1.1 asks
  for a *stream* error, so :func:`request_head` does the checks instead.
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
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import h2.config
import h2.connection
import h2.exceptions
import h2.frame_buffer
import h2.settings
import hpack
import hpack.table
from h2.errors import ErrorCodes
from hyperframe.frame import FRAMES, ExtensionFrame

if TYPE_CHECKING:
    from collections.abc import Iterable

    from hyperframe.frame import Frame

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
# 16 MiB would be 1 GiB); _FrameBuffer also bounds the open header block in bytes, by
# --h2-max-header-list-size, and refuses a frame as soon as its header announces it too long.


class ServerH2Connection(h2.connection.H2Connection):
    """``H2Connection`` that leaves the concurrent-stream limit to trioserve.

    h2 answers a stream past ``SETTINGS_MAX_CONCURRENT_STREAMS`` with a *connection*
    error; RFC 9113 §5.1.2 asks for a stream error (PROTOCOL_ERROR or REFUSED_STREAM), and
    trioserve counts a reset stream until its task has exited (CVE-2023-39325), which h2
    cannot know. The connection task refuses such streams with REFUSED_STREAM instead.
    """

    # h2 asks for ``open_inbound_streams`` on every new stream; its count walks every
    # stream it holds and forgets the closed ones. trioserve needs only the forgetting
    # (the count is 0 here), so it is done once the table has doubled since the last
    # sweep: amortized O(1) per stream instead of O(streams), memory still bounded.
    _sweep_at = 16

    @property
    def open_inbound_streams(self) -> int:
        if len(self.streams) >= self._sweep_at:
            self.forget_closed_streams()
        return 0

    def forget_closed_streams(self) -> None:
        """Drop h2's state of every closed stream now (an idle connection keeps none)."""
        super().open_inbound_streams  # noqa: B018 (its side effect forgets closed streams)
        self._sweep_at = 2 * len(self.streams) + 16


def _quiet_frame_class(kind: type[Frame]) -> type[Frame]:
    """A subclass of hyperframe's frame class ``kind`` with a cheap ``repr``.

    h2 formats ``repr(frame)`` of every frame it receives for a trace log line, eagerly,
    whether its logger (here always h2's no-op one) writes it or not: hyperframe's repr
    formats the flags and body, ~2 % of an HTTP/2 request. :class:`_FrameBuffer` hands
    frames over as these classes (only the repr differs; h2 dispatches on the class,
    :class:`_FrameDispatch`).
    """

    def __repr__(self: Frame) -> str:
        return f"{kind.__name__}(stream_id={self.stream_id})"

    return type(kind.__name__, (kind,), {"__repr__": __repr__, "__module__": __name__})


# hyperframe's frame classes -> their quiet subclasses.
_QUIET_FRAMES: Final = {
    kind: _quiet_frame_class(kind) for kind in (*FRAMES.values(), ExtensionFrame)
}


class _FrameDispatch:
    """h2's frame-type → handler table, shared by every connection instead of built by each.

    ``H2Connection.__init__`` builds a dict of twelve bound methods per connection (about
    1.4 KiB, a tenth of an idle HTTP/2 connection); this view looks the handler's name up
    in one table per server process and binds it when a frame arrives.
    """

    __slots__ = ("_conn",)
    _names: dict[type[Frame], str] = {}  # (filled from the first connection's table)

    def __init__(self, conn: h2.connection.H2Connection) -> None:
        if not _FrameDispatch._names:
            table = conn._frame_dispatch_table
            names = {kind: handler.__name__ for kind, handler in table.items()}
            for kind, quiet in _QUIET_FRAMES.items():
                names[quiet] = names[kind]
            _FrameDispatch._names = names
        self._conn = conn

    def __getitem__(self, kind: type[Frame]) -> Any:
        return getattr(self._conn, self._names[kind])


class CompressionError(h2.exceptions.ProtocolError):
    """A header block HPACK cannot decode: a connection error of type COMPRESSION_ERROR.

    RFC 9113 §4.3 asks for COMPRESSION_ERROR; h2 turns every decoding error into a plain
    PROTOCOL_ERROR. Being a ``ProtocolError`` (not an ``HPACKError``), this passes through
    h2's translation, and h2 ends the connection with this class's code.
    """

    error_code = ErrorCodes.COMPRESSION_ERROR


# HPACK's output is a function of its input and its dynamic table: a header block that
# neither added to nor resized the table (every field indexed, or literal without
# indexing, as a client repeating its request sends, and as a server repeating its
# response fields sends once they are in the table) comes out the same for the same input
# as long as the table has not changed since. _Encoder and _Decoder keep the last such
# block and answer it again without HPACK's per-field work (about a tenth of a small
# HTTP/2 request's instructions). The table's state is told by the number of entries ever
# added and its size limit; a memo is made only after a block that changed neither, so a
# connection that served one request holds none (idle memory).


class _Encoder(hpack.Encoder):
    """HPACK's encoder, with the last table-neutral header list's block kept (above)."""

    _memo: tuple[list[Any], int, int, bool, bytes] | None = None

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        table = cast("_HeaderTable", self.header_table)
        memo = self._memo
        if (
            memo is not None
            and memo[1] == table._added
            and memo[2] == table.maxsize
            and memo[3] is huffman
            and memo[0] == headers
            and not self.table_size_changes
        ):
            return memo[4]
        added, size = table._added, table.maxsize
        neutral = type(headers) is list and not self.table_size_changes
        block = super().encode(headers, huffman)
        if neutral and table._added == added and table.maxsize == size:
            self._memo = (list(headers), added, size, huffman, block)
        return block


class _Decoder(hpack.Decoder):
    """HPACK's decoder raising :class:`CompressionError` for a block it cannot decode,
    with the last table-neutral block's header list kept (above).

    ``OversizedHeaderListError`` stays what it is: h2 answers it with ENHANCE_YOUR_CALM.
    """

    _memo: tuple[bytes, bool, tuple[int, int, int, int], list[hpack.HeaderTuple]] | None = None

    def decode(self, data: bytes, raw: bool = False) -> Iterable[hpack.HeaderTuple]:
        table = cast("_DecoderTable", self.header_table)
        state = (
            table._added,
            table.maxsize,
            self.max_header_list_size,
            self.max_allowed_table_size,
        )
        memo = self._memo
        if memo is not None and memo[2] == state and memo[1] is raw and memo[0] == data:
            return list(memo[3])
        try:
            headers = super().decode(data, raw)
        except hpack.OversizedHeaderListError:
            raise
        except (hpack.HPACKError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise CompressionError(f"Error decoding header block: {exc}") from exc
        if table._added == state[0] and table.maxsize == state[1] and type(headers) is list:
            self._memo = (bytes(data), raw, state, list(headers))
        return headers


class _Values(list[int]):
    """A setting's values while a change is in flight: current first, then those sent and
    not yet acknowledged (h2 keeps them in a ``collections.deque``, about 760 bytes
    however few values it holds; ``popleft`` is all of deque that h2 uses beyond a
    list's methods)."""

    def popleft(self) -> int:
        return self.pop(0)


@functools.lru_cache(maxsize=256)
def _shared_values(items: tuple[tuple[int, int], ...]) -> dict[int, tuple[int]]:
    """One settings table per distinct set of current values, shared by every connection
    that holds it and never mutated (a memo of a pure function: the per-process sharing
    of an immutable value). Bounded: a client varying its settings only evicts."""
    return {key: (value,) for key, value in items}


class _Settings(h2.settings.Settings):
    """``h2.settings.Settings`` whose table is shared while no change is in flight.

    h2 keeps, per connection and for each side, a dict of a deque per setting (two
    ``Settings`` of five to nine settings: over 10 KiB, more than an idle HTTP/1.1
    connection costs in all). Here, whenever every setting has just its current value
    (after construction and after each ``acknowledge()``), the table is a dict of 1-tuples
    shared by all connections with the same values (:func:`_shared_values`): what h2 reads
    of it (``[0]``, ``len``) works on a tuple. Before a change (``__setitem__``, h2's only
    mutation besides ``acknowledge``), the table is copied into lists of this connection's
    own. Relies on h2 4.4's table (``_settings``: per setting a sequence, the current value
    first), as the list-based version before did; every mutation goes through the mapping
    methods overridden here.
    """

    _shared = False  # self._settings is a _shared_values() table (copy before a change)

    def __init__(
        self,
        client: bool = True,
        initial_values: dict[h2.settings.SettingCodes, int] | None = None,
    ) -> None:
        super().__init__(client, initial_values)
        self._share()

    def _share(self) -> None:
        settings = self._settings
        if all(len(values) == 1 and values[0] is not None for values in settings.values()):
            key = tuple((code, values[0]) for code, values in settings.items())
            self._settings = _shared_values(key)  # type: ignore[assignment]
            self._shared = True

    def _own(self) -> None:
        if self._shared:
            owned: dict[Any, Any] = {
                code: _Values(values) for code, values in self._settings.items()
            }
            self._settings = owned
            self._shared = False

    def acknowledge(self) -> dict[h2.settings.SettingCodes | int, h2.settings.ChangedSetting]:
        changed = super().acknowledge()  # (mutates only a table with a change in flight)
        self._share()
        return changed

    def __setitem__(self, key: h2.settings.SettingCodes | int, value: int) -> None:
        self._own()
        super().__setitem__(key, value)  # (a setting new to this object: a deque)

    def __delitem__(self, key: h2.settings.SettingCodes | int) -> None:
        self._own()
        super().__delitem__(key)


class _Entries(list[tuple[bytes, bytes]]):
    """An HPACK dynamic table's entries, newest first, in a list.

    ``hpack.table.HeaderTable`` keeps them in a ``collections.deque`` (about 630 bytes
    even when empty, two per connection); a table holds a few dozen entries at most
    (4 KiB of 32-byte overhead each), so inserting at the front costs a short memmove.
    ``appendleft`` is all of deque that hpack uses beyond a list's methods.
    """

    def appendleft(self, entry: tuple[bytes, bytes]) -> None:
        self.insert(0, entry)


class _DecoderTable(hpack.table.HeaderTable):
    """HPACK's header table (the decoder's side) with its entries in an :class:`_Entries`,
    counting the entries ever added (:class:`_Decoder`'s memo)."""

    _added = 0

    def __init__(self) -> None:
        super().__init__()
        self.dynamic_entries = _Entries()  # type: ignore[assignment]

    def add(self, name: bytes, value: bytes) -> None:
        self._added += 1
        super().add(name, value)


class _HeaderTable(hpack.table.HeaderTable):
    """HPACK's header table with the dynamic part indexed by a dict (the encoder's side).

    ``hpack.table.HeaderTable.search`` scans the dynamic table entry by entry for every
    field of every response; a table filled by fields that change (``date`` once a
    second, ``content-length``, ``etag``) holds up to ~100 entries, and the scan was the
    largest single cost of a small HTTP/2 response. Here the newest entry of each
    (name, value) and of each name is kept in one dict (keyed by the pair, and by the
    name: a tuple and bytes never collide) by its sequence number (entries ever added),
    from which its index follows, so a search costs two lookups. The answers are the
    scan's: the static table first, then the newest dynamic match.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dynamic_entries = _Entries()  # type: ignore[assignment]
        self._added = 0  # entries ever added: the newest has sequence number _added - 1
        self._index: dict[tuple[bytes, bytes] | bytes, int] = {}  # newest sequence number

    def add(self, name: bytes, value: bytes) -> None:
        # Counted first: _shrink, which add() calls, works out sequence numbers from it.
        seq = self._added
        self._added += 1
        index = self._index
        index[name, value] = seq
        index[name] = seq
        super().add(name, value)
        if not self.dynamic_entries:  # (an entry larger than the table empties it)
            index.clear()

    def search(self, name: bytes, value: bytes) -> tuple[int, bytes, bytes | None] | None:
        partial = None
        static = self.STATIC_TABLE_MAPPING.get(name)
        if static is not None:
            index = static[1].get(value)
            if index is not None:
                return index, name, value
            partial = (static[0], name, None)
        newest = self._added + self.STATIC_TABLE_LENGTH  # (the index of sequence number s
        seq = self._index.get((name, value))  #  is newest - s: the table is 1-based)
        if seq is not None:
            return newest - seq, name, value
        if partial is None:
            seq = self._index.get(name)
            if seq is not None:
                return newest - seq, name, None
        return partial

    def _shrink(self) -> None:
        entries = self.dynamic_entries
        size = self._current_size
        index = self._index
        while size > self._maxsize:
            name, value = entries.pop()
            seq = self._added - len(entries) - 1  # (the oldest entry's, just evicted)
            if index.get((name, value)) == seq:
                del index[name, value]
            if index.get(name) == seq:
                del index[name]
            size -= hpack.table.table_entry_size(name, value)
        self._current_size = size
        if not entries:
            index.clear()

    # (The maxsize setter empties the table itself when the size goes to 0.)
    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        hpack.table.HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]
        if not self.dynamic_entries:
            self._index.clear()


class _FrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, with what it buffers for a peer bounded in bytes.

    * A frame whose header announces more than the maximum frame size is refused as soon
      as the 9-byte header is in (FRAME_SIZE_ERROR); h2 checks only once the whole frame
      arrived, so a header announcing 16 MiB would make it buffer 16 MiB first.
    * A header block not yet ended (HEADERS and CONTINUATION frames without END_HEADERS)
      may hold at most ``max_header_block`` bytes (ENHANCE_YOUR_CALM); h2 only counts its
      frames. An HPACK block is never larger than the header list it decodes to (each
      field costs 32 bytes more in the list), so the header list limit serves.
    """

    def __init__(self, max_header_block: int) -> None:
        super().__init__(server=True)
        self.max_header_block = max_header_block

    def __next__(self) -> Frame:
        if len(self._data) >= 9:
            self._validate_frame_length(int.from_bytes(self._data[:3], "big"))
        frame = super().__next__()
        frame.__class__ = _QUIET_FRAMES[frame.__class__]
        return frame

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        f = super()._update_header_buffer(f)
        if self._headers_buffer:
            size = sum(len(frame.data) for frame in self._headers_buffer)
            if size > self.max_header_block:
                raise h2.exceptions.DenialOfServiceError(
                    f"header block of {size} bytes without END_HEADERS "
                    f"(limit {self.max_header_block})"
                )
        return f


def h2_connection(config: Config) -> ServerH2Connection:
    """A server-side ``H2Connection`` with trioserve's settings, not yet initiated.

    The caller sends the preface with ``initiate_connection()`` (prior knowledge, ALPN) or
    ``initiate_upgrade_connection(settings)`` (h2c), then raises the connection-level
    receive window with ``increment_flow_control_window`` (the initial window setting only
    covers streams, RFC 9113 §6.9.2).
    """
    h2_config = h2.config.H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=False,  # request_head() checks, as a stream error
        normalize_inbound_headers=False,  # request_head() joins cookies
        validate_outbound_headers=False,  # response_header_list() makes them valid
        normalize_outbound_headers=False,
    )
    conn = ServerH2Connection(config=h2_config)
    conn._frame_dispatch_table = _FrameDispatch(conn)  # type: ignore[assignment]
    conn.encoder = _Encoder()
    conn.encoder.header_table = _HeaderTable()  # (before any use: h2 has sent nothing)
    conn.remote_settings = _Settings(client=True)  # (the defaults, as h2 made them)
    conn.local_settings = _Settings(
        client=False,
        initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: config.h2_max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: config.h2_max_header_list_size,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: config.h2_initial_window_size,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: config.h2_max_inbound_frame_size,
            # RFC 8441 §3: WebSocket over an extended CONNECT (connection.http2_websocket).
            h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: int(config.ws != "none"),
        },
    )
    # h2 refuses a frame larger than max_inbound_frame_size before acknowledging our
    # SETTINGS; the setting above covers the time after.
    conn.max_inbound_frame_size = config.h2_max_inbound_frame_size
    conn.incoming_buffer = _FrameBuffer(config.h2_max_header_list_size)
    # h2 hands a header list limit to HPACK only when a *changed* setting is acknowledged;
    # initial values never are, so the limit is set here.
    conn.decoder = _Decoder()
    conn.decoder.header_table = _DecoderTable()
    conn.decoder.max_header_list_size = config.h2_max_header_list_size
    return conn


def header_block_pending(conn: h2.connection.H2Connection) -> bool:
    """Whether a header block has begun and not ended (HEADERS without END_HEADERS yet).

    While one is pending no other frame may arrive (RFC 9113 §6.10), so the connection
    task bounds that time by ``--timeout-request-header``, as HTTP/1.1 bounds a head.
    """
    return bool(conn.incoming_buffer._headers_buffer)


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
