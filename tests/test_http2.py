"""HTTP/2 on the wire: an ``h2`` client over real sockets against ``HTTP2Connection``.

The server here is a plain trio listener whose handler runs
:class:`~trioserve.connection.http2.HTTP2Connection` directly (the connection's own
behaviour); ``test_http2_serving.py`` goes through ``serve()`` (negotiation, transports).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from conftest import read_body
from h2.errors import ErrorCodes

from trioserve.config import Config
from trioserve.connection.http2 import READER_TASK, WRITER_TASK, HTTP2Connection
from trioserve.connection.state import ServerState
from trioserve.protocol.http2 import SEND_BATCH_BYTES
from trioserve.protocol.scope import ConnectionFacts

App = Any
CONFIG = Config(port=0, lifespan="off", access_log=False)


@asynccontextmanager
async def h2_server(
    app: App,
    config: Config = CONFIG,
    wrap: Callable[[trio.SocketStream], trio.abc.Stream] | None = None,
) -> AsyncIterator[int]:
    """Serve ``app`` on a port over HTTP/2 (``wrap``: what the connection sees of the
    socket)."""
    state = ServerState(config, app)

    async def handler(stream: trio.SocketStream) -> None:
        host, port = stream.socket.getpeername()[:2]
        facts = ConnectionFacts(client=(host, port), server=("127.0.0.1", 0))
        await HTTP2Connection(stream if wrap is None else wrap(stream), state, facts).run()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


class Client:
    """A raw HTTP/2 client: an ``h2`` connection over a trio socket stream."""

    def __init__(self, stream: trio.SocketStream, window: int | None = None) -> None:
        self.stream = stream
        # (no outbound validation: the tests send what a broken or hostile client would)
        config = h2.config.H2Configuration(
            header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.events: list[h2.events.Event] = []
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()

    async def flush(self) -> None:
        await self.stream.send_all(self.conn.data_to_send())

    async def read_event(self) -> list[h2.events.Event]:
        data = await self.stream.receive_some(65536)
        if not data:
            return [h2.events.ConnectionTerminated()]
        events = self.conn.receive_data(data)
        await self.flush()
        self.events += events
        return events

    async def request(
        self, path: str = "/", method: str = "GET", body: bytes = b"", headers: Any = ()
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"localhost"),
            *headers,
        ]
        self.conn.send_headers(sid, fields, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        await self.flush()
        return sid

    async def response(self, sid: int) -> tuple[dict[bytes, bytes], bytes]:
        """Read until stream ``sid`` ends (other streams' events are kept); credit DATA."""
        while sid not in self.ended:
            for event in await self.read_event():
                stream_id = getattr(event, "stream_id", 0)
                if isinstance(event, h2.events.ResponseReceived):
                    self.heads[stream_id] = dict(event.headers or ())
                elif isinstance(event, h2.events.DataReceived):
                    self.bodies[stream_id] = self.bodies.get(stream_id, b"") + event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                    await self.flush()
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended.add(stream_id)
                elif isinstance(event, h2.events.StreamReset) and stream_id == sid:
                    raise AssertionError(f"stream {sid} reset: {event.error_code!r}")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise AssertionError(f"connection terminated: {event.error_code!r}")
        return self.heads.get(sid, {}), self.bodies.get(sid, b"")


@asynccontextmanager
async def client(port: int, window: int | None = None) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        c = Client(stream, window)
        await c.flush()
        yield c


async def hello(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-v", b"1")]})
    text = f"{scope['http_version']} {scope['method']} {scope['path']} {scope['query_string']}"
    await send({"type": "http.response.body", "body": text.encode()})


async def echo(scope: Any, receive: Any, send: Any) -> None:
    body = await read_body(receive)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def test_get_is_answered_with_http_version_2_and_pseudo_headers_mapped() -> None:
    async with h2_server(hello) as port, client(port) as c:
        sid = await c.request("/a%20b?x=1")
        head, body = await c.response(sid)
    assert head[b":status"] == b"200"
    assert head[b"x-v"] == b"1"
    assert body == b"2 GET /a b b'x=1'"


async def test_cookies_are_joined_and_authority_becomes_host() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["headers"])
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    async with h2_server(app) as port, client(port) as c:
        sid = await c.request(headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
        head, _ = await c.response(sid)
    assert head[b":status"] == b"204"
    assert seen == [[(b"host", b"localhost"), (b"cookie", b"a=1; b=2")]]


async def test_upload_larger_than_the_rfc_window_is_received_whole() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    async with h2_server(echo) as port, client(port) as c:
        # (the client's connection window is the RFC's: send as the server opens it)
        sid = c.conn.get_next_available_stream_id()
        c.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                  (b":path", b"/"), (b":authority", b"a")])  # fmt: skip
        sent = 0
        while sent < len(body):
            window = c.conn.local_flow_control_window(sid)
            size = min(window, c.conn.max_outbound_frame_size, len(body) - sent)
            if size:
                c.conn.send_data(sid, body[sent : sent + size], end_stream=sent + size == len(body))
                sent += size
                await c.flush()
            else:
                await c.read_event()
        _, received = await c.response(sid)
    assert received == body


