"""WebSocket over HTTP/2 (RFC 8441) on the wire: a raw ``h2`` client opens extended
CONNECT streams against ``serve()`` (prior knowledge on a cleartext port) and speaks
WebSocket frames in their DATA with wsproto's client-side frame protocol.

Every test runs on both WebSocket engines (``--ws wsproto`` and ``--ws websockets``).
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h2.events
import pytest
import trio
import trio.testing
from conftest import run_server
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame
from test_http2 import Client, hello
from test_http2_defences import FrameReader
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from trioserve.config import Config
from trioserve.protocol.h2_engine import h2_connection

pytestmark = pytest.mark.usefixtures("both_ws_engines")

WS_FIELDS = [(b"sec-websocket-version", b"13")]


# -- apps -------------------------------------------------------------------------------


class EchoApp:
    """Accept, echo every message, record the scope and what receive() said last."""

    def __init__(self, subprotocol: str | None = None) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.disconnects: list[dict[str, Any]] = []
        self.subprotocol = subprotocol
        self.done = trio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await hello(scope, receive, send)
            return
        self.scopes.append(scope)
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept", "subprotocol": self.subprotocol})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.disconnects.append(message)
                self.done.set()
                return
            if message.get("text") == "close please":
                await send({"type": "websocket.close", "code": 4001, "reason": "asked"})
                continue
            await send(
                {
                    "type": "websocket.send",
                    "text": message.get("text"),
                    "bytes": message.get("bytes"),
                }
            )


# -- the client -------------------------------------------------------------------------

# The WebSockets open on each client, by stream id (events are routed to them).
SOCKETS: weakref.WeakKeyDictionary[Client, dict[int, StreamWS]] = weakref.WeakKeyDictionary()


class StreamWS:
    """One WebSocket on one stream of a raw h2 ``Client`` (wsproto frames in DATA).

    Args:
        deflate: the permessage-deflate the server accepted (finalized), or None.
        early: events of the stream that came with the response head.
    """

    def __init__(
        self, c: Client, sid: int, deflate: PerMessageDeflate | None, early: list[Any]
    ) -> None:
        self.c = c
        self.sid = sid
        # (wsproto keeps the extensions enabled when it is made: after the handshake)
        self.ws = Connection(ConnectionType.CLIENT, [deflate] if deflate else None)
        self.ended = False
        self.reset: ErrorCodes | None = None
        self.body = b""  # DATA of a refusal (not WebSocket frames)
        self.pending: list[Event] = []
        for event in early:
            self._handle(event)
        SOCKETS.setdefault(c, {})[sid] = self

    def _handle(self, event: Any) -> None:
        if isinstance(event, h2.events.DataReceived):
            self.c.conn.acknowledge_received_data(event.flow_controlled_length, self.sid)
            self.body += event.data
            if event.data:  # (END_STREAM may come as an empty DATA frame)
                self.ws.receive_data(event.data)
        elif isinstance(event, h2.events.StreamEnded):
            self.ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.reset = event.error_code

    async def _read(self) -> None:
        """Read, and hand each event to its stream (a WebSocket, or a plain response
        kept as ``Client.response`` keeps it)."""
        c = self.c
        sockets = SOCKETS[c]
        for event in await c.read_event():
            if isinstance(event, h2.events.ConnectionTerminated):
                raise AssertionError(f"connection terminated: {event.error_code!r}")
            sid = getattr(event, "stream_id", None)
            if sid in sockets:
                sockets[sid]._handle(event)
            elif isinstance(event, h2.events.ResponseReceived):
                c.heads[event.stream_id] = dict(event.headers or ())
            elif isinstance(event, h2.events.DataReceived):
                c.bodies[event.stream_id] = c.bodies.get(event.stream_id, b"") + event.data
                c.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                c.ended.add(event.stream_id)
        await c.flush()

    async def send(self, event: Event) -> None:
        self.c.conn.send_data(self.sid, self.ws.send(event))
        await self.c.flush()

    async def next_event(self) -> Event:
        """The next WebSocket event on this stream (other streams' events are kept)."""
        while True:
            self.pending += self.ws.events()
            if self.pending:
                return self.pending.pop(0)
            assert not self.ended and self.reset is None, "stream over"
            await self._read()

    async def wait_end(self) -> None:
        """Read until the server ends the stream (END_STREAM or RST_STREAM)."""
        while not self.ended and self.reset is None:
            await self._read()


async def settings_received(c: Client) -> None:
    """Read until the server's SETTINGS arrived (ENABLE_CONNECT_PROTOCOL is in them)."""
    while not any(isinstance(e, h2.events.RemoteSettingsChanged) for e in c.events):
        await c.read_event()


async def open_ws(
    c: Client, path: str = "/chat?x=1", fields: Any = (), *, deflate: bool = False
) -> tuple[StreamWS, dict[bytes, bytes]]:
    """Send an extended CONNECT; return the WebSocket and the response head."""
    await settings_received(c)
    assert c.conn.remote_settings.enable_connect_protocol == 1
    sid = c.conn.get_next_available_stream_id()
    head = [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"localhost"),
        *WS_FIELDS,
        *fields,
    ]
    if deflate:
        head.append((b"sec-websocket-extensions", b"permessage-deflate"))
    c.conn.send_headers(sid, head)
    await c.flush()
    early: list[Any] = []
    while sid not in c.heads:
        for event in await c.read_event():
            if getattr(event, "stream_id", None) != sid:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                c.heads[sid] = dict(event.headers or ())
            elif isinstance(event, h2.events.StreamReset):
                raise AssertionError(f"stream reset: {event.error_code!r}")
            else:
                early.append(event)  # (what came with the head)
    accepted = c.heads[sid].get(b"sec-websocket-extensions")
    extension = None
    if deflate and accepted is not None:
        extension = PerMessageDeflate()
        extension.finalize(accepted.decode())  # (what a client's handshake does)
    return StreamWS(c, sid, extension, early), c.heads[sid]


