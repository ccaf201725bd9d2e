"""HTTP/2 attack defences on the wire: each test attacks, then checks the server is fine.

Every attack here is one of the 2023-2025 HTTP/2 denial-of-service classes (the CVE is in
the test's docstring). Each test makes the attack with a raw frame client (``h2`` for the
polite parts, ``hyperframe`` / ``hpack`` for the frames a polite client never sends), checks
the server's answer (the RFC 9113 error code on the wire), that what the attack could make
the server hold stayed bounded, and that a *fresh* client is served promptly afterwards.

The server is the real one (``serve()``, prior knowledge on a cleartext port).
"""

from __future__ import annotations

import logging
import socket
import ssl
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import h2.events
import h2.settings
import pytest
import trio
import trio.testing
import trustme
from conftest import run_server
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from test_http2 import Client, hello
from test_tls import ca, pki, tls_options  # noqa: F401 (fixtures)

from trioserve.protocol.http2 import RESET_BURST

App = Any
# Kernel socket buffers of the server's accepted sockets in the flood tests: small, so that
# what the client manages to send measures what the *server* holds, not what Linux buffers
# (loopback autotuning grows a receive buffer to tens of MiB).
SMALL_SOCKET_BUFFER = 64 * 1024
GET: Any = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]


@asynccontextmanager
async def h2_listener(
    app: App, *, small_buffers: bool = False, **options: Any
) -> AsyncIterator[int]:
    """Serve ``app`` with ``serve()`` on 127.0.0.1 (``conftest.run_server``); yield the port.

    Args:
        small_buffers: listen on a socket whose accepted sockets get
            :data:`SMALL_SOCKET_BUFFER` kernel buffers (they inherit the listening
            socket's), handed to the server as ``--fd``.
        options: ``Config`` fields.
    """
    port = 0
    if small_buffers:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SOCKET_BUFFER)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        options["fd"] = sock.detach()  # (the server owns and closes it)
    async with run_server(app, **options) as server:
        yield port or int(server.addresses[0][1])


@asynccontextmanager
async def h2_client(
    port: int, *, small_buffers: bool = False, tls: ssl.SSLContext | None = None
) -> AsyncIterator[Client]:
    """A raw client (``test_http2.Client``) that has sent its preface and SETTINGS.

    Args:
        tls: connect with TLS, ALPN ``h2`` (the server must select it).
    """
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    if small_buffers:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SOCKET_BUFFER)
    await sock.connect(("127.0.0.1", port))
    stream: trio.abc.Stream = trio.SocketStream(sock)
    if tls is not None:
        stream = trio.SSLStream(stream, tls, server_hostname="127.0.0.1")
        await stream.do_handshake()
        assert stream.selected_alpn_protocol() == "h2"
    async with stream:
        c = Client(stream)  # type: ignore[arg-type]  # (any trio stream serves)
        await c.flush()
        yield c


@pytest.fixture(params=["tcp", "tls"])
def transport(
    request: pytest.FixtureRequest,
    ca: trustme.CA,  # noqa: F811
    pki: dict[str, str],  # noqa: F811
) -> tuple[dict[str, Any], ssl.SSLContext | None]:
    """Server options and the client's TLS context (None on cleartext) of a transport."""
    if request.param == "tcp":
        return {}, None
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["h2"])
    return tls_options(pki), context


async def settle(c: Client) -> None:
    """Read until the server's SETTINGS are acknowledged (its limits now apply)."""
    while not any(isinstance(e, h2.events.SettingsAcknowledged) for e in c.events):
        await c.read_event()


class FrameReader:
    """Frames from the server parsed raw (``hyperframe``): the attacks bypass the client's
    ``h2`` state machine, which would refuse what the server answers to them."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def next_frame(self) -> Frame:
        while True:
            if len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) >= 9 + length:
                    frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                    del self.buffer[: 9 + length]
                    return frame
            data = await self.stream.receive_some(65536)
            assert data, "the server closed without a GOAWAY"
            self.buffer += data


async def goaway(c: Client) -> GoAwayFrame:
    """Read raw frames until the server's GOAWAY."""
    reader = FrameReader(c.stream)
    while not isinstance(frame := await reader.next_frame(), GoAwayFrame):
        pass
    return frame