async def test_a_stream_whose_app_does_not_read_stalls_nothing_else() -> None:
    release = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/stuck":
            await release.wait()  # never reads its body
        await hello(scope, receive, send)

    config = replace(CONFIG, h2_initial_window_size=65535)
    async with h2_server(app, config) as port, client(port) as c:
        stuck = c.conn.get_next_available_stream_id()
        c.conn.send_headers(stuck, [(b":method", b"POST"), (b":scheme", b"http"),
                                    (b":path", b"/stuck"), (b":authority", b"a")])  # fmt: skip
        for _ in range(3):  # nearly fills its window: nobody credits it
            c.conn.send_data(stuck, b"x" * 16384)
        await c.flush()
        c.conn.ping(b"12345678")
        await c.flush()
        with trio.fail_after(5):
            sid = await c.request("/other")
            head, _ = await c.response(sid)
            assert head[b":status"] == b"200"
            assert any(isinstance(e, h2.events.PingAckReceived) for e in c.events)
        release.set()


async def test_response_waits_for_the_client_window_and_resumes_on_window_update() -> None:
    big = b"y" * 200_000

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": big})

    async with h2_server(app) as port, client(port) as c:
        sid = await c.request()
        _, body = await c.response(sid)  # 65,535-byte window: only completes by crediting
    assert body == big


async def test_client_reset_delivers_disconnect_and_other_streams_go_on() -> None:
    got: list[Any] = []
    waiting = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/long":
            await receive()  # the (empty) body
            waiting.set()
            got.append(await receive())
            return
        await hello(scope, receive, send)

    async with h2_server(app) as port, client(port) as c:
        long = await c.request("/long")
        with trio.fail_after(5):
            await waiting.wait()
            c.conn.reset_stream(long, ErrorCodes.CANCEL)
            await c.flush()
            sid = await c.request("/")
            head, _ = await c.response(sid)
            while not got:
                await trio.sleep(0.01)
    assert head[b":status"] == b"200"
    assert got == [{"type": "http.disconnect"}]


async def test_app_error_before_the_response_is_a_500_on_that_stream() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    async with h2_server(app) as port, client(port) as c:
        head, body = await c.response(await c.request())
    assert head[b":status"] == b"500"
    assert b"boom" not in body


async def test_app_error_after_the_response_started_resets_the_stream() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        raise RuntimeError("boom")

    async with h2_server(app) as port, client(port) as c:
        sid = await c.request()
        with pytest.raises(AssertionError, match="INTERNAL_ERROR"):
            await c.response(sid)


async def test_malformed_request_is_a_stream_error_and_the_connection_lives() -> None:
    async with h2_server(hello) as port, client(port) as c:
        bad = await c.request(headers=[(b"connection", b"keep-alive")])
        with pytest.raises(AssertionError, match="PROTOCOL_ERROR"):
            await c.response(bad)
        head, _ = await c.response(await c.request())
    assert head[b":status"] == b"200"


