"""h2 as trioserve runs it (layer 2, sans-IO): the server connection, its frame buffer,
HPACK coders and tables and settings, each adapted from the h2 / hpack / hyperframe class it
subclasses for bounded memory and speed; :func:`h2_connection` puts them together.

What each changes, and why, is in its docstring: the concurrent-stream limit left to the
connection task (a stream error, not h2's connection error), received frames with a cheap
``repr``, one frame-dispatch table per process, HPACK errors as COMPRESSION_ERROR, the last
table-neutral header block memoized on both sides, settings tables shared between
connections, dynamic tables in lists and the encoder's indexed by a dict, and a frame buffer
that bounds what a peer can make it hold. None changes what goes on the wire: the tests
compare each with the stock class (tests/test_http2_protocol.py).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Final, cast

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


class ServerH2Connection(h2.connection.H2Connection):
    """``H2Connection`` that leaves the concurrent-stream limit to trioserve.

    h2 answers a stream past ``SETTINGS_MAX_CONCURRENT_STREAMS`` with a *connection*
    error; RFC 9113 §5.1.2 asks for a stream error (PROTOCOL_ERROR or REFUSED_STREAM), and
    trioserve counts a reset stream until its task has exited (CVE-2023-39325), which h2
    cannot know. The connection task refuses such streams with REFUSED_STREAM instead.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self.encoder = _Encoder()  # (before any use: h2 has sent nothing)

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

    @property
    def closed(self) -> bool:
        """h2 sends nothing more: a GOAWAY was received or sent."""
        return self.state_machine.state is h2.connection.ConnectionState.CLOSED

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