async def reset_code(c: Client, sid: int) -> int:
    """Read until the server resets stream ``sid`` (or find it read already); its code."""
    while True:
        for event in c.events:
            if isinstance(event, h2.events.StreamReset) and event.stream_id == sid:
                assert event.error_code is not None
                return event.error_code
        await c.read_event()


async def served_promptly(port: int, tls: ssl.SSLContext | None = None) -> None:
    """A fresh client gets its 200 within a second."""
    with trio.fail_after(1):
        async with h2_client(port, tls=tls) as fresh:
            head, body = await fresh.response(await fresh.request("/fresh"))
    assert head[b":status"] == b"200"
    assert body == b"2 GET /fresh b''"


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Measure the peak of Python allocations (client and server) inside the block.

    Yields a list that holds the peak in bytes, above the level at entry, once the block ended.
    """
    result: list[int] = []
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        yield result
        _, peak = tracemalloc.get_traced_memory()
        result.append(peak - base)
    finally:
        tracemalloc.stop()


def one_line_info_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """trioserve's log records of the test: none above INFO and none with a traceback."""
    records = [r for r in caplog.records if r.name.startswith("trioserve")]
    assert not [r for r in records if r.levelno > logging.INFO or r.exc_info], records
    return [r for r in records if r.levelno == logging.INFO]


# -- rapid reset, CVE-2023-44487 ----------------------------------------------------------------


async def test_rapid_reset_ends_in_enhance_your_calm_with_app_calls_bounded(
    transport: tuple[dict[str, Any], ssl.SSLContext | None],
) -> None:
    """CVE-2023-44487: HEADERS + RST_STREAM pairs as fast as the socket takes them.

    The reset budget ends the connection with GOAWAY ENHANCE_YOUR_CALM; the apps the attack
    started are at most the budget's burst, not one per stream sent.
    """
    calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await hello(scope, receive, send)

    options, tls = transport
    async with h2_listener(app, **options) as port:
        with peak_memory() as peak:
            async with h2_client(port, tls=tls) as c:
                for _ in range(5 * RESET_BURST):
                    sid = c.conn.get_next_available_stream_id()
                    c.conn.send_headers(sid, GET)
                    c.conn.reset_stream(sid, ErrorCodes.CANCEL)
                with trio.fail_after(5):
                    await c.flush()
                    terminated = await goaway(c)
        assert terminated.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert calls <= RESET_BURST + 1
        assert peak[0] < 8 * 1024 * 1024
        await served_promptly(port, tls)


# -- a reset stream frees its slot only when its task exited, CVE-2023-39325 -----------------------


async def test_reset_stream_keeps_its_concurrency_slot_until_its_app_returned() -> None:
    """CVE-2023-39325 (Go's fix): resetting streams does not make room for more app calls.

    The apps here ignore the disconnect and go on working; the client resets every stream
    and opens new ones. Those are refused (REFUSED_STREAM) while the reset streams' apps
    still run, so no more than the limit of apps ever run at once.
    """
    limit = 4
    running = peak_running = 0
    release = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal running, peak_running
        running += 1
        peak_running = max(peak_running, running)
        try:
            if scope["path"] == "/work":
                await release.wait()  # (ignores the reset: the work goes on)
            await hello(scope, receive, send)
        finally:
            running -= 1

    async with h2_listener(app, h2_max_concurrent_streams=limit) as port:
        async with h2_client(port) as c:
            with trio.fail_after(5):
                await settle(c)
                for _ in range(3):  # three rounds of: open up to the limit, reset them all
                    sids = [await c.request("/work") for _ in range(limit)]
                    for sid in sids:
                        c.conn.reset_stream(sid, ErrorCodes.CANCEL)
                    await c.flush()
                for sid in [await c.request("/work") for _ in range(limit)]:
                    # (new streams while the reset ones' apps still work)
                    assert await reset_code(c, sid) == ErrorCodes.REFUSED_STREAM
                await trio.testing.wait_all_tasks_blocked()
                assert running == peak_running == limit
                release.set()
                await trio.testing.wait_all_tasks_blocked()
                assert running == 0
                head, _ = await c.response(await c.request())  # the slots are free again
        assert head[b":status"] == b"200"
        assert peak_running == limit
        await served_promptly(port)


