"""WebSocket over real sockets: the `websockets` client where a library is natural, raw
frames (parsed back with wsproto) where a library would refuse to send the bad input.

Tests that drive the `websockets` sync client run it in a worker thread, so they use real
time under a tight ``trio.fail_after``; the raw-socket tests run entirely in the test's trio
run and use the ``autojump_clock`` where timeouts are involved.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import h11
import pytest
import trio
from conftest import hello_app, run_server
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from wire import Client, connect, header, parse_responses, read_until_eof
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

from trioserve import ClientDisconnected
from trioserve.connection.websocket import CLOSE_TIMEOUT

# Every test on h11 and httptools, and on both WebSocket engines (wsproto, websockets).
pytestmark = pytest.mark.usefixtures("both_parsers", "both_ws_engines")

KEY = base64.b64encode(b"0123456789abcdef")
UPGRADE_HEADERS = [
    ("upgrade", "websocket"),
    ("connection", "Upgrade"),
    ("sec-websocket-key", KEY.decode()),
    ("sec-websocket-version", "13"),
]

# -- apps -------------------------------------------------------------------------------


async def echo_app(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "websocket"
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    await echo_messages(receive, send)


async def echo_messages(receive: Any, send: Any) -> None:
    """Send every message back until the client disconnects."""
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send(
            {"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")}
        )


class Recorder:
    """Wraps an app body; records the scope, what receive() returned and how it ended."""

    def __init__(self, body: Callable[[Any, Any, Any], Any]) -> None:
        self.body = body
        self.scope: dict[str, Any] = {}
        self.received: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.done = trio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scope = scope

        async def recording_receive() -> Any:
            message = await receive()
            self.received.append(message)
            return message

        try:
            await self.body(scope, recording_receive, send)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.done.set()

    @property
    def disconnect(self) -> dict[str, Any]:
        assert self.received[-1]["type"] == "websocket.disconnect", self.received
        return self.received[-1]


# -- raw client -------------------------------------------------------------------------


def upgrade_request(target: str = "/", headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "host: test"]
    lines += [
        f"{name}: {value}" for name, value in (headers if headers is not None else UPGRADE_HEADERS)
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x01\x02\x03\x04",
) -> bytes:
    """A raw client frame, built by hand so that it can be wrong on purpose."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask_bit = 0x80 if mask is not None else 0
    length = len(payload)
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if mask is None:
        return head + payload
    key = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")
    return head + mask + masked