@asynccontextmanager
async def h2_ws_server(app: Any, **options: Any) -> AsyncIterator[int]:
    options.setdefault("ws_ping_interval", None)
    async with run_server(app, **options) as server:
        yield int(server.addresses[0][1])


@asynccontextmanager
async def client(port: int) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        c = Client(stream)
        await c.flush()
        yield c


# -- tests ------------------------------------------------------------------------------


def test_enable_connect_protocol_is_advertised_unless_ws_is_none() -> None:
    for ws, expected in (("wsproto", 1), ("none", 0)):
        server = h2_connection(Config(ws=ws))
        server.initiate_connection()
        client = h2.connection.H2Connection()
        client.initiate_connection()
        client.receive_data(server.data_to_send())
        assert client.remote_settings.enable_connect_protocol == expected, ws


async def test_extended_connect_opens_a_websocket_that_echoes_text_and_bytes() -> None:
    app = EchoApp()
    async with h2_ws_server(app) as port, client(port) as c:
        ws, head = await open_ws(c)
        # RFC 8441 §5: 200, not 101; no Sec-WebSocket-Accept.
        assert head[b":status"] == b"200"
        assert b"sec-websocket-accept" not in head
        await ws.send(TextMessage(data="héllo"))
        event = await ws.next_event()
        assert isinstance(event, TextMessage) and event.data == "héllo"
        await ws.send(BytesMessage(data=b"\x00\x01" * 5000))
        event = await ws.next_event()
        assert isinstance(event, BytesMessage) and event.data == b"\x00\x01" * 5000
        await ws.send(CloseConnection(code=1000))
        event = await ws.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1000
        await ws.wait_end()
        assert ws.ended and ws.reset is None  # END_STREAM, not a reset
    scope = app.scopes[0]
    assert scope["type"] == "websocket"
    assert scope["http_version"] == "2"
    assert scope["scheme"] == "ws"
    assert (scope["path"], scope["query_string"]) == ("/chat", b"x=1")
    assert (b"host", b"localhost") in scope["headers"]
    assert app.disconnects == [{"type": "websocket.disconnect", "code": 1000, "reason": ""}]


async def test_ping_is_answered_with_its_payload() -> None:
    async with h2_ws_server(EchoApp()) as port, client(port) as c:
        ws, _ = await open_ws(c)
        await ws.send(Ping(payload=b"are you there"))
        event = await ws.next_event()
        assert isinstance(event, Pong) and event.payload == b"are you there"


async def test_keepalive_ping_goes_out_as_data_on_the_stream() -> None:
    async with h2_ws_server(EchoApp(), ws_ping_interval=0.05) as port, client(port) as c:
        ws, _ = await open_ws(c)
        with trio.fail_after(5):
            event = await ws.next_event()
        assert isinstance(event, Ping)


async def test_app_close_reaches_the_client_then_the_stream_ends() -> None:
    app = EchoApp()
    async with h2_ws_server(app) as port, client(port) as c:
        ws, _ = await open_ws(c)
        await ws.send(TextMessage(data="close please"))
        event = await ws.next_event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (4001, "asked")
        await ws.send(event.response())
        await ws.wait_end()
        assert ws.ended and ws.reset is None
        with trio.fail_after(5):
            await app.done.wait()
    assert app.disconnects[0]["code"] == 4001