# -- MadeYouReset, CVE-2025-8671 ------------------------------------------------------------------


def _window_overflow(sid: int) -> Frame:
    # RFC 9113 §6.9.1: a stream window past 2**31-1 is a stream error, FLOW_CONTROL_ERROR.
    frame = WindowUpdateFrame(sid)
    frame.window_increment = 2**31 - 1
    return frame


def _data_after_end_stream(sid: int) -> Frame:
    # RFC 9113 §5.1: DATA on a half-closed (remote) stream is a stream error, STREAM_CLOSED.
    frame = DataFrame(sid)
    frame.data = b"x"
    return frame


def _request_frame(c: Client, sid: int, extra: Any = ()) -> bytes:
    frame = HeadersFrame(sid, flags=["END_HEADERS", "END_STREAM"])
    frame.data = c.conn.encoder.encode([*GET, *extra])
    return frame.serialize()


@pytest.mark.parametrize(
    ("provoke", "code"),
    [
        pytest.param(_window_overflow, ErrorCodes.FLOW_CONTROL_ERROR, id="window-update-overflow"),
        pytest.param(_data_after_end_stream, ErrorCodes.STREAM_CLOSED, id="data-after-end-stream"),
        # RFC 9113 §8.1.1: a malformed request (a connection-specific field) is PROTOCOL_ERROR.
        pytest.param(None, ErrorCodes.PROTOCOL_ERROR, id="malformed-request"),
    ],
)
async def test_made_you_reset_counts_the_server_resets_against_the_budget(
    provoke: Any, code: ErrorCodes
) -> None:
    """CVE-2025-8671: frames that make the *server* reset a stream whose app runs.

    Sent a few streams at a time (so that no stream is refused for the concurrency limit),
    each provokes the server's RST_STREAM with its RFC code; those resets spend the same
    budget as a client's RST_STREAM, so the connection ends in ENHANCE_YOUR_CALM.
    """

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/fresh":
            await hello(scope, receive, send)
            return
        while (await receive())["type"] != "http.disconnect":
            pass  # (the reset ends it at once: the slot is free for the next batch)

    async with h2_listener(app) as port:
        async with h2_client(port) as c:
            reader = FrameReader(c.stream)
            resets = 0
            sid = 1
            with trio.fail_after(10):
                while True:
                    batch = b""
                    for _ in range(10):
                        if provoke is None:
                            batch += _request_frame(c, sid, [(b"connection", b"close")])
                        else:
                            batch += _request_frame(c, sid) + provoke(sid).serialize()
                        sid += 2
                    await c.stream.send_all(batch)
                    answered = 0
                    while answered < 10:
                        frame = await reader.next_frame()
                        if isinstance(frame, GoAwayFrame):
                            break
                        if isinstance(frame, RstStreamFrame):
                            assert frame.error_code == code
                            answered += 1
                            resets += 1
                    else:
                        continue
                    break
        assert frame.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert RESET_BURST <= resets <= RESET_BURST + 20
        await served_promptly(port)