class RawWS:
    """A WebSocket client on a raw trio stream; server frames are parsed with wsproto."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = Connection(ConnectionType.CLIENT)
        self.answer_pings = True
        self.pings: list[bytes] = []

    @classmethod
    async def open(
        cls,
        address: Any,
        target: str = "/",
        *,
        extra: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
    ) -> tuple[RawWS, bytes]:
        """Connect and upgrade; ``extra`` is sent in the same write as the request."""
        stream = await connect(address)
        client = cls(stream)
        await stream.send_all(upgrade_request(target, headers) + extra)
        head = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(65536)
                assert data, head
                head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        client.conn.receive_data(rest)
        return client, head

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def next_event(self) -> Event:
        with trio.fail_after(30):
            while True:
                for event in self.conn.events():
                    if isinstance(event, Ping):
                        self.pings.append(event.payload)
                        if self.answer_pings:
                            await self.send(event.response())
                        continue
                    return event
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                self.conn.receive_data(data or None)

    async def read_message(self) -> str | bytes:
        event = await self.next_event()
        assert isinstance(event, (TextMessage, BytesMessage)), event
        assert event.message_finished
        return event.data if isinstance(event, TextMessage) else bytes(event.data)

    async def read_close(self) -> tuple[int, str | None]:
        event = await self.next_event()
        assert isinstance(event, CloseConnection), event
        return event.code, event.reason

    async def expect_eof(self) -> bytes:
        return await read_until_eof(self.stream)


async def http_answer(
    address: Any, headers: list[tuple[str, Any]] | None = None, target: str = "/"
) -> tuple[h11.Response, bytes]:
    stream = await connect(address)
    async with stream:
        headers = UPGRADE_HEADERS if headers is None else headers
        return await Client(stream).request(target=target, headers=headers)


def ws_uri(server: Any, path: str = "/") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def in_thread(fn: Callable[[], Any]) -> Any:
    with trio.fail_after(15):
        return await trio.to_thread.run_sync(fn)


def open_client(uri: str, **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("close_timeout", 5)
    client: ClientConnection = ws_connect(uri, **kwargs)
    return client


# -- handshake and scope ----------------------------------------------------------------


async def test_echo_text_and_bytes_with_websockets_client() -> None:
    async with run_server(echo_app) as server:

        def talk() -> list[Any]:
            with open_client(ws_uri(server)) as ws:
                ws.send("héllo")
                first = ws.recv()
                ws.send(b"\x00\xff")
                return [first, ws.recv()]

        assert await in_thread(talk) == ["héllo", b"\x00\xff"]


async def test_scope_is_complete_and_connect_comes_first() -> None:
    async def body(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept", "subprotocol": "chat"})
        await receive()

    app = Recorder(body)
    async with run_server(app, root_path="/api") as server:

        def talk() -> str | None:
            with open_client(
                ws_uri(server, "/room%201?x=1"),
                subprotocols=["chat", "superchat"],
                additional_headers={"X-Custom": "yes"},
            ) as ws:
                return ws.subprotocol

        assert await in_thread(talk) == "chat"
        with trio.fail_after(5):
            await app.done.wait()
    scope = app.scope
    assert scope["type"] == "websocket"
    assert scope["scheme"] == "ws"
    assert scope["path"] == "/api/room 1"
    assert scope["raw_path"] == b"/api/room%201"
    assert scope["query_string"] == b"x=1"
    assert scope["root_path"] == "/api"
    assert scope["subprotocols"] == ["chat", "superchat"]
    assert (b"x-custom", b"yes") in scope["headers"]
    assert scope["client"][0] == "127.0.0.1"
    assert scope["server"] == ("127.0.0.1", server.port)
    assert scope["extensions"]["websocket.http.response"] == {}
    assert app.received[0] == {"type": "websocket.connect"}


async def test_accept_sends_subprotocol_and_extra_headers() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "websocket.accept",
                "subprotocol": "b",
                "headers": [(b"x-session", b"42"), (b"set-cookie", b"k=v")],
            }
        )
        await receive()

    async with run_server(app) as server:
        ws, head = await RawWS.open(
            server.addresses[0], headers=[*UPGRADE_HEADERS, ("sec-websocket-protocol", "a, b")]
        )
        async with ws.stream:
            lines = head.lower().split(b"\r\n")
            assert lines[0] == b"http/1.1 101 switching protocols"
            assert b"sec-websocket-protocol: b" in lines
            assert b"x-session: 42" in lines
            assert b"set-cookie: k=v" in lines
            assert b"server: trioserve" in lines
            accept = base64.b64encode(
                hashlib.sha1(KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            )
            assert b"sec-websocket-accept: " + accept.lower() in lines


async def test_handshake_and_first_frame_in_one_write_keeps_the_frame() -> None:
    async with run_server(echo_app) as server:
        first = frame(0x1, b"sent with the handshake")
        ws, head = await RawWS.open(server.addresses[0], extra=first + frame(0x2, b"\x01"))
        async with ws.stream:
            assert head.startswith(b"HTTP/1.1 101 ")
            assert await ws.read_message() == "sent with the handshake"
            assert await ws.read_message() == b"\x01"


@pytest.mark.parametrize(
    ("headers", "version_header"),
    [
        pytest.param(
            [
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-key", KEY.decode()),
                ("sec-websocket-version", "8"),
            ],
            True,
            id="bad-version",
        ),
        pytest.param(
            [
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-key", KEY.decode()),
            ],
            True,
            id="missing-version",
        ),
        pytest.param(
            [("upgrade", "websocket"), ("connection", "Upgrade"), ("sec-websocket-version", "13")],
            False,
            id="missing-key",
        ),
        pytest.param(
            [*UPGRADE_HEADERS, ("sec-websocket-protocol", b"caf\xe9")],
            False,
            id="non-ascii-subprotocol",
        ),
    ],
)
async def test_invalid_upgrade_gets_400(
    headers: list[tuple[str, Any]], version_header: bool
) -> None:
    app = Recorder(echo_app)
    async with run_server(app) as server:
        response, _ = await http_answer(server.addresses[0], headers)
    assert response.status_code == 400
    assert header(response, b"connection") == b"close"
    assert (header(response, b"sec-websocket-version") == b"13") is version_header
    assert app.scope == {}  # the app never saw it


async def test_ws_none_serves_upgrade_requests_as_plain_http() -> None:
    app_scope: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        app_scope.update(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"plain"})

    async with run_server(app, ws="none") as server:
        response, body = await http_answer(server.addresses[0])
    assert (response.status_code, body) == (200, b"plain")
    assert app_scope["type"] == "http"


@pytest.mark.parametrize("ws", ["auto", "wsproto", "websockets"])
@pytest.mark.parametrize(
    "request_line",
    [b"POST /ws HTTP/1.1", b"PUT /ws HTTP/1.1", b"GET /ws HTTP/1.0"],
    ids=["post", "put", "http-1.0-get"],
)
async def test_upgrade_offer_other_than_an_http11_get_is_plain_http(
    request_line: bytes, ws: str
) -> None:
    # RFC 6455 §4.1: the handshake is a GET, HTTP/1.1 or later. Any other request that
    # offers the upgrade is an HTTP request (RFC 9110 §7.8): the app answers it, never 101.
    scopes: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await send({"type": "http.response.start", "status": 405, "headers": []})
        await send({"type": "http.response.body", "body": b"use GET"})

    offer = "".join(f"{name}: {value}\r\n" for name, value in UPGRADE_HEADERS[2:]).encode()
    raw = (
        request_line
        + b"\r\nHost: t\r\nContent-Length: 0\r\nUpgrade: websocket\r\n"
        + b"Connection: Upgrade, close\r\n"
        + offer
        + b"\r\n"
    )
    async with run_server(app, ws=ws) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            await stream.send_all(raw)
            data = await read_until_eof(stream)
    [(response, body)] = parse_responses(data)
    assert (response.status_code, body) == (405, b"use GET")
    assert [scope["type"] for scope in scopes] == ["http"]
    assert scopes[0]["method"] == request_line.split()[0].decode()


async def test_handshake_outcome_gets_an_access_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "trioserve.access")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        if scope["path"] == "/no":
            await send({"type": "websocket.close"})
        else:
            await send({"type": "websocket.accept"})

    async with run_server(app, access_log=True) as server:
        ws, _ = await RawWS.open(server.addresses[0], "/yes?q=1")
        async with ws.stream:
            assert (await ws.read_close())[0] == 1000
        response, _ = await http_answer(server.addresses[0], target="/no")
        assert response.status_code == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "trioserve.access"]
    assert len(lines) == 2
    assert '"GET /yes?q=1 HTTP/1.1" 101' in lines[0]
    assert '"GET /no HTTP/1.1" 403' in lines[1]


# -- rejection and denial responses -----------------------------------------------------


async def test_close_before_accept_is_403() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.close"})

    async with run_server(app) as server:
        response, body = await http_answer(server.addresses[0])

        def talk() -> int:
            with pytest.raises(InvalidStatus) as info:
                open_client(ws_uri(server))
            return info.value.response.status_code

        assert await in_thread(talk) == 403
    assert (response.status_code, response.reason, body) == (403, b"Forbidden", b"Forbidden\n")


async def test_denial_response_extension_streams_the_apps_response() -> None:
    async def body(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"x")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": b"no ", "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b"entry"})
        assert await receive() == {"type": "websocket.disconnect", "code": 1006, "reason": ""}

    app = Recorder(body)
    async with run_server(app) as server:
        response, content = await http_answer(server.addresses[0])
        with trio.fail_after(5):
            await app.done.wait()
    assert response.status_code == 401
    assert header(response, b"www-authenticate") == b"x"
    assert header(response, b"transfer-encoding") == b"chunked"
    assert content == b"no entry"
    assert app.error is None


@pytest.mark.parametrize("where", ["before-accept", "after-denial-start", "returns"])
async def test_app_failing_before_accept_gets_500(
    where: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        if where == "after-denial-start":
            await send({"type": "websocket.http.response.start", "status": 401})
        if where != "returns":
            raise RuntimeError("boom")

    async with run_server(app) as server:
        response, _ = await http_answer(server.addresses[0])
    assert response.status_code == 500
    if where == "returns":
        assert "returned without sending handshake" in caplog.text
    else:
        assert "Exception in ASGI application" in caplog.text


# -- messages, close codes, disconnects -------------------------------------------------


async def test_fragmented_message_reaches_the_app_as_one() -> None:
    async with run_server(echo_app) as server:

        def talk() -> Any:
            with open_client(ws_uri(server), compression=None) as ws:
                ws.send(["frag", "men", "ted"])
                text = ws.recv()
                ws.send([b"\x01", b"\x02"])
                return text, ws.recv()

        assert await in_thread(talk) == ("fragmented", b"\x01\x02")


async def test_raw_fragments_with_ping_in_between_are_reassembled() -> None:
    async with run_server(echo_app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            await ws.stream.send_all(
                frame(0x1, b"ab", fin=False)
                + frame(0x9, b"p")
                + frame(0x0, b"cd", fin=False)
                + frame(0x0, b"e")
            )
            event = await ws.next_event()
            assert isinstance(event, Pong)
            assert event.payload == b"p"
            assert await ws.read_message() == "abcde"


async def test_app_close_code_and_reason_reach_the_client() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 4000, "reason": "done here"})
        assert (await receive())["type"] == "websocket.disconnect"

    recorder = Recorder(app)
    async with run_server(recorder) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            assert await ws.read_close() == (4000, "done here")
            await ws.send(CloseConnection(code=4000, reason="done here"))
            assert await ws.expect_eof() == b""
        with trio.fail_after(5):
            await recorder.done.wait()
    assert recorder.disconnect["code"] == 4000
    assert recorder.error is None


async def test_client_close_code_and_reason_reach_the_app() -> None:
    app = Recorder(echo_app)
    async with run_server(app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            await ws.send(CloseConnection(code=4001, reason="bye"))
            assert await ws.read_close() == (4001, "bye")  # echoed (RFC 6455 §5.5.1)
            assert await ws.expect_eof() == b""  # then the server closes TCP
        with trio.fail_after(5):
            await app.done.wait()
    assert app.disconnect == {"type": "websocket.disconnect", "code": 4001, "reason": "bye"}


async def test_messages_and_a_close_in_one_write_are_all_answered_before_the_close() -> None:
    # The peer's Close is answered when the app has read what came before it: its echoes
    # of those messages still leave (websockets alone would answer the Close at once).
    app = Recorder(echo_app)
    async with run_server(app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            await ws.stream.send_all(
                frame(0x1, b"one") + frame(0x2, b"two") + frame(0x8, b"\x0f\xa1bye")
            )
            assert await ws.read_message() == "one"
            assert await ws.read_message() == b"two"
            assert await ws.read_close() == (4001, "bye")
            assert await ws.expect_eof() == b""
        with trio.fail_after(5):
            await app.done.wait()
    assert app.error is None
    assert app.disconnect == {"type": "websocket.disconnect", "code": 4001, "reason": "bye"}


async def test_client_close_without_code_is_1005_for_the_app() -> None:
    app = Recorder(echo_app)
    async with run_server(app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            await ws.stream.send_all(frame(0x8))  # a Close frame with no status code
            assert await ws.read_close() == (1005, "")  # echoed without a code
            assert await ws.expect_eof() == b""
        with trio.fail_after(5):
            await app.done.wait()
    assert app.disconnect["code"] == 1005


async def test_app_returning_without_close_closes_with_1000() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "bye"})

    async with run_server(app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            assert await ws.read_message() == "bye"
            assert await ws.read_close() == (1000, "")
            await ws.send(CloseConnection(code=1000))
            assert await ws.expect_eof() == b""


async def test_app_raising_after_accept_closes_with_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await receive()
        raise RuntimeError("boom")

    async with run_server(app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            await ws.send(TextMessage(data="go"))
            assert (await ws.read_close())[0] == 1011
    assert "Exception in ASGI application" in caplog.text


async def test_invalid_app_message_after_accept_closes_with_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": 42})

    async with run_server(app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            assert (await ws.read_close())[0] == 1011
    assert "'text' must be a str" in caplog.text


@pytest.mark.parametrize("how", ["close-frame", "tcp-reset"])
async def test_send_after_peer_gone_raises_client_disconnected(how: str) -> None:
    async def body(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        assert (await receive())["type"] == "websocket.disconnect"
        await send({"type": "websocket.send", "text": "too late"})

    app = Recorder(body)
    async with run_server(app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            if how == "close-frame":
                await ws.send(CloseConnection(code=1000))
            else:
                ws.stream.setsockopt(
                    trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        with trio.fail_after(5):
            await app.done.wait()
    assert isinstance(app.error, ClientDisconnected)
    assert isinstance(app.error, OSError)
    assert app.disconnect["code"] == (1000 if how == "close-frame" else 1006)


# -- ping/pong and keepalive ------------------------------------------------------------


async def test_ping_is_answered_with_its_payload() -> None:
    async with run_server(echo_app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            await ws.stream.send_all(frame(0x9, b"payload"))
            event = await ws.next_event()
            assert isinstance(event, Pong)
            assert event.payload == b"payload"


async def test_keepalive_pings_an_answering_peer_and_keeps_it(autojump_clock: Any) -> None:
    async with run_server(echo_app, ws_ping_interval=5.0, ws_ping_timeout=2.0) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            start = trio.current_time()
            await ws.send(TextMessage(data="x"))
            assert await ws.read_message() == "x"
            with trio.move_on_after(22):
                await ws.next_event()  # answers pings; nothing else arrives
            assert trio.current_time() - start >= 22
            assert len(ws.pings) == 4
            await ws.send(TextMessage(data="still here"))
            assert await ws.read_message() == "still here"


async def test_keepalive_drops_a_silent_peer_with_a_log_line(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trioserve")
    app = Recorder(echo_app)
    async with run_server(app, ws_ping_interval=5.0, ws_ping_timeout=2.0) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        ws.answer_pings = False
        async with ws.stream:
            start = trio.current_time()
            assert await ws.read_close() == (1011, "keepalive ping timeout")
            assert len(ws.pings) == 1
            assert await ws.expect_eof() == b""
            assert 7.0 <= trio.current_time() - start < 7.0 + 2
        with trio.fail_after(5):
            await app.done.wait()
    assert app.disconnect["code"] == 1011
    assert "keepalive ping not answered within 2.0s" in caplog.text


# -- limits -----------------------------------------------------------------------------


async def test_message_over_max_size_closes_with_1009() -> None:
    app = Recorder(echo_app)
    async with run_server(app, ws_max_size=1000) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            await ws.send(BytesMessage(data=b"x" * 1000))
            assert await ws.read_message() == b"x" * 1000
            await ws.send(TextMessage(data="y" * 600, message_finished=False))
            await ws.send(TextMessage(data="y" * 401))
            assert (await ws.read_close())[0] == 1009
            assert await ws.expect_eof() == b""
        with trio.fail_after(5):
            await app.done.wait()
    assert app.disconnect["code"] == 1009


async def test_full_message_queue_stops_reading_from_the_socket(autojump_clock: Any) -> None:
    release = trio.Event()
    received: list[int] = []
    disconnected = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await release.wait()
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                disconnected.set()
                return
            received.append(len(message["bytes"]))

    count, size = 64, 1 << 20
    payload = frame(0x2, b"z" * size) * count  # 64 MiB
    # No keepalive: this client does not read while it writes.
    async with run_server(app, ws_max_queue=2, ws_ping_interval=None) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            sent = 0
            for _ in range(100):  # until a whole 5 s window (virtual time) moves nothing
                before = sent
                with trio.move_on_after(5):
                    while sent < len(payload):
                        # socket.send: a cancelled call sent nothing (send_all may send part).
                        sent += await ws.stream.socket.send(payload[sent : sent + 65536])
                if sent == before:
                    break
            # The server read at most the queue, one message being assembled and the
            # socket buffers; the rest is still with the client. (It read at least the
            # queue's worth: a window that ended before the queue filled tested nothing.)
            assert 2 * size < sent < len(payload) // 2
            assert received == []
            release.set()
            await ws.stream.send_all(payload[sent:])
            await ws.send(CloseConnection(code=1000))
            assert (await ws.read_close())[0] == 1000
            # Our close was answered while up to ws_max_queue messages may still wait for
            # the app: let it take them (and the disconnect) before the server stops.
            with trio.fail_after(10):
                await disconnected.wait()
    assert received == [size] * count


# -- protocol errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        pytest.param(frame(0x3), 1002, id="reserved-opcode"),
        pytest.param(frame(0x1, b"x", rsv=4), 1002, id="rsv1-without-deflate"),
        pytest.param(frame(0x1, b"x", mask=None), 1002, id="unmasked"),
        pytest.param(frame(0x9, b"p" * 126), 1002, id="ping-too-long"),
        pytest.param(frame(0x0, b"x"), 1002, id="continuation-without-start"),
        pytest.param(
            frame(0x1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"),
            1007,
            id="invalid-utf8",
        ),
        pytest.param(frame(0x8, b"\x03\xe8\xff"), 1007, id="close-reason-invalid-utf8"),
        pytest.param(frame(0x8, struct.pack("!H", 1006)), 1002, id="close-code-1006"),
    ],
)
@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "byte-by-byte"])
async def test_bad_frame_fails_the_connection_after_earlier_messages(
    bad: bytes, code: int, byte_by_byte: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trioserve")
    app = Recorder(echo_app)
    async with run_server(app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            data = frame(0x1, b"before") + bad
            if byte_by_byte:
                for i in range(len(data)):
                    await ws.stream.send_all(data[i : i + 1])
            else:
                await ws.stream.send_all(data)
            assert await ws.read_message() == "before"  # not dropped, and its echo sent
            assert (await ws.read_close())[0] == code
            assert await ws.expect_eof() == b""
        with trio.fail_after(5):
            await app.done.wait()
    assert app.disconnect["code"] == code
    assert "WebSocket protocol error" in caplog.text
    assert "Traceback" not in caplog.text


# -- permessage-deflate -----------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
async def test_per_message_deflate_is_negotiated_when_enabled(enabled: bool) -> None:
    async with run_server(echo_app, ws_per_message_deflate=enabled) as server:

        def talk() -> tuple[str | None, Any]:
            with open_client(ws_uri(server), compression="deflate") as ws:
                text = "compress me " * 5000
                ws.send(text)
                assert ws.recv() == text
                ws.send(os.urandom(3000))
                ws.recv()
                assert ws.response is not None
                return ws.response.headers.get("Sec-WebSocket-Extensions"), None

        extensions, _ = await in_thread(talk)
    if enabled:
        assert extensions is not None
        assert extensions.startswith("permessage-deflate")
    else:
        assert extensions is None


async def test_deflate_takes_first_acceptable_offer_and_compresses_both_ways() -> None:
    async with run_server(echo_app) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            await stream.send_all(
                upgrade_request(
                    headers=[
                        *UPGRADE_HEADERS,
                        (
                            "sec-websocket-extensions",
                            "permessage-deflate; server_max_window_bits=8, "
                            "permessage-deflate; client_no_context_takeover",
                        ),
                    ]
                )
            )
            response = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in response:
                    response += await stream.receive_some(65536)
            head, _, rest = response.partition(b"\r\n\r\n")
            assert (
                b"sec-websocket-extensions: permessage-deflate; client_no_context_takeover"
                in head.lower().split(b"\r\n")
            )
            text = b"hello hello hello hello"
            compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
            deflated = compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH)
            await stream.send_all(frame(0x1, deflated[:-4], rsv=4))  # RSV1: compressed
            with trio.fail_after(10):
                while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7F):
                    rest += await stream.receive_some(65536)
            assert rest[0] == 0xC1  # FIN, RSV1, text: the echo is compressed too
            payload = rest[2 : 2 + rest[1]]
            assert zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff") == text


# -- shutdown ---------------------------------------------------------------------------


async def test_graceful_shutdown_closes_with_1012_and_app_gets_disconnect() -> None:
    app = Recorder(echo_app)
    async with run_server(app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with trio.open_nursery() as nursery, ws.stream:
            await ws.send(TextMessage(data="hi"))
            assert await ws.read_message() == "hi"
            nursery.start_soon(server.shutdown)
            assert (await ws.read_close())[0] == 1012
            await ws.send(CloseConnection(code=1012))
            assert await ws.expect_eof() == b""
        # server.shutdown() has returned: serve() is done.
        assert app.disconnect["code"] == 1012
        assert app.error is None


async def test_graceful_shutdown_is_bounded_when_the_peer_never_answers(
    autojump_clock: Any,
) -> None:
    app = Recorder(echo_app)
    async with run_server(app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            start = trio.current_time()
            await server.shutdown()
            elapsed = trio.current_time() - start
            assert CLOSE_TIMEOUT <= elapsed <= CLOSE_TIMEOUT + 2
            assert (await ws.read_close())[0] == 1012
    assert app.disconnect["code"] == 1006


async def test_app_close_is_bounded_when_the_peer_never_answers(autojump_clock: Any) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close"})

    async with run_server(app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            start = trio.current_time()
            assert await ws.read_close() == (1000, "")
            assert await read_until_eof(ws.stream) == b""
            assert trio.current_time() - start <= CLOSE_TIMEOUT + 2


async def test_cancelling_serve_with_an_open_websocket_is_prompt() -> None:
    blocked = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        blocked.set()
        await trio.sleep_forever()

    with trio.fail_after(5):
        async with run_server(app) as server:
            ws, _ = await RawWS.open(server.addresses[0])
            await blocked.wait()
        async with ws.stream:
            assert await read_until_eof(ws.stream) == b""


# -- frameworks -------------------------------------------------------------------------


fastapi_app = FastAPI()
fastapi_closed: list[int] = []


@fastapi_app.websocket("/ws/{room}")
async def fastapi_room(websocket: WebSocket, room: str, token: str = "") -> None:
    await websocket.accept(subprotocol="json")
    try:
        while True:
            data = await websocket.receive_json()
            await websocket.send_json({"room": room, "token": token, "echo": data})
    except WebSocketDisconnect as exc:
        fastapi_closed.append(exc.code)


async def test_fastapi_websocket_endpoint_works_unmodified() -> None:
    fastapi_closed.clear()
    async with run_server(fastapi_app, lifespan="auto") as server:

        def talk() -> Any:
            with open_client(ws_uri(server, "/ws/lobby?token=t1"), subprotocols=["json"]) as ws:
                ws.send(json.dumps({"n": 1}))
                reply = json.loads(ws.recv())
                ws.close(code=4100)
                return ws.subprotocol, reply

        subprotocol, reply = await in_thread(talk)
        with trio.fail_after(5):
            while not fastapi_closed:
                await trio.sleep(0.01)
    assert subprotocol == "json"
    assert reply == {"room": "lobby", "token": "t1", "echo": {"n": 1}}
    assert fastapi_closed == [4100]


async def test_websockets_client_sees_close_codes_from_the_app() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await receive()
        await send({"type": "websocket.close", "code": 1008, "reason": "policy"})

    async with run_server(app) as server:

        def talk() -> tuple[int, str]:
            with open_client(ws_uri(server)) as ws:
                ws.send("x")
                with pytest.raises(ConnectionClosed) as info:
                    ws.recv()
                assert info.value.rcvd is not None
                return info.value.rcvd.code, info.value.rcvd.reason

        assert await in_thread(talk) == (1008, "policy")


# -- --limit-concurrency and --limit-max-requests count WebSocket sessions ---------------


async def test_open_websocket_counts_against_limit_concurrency() -> None:
    async with run_server(echo_app, limit_concurrency=1, ws_ping_interval=None) as server:
        address = server.addresses[0]
        ws, head = await RawWS.open(address)
        assert head.startswith(b"HTTP/1.1 101 ")
        async with ws.stream:
            await ws.send(TextMessage(data="held"))
            assert await ws.read_message() == "held"
            # The open session is the one app call allowed: an upgrade and a request get 503.
            response, _ = await http_answer(address)
            assert response.status_code == 503
            response, _ = await http_answer(address, headers=[])
            assert response.status_code == 503
            await ws.send(CloseConnection(code=1000))
            assert (await ws.read_close())[0] == 1000
            assert await ws.expect_eof() == b""
        # The session ended: the slot is free again.
        with trio.fail_after(5):
            while True:
                again, head = await RawWS.open(address)
                async with again.stream:
                    if head.startswith(b"HTTP/1.1 101 "):
                        await again.send(TextMessage(data="free"))
                        assert await again.read_message() == "free"
                        break
                await trio.sleep(0.01)


async def test_websocket_handshake_counts_for_limit_max_requests() -> None:
    async def http_or_echo(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await hello_app(scope, receive, send)
        else:
            await echo_app(scope, receive, send)

    app = Recorder(http_or_echo)
    async with run_server(app, limit_max_requests=2, ws_ping_interval=None) as server:
        address = server.addresses[0]
        response, _ = await http_answer(address, headers=[])  # request 1: plain HTTP
        assert response.status_code == 200
        ws, head = await RawWS.open(address)  # request 2: the limit, the server drains
        assert head.startswith(b"HTTP/1.1 101 ")
        async with ws.stream:
            assert (await ws.read_close())[0] == 1012
            await ws.send(CloseConnection(code=1012))
            assert await ws.expect_eof() == b""
        with trio.fail_after(5):
            await server.wait_draining()
            await app.done.wait()
    assert app.disconnect["code"] == 1012


async def test_compressed_bomb_is_never_inflated_past_max_size() -> None:
    """A 64 KiB compressed frame of 64 MiB of zeros, against --ws-max-size 1 MiB.

    wsproto alone would inflate each read whole (tens of MiB) before the size check; the
    bounded extension stops at max_size + 1 bytes and fails the connection with 1009.
    """
    max_size = 1 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = compressor.compress(bytes(64 << 20)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 128 * 1024
    headers = [*UPGRADE_HEADERS, ("sec-websocket-extensions", "permessage-deflate")]
    app = Recorder(echo_app)
    async with run_server(app, ws_max_size=max_size, ws_ping_interval=None) as server:
        ws, head = await RawWS.open(server.addresses[0], headers=headers)
        assert b"permessage-deflate" in head.lower()
        async with ws.stream:
            tracemalloc.start()
            try:
                await ws.stream.send_all(frame(0x2, bomb[:-4], rsv=4))
                assert (await ws.read_close())[0] == 1009
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert await ws.expect_eof() == b""
        with trio.fail_after(5):
            await app.done.wait()
    assert app.disconnect["code"] == 1009
    assert peak < 8 * max_size, peak


async def test_compressed_message_of_exactly_max_size_passes_one_more_byte_fails() -> None:
    text = b"a" * 4096

    def deflate(data: bytes) -> bytes:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]

    headers = [*UPGRADE_HEADERS, ("sec-websocket-extensions", "permessage-deflate")]
    app = Recorder(echo_app)
    async with run_server(app, ws_max_size=len(text), ws_ping_interval=None) as server:
        ws, head = await RawWS.open(server.addresses[0], headers=headers)
        assert b"permessage-deflate" in head.lower()
        # Replace the raw client's parser with one that inflates the compressed echo.
        [accepted] = [
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-extensions:")
        ]
        deflate_ext = PerMessageDeflate()
        deflate_ext.finalize(accepted)
        ws.conn = Connection(ConnectionType.CLIENT, extensions=[deflate_ext])
        async with ws.stream:
            for _ in range(2):  # the room is per message, not per connection
                deflated = deflate(text)
                half = len(deflated) // 2  # two fragments: the room spans the message
                await ws.stream.send_all(frame(0x1, deflated[:half], fin=False, rsv=4))
                await ws.stream.send_all(frame(0x0, deflated[half:]))
                assert await ws.read_message() == text.decode()
            await ws.stream.send_all(frame(0x1, deflate(text + b"a"), rsv=4))
            assert (await ws.read_close())[0] == 1009
            assert await ws.expect_eof() == b""
        with trio.fail_after(5):
            await app.done.wait()
    assert [m.get("text") for m in app.received[1:-1]] == [text.decode()] * 2
    assert app.disconnect["code"] == 1009