async def test_client_close_code_and_reason_reach_the_app() -> None:
    app = EchoApp()
    async with h2_ws_server(app) as port, client(port) as c:
        ws, _ = await open_ws(c)
        await ws.send(CloseConnection(code=4321, reason="bye"))
        event = await ws.next_event()
        assert isinstance(event, CloseConnection) and event.code == 4321
        with trio.fail_after(5):
            await app.done.wait()
    assert app.disconnects == [{"type": "websocket.disconnect", "code": 4321, "reason": "bye"}]


async def test_message_over_max_size_closes_with_1009() -> None:
    app = EchoApp()
    async with h2_ws_server(app, ws_max_size=1000) as port, client(port) as c:
        ws, _ = await open_ws(c)
        await ws.send(BytesMessage(data=b"x" * 1001))
        event = await ws.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1009
        with trio.fail_after(5):
            await app.done.wait()
    assert app.disconnects[0]["code"] == 1009


async def test_permessage_deflate_and_subprotocol_are_negotiated_as_on_http1() -> None:
    app = EchoApp(subprotocol="chat.v2")
    offer = [(b"sec-websocket-protocol", b"chat.v1, chat.v2")]
    async with h2_ws_server(app) as port, client(port) as c:
        ws, head = await open_ws(c, fields=offer, deflate=True)
        assert head[b"sec-websocket-protocol"] == b"chat.v2"
        assert head[b"sec-websocket-extensions"].startswith(b"permessage-deflate")
        text = "compress me " * 1000
        await ws.send(TextMessage(data=text))
        event = await ws.next_event()
        assert isinstance(event, TextMessage) and event.data == text
        assert c.bodies.get(ws.sid) is None  # (the bytes were frames, read by wsproto)
    assert app.scopes[0]["subprotocols"] == ["chat.v1", "chat.v2"]


async def test_denial_response_is_an_http2_response_on_the_stream() -> None:
    async def deny(scope: Any, receive: Any, send: Any) -> None:
        assert scope["http_version"] == "2"
        assert "websocket.http.response" in scope["extensions"]
        await receive()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"text/plain"), (b"x-why", b"token")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": b"go ", "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b"away"})

    async with h2_ws_server(deny) as port, client(port) as c:
        await settings_received(c)
        fields = [(b":protocol", b"websocket"), *WS_FIELDS]
        sid = await c.request("/ws", method="CONNECT", headers=fields)
        # (Client.request puts :protocol after the other pseudo-headers: still a valid
        # request, RFC 9113 §8.3 only asks pseudo-headers to come before regular fields.)
        head, body = await c.response(sid)
    assert head[b":status"] == b"403"
    assert head[b"x-why"] == b"token"
    assert body == b"go away"


async def test_close_before_accept_is_403_and_the_connection_goes_on() -> None:
    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await hello(scope, receive, send)
            return
        await receive()
        await send({"type": "websocket.close"})

    async with h2_ws_server(refuse) as port, client(port) as c:
        ws, head = await open_ws(c)
        assert head[b":status"] == b"403"
        await ws.wait_end()
        assert ws.ended and ws.reset is None and ws.body == b"Forbidden\n"
        _, body = await c.response(await c.request("/after"))
        assert body.startswith(b"2 GET /after")


async def test_wrong_version_is_400_naming_13() -> None:
    app = EchoApp()
    async with h2_ws_server(app) as port, client(port) as c:
        WS_FIELDS[:] = [(b"sec-websocket-version", b"8")]
        try:
            ws, head = await open_ws(c)
        finally:
            WS_FIELDS[:] = [(b"sec-websocket-version", b"13")]
        assert head[b":status"] == b"400"
        assert head[b"sec-websocket-version"] == b"13"
        await ws.wait_end()
        assert ws.ended and ws.body == b"Bad Request\n"
    assert app.scopes == []


async def test_several_websockets_and_requests_share_one_connection() -> None:
    app = EchoApp()
    async with h2_ws_server(app) as port, client(port) as c:
        sockets = [(await open_ws(c, f"/ws{i}"))[0] for i in range(3)]
        requests = [await c.request(f"/r{i}") for i in range(3)]
        for i, ws in enumerate(sockets):
            await ws.send(TextMessage(data=f"to {i}"))
        for i, ws in reversed(list(enumerate(sockets))):
            event = await ws.next_event()
            assert isinstance(event, TextMessage) and event.data == f"to {i}"
        for i, sid in enumerate(requests):
            head, body = await c.response(sid)
            assert head[b":status"] == b"200" and body.startswith(f"2 GET /r{i}".encode())
    assert sorted(scope["path"] for scope in app.scopes) == ["/ws0", "/ws1", "/ws2"]


