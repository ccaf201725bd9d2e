"""Both WebSocket engines behind protocol.ws_engine's one interface, fed bytes (sans-IO).

Each test runs on wsproto and on websockets: what the session above relies on (the order
of events, when a Close is answered, that a refused frame writes nothing by itself) must
not depend on the engine. Server frames are parsed back with a wsproto client.
"""

from __future__ import annotations

import importlib.metadata
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from server_process import started_process
from test_websocket_wire import RawWS, frame
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Event, Pong, TextMessage
from wsproto.extensions import PerMessageDeflate

from trioserve import Config
from trioserve.config import ws_implementation
from trioserve.connection.state import ServerState
from trioserve.errors import ConfigError
from trioserve.protocol.ws_deflate import BoundedPerMessageDeflate
from trioserve.protocol.ws_engine import (
    Closed,
    EngineFactory,
    PingReceived,
    PongReceived,
    WebSocketEngine,
    WsprotoEngine,
)
from trioserve.protocol.ws_messages import CloseKind
from trioserve.protocol.ws_websockets import WebsocketsEngine

# -- choosing the engine ----------------------------------------------------------------


def engine_kind(config: Config) -> Any:
    return ServerState(config, hello_app).new_ws_engine


async def hello_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("not called")


def pretend_websockets_version(monkeypatch: pytest.MonkeyPatch, version: str | None) -> None:
    real = importlib.metadata.version

    def version_of(name: str) -> str:
        if name != "websockets":
            return real(name)
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(importlib.metadata, "version", version_of)


def test_auto_picks_websockets_when_installed_and_wsproto_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Config().ws == "auto"
    assert ws_implementation("auto") == "websockets"  # (the test extra installs it)
    assert engine_kind(Config()) is WebsocketsEngine
    assert engine_kind(Config(ws="wsproto")) is WsprotoEngine
    for version in (None, "13.1"):  # missing, or older than the sans-IO API we drive
        pretend_websockets_version(monkeypatch, version)
        assert ws_implementation("auto") == "wsproto"
        assert engine_kind(Config()) is WsprotoEngine
        with pytest.raises(ConfigError, match=r"--ws websockets needs websockets>=14: pip"):
            Config(ws="websockets")


@pytest.mark.parametrize(("ws", "engine"), [("websockets", "websockets"), ("wsproto", "wsproto")])
async def test_the_command_line_serves_websocket_on_the_engine_it_names(
    ws: str, engine: str
) -> None:
    # (uvicorn's users type --ws websockets: it was refused before this engine existed.)
    echo_dir = Path(__file__).resolve().parent.parent / "autobahn"
    args = ["echo_app:app", "--app-dir", str(echo_dir), "--port", "0", "--ws", ws]
    async with started_process([*args, "--log-level", "debug"]) as server:
        client, head = await RawWS.open(("127.0.0.1", server.port))
        async with client.stream:
            assert head.startswith(b"HTTP/1.1 101 ")
            await client.send(TextMessage(data="héllo"))
            assert await client.read_message() == "héllo"
            await client.send(CloseConnection(code=1000))
            assert await client.read_close() == (1000, "")
        assert await server.stop() == 0
    assert f"WebSocket engine: {engine}" in server.stderr
    assert "Traceback" not in server.stderr


def test_unknown_engine_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="ws"):
        Config(ws="websockets-sansio")  # type: ignore[arg-type]


# -- the engines, fed bytes ---------------------------------------------------------------


@pytest.fixture(params=[WsprotoEngine, WebsocketsEngine], ids=["wsproto", "websockets"])
def new_engine(request: pytest.FixtureRequest) -> EngineFactory:
    factory: EngineFactory = request.param
    return factory


def feed(engine: WebSocketEngine, data: bytes | None) -> list[Any]:
    engine.receive_data(data)
    return list(engine.events())


def data_of(event: Any) -> Any:
    """A data event's payload: a fragment's, or a whole message's (its ASGI dict)."""
    if isinstance(event, dict):
        assert event["type"] == "websocket.receive"
        return event["text"] if "text" in event else event["bytes"]
    return event.data


def parts(events: list[Any]) -> list[tuple[Any, bool]]:
    return [
        (data_of(event), True if isinstance(event, dict) else event.message_finished)
        for event in events
    ]


def from_server(data: bytes, client: Connection | None = None) -> list[Event]:
    """What a client makes of the server's bytes."""
    client = client or Connection(ConnectionType.CLIENT)
    client.receive_data(data)
    return list(client.events())


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return frame(0x8, struct.pack("!H", code) + reason)


def test_messages_of_both_kinds_and_fragments(new_engine: EngineFactory) -> None:
    engine = new_engine(1 << 20, None)
    data = (
        frame(0x1, "héllo".encode())
        + frame(0x2, b"\x00\xff")
        + frame(0x1, b"ab", fin=False)
        + frame(0x0, "\u00e9".encode()[:1], fin=False)  # a character split across frames
        + frame(0x0, "\u00e9".encode()[1:])
    )
    events = feed(engine, data)
    assert [type(data_of(event)) for event in events] == [str, bytes, str, str, str]
    assert "".join(data_of(event) for event in events[2:]) == "ab\u00e9"
    assert parts(events[:2]) == [("héllo", True), (b"\x00\xff", True)]
    assert [event.message_finished for event in events[2:]] == [False, False, True]


