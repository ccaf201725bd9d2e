"""Pure tables for ``trioserve.protocol.http2`` (no sockets, no trio)."""

from __future__ import annotations

import base64

import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import hyperframe.frame
import pytest
from h2.errors import ErrorCodes

from trioserve.config import Config
from trioserve.errors import ConfigError
from trioserve.protocol.h2_engine import h2_connection, header_block_pending
from trioserve.protocol.http2 import (
    PREFACE,
    ResetBudget,
    StreamError,
    connection_window_increment,
    h2c_settings,
    preface_state,
    request_head,
    response_header_list,
)

ASKS = [(b"upgrade", b"h2c"), (b"connection", b"upgrade, http2-settings")]
BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b=1")]


@pytest.mark.parametrize(
    ("data", "state"),
    [
        pytest.param(PREFACE, "h2", id="whole"),
        pytest.param(PREFACE + b"\x00\x00\x12\x04", "h2", id="with-settings"),
        pytest.param(b"", "undecided", id="empty"),
        pytest.param(b"PRI * HTTP/2", "undecided", id="prefix"),
        pytest.param(b"GET / HTTP/1.1\r\n", "http1", id="http1"),
        pytest.param(b"PRI * HTTP/1.1\r\n\r\n", "http1", id="pri-http1"),
        pytest.param(b"P", "undecided", id="one-byte"),
        pytest.param(b"POST / HTTP/1.1\r\n", "http1", id="post"),
    ],
)
def test_preface_is_told_from_http1_from_its_first_bytes(data: bytes, state: str) -> None:
    assert preface_state(data) == state


def test_request_head_maps_pseudo_headers_authority_and_cookies() -> None:
    head = request_head(
        [
            *BASE,
            (b":authority", b"example.com"),
            (b"cookie", b"a=1"),
            (b"accept", b"*/*"),
            (b"cookie", b"b=2"),
        ]
    )
    assert head.method == b"GET"
    assert head.scheme == b"https"
    assert head.target == b"/a?b=1"
    assert head.headers == [
        (b"host", b"example.com"),
        (b"accept", b"*/*"),
        (b"cookie", b"a=1; b=2"),
    ]
    assert head.protocol is None


def test_request_head_keeps_an_explicit_host_over_authority() -> None:
    head = request_head([*BASE, (b":authority", b"a"), (b"host", b"b")])
    assert head.headers == [(b"host", b"b")]


def test_extended_connect_carries_its_protocol() -> None:
    head = request_head(
        [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"https"),
            (b":path", b"/chat"),
            (b":authority", b"a"),
        ]
    )
    assert head.protocol == b"websocket"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        pytest.param(BASE[1:], ErrorCodes.PROTOCOL_ERROR, id="no-method"),
        pytest.param([BASE[0], BASE[2]], ErrorCodes.PROTOCOL_ERROR, id="no-scheme"),
        pytest.param(BASE[:2], ErrorCodes.PROTOCOL_ERROR, id="no-path"),
        pytest.param([*BASE[:2], (b":path", b"")], ErrorCodes.PROTOCOL_ERROR, id="empty-path"),
        pytest.param([*BASE, BASE[0]], ErrorCodes.PROTOCOL_ERROR, id="repeated-pseudo"),
        pytest.param([*BASE, (b":status", b"200")], ErrorCodes.PROTOCOL_ERROR, id="status"),
        pytest.param(
            [BASE[0], (b"a", b"1"), *BASE[1:]], ErrorCodes.PROTOCOL_ERROR, id="pseudo-after"
        ),
        pytest.param([*BASE, (b"Accept", b"x")], ErrorCodes.PROTOCOL_ERROR, id="upper-case"),
        pytest.param([*BASE, (b"connection", b"close")], ErrorCodes.PROTOCOL_ERROR, id="conn"),
        pytest.param([*BASE, (b"keep-alive", b"5")], ErrorCodes.PROTOCOL_ERROR, id="keep-alive"),
        pytest.param(
            [*BASE, (b"transfer-encoding", b"chunked")], ErrorCodes.PROTOCOL_ERROR, id="te-chunked"
        ),
        pytest.param([*BASE, (b"upgrade", b"h2c")], ErrorCodes.PROTOCOL_ERROR, id="upgrade"),
        pytest.param([*BASE, (b"te", b"gzip")], ErrorCodes.PROTOCOL_ERROR, id="te-gzip"),
        pytest.param(
            [(b":method", b"CONNECT"), (b":authority", b"a:443")],
            ErrorCodes.REFUSED_STREAM,
            id="plain-connect",
        ),
        pytest.param([*BASE, (b":protocol", b"websocket")], ErrorCodes.PROTOCOL_ERROR, id="proto"),
    ],
)
def test_malformed_request_heads_are_stream_errors(
    fields: list[tuple[bytes, bytes]], code: ErrorCodes
) -> None:
    with pytest.raises(StreamError) as caught:
        request_head(fields)
    assert caught.value.code == code


