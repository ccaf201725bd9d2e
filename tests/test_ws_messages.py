"""Pure tests for ws_messages: scope, app-message state machine, reassembly, close kinds."""

from __future__ import annotations

from typing import Any

import h11
import pytest
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, TextMessage

from trioserve.errors import AppProtocolError
from trioserve.protocol.http1_messages import header_list
from trioserve.protocol.scope import ConnectionFacts, websocket_scope
from trioserve.protocol.ws_messages import (
    Accept,
    AppMessages,
    Close,
    CloseKind,
    MessageAssembler,
    MessageTooBigError,
    Phase,
    ResponseBody,
    ResponseStart,
    Send,
    classify_close,
    disconnect_message,
    handshake_headers,
    parse_subprotocols,
)

# -- scope ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([], [], id="none"),
        pytest.param([(b"sec-websocket-protocol", b"chat")], ["chat"], id="one"),
        pytest.param(
            [(b"sec-websocket-protocol", b"chat, superchat")], ["chat", "superchat"], id="list"
        ),
        pytest.param(
            [
                (b"sec-websocket-protocol", b"a"),
                (b"x", b"y"),
                (b"sec-websocket-protocol", b" b ,, c"),
            ],
            ["a", "b", "c"],
            id="repeated",
        ),
    ],
)
def test_parse_subprotocols_keeps_order(
    headers: list[tuple[bytes, bytes]], expected: list[str]
) -> None:
    assert parse_subprotocols(headers) == expected