def test_websockets_hands_a_message_in_one_frame_over_as_the_asgi_message() -> None:
    # (No fragment object, no reassembly: the common case of the session's reading.)
    engine = WebsocketsEngine(1 << 20, None)
    events = feed(engine, frame(0x1, "héllo".encode()) + frame(0x2, b"\x00\xff"))
    assert events == [
        {"type": "websocket.receive", "text": "héllo"},
        {"type": "websocket.receive", "bytes": b"\x00\xff"},
    ]
    assert type(events[1]["bytes"]) is bytes
    # Fragments stay fragments.
    [first, last] = feed(engine, frame(0x2, b"a", fin=False) + frame(0x0, b"b"))
    assert parts([first, last]) == [(b"a", False), (b"b", True)]


@pytest.mark.parametrize(
    "data",
    [
        frame(0x1, b"a") + frame(0x1, b"b"),  # two messages
        frame(0x1, b"a", fin=False),  # a fragment
        frame(0x9, b"p"),  # a ping
        close_frame(1000),
        frame(0x1, b"\xff"),  # invalid UTF-8
        frame(0x1, b"ab")[:4],  # an incomplete frame
    ],
    ids=["two", "fragment", "ping", "close", "invalid-utf8", "incomplete"],
)
def test_receive_message_returns_a_lone_whole_message_else_leaves_it_to_events(
    new_engine: EngineFactory, data: bytes
) -> None:
    engine = new_engine(1 << 20, None)
    assert engine.receive_message(frame(0x1, "héllo".encode())) == (
        {"type": "websocket.receive", "text": "héllo"}
        if isinstance(engine, WebsocketsEngine)
        else None
    )
    if isinstance(engine, WebsocketsEngine):
        assert engine.receive_message(frame(0x2, b"\x00")) == {
            "type": "websocket.receive",
            "bytes": b"\x00",
        }
        assert list(engine.events()) == []  # (handed out: not again)
    else:
        assert parts(list(engine.events())) == [("héllo", True)]
    # Anything else: None, and events() hands it out as receive_data's would.
    reference = new_engine(1 << 20, None)
    assert engine.receive_message(data) is None
    assert [repr(event) for event in engine.events()] == [
        repr(event) for event in feed(reference, data)
    ]


def test_a_message_before_a_close_in_one_read_can_still_be_answered(
    new_engine: EngineFactory,
) -> None:
    # websockets answers a Close as soon as it parses it; the engine defers that to the
    # Close's turn, as wsproto does, so the app's reply to "hi" is not refused.
    engine = new_engine(1 << 20, None)
    engine.receive_data(frame(0x1, b"hi") + close_frame(1000, b"bye"))
    events = engine.events()
    assert parts([next(events)]) == [("hi", True)]
    assert engine.open
    reply = engine.send_message("hi")
    closed = next(events)
    assert isinstance(closed, Closed)
    assert closed == Closed(CloseKind.PEER_CLOSING, 1000, "bye", closed.reply)
    assert not engine.open
    assert list(events) == []
    echoed, close = from_server(reply + closed.reply)
    assert isinstance(echoed, TextMessage) and echoed.data == "hi"
    assert isinstance(close, CloseConnection) and (close.code, close.reason) == (1000, "bye")


def test_our_close_may_cross_a_peer_close_not_yet_handed_out(new_engine: EngineFactory) -> None:
    # The app closes after reading "hi", while the peer's Close already sits in the same
    # read: that Close then ends our close handshake (it is not answered).
    engine = new_engine(1 << 20, None)
    engine.receive_data(frame(0x1, b"hi") + close_frame(4001, b"bye"))
    events = engine.events()
    assert parts([next(events)]) == [("hi", True)]
    [close] = from_server(engine.send_close(1000, ""))
    assert isinstance(close, CloseConnection) and close.code == 1000
    assert list(events) == [Closed(CloseKind.HANDSHAKE_DONE, 4001, "bye")]


def test_an_empty_close_is_1005_and_answered_empty(new_engine: EngineFactory) -> None:
    engine = new_engine(1 << 20, None)
    [closed] = feed(engine, frame(0x8))
    assert (closed.kind, closed.code, closed.reason) == (CloseKind.PEER_CLOSING, 1005, "")
    assert closed.reply == b"\x88\x00"


def test_the_answer_to_our_close_ends_the_handshake(new_engine: EngineFactory) -> None:
    engine = new_engine(1 << 20, None)
    ours = engine.send_close(4000, "done")
    assert not engine.open
    [close] = from_server(ours)
    assert isinstance(close, CloseConnection) and (close.code, close.reason) == (4000, "done")
    # Messages still arrive while the peer has not answered; then its Close.
    events = feed(engine, frame(0x1, b"late") + close_frame(4000))
    assert parts(events[:1]) == [("late", True)]
    assert events[1] == Closed(CloseKind.HANDSHAKE_DONE, 4000, "")