def test_te_trailers_is_allowed() -> None:
    assert request_head([*BASE, (b"te", b"trailers")]).headers == [(b"te", b"trailers")]


def test_response_headers_drop_connection_specific_fields_and_lower_case_names() -> None:
    fields = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"keep-alive"),
        (b"transfer-encoding", b"chunked"),
        (b"Keep-Alive", b"timeout=5"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
    assert response_header_list(204, fields) == [
        (b":status", b"204"),
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


def _settings_header() -> bytes:
    client = h2.connection.H2Connection()
    header = client.initiate_upgrade_connection()
    assert header is not None
    return header


@pytest.mark.parametrize(
    ("headers", "wanted"),
    [
        pytest.param(
            [
                (b"Upgrade", b"h2c"),
                (b"Connection", b"Upgrade, HTTP2-Settings"),
                (b"HTTP2-Settings", b"AAMAAABkAAQAAP__"),
            ],
            b"AAMAAABkAAQAAP__",
            id="curl",
        ),
        pytest.param(
            [(b"upgrade", b"h2c"), (b"connection", b"upgrade"), (b"http2-settings", b"AAMA")],
            None,
            id="connection-lacks-settings",
        ),
        pytest.param(
            [(b"upgrade", b"websocket"), ASKS[1], (b"http2-settings", b"")],
            None,
            id="websocket",
        ),
        pytest.param(
            [(b"upgrade", b"h2c"), (b"connection", b"upgrade, http2-settings")],
            None,
            id="no-settings",
        ),
        pytest.param(
            [
                (b"upgrade", b"h2c"),
                (b"connection", b"upgrade, http2-settings"),
                (b"http2-settings", b"AAMA"),
                (b"http2-settings", b"AAMA"),
            ],
            None,
            id="two-settings",
        ),
        pytest.param(
            [*ASKS, (b"http2-settings", b"!!")],
            None,
            id="not-base64",
        ),
    ],
)  # fmt: skip
def test_h2c_upgrade_requests_are_recognised(
    headers: list[tuple[bytes, bytes]], wanted: bytes | None
) -> None:
    assert h2c_settings(headers) == wanted


def test_h2c_settings_reach_the_server_connection() -> None:
    header = _settings_header()
    assert h2c_settings([*ASKS, (b"http2-settings", header)]) == header
    server = h2_connection(Config())
    server.initiate_upgrade_connection(header)
    assert server.data_to_send().startswith(b"\x00")  # our SETTINGS frame


def test_server_settings_come_from_the_config() -> None:
    config = Config(
        h2_max_concurrent_streams=7,
        h2_initial_window_size=2**20,
        h2_max_header_list_size=8192,
        h2_max_inbound_frame_size=2**15,
    )
    server = h2_connection(config)
    server.initiate_connection()
    client = h2.connection.H2Connection()
    client.initiate_connection()
    events = client.receive_data(server.data_to_send())
    changed = next(e for e in events if isinstance(e, h2.events.RemoteSettingsChanged))
    values = {code: setting.new_value for code, setting in changed.changed_settings.items()}
    assert values[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 7
    assert values[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == 2**20
    assert values[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] == 8192
    assert values[h2.settings.SettingCodes.MAX_FRAME_SIZE] == 2**15
    assert connection_window_increment(config) == 4 * 2**20 - 65535


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("h2_initial_window_size", 1000),
        ("h2_initial_window_size", 2**31),
        ("h2_max_inbound_frame_size", 2**14 - 1),
        ("h2_max_inbound_frame_size", 2**24),
        ("h2_max_concurrent_streams", 0),
        ("h2_max_header_list_size", 10),
    ],
)
def test_h2_options_out_of_the_rfc_ranges_are_refused(option: str, value: int) -> None:
    with pytest.raises(ConfigError, match=option):
        Config(**{option: value})  # type: ignore[arg-type]


def test_reset_budget_allows_a_burst_then_refuses_until_it_refills() -> None:
    budget = ResetBudget(burst=3, refill_per_second=1.0)
    assert [budget.spend(0.0) for _ in range(4)] == [True, True, True, False]
    assert not budget.spend(0.5)  # half a token back: still short
    assert budget.spend(10.0)  # refilled (capped at the burst)
    assert budget.spend(10.0)
    assert budget.spend(10.0)
    assert not budget.spend(10.0)


def test_reset_budget_never_refuses_a_browser_cancelling_now_and_then() -> None:
    budget = ResetBudget()
    assert all(budget.spend(t * 0.1) for t in range(10_000))


def test_settings_header_is_base64url() -> None:
    assert base64.urlsafe_b64decode(_settings_header() + b"==")


# -- what the server connection buffers for a peer, and the codes it answers with -------------


def _server_after_preface(**options: object) -> h2.connection.H2Connection:
    conn = h2_connection(Config(**options))  # type: ignore[arg-type]
    conn.initiate_connection()
    conn.receive_data(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # empty SETTINGS
    conn.data_to_send()
    return conn


def _goaway_code(conn: h2.connection.H2Connection, data: bytes) -> int:
    """Feed ``data``; the error code of the GOAWAY the server then queues."""
    with pytest.raises(h2.exceptions.ProtocolError):
        conn.receive_data(data)
    out = conn.data_to_send()
    assert out[3] == 0x7  # a GOAWAY frame
    return int.from_bytes(out[13:17], "big")


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def test_frame_announced_past_the_max_size_is_refused_on_its_header() -> None:
    conn = _server_after_preface()
    header_only = (2**24 - 1).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    assert _goaway_code(conn, header_only) == ErrorCodes.FRAME_SIZE_ERROR


def test_open_header_block_is_bounded_in_bytes_by_the_header_list_limit() -> None:
    conn = _server_after_preface(h2_max_header_list_size=4096, h2_max_inbound_frame_size=65536)
    assert not header_block_pending(conn)
    conn.receive_data(_frame(0x1, 0x0, 1, b"\x82"))  # HEADERS without END_HEADERS
    assert header_block_pending(conn)
    conn.receive_data(_frame(0x9, 0x0, 1, b"\x00" * 4000))  # 4,001 bytes: within
    assert _goaway_code(conn, _frame(0x9, 0x0, 1, b"\x00" * 100)) == ErrorCodes.ENHANCE_YOUR_CALM


def test_undecodable_header_block_is_a_compression_error() -> None:
    conn = _server_after_preface()
    block = b"\xff\xff\x7f"  # an indexed field far past the tables (RFC 9113 §4.3)
    assert _goaway_code(conn, _frame(0x1, 0x5, 1, block)) == ErrorCodes.COMPRESSION_ERROR


def test_header_list_limit_applies_from_the_first_request() -> None:
    conn = _server_after_preface(h2_max_header_list_size=1024)
    encoder = hpack.Encoder()
    block = encoder.encode([*BASE, (b":authority", b"a"), (b"x-big", b"v" * 2000)])
    assert _goaway_code(conn, _frame(0x1, 0x5, 1, block)) == ErrorCodes.ENHANCE_YOUR_CALM


def test_response_header_blocks_are_hpacks_own_however_the_table_churns() -> None:
    # The server's encoder looks fields up by dict (protocol.h2_engine._HeaderTable); its
    # blocks must be byte for byte those of hpack's scanning encoder, through evictions
    # (a changing date, varying lengths), a field larger than the table, and resizes
    # (the client's SETTINGS_HEADER_TABLE_SIZE, down to 0 and up again).
    ours = _server_after_preface().encoder
    stock = hpack.Encoder()
    for n in range(600):
        if n in (150, 300, 450):
            size = {150: 256, 300: 0, 450: 4096}[n]
            ours.header_table_size = stock.header_table_size = size
        fields = [
            (b":status", b"200"),
            (b"date", b"Mon, 07 Dec 2026 10:%02d:%02d GMT" % (n // 60 % 60, n % 60)),
            (b"server", b"trioserve"),
            (b"content-length", str(n % 37).encode()),
            (b"etag", b'"%d"' % (n % 11)),
        ]
        if n % 97 == 0:
            fields.append((b"x-big", b"v" * 5000))  # larger than the whole table
        for _ in range(1 + n % 3):  # (repeats: the memo of a table-neutral block answers)
            assert ours.encode(fields) == stock.encode(fields), n
            table = ours.header_table
            assert list(table.dynamic_entries) == list(stock.header_table.dynamic_entries)
    # A list encoded again with the table unchanged is answered from the memo; once
    # another list added entries (the indexes moved), it is encoded anew.
    fields = [(b":status", b"200"), (b"server", b"trioserve"), (b"x-a", b"1")]
    for _ in range(2):
        assert ours.encode(fields) == stock.encode(fields)
    assert ours.encode(list(fields)) is ours.encode(fields)
    stock.encode(fields)
    stock.encode(fields)
    other = [(b":status", b"200"), (b"x-b", b"2")]
    assert ours.encode(other) == stock.encode(other)
    assert ours.encode(fields) == stock.encode(fields)


def test_settings_of_an_idle_connection_stay_small() -> None:
    # h2 keeps each setting's values in a deque (~760 bytes each, a dozen per
    # connection): an idle HTTP/2 connection cost several times an HTTP/1.1 one.
    import sys

    conn = _server_after_preface()
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10})
    conn.receive_data(client.data_to_send()[len(PREFACE) :])  # a new key, then the ACK
    assert conn.remote_settings.max_concurrent_streams == 10
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 123_456})
    assert conn.local_settings.initial_window_size != 123_456  # (not acknowledged yet)
    client.receive_data(conn.data_to_send())
    conn.receive_data(client.data_to_send())
    assert conn.local_settings.initial_window_size == 123_456
    for settings in (conn.local_settings, conn.remote_settings):
        values = settings._settings.values()
        assert sum(map(sys.getsizeof, values)) <= 100 * len(values)


def test_settings_tables_are_shared_while_no_change_is_in_flight() -> None:
    # Memory per idle connection: connections with the same settings share one table
    # (protocol.h2_engine._Settings); a change in flight gives its connection a table of its
    # own, and the acknowledgement shares it again.
    a, b = _server_after_preface(), _server_after_preface()
    assert a.local_settings._settings is b.local_settings._settings
    assert a.remote_settings._settings is b.remote_settings._settings
    a.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 123_456})
    assert a.local_settings._settings is not b.local_settings._settings
    assert b.local_settings.initial_window_size == Config().h2_initial_window_size
    a.receive_data(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")  # the client's SETTINGS ACK
    assert a.local_settings.initial_window_size == 123_456
    c = _server_after_preface()
    c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 123_456})
    c.receive_data(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
    assert c.local_settings._settings is a.local_settings._settings
    assert b.local_settings.initial_window_size == Config().h2_initial_window_size


def test_request_header_blocks_decode_as_hpacks_own_however_the_table_churns() -> None:
    # The server's decoder keeps its dynamic table in a list (protocol.h2_engine._Entries):
    # every block a stock encoder makes decodes to its fields, through evictions, a field
    # larger than the table and table size updates.
    ours = _server_after_preface().decoder
    stock = hpack.Encoder()
    for n in range(600):
        if n in (150, 300, 450):
            stock.header_table_size = {150: 256, 300: 0, 450: 4096}[n]
        fields = [
            (b":method", b"GET"),
            (b":path", b"/item/%d" % (n % 53)),
            (b"x-request", b"%d" % n),
            (b"cookie", b"session=%d" % (n % 7)),
        ]
        if n % 97 == 0:
            fields.append((b"x-big", b"v" * 5000))  # larger than the whole table
        for _ in range(1 + n % 3):  # (repeats: the memo of a table-neutral block answers)
            assert list(ours.decode(stock.encode(fields), raw=True)) == fields, n
            entries = list(ours.header_table.dynamic_entries)
            assert entries == list(stock.header_table.dynamic_entries)
    assert ours._memo is not None  # (made by the repeats)
    # A table size update in a block that repeats a memo's fields is still applied.
    stock.header_table_size = 512
    assert list(ours.decode(stock.encode(fields), raw=True)) == fields
    assert ours.header_table.maxsize == 512


def test_closed_streams_are_forgotten_under_constant_load_and_at_idle() -> None:
    # h2 forgets closed streams only when it counts open ones; the server connection
    # counts only now and then (protocol.h2_engine.ServerH2Connection), so what it holds
    # must stay bounded while streams keep coming, and be empty once asked at idle.
    conn = _server_after_preface()
    encoder = hpack.Encoder()
    held = []
    for n in range(500):
        sid = 2 * n + 1
        block = encoder.encode([*BASE, (b":authority", b"a")])
        events = conn.receive_data(_frame(0x1, 0x5, sid, block))
        assert isinstance(events[0], h2.events.RequestReceived)
        conn.send_headers(sid, [(b":status", b"204")], end_stream=True)
        held.append(len(conn.streams))
    assert max(held) <= 2 * 16 + 16  # (never more than the sweep bound)
    assert min(held[100:]) < max(held)  # (swept again and again)
    conn.forget_closed_streams()  # type: ignore[attr-defined]
    assert conn.streams == {}


def test_received_frames_keep_their_kind_and_a_cheap_repr() -> None:
    # (The frame buffer hands h2 subclasses whose repr h2's trace log may format cheaply.)
    conn = _server_after_preface()
    block = hpack.Encoder().encode([*BASE, (b":authority", b"a")])
    conn.incoming_buffer.add_data(_frame(0x1, 0x5, 1, block) + _frame(0x6, 0x0, 0, b"p" * 8))
    frames = list(conn.incoming_buffer)
    assert [type(f).__mro__[1] for f in frames] == [
        hyperframe.frame.HeadersFrame,
        hyperframe.frame.PingFrame,
    ]
    assert repr(frames[0]) == "HeadersFrame(stream_id=1)"