def _websocket_scope(
    target: bytes = b"/chat/room%201?x=1", *, scheme: str = "http", root_path: str = ""
) -> dict[str, Any]:
    request = h11.Request(
        method="GET",
        target=target,
        headers=[
            ("Host", "example.com"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Protocol", "chat, superchat"),
        ],
    )
    facts = ConnectionFacts(("10.0.0.1", 5000), ("10.0.0.2", 80), scheme, root_path)
    return websocket_scope(
        request.target, request.http_version, header_list(request), facts, {"db": "conn"}
    )


def test_websocket_scope_has_every_asgi_key() -> None:
    scope = _websocket_scope()
    assert scope["type"] == "websocket"
    assert "method" not in scope
    assert scope["scheme"] == "ws"
    assert scope["path"] == "/chat/room 1"
    assert scope["raw_path"] == b"/chat/room%201"
    assert scope["query_string"] == b"x=1"
    assert scope["root_path"] == ""
    assert scope["subprotocols"] == ["chat", "superchat"]
    assert (b"sec-websocket-protocol", b"chat, superchat") in scope["headers"]
    assert scope["client"] == ("10.0.0.1", 5000)
    assert scope["server"] == ("10.0.0.2", 80)
    assert scope["state"] == {"db": "conn"}
    assert scope["extensions"] == {"websocket.http.response": {}}
    assert scope["asgi"]["version"] == "3.0"
    assert scope["http_version"] == "1.1"


def test_websocket_scope_over_tls_is_wss_and_keeps_root_path() -> None:
    scope = _websocket_scope(b"/ws", scheme="https", root_path="/api")
    assert scope["scheme"] == "wss"
    assert scope["root_path"] == "/api"
    assert scope["path"] == "/api/ws"


def test_disconnect_message_carries_code_and_reason() -> None:
    assert disconnect_message(1001, "bye") == {
        "type": "websocket.disconnect",
        "code": 1001,
        "reason": "bye",
    }


# -- permessage-deflate offer selection --------------------------------------------------

BASE = [(b"host", b"x"), (b"sec-websocket-key", b"k")]


@pytest.mark.parametrize(
    ("offers", "chosen"),
    [
        pytest.param([b"permessage-deflate"], b"permessage-deflate", id="plain"),
        pytest.param(
            [b"permessage-deflate; client_max_window_bits"],
            b"permessage-deflate; client_max_window_bits",
            id="client-bits-no-value",
        ),
        pytest.param(
            [b"permessage-deflate; server_max_window_bits=10; client_no_context_takeover"],
            b"permessage-deflate; server_max_window_bits=10; client_no_context_takeover",
            id="params",
        ),
        pytest.param(
            [b'permessage-deflate; client_max_window_bits="12"'],
            b"permessage-deflate; client_max_window_bits=12",
            id="quoted-value",
        ),
        pytest.param(
            [b"permessage-deflate; server_max_window_bits=8, permessage-deflate"],
            b"permessage-deflate",
            id="server-bits-8-declined-next-taken",
        ),
        pytest.param(
            [
                b"permessage-deflate; client_max_window_bits=16",
                b"permessage-deflate; server_no_context_takeover",
            ],
            b"permessage-deflate; server_no_context_takeover",
            id="second-header",
        ),
        pytest.param(
            [b"x-webkit-deflate-frame, permessage-deflate; foo"],
            None,
            id="unknown-extension-and-param",
        ),
        pytest.param(
            [b"permessage-deflate; server_no_context_takeover; server_no_context_takeover"],
            None,
            id="repeated-param",
        ),
        pytest.param(
            [b"permessage-deflate; server_max_window_bits"], None, id="server-bits-needs-value"
        ),
        pytest.param(
            [b"permessage-deflate; client_no_context_takeover=1"], None, id="flag-with-value"
        ),
        pytest.param([b"permessage-deflate; server_max_window_bits=abc"], None, id="not-a-number"),
        pytest.param(["permessage-deflate; é".encode()], None, id="non-ascii"),
        pytest.param([], None, id="no-offer"),
    ],
)
def test_handshake_headers_keep_first_acceptable_deflate_offer(
    offers: list[bytes], chosen: bytes | None
) -> None:
    headers = BASE + [(b"sec-websocket-extensions", offer) for offer in offers]
    out = handshake_headers(headers, per_message_deflate=True)
    expected = BASE + ([(b"sec-websocket-extensions", chosen)] if chosen else [])
    assert out == expected


def test_handshake_headers_without_deflate_drop_every_offer() -> None:
    headers = [*BASE, (b"sec-websocket-extensions", b"permessage-deflate")]
    assert handshake_headers(headers, per_message_deflate=False) == BASE


# -- the app-message state machine -------------------------------------------------------

ACCEPT = {"type": "websocket.accept"}
CLOSE = {"type": "websocket.close"}
START = {"type": "websocket.http.response.start", "status": 401, "headers": []}


def _machine(*messages: dict[str, Any]) -> AppMessages:
    machine = AppMessages(["chat"])
    for message in messages:
        machine.next(message)
    return machine


@pytest.mark.parametrize(
    ("before", "message", "expected", "phase"),
    [
        pytest.param((), ACCEPT, Accept(None, []), Phase.ACCEPTED, id="accept"),
        pytest.param(
            (),
            {"type": "websocket.accept", "subprotocol": "chat", "headers": [(b"x-a", b"1")]},
            Accept("chat", [(b"x-a", b"1")]),
            Phase.ACCEPTED,
            id="accept-full",
        ),
        pytest.param((), CLOSE, Close(1000, ""), Phase.REJECTED, id="close-before-accept"),
        pytest.param((), START, ResponseStart(START), Phase.RESPONDING, id="denial-start"),
        pytest.param(
            (START,),
            {"type": "websocket.http.response.body", "body": b"a", "more_body": True},
            ResponseBody(
                {"type": "websocket.http.response.body", "body": b"a", "more_body": True},
                last=False,
            ),
            Phase.RESPONDING,
            id="denial-body-more",
        ),
        pytest.param(
            (START,),
            {"type": "websocket.http.response.body"},
            ResponseBody({"type": "websocket.http.response.body"}, last=True),
            Phase.REJECTED,
            id="denial-body-last",
        ),
        pytest.param(
            (ACCEPT,),
            {"type": "websocket.send", "text": "hi"},
            Send("hi"),
            Phase.ACCEPTED,
            id="send-text",
        ),
        pytest.param(
            (ACCEPT,),
            {"type": "websocket.send", "bytes": b"hi", "text": None},
            Send(b"hi"),
            Phase.ACCEPTED,
            id="send-bytes",
        ),
        pytest.param(
            (ACCEPT,),
            {"type": "websocket.send", "bytes": bytearray(b"x")},
            Send(b"x"),
            Phase.ACCEPTED,
            id="send-bytearray",
        ),
        pytest.param(
            (ACCEPT,),
            {"type": "websocket.close", "code": 4000, "reason": "done"},
            Close(4000, "done"),
            Phase.CLOSED,
            id="close-code-reason",
        ),
        pytest.param(
            (ACCEPT,),
            {"type": "websocket.close", "code": 1001, "reason": None},
            Close(1001, ""),
            Phase.CLOSED,
            id="close-reason-none",
        ),
    ],
)
def test_app_message_is_validated_and_advances(
    before: tuple[dict[str, Any], ...], message: dict[str, Any], expected: object, phase: Phase
) -> None:
    machine = _machine(*before)
    assert machine.next(message) == expected
    assert machine.phase is phase


@pytest.mark.parametrize(
    ("before", "message", "match"),
    [
        pytest.param((), "nope", "must be a dict", id="not-a-dict"),
        pytest.param((), {"type": "http.response.start"}, "unexpected", id="wrong-protocol"),
        pytest.param(
            (), {"type": "websocket.send", "text": "x"}, "connecting", id="send-before-accept"
        ),
        pytest.param((ACCEPT,), ACCEPT, "accepted", id="accept-twice"),
        pytest.param((ACCEPT,), START, "accepted", id="denial-after-accept"),
        pytest.param(
            (), {"type": "websocket.http.response.body"}, "connecting", id="body-before-start"
        ),
        pytest.param((CLOSE,), ACCEPT, "rejected", id="accept-after-reject"),
        pytest.param(
            (ACCEPT, CLOSE),
            {"type": "websocket.send", "text": "x"},
            "closed",
            id="send-after-close",
        ),
        pytest.param((ACCEPT, CLOSE), CLOSE, "closed", id="close-twice"),
        pytest.param((START,), ACCEPT, "responding", id="accept-during-denial"),
        pytest.param(
            (),
            {"type": "websocket.accept", "subprotocol": "other"},
            "not offered",
            id="subprotocol-not-offered",
        ),
        pytest.param(
            (), {"type": "websocket.accept", "subprotocol": b"chat"}, "str", id="subprotocol-bytes"
        ),
        pytest.param(
            (), {"type": "websocket.accept", "headers": [("a", "b")]}, "bytes", id="header-str"
        ),
        pytest.param(
            (),
            {"type": "websocket.accept", "headers": [(b"a b", b"c")]},
            "invalid",
            id="header-bad-name",
        ),
        pytest.param(
            (),
            {"type": "websocket.accept", "headers": [(b"a", b"c\r\nx: y")]},
            "invalid",
            id="header-injection",
        ),
        pytest.param((ACCEPT,), {"type": "websocket.send"}, "needs", id="send-empty"),
        pytest.param(
            (ACCEPT,),
            {"type": "websocket.send", "text": "a", "bytes": b"a"},
            "not both",
            id="send-both",
        ),
        pytest.param((ACCEPT,), {"type": "websocket.send", "text": b"a"}, "str", id="text-bytes"),
        pytest.param((ACCEPT,), {"type": "websocket.send", "bytes": "a"}, "bytes", id="bytes-str"),
        pytest.param((ACCEPT,), {"type": "websocket.close", "code": "1000"}, "int", id="code-str"),
        pytest.param((ACCEPT,), {"type": "websocket.close", "code": True}, "int", id="code-bool"),
        pytest.param(
            (ACCEPT,), {"type": "websocket.close", "code": 1005}, "may not", id="code-1005-reserved"
        ),
        pytest.param(
            (ACCEPT,),
            {"type": "websocket.close", "code": 1006},
            "may not",
            id="code-1006-local-only",
        ),
        pytest.param(
            (ACCEPT,), {"type": "websocket.close", "code": 999}, "may not", id="code-too-small"
        ),
        pytest.param(
            (ACCEPT,), {"type": "websocket.close", "code": 5000}, "may not", id="code-too-big"
        ),
        pytest.param(
            (ACCEPT,), {"type": "websocket.close", "reason": b"x"}, "str", id="reason-bytes"
        ),
        pytest.param(
            (START,),
            {"type": "websocket.http.response.body", "more_body": 1},
            "bool",
            id="more-body-int",
        ),
    ],
)
def test_invalid_app_message_raises_and_keeps_phase(
    before: tuple[dict[str, Any], ...], message: object, match: str
) -> None:
    machine = _machine(*before)
    phase = machine.phase
    with pytest.raises(AppProtocolError, match=match):
        machine.next(message)
    assert machine.phase is phase


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1011, 1012, 3000, 4999])
def test_sendable_close_codes_are_accepted(code: int) -> None:
    assert _machine(ACCEPT).next({"type": "websocket.close", "code": code}) == Close(code, "")