async def test_client_reset_is_a_1006_disconnect_and_other_streams_go_on() -> None:
    app = EchoApp()
    async with h2_ws_server(app) as port, client(port) as c:
        gone, _ = await open_ws(c, "/gone")
        stays, _ = await open_ws(c, "/stays")
        c.conn.reset_stream(gone.sid, ErrorCodes.CANCEL)
        await c.flush()
        with trio.fail_after(5):
            await app.done.wait()
        assert app.disconnects == [{"type": "websocket.disconnect", "code": 1006, "reason": ""}]
        await stays.send(TextMessage(data="still here"))
        event = await stays.next_event()
        assert isinstance(event, TextMessage) and event.data == "still here"


async def test_ws_none_refuses_extended_connect_as_malformed() -> None:
    async with h2_ws_server(hello, ws="none") as port, client(port) as c:
        await settings_received(c)
        assert c.conn.remote_settings.enable_connect_protocol == 0
        sid = await c.request("/ws", method="CONNECT", headers=[(b":protocol", b"websocket")])
        while True:
            events = await c.read_event()
            reset = [e for e in events if isinstance(e, h2.events.StreamReset)]
            if reset:
                assert reset[0].stream_id == sid
                assert reset[0].error_code == ErrorCodes.PROTOCOL_ERROR
                break
        _, body = await c.response(await c.request("/after"))
        assert body.startswith(b"2 GET /after")


async def test_graceful_shutdown_closes_with_1012_then_ends_the_stream() -> None:
    """After the GOAWAY h2's client state machine takes nothing more: raw frames here."""
    app = EchoApp()
    async with (
        run_server(app, ws_ping_interval=None) as server,
        client(int(server.addresses[0][1])) as c,
    ):
        ws, _ = await open_ws(c)
        reader = FrameReader(c.stream)
        codes: list[int] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.shutdown)
            with trio.fail_after(5):
                while True:
                    frame = await reader.next_frame()
                    if not isinstance(frame, DataFrame) or frame.stream_id != ws.sid:
                        continue
                    if frame.data:
                        ws.ws.receive_data(frame.data)
                    for event in ws.ws.events():
                        assert isinstance(event, CloseConnection)
                        codes.append(event.code)
                        reply = DataFrame(ws.sid, ws.ws.send(event.response()))
                        reply.flags.add("END_STREAM")
                        await c.stream.send_all(reply.serialize())
                    if "END_STREAM" in frame.flags:
                        break
    assert codes == [1012]
    assert app.disconnects[0]["code"] == 1012


async def test_client_ending_the_stream_without_a_close_is_a_1006_disconnect() -> None:
    app = EchoApp()
    async with h2_ws_server(app) as port, client(port) as c:
        ws, _ = await open_ws(c)
        c.conn.end_stream(ws.sid)  # (a TCP FIN's equivalent, RFC 8441 §5)
        await c.flush()
        with trio.fail_after(5):
            await app.done.wait()
            await ws.wait_end()
        assert ws.reset is None
    assert app.disconnects == [{"type": "websocket.disconnect", "code": 1006, "reason": ""}]


async def test_silent_peer_is_dropped_by_keepalive_with_a_stream_reset() -> None:
    """A dropped peer gets RST_STREAM (CANCEL), RFC 8441 §5's abortive close."""
    app = EchoApp()
    async with (
        h2_ws_server(app, ws_ping_interval=0.05, ws_ping_timeout=0.05) as port,
        client(port) as c,
    ):
        ws, _ = await open_ws(c)
        with trio.fail_after(5):
            await app.done.wait()
            await ws.wait_end()  # (the pings and the Close frame come first; never answered)
        assert ws.reset == ErrorCodes.CANCEL
        _, body = await c.response(await c.request("/after"))
        assert body.startswith(b"2 GET /after")
    assert app.disconnects[0]["code"] == 1011


async def test_open_websocket_stream_holds_a_limit_concurrency_place_until_it_ends() -> None:
    app = EchoApp()
    async with h2_ws_server(app, limit_concurrency=1) as port, client(port) as c:
        ws, _ = await open_ws(c)
        head, _ = await c.response(await c.request("/busy"))
        assert head[b":status"] == b"503"
        await ws.send(CloseConnection(code=1000))
        await ws.wait_end()
        with trio.fail_after(5):
            await app.done.wait()
        await trio.testing.wait_all_tasks_blocked()
        head, _ = await c.response(await c.request("/free"))
        assert head[b":status"] == b"200"