async def test_trailers_are_sent_when_announced() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert "http.response.trailers" in scope["extensions"]
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.body", "body": b"data"})
        await send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")]})

    async with h2_server(app) as port, client(port) as c:
        sid = await c.request()
        _, body = await c.response(sid)
    trailers = [e for e in c.events if isinstance(e, h2.events.TrailersReceived)]
    assert body == b"data"
    assert trailers and dict(trailers[0].headers or ())[b"grpc-status"] == b"0"


async def test_rapid_reset_ends_the_connection_with_enhance_your_calm() -> None:
    async with h2_server(hello) as port:
        async with client(port) as c:
            for _ in range(300):
                sid = c.conn.get_next_available_stream_id()
                c.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                                          (b":path", b"/"), (b":authority", b"a")])  # fmt: skip
                c.conn.reset_stream(sid, ErrorCodes.CANCEL)
            with trio.fail_after(5):
                await c.flush()
                codes = []
                while not codes:
                    events = await c.read_event()
                    codes = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert codes[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
        # a fresh client is served at once
        async with client(port) as fresh:
            with trio.fail_after(5):
                head, _ = await fresh.response(await fresh.request())
        assert head[b":status"] == b"200"


async def test_streams_past_the_limit_are_refused_while_the_connection_lives() -> None:
    release = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await hello(scope, receive, send)

    config = replace(CONFIG, h2_max_concurrent_streams=2)
    async with h2_server(app, config) as port, client(port) as c:
        # (sent before the server's SETTINGS are read: the client does not know the limit)
        sids = [await c.request() for _ in range(3)]
        with pytest.raises(AssertionError, match="REFUSED_STREAM"):
            await c.response(sids[2])
        release.set()
        for sid in sids[:2]:
            head, _ = await c.response(sid)
            assert head[b":status"] == b"200"


async def test_protocol_error_is_answered_with_goaway() -> None:
    async with h2_server(hello) as port, client(port) as c:
        # DATA on stream 0 is a connection error of type PROTOCOL_ERROR (RFC 9113 §6.1)
        await c.stream.send_all(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
        with trio.fail_after(5):
            codes = []
            while not codes:
                codes = [
                    e for e in await c.read_event() if isinstance(e, h2.events.ConnectionTerminated)
                ]
    assert codes[0].error_code == ErrorCodes.PROTOCOL_ERROR


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_curl_prior_knowledge_is_served() -> None:
    async with h2_server(hello) as port:
        result = await trio.run_process(
            ["curl", "-s", "--http2-prior-knowledge", "-w", " %{http_version}",
             f"http://127.0.0.1:{port}/c?q"],
            capture_stdout=True,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    assert result.stdout == b"2 GET /c b'q' 2"


class CountingStream(trio.abc.Stream):
    """A socket stream that counts the server's writes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.writes = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_a_large_body_leaves_in_batches_of_frames_not_a_write_per_frame() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: 64 DATA frames of 16 KiB

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200})
            await send({"type": "http.response.body", "body": body})

    streams: list[CountingStream] = []

    def wrap(stream: trio.SocketStream) -> CountingStream:
        streams.append(CountingStream(stream))
        return streams[-1]

    async with h2_server(app, wrap=wrap) as port, client(port, window=2**31 - 1) as c:
        c.conn.increment_flow_control_window(2**31 - 1 - 65535)  # (the connection's too)
        sid = await c.request()
        _, received = await c.response(sid)
    assert received == body
    # One write per batch of frames (plus SETTINGS, its ACK and the head), not per frame.
    assert streams[0].writes <= len(body) // SEND_BATCH_BYTES + 4


async def test_a_response_sent_at_once_costs_its_stream_no_task() -> None:
    # As on HTTP/1.1, an app that answers without waiting runs to its end in the task
    # that read its request (the reader's): no task per stream, and the end of the
    # response does not yield to the writer (which would count as the app's first wait).
    spawned: list[str] = []

    class Spawns(trio.abc.Instrument):
        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            spawned.append(task.name)

    instrument = Spawns()
    async with h2_server(hello) as port, client(port) as c:
        await c.response(await c.request("/"))  # (the connection's own tasks started)
        spawned.clear()
        trio.lowlevel.add_instrument(instrument)
        try:
            sids = [await c.request(f"/{n}") for n in range(5)]
            bodies = [(await c.response(sid))[1] for sid in sids]
        finally:
            trio.lowlevel.remove_instrument(instrument)
    assert bodies == [f"2 GET /{n} b''".encode() for n in range(5)]
    # (The writer ends whenever the connection is idle, so it may start again.)
    assert [name for name in spawned if name != WRITER_TASK] == []


async def test_an_app_that_waits_hands_the_reader_to_a_new_task() -> None:
    # Streams opened by one read: the first app waits (for an event only the third
    # stream sets), so the reader must move on to call the others; nothing stalls.
    release = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/wait":
            await release.wait()
        elif scope["path"] == "/release":
            release.set()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    spawned: list[str] = []

    class Spawns(trio.abc.Instrument):
        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            spawned.append(task.name)

    instrument = Spawns()
    async with h2_server(app) as port, client(port) as c:
        await c.response(await c.request("/warm"))
        trio.lowlevel.add_instrument(instrument)
        try:
            sids = []
            for path in (b"/wait", b"/other", b"/release"):
                sid = c.conn.get_next_available_stream_id()
                fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", path)]
                c.conn.send_headers(sid, [*fields, (b":authority", b"localhost")], end_stream=True)
                sids.append(sid)
            await c.flush()  # (all three in one write: one read on the server)
            with trio.fail_after(5):
                bodies = [(await c.response(sid))[1] for sid in sids]
        finally:
            trio.lowlevel.remove_instrument(instrument)
    assert bodies == [b"/wait", b"/other", b"/release"]
    assert spawned.count(READER_TASK) == 1  # (only the waiting app cost a hand-over)


def _task_names(task: trio.lowlevel.Task) -> list[str]:
    names = [task.name]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            names += _task_names(child)
    return names


async def test_an_idle_connection_keeps_no_writer_task() -> None:
    # Memory per idle connection (issue 18): the writer runs only while there is
    # something to send or a stream runs; a new request starts it again.
    async with h2_server(hello) as port, client(port) as c:
        for n in range(2):
            assert (await c.response(await c.request(f"/{n}")))[1] == f"2 GET /{n} b''".encode()
            await trio.testing.wait_all_tasks_blocked()
            names = _task_names(trio.lowlevel.current_root_task())
            assert WRITER_TASK not in names
            assert not any(name.startswith("h2 stream") for name in names)


async def test_coalesced_pieces_are_framed_where_they_lie_whatever_the_window() -> None:
    # A streamed body the request cycle coalesced reaches the stream as pieces; pieces of
    # a frame's size or more are framed in place (no join), across window waits.
    chunks = [bytes([65 + n]) * (16384 + n * 1000) for n in range(6)]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async with h2_server(app) as port, client(port, window=10_000) as c:
        with trio.fail_after(5):
            headers, body = await c.response(await c.request("/"))
    assert headers[b":status"] == b"200"
    assert body == b"".join(chunks)


async def test_a_large_read_handed_over_mid_way_keeps_its_order() -> None:
    # One read larger than the reader hands h2 at once (RECEIVE_SIZE): the first app
    # waits while the rest of the read is unprocessed; the new reader task takes it
    # from there, in order (a body split across the parts, then a later request).
    release = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/wait":
            await release.wait()
        elif scope["path"] == "/release":
            release.set()
        body = await read_body(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % len(body)})

    big = b"b" * 150_000
    async with h2_server(app) as port, client(port) as c:
        await c.response(await c.request("/warm"))
        sids = []
        for path, body in ((b"/wait", b""), (b"/big", big), (b"/release", b"")):
            sid = c.conn.get_next_available_stream_id()
            fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path)]
            c.conn.send_headers(sid, [*fields, (b":authority", b"x")], end_stream=not body)
            for start in range(0, len(body), 16384):
                last = start + 16384 >= len(body)
                c.conn.send_data(sid, body[start : start + 16384], end_stream=last)
            sids.append(sid)
        await c.flush()  # (one write of ~150 KB)
        with trio.fail_after(5):
            bodies = [(await c.response(sid))[1] for sid in sids]
    assert bodies == [b"0", b"150000", b"0"]