# -- reassembly and the size limit -------------------------------------------------------


def _frames_from_client(*events: Message[Any] | CloseConnection) -> bytes:
    client = Connection(ConnectionType.CLIENT)
    return b"".join(client.send(event) for event in events)


def _server_events(data: bytes, *, byte_by_byte: bool) -> list[Any]:
    server = Connection(ConnectionType.SERVER)
    events: list[Any] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    for chunk in chunks:
        server.receive_data(chunk)
        events.extend(server.events())
    return events


def _assemble(events: list[Any], max_size: int = 1 << 20) -> list[dict[str, Any]]:
    assembler = MessageAssembler(max_size)
    out = []
    for event in events:
        message = assembler.feed(event)
        if message is not None:
            out.append(message)
    return out


FRAGMENTED: list[Message[Any]] = [
    TextMessage(data="héllo ", message_finished=False),
    TextMessage(data="wörld", message_finished=True),
    BytesMessage(data=b"\x00\x01", message_finished=False),
    BytesMessage(data=b"", message_finished=False),
    BytesMessage(data=b"\x02", message_finished=True),
    TextMessage(data=""),
]


@pytest.mark.parametrize("byte_by_byte", [False, True], ids=["whole", "byte-by-byte"])
def test_fragmented_messages_are_reassembled(byte_by_byte: bool) -> None:
    events = _server_events(_frames_from_client(*FRAGMENTED), byte_by_byte=byte_by_byte)
    assert _assemble(events) == [
        {"type": "websocket.receive", "text": "héllo wörld"},
        {"type": "websocket.receive", "bytes": b"\x00\x01\x02"},
        {"type": "websocket.receive", "text": ""},
    ]