def test_pings_are_answered_until_our_close_and_pongs_reported(new_engine: EngineFactory) -> None:
    engine = new_engine(1 << 20, None)
    [ping, pong] = feed(engine, frame(0x9, b"p1") + frame(0xA, b"p2"))
    assert isinstance(ping, PingReceived)
    [answer] = from_server(ping.reply)
    assert isinstance(answer, Pong) and answer.payload == b"p1"
    assert pong == PongReceived(b"p2")
    engine.send_close(1000, "")
    assert feed(engine, frame(0x9, b"p3")) == [PingReceived(b"")]


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        pytest.param(frame(0x3), 1002, id="reserved-opcode"),
        pytest.param(frame(0x1, b"x", mask=None), 1002, id="unmasked"),
        pytest.param(frame(0x0, b"x"), 1002, id="continuation-without-start"),
        pytest.param(close_frame(1006), 1002, id="close-code-1006"),
        pytest.param(frame(0x8, b"\x03\xe8\xff"), 1007, id="close-reason-invalid-utf8"),
        pytest.param(frame(0x1, b"ok\xff"), 1007, id="invalid-utf8"),
        pytest.param(frame(0x1, b"ok", fin=False) + frame(0x0, b"\xff"), 1007, id="utf8-part"),
    ],
)
def test_a_refused_frame_writes_nothing_and_leaves_the_close_to_the_caller(
    new_engine: EngineFactory, bad: bytes, code: int
) -> None:
    engine = new_engine(1 << 20, None)
    events = feed(engine, frame(0x1, b"before") + bad + frame(0x1, b"after"))
    assert parts(events[:1]) == [("before", True)]
    failure = events[-1]
    assert isinstance(failure, Closed)
    assert (failure.kind, failure.code, failure.reply) == (CloseKind.INVALID, code, b"")
    assert failure.reason
    assert engine.open  # the caller sends the Close when the app has read "before"
    [close] = from_server(engine.send_close(failure.code, failure.reason))
    assert isinstance(close, CloseConnection) and close.code == code


def test_invalid_utf8_fails_at_the_fragment_that_holds_it(new_engine: EngineFactory) -> None:
    engine = new_engine(1 << 20, None)
    events = feed(engine, frame(0x1, b"ok", fin=False) + frame(0x0, b"\xff", fin=False))
    assert parts(events[:1]) == [("ok", False)]
    assert events[-1].kind is CloseKind.INVALID and events[-1].code == 1007


def test_eof_without_a_close_is_lost(new_engine: EngineFactory) -> None:
    engine = new_engine(1 << 20, None)
    assert feed(engine, frame(0x1, b"par")[:4]) == []  # an incomplete frame
    assert feed(engine, None) == [Closed(CloseKind.LOST, 1006, "")]


def negotiated(offer: str, max_size: int) -> tuple[BoundedPerMessageDeflate, Connection]:
    """The server's deflate after accepting ``offer``, and a client that agreed."""
    deflate = BoundedPerMessageDeflate(max_size)
    answer = deflate.accept(offer)
    assert isinstance(answer, str)
    deflate.accept_any_client_window()
    client_deflate = PerMessageDeflate()
    client_deflate.finalize(answer)
    return deflate, Connection(ConnectionType.CLIENT, [client_deflate])


def compressed(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


@pytest.mark.parametrize(
    "offer", ["permessage-deflate", "permessage-deflate; server_max_window_bits=10"]
)
def test_negotiated_deflate_works_both_ways(new_engine: EngineFactory, offer: str) -> None:
    deflate, client = negotiated(offer, 1 << 20)
    engine = new_engine(1 << 20, deflate)
    text = "compress me " * 1000
    events = feed(engine, frame(0x1, compressed(text.encode()), rsv=4))
    assert "".join(data_of(event) for event in events) == text
    data = engine.send_message(text)
    assert data[0] == 0xC1 and len(data) < 200  # FIN, RSV1, text: compressed
    [message] = from_server(data, client)
    assert isinstance(message, TextMessage) and message.data == text


def test_a_compressed_bomb_is_refused_at_max_size(new_engine: EngineFactory) -> None:
    deflate, _ = negotiated("permessage-deflate", 1000)
    engine = new_engine(1000, deflate)
    events = feed(engine, frame(0x2, compressed(b"\x00" * 1_000_000), rsv=4))
    assert sum(len(data_of(event)) for event in events[:-1]) <= 1000
    assert events[-1].kind is CloseKind.INVALID and events[-1].code == 1009


def test_a_close_between_fragments_is_a_close(new_engine: EngineFactory) -> None:
    # RFC 6455 §5.4: control frames may come between the fragments of a message (Autobahn
    # 7.1.5): the Close is answered as any other, and the unfinished message dropped.
    engine = new_engine(1 << 20, None)
    events = feed(engine, frame(0x1, b"frag", fin=False) + close_frame(1000) + frame(0x0, b"x"))
    assert parts(events[:1]) == [("frag", False)]
    closed = events[1]
    assert (closed.kind, closed.code) == (CloseKind.PEER_CLOSING, 1000)
    assert len(events) == 2