# -- CONTINUATION flood ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame_size", "payload", "code"),
    [
        # (bounded by the header list limit, 64 KiB)
        pytest.param(256 * 1024, 256 * 1024, ErrorCodes.ENHANCE_YOUR_CALM, id="large-frames"),
        # (bounded by h2's count of 64 CONTINUATION frames)
        pytest.param(16 * 1024, 0, ErrorCodes.PROTOCOL_ERROR, id="empty-frames"),
    ],
)
async def test_continuation_flood_is_cut_off_before_the_header_block_grows(
    frame_size: int, payload: int, code: ErrorCodes, caplog: pytest.LogCaptureFixture
) -> None:
    """CONTINUATION flood (CVE-2024-27316 class): a header block that never ends.

    The server must bound what it holds before END_HEADERS in bytes (by the header list
    limit), not in frames: 64 frames of the largest accepted size would be 16 MiB here.
    Empty frames are bounded by their count. The connection ends with a GOAWAY.
    """
    caplog.set_level(logging.INFO, logger="trioserve")
    async with h2_listener(hello, h2_max_inbound_frame_size=frame_size) as port:
        with peak_memory() as peak:
            async with h2_client(port) as c:
                with trio.fail_after(10):
                    await settle(c)
                    sid = c.conn.get_next_available_stream_id()
                    head = HeadersFrame(sid, flags=["END_STREAM"])
                    head.data = c.conn.encoder.encode(GET)
                    await c.stream.send_all(head.serialize())
                    sent = 0
                    with trio.move_on_after(5):  # (the server closes: stop sending)
                        while sent < 64 * 1024 * 1024:
                            frame = ContinuationFrame(sid)
                            frame.data = b"\x40\x01a\x01b" * (payload // 5)  # literal a: b
                            try:
                                await c.stream.send_all(frame.serialize())
                            except trio.BrokenResourceError:
                                break
                            sent += len(frame.data)
                    terminated = await goaway(c)
        assert terminated.error_code == code
        # The header list limit (64 KiB) and a frame, plus the test's own frames in flight;
        # 64 frames of 256 KiB would be 16 MiB.
        assert peak[0] < 2 * 1024 * 1024, peak
        await served_promptly(port)
    assert len(one_line_info_logs(caplog)) == 1


# -- PING / SETTINGS floods that never read the answers --------------------------------------------


def _pings() -> bytes:
    frame = PingFrame(0)
    frame.opaque_data = b"floodnow"
    return frame.serialize()


def _settings() -> bytes:
    return SettingsFrame(0).serialize()  # (each is acknowledged with a SETTINGS ACK)


@pytest.mark.parametrize(
    "flood", [pytest.param(_pings, id="ping"), pytest.param(_settings, id="settings")]
)
async def test_flood_without_reading_makes_the_server_stop_reading(flood: Any) -> None:
    """PING and SETTINGS floods from a client that never reads the server's answers.

    Each frame makes the server queue an answer. Past its outbound bound (1 MiB) the server
    must stop reading, so the client's writes stall: what it manages to send stays near
    the bound plus the small kernel buffers, instead of everything it has.
    """
    frame = flood()
    batch = frame * (64 * 1024 // len(frame))
    cap = 8 * 1024 * 1024  # (a server that reads it all answers 8 MiB of frames)
    async with h2_listener(hello, small_buffers=True) as port:
        async with h2_client(port, small_buffers=True) as c:
            sent = 0
            while sent < cap:
                with trio.move_on_after(2) as stalled:
                    await c.stream.send_all(batch)
                if stalled.cancelled_caught:
                    break
                sent += len(batch)
        assert sent < 4 * 1024 * 1024, f"the server read {sent} bytes of {flood.__name__}"
        await served_promptly(port)


# -- streams beyond SETTINGS_MAX_CONCURRENT_STREAMS ------------------------------------------------


async def test_streams_beyond_the_advertised_limit_are_refused_and_the_connection_lives() -> None:
    """A client that ignores SETTINGS_MAX_CONCURRENT_STREAMS: REFUSED_STREAM per extra stream.

    RFC 9113 §5.1.2: a stream error, not a connection error; the streams in flight finish and
    the connection serves new streams once they have.
    """
    limit = 3
    release = trio.Event()
    calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await release.wait()
        await hello(scope, receive, send)

    async with h2_listener(app, h2_max_concurrent_streams=limit) as port:
        async with h2_client(port) as c:
            with trio.fail_after(5):
                await settle(c)
                assert c.conn.remote_settings.max_concurrent_streams == limit
                # (the client forgets the limit: its h2 would refuse to go past it)
                max_streams = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                c.conn.remote_settings[max_streams] = 2**31 - 1
                c.conn.remote_settings.acknowledge()
                admitted = [await c.request() for _ in range(limit)]
                extra = [await c.request() for _ in range(limit * 3)]
                for sid in extra:
                    assert await reset_code(c, sid) == ErrorCodes.REFUSED_STREAM
                c.conn.ping(b"liveness")
                await c.flush()
                while not any(isinstance(e, h2.events.PingAckReceived) for e in c.events):
                    await c.read_event()
                assert calls == limit
                release.set()
                for sid in admitted:
                    head, _ = await c.response(sid)
                    assert head[b":status"] == b"200"
                head, _ = await c.response(await c.request())
                assert head[b":status"] == b"200"
        await served_promptly(port)


# -- a client that never opens its window ----------------------------------------------------------


async def test_client_that_never_opens_its_window_gets_the_stream_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A receive window of 0 that the client never raises: the send is given up.

    After the per-stream send timeout the stream is reset (RST_STREAM CANCEL) and the app's
    ``send()`` raises ``ClientDisconnected``; the connection stays usable.
    """
    from trioserve.errors import ClientDisconnected

    outcome: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] != "/stuck":
            await hello(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200})
        try:
            await send({"type": "http.response.body", "body": b"z" * 100})
        except ClientDisconnected:
            outcome.append("disconnected")
            raise
        outcome.append("sent")

    async with h2_listener(app, timeout_keep_alive=3600.0) as port, h2_client(port) as c:
        with trio.fail_after(600):
            c.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            await c.flush()
            await settle(c)
            sid = await c.request("/stuck")
            start = trio.current_time()
            with pytest.raises(AssertionError, match="CANCEL"):
                await c.response(sid)
            waited = trio.current_time() - start
    assert 30 <= waited <= 120
    assert outcome == ["disconnected"]


# -- header list size and the request head timeout -------------------------------------------------


async def test_header_list_over_the_limit_is_refused_without_calling_the_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request head larger than ``--h2-max-header-list-size``: refused, logged in one line."""
    caplog.set_level(logging.INFO, logger="trioserve")
    calls = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal calls
        calls += 1
        await hello(scope, receive, send)

    async with h2_listener(app, h2_max_header_list_size=4096) as port:
        async with h2_client(port) as c:
            with trio.fail_after(5):
                await settle(c)
                big = [(b"x-big", b"v" * 8000)]
                sid = await c.request(headers=big)
                refused = ""
                try:
                    head, _ = await c.response(sid)
                    refused = head[b":status"].decode()
                except AssertionError as exc:
                    refused = str(exc)
        assert refused == "431" or "ENHANCE_YOUR_CALM" in refused or "PROTOCOL_ERROR" in refused
        assert calls == 0
        await served_promptly(port)
    assert len(one_line_info_logs(caplog)) == 1


@pytest.mark.parametrize("busy", [False, True], ids=["idle-connection", "stream-in-flight"])
async def test_header_block_left_open_is_dropped_after_the_request_header_timeout(
    busy: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """A HEADERS frame without END_HEADERS and no CONTINUATION: ``--timeout-request-header``.

    As on HTTP/1.1, a request head must be complete in that time, whether or not another
    stream keeps the connection busy (it would otherwise hold its buffer forever).
    """
    release = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/long":
            await release.wait()
        await hello(scope, receive, send)

    async with h2_listener(app, timeout_keep_alive=3600.0, timeout_request_header=10.0) as port:
        async with h2_client(port) as c:
            with trio.fail_after(600):
                await settle(c)
                if busy:
                    await c.request("/long")
                sid = c.conn.get_next_available_stream_id()
                c.conn.highest_outbound_stream_id = sid
                head = HeadersFrame(sid)
                head.data = c.conn.encoder.encode(GET)[:3]  # (the rest never comes)
                await c.stream.send_all(head.serialize())
                start = trio.current_time()
                terminated = await goaway(c)
                waited = trio.current_time() - start
        release.set()
        assert 9 <= waited <= 30, waited
        assert terminated.error_code in (ErrorCodes.NO_ERROR, ErrorCodes.PROTOCOL_ERROR)
        await served_promptly(port)


# -- protocol errors: the RFC 9113 code, one INFO line, no traceback -------------------------------


def _data_on_stream_zero() -> bytes:
    return b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"  # RFC 9113 §6.1


def _oversized_frame() -> bytes:
    # §4.2: DATA on stream 1, 20,000 bytes, past the 16,384 the server advertised.
    return (20000).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + b"\x00" * 20000


def _oversized_frame_announced() -> bytes:
    # The same, announcing 16 MiB and sending 10 bytes of it: refused on its header, not
    # after buffering 16 MiB.
    return (2**24 - 1).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + b"\x00" * 10


def _connection_window_overflow() -> bytes:
    frame = WindowUpdateFrame(0)
    frame.window_increment = 2**31 - 1  # §6.9.1
    return frame.serialize()


def _bad_hpack_index() -> bytes:
    frame = HeadersFrame(1, flags=["END_HEADERS", "END_STREAM"])
    frame.data = b"\xff\xff\x7f"  # an indexed field far past any table: §4.3
    return frame.serialize()


def _settings_with_bad_window() -> bytes:
    frame = SettingsFrame(0)
    frame.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 2**31}  # §6.5.2
    return frame.serialize()


@pytest.mark.parametrize(
    ("attack", "code"),
    [
        pytest.param(_data_on_stream_zero, ErrorCodes.PROTOCOL_ERROR, id="data-on-stream-0"),
        pytest.param(_oversized_frame, ErrorCodes.FRAME_SIZE_ERROR, id="frame-too-large"),
        pytest.param(
            _oversized_frame_announced, ErrorCodes.FRAME_SIZE_ERROR, id="frame-too-large-announced"
        ),
        pytest.param(
            _connection_window_overflow, ErrorCodes.FLOW_CONTROL_ERROR, id="window-overflow"
        ),
        pytest.param(_bad_hpack_index, ErrorCodes.COMPRESSION_ERROR, id="bad-hpack"),
        pytest.param(
            _settings_with_bad_window, ErrorCodes.FLOW_CONTROL_ERROR, id="settings-bad-window"
        ),
    ],
)
async def test_protocol_error_gets_its_rfc_code_and_one_info_line(
    attack: Any,
    code: ErrorCodes,
    caplog: pytest.LogCaptureFixture,
    transport: tuple[dict[str, Any], ssl.SSLContext | None],
) -> None:
    """A connection error gets GOAWAY with its RFC 9113 code and one INFO line (the peer's
    fault), never a traceback; the next client is served."""
    caplog.set_level(logging.DEBUG, logger="trioserve")
    options, tls = transport
    async with h2_listener(hello, **options) as port:
        async with h2_client(port, tls=tls) as c:
            with trio.fail_after(5):
                await settle(c)
                await c.stream.send_all(attack())
                terminated = await goaway(c)
        assert terminated.error_code == code
        await served_promptly(port, tls)
    infos = one_line_info_logs(caplog)
    assert len(infos) == 1
    assert "\n" not in infos[0].getMessage()


async def test_data_on_a_stream_the_client_ended_is_a_stream_closed_reset() -> None:
    """RFC 9113 §5.1: DATA after END_STREAM is STREAM_CLOSED; other streams go on."""
    release = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await hello(scope, receive, send)

    async with h2_listener(app) as port, h2_client(port) as c:
        with trio.fail_after(5):
            await settle(c)
            sid = await c.request()
            await c.stream.send_all(_data_after_end_stream(sid).serialize())
            with pytest.raises(AssertionError, match="STREAM_CLOSED"):
                await c.response(sid)
            release.set()
            head, _ = await c.response(await c.request())
    assert head[b":status"] == b"200"