def test_binary_payload_is_bytes_not_bytearray() -> None:
    events = _server_events(_frames_from_client(BytesMessage(data=b"abc")), byte_by_byte=False)
    message = _assemble(events)[0]
    assert type(message["bytes"]) is bytes


@pytest.mark.parametrize(
    ("events", "max_size", "too_big"),
    [
        pytest.param([BytesMessage(data=b"x" * 10)], 10, False, id="bytes-at-limit"),
        pytest.param([BytesMessage(data=b"x" * 11)], 10, True, id="bytes-over"),
        pytest.param([TextMessage(data="é" * 5)], 10, False, id="utf8-bytes-at-limit"),
        pytest.param([TextMessage(data="é" * 6)], 10, True, id="utf8-counted-in-bytes"),
        pytest.param(
            [TextMessage(data="x" * 6, message_finished=False), TextMessage(data="x" * 5)],
            10,
            True,
            id="fragments-add-up",
        ),
        pytest.param(
            [TextMessage(data="x" * 10), TextMessage(data="x" * 10)],
            10,
            False,
            id="limit-is-per-message",
        ),
    ],
)
def test_message_size_limit(events: list[Any], max_size: int, too_big: bool) -> None:
    if too_big:
        with pytest.raises(MessageTooBigError):
            _assemble(events, max_size)
    else:
        assert len(_assemble(events, max_size)) == sum(e.message_finished for e in events)


# -- close classification -------------------------------------------------------------------


def _close_event(server: Connection, data: bytes | None) -> CloseConnection:
    server.receive_data(data)
    closes = [e for e in server.events() if isinstance(e, CloseConnection)]
    assert len(closes) == 1
    return closes[0]


def test_peer_close_is_peer_closing() -> None:
    server = Connection(ConnectionType.SERVER)
    event = _close_event(server, _frames_from_client(CloseConnection(code=1001, reason="bye")))
    assert classify_close(event, server.state) is CloseKind.PEER_CLOSING
    assert (event.code, event.reason) == (1001, "bye")


def test_answer_to_our_close_is_handshake_done() -> None:
    server = Connection(ConnectionType.SERVER)
    server.send(CloseConnection(code=1000))
    event = _close_event(server, _frames_from_client(CloseConnection(code=1000)))
    assert classify_close(event, server.state) is CloseKind.HANDSHAKE_DONE


@pytest.mark.parametrize("we_closed", [False, True])
def test_eof_is_lost(we_closed: bool) -> None:
    server = Connection(ConnectionType.SERVER)
    if we_closed:
        server.send(CloseConnection(code=1000))
    event = _close_event(server, None)
    assert classify_close(event, server.state) is CloseKind.LOST
    assert event.code == 1006


MASK = b"\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param(b"\x83\x80" + MASK, 1002, id="reserved-opcode"),
        pytest.param(b"\xc1\x80" + MASK, 1002, id="rsv1-without-extension"),
        pytest.param(b"\x81\x00", 1002, id="unmasked-client-frame"),
        pytest.param(b"\x81\x82" + MASK + b"\xc3\x28", 1007, id="invalid-utf8"),
        pytest.param(b"\x89\xfe\x00\x80" + MASK + b"x" * 128, 1002, id="control-too-long"),
        pytest.param(b"\x09\x80" + MASK, 1002, id="fragmented-control"),
        pytest.param(b"\x80\x80" + MASK, 1002, id="continuation-without-start"),
        pytest.param(b"\x88\x82" + MASK + b"\x03\xed", 1002, id="close-code-1005"),
    ],
)
def test_rejected_frame_is_invalid_with_its_code(frame: bytes, code: int) -> None:
    server = Connection(ConnectionType.SERVER)
    event = _close_event(server, frame)
    assert classify_close(event, server.state) is CloseKind.INVALID
    assert event.code == code
    assert server.state is ConnectionState.OPEN
