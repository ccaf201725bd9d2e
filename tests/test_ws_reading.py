"""WebSocket reading and writing paths over real sockets: receive() reading on demand, the
watcher reading for an app that stays away from receive(), the frame fast path, writes that
never wait and backpressure (see ws_connection's module docstring).

The raw client, apps and frame builder come from test_websocket_wire.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
import trustme
import wsproto
from conftest import run_server
from test_tls import ca, client_context, open_tls, pki, tls_options  # noqa: F401 (fixtures)
from test_websocket_wire import RawWS, Recorder, echo_app, echo_messages, frame
from wsproto.events import BytesMessage, CloseConnection, Pong, TextMessage

from trioserve import ClientDisconnected
from trioserve.connection.websocket import CLOSE_TIMEOUT
from trioserve.connection.ws_outbox import OUTBOX_HIGH_WATER
from trioserve.connection.ws_reader import IDLE_READ_DELAY

pytestmark = pytest.mark.usefixtures("both_ws_engines")  # every test on wsproto and websockets


async def read_whole_message(ws: RawWS) -> str | bytes:
    """A message of any size (RawWS.read_message wants it in one wsproto event)."""
    parts: list[Any] = []
    while True:
        event = await ws.next_event()
        assert isinstance(event, (TextMessage, BytesMessage)), event
        parts.append(event.data)
        if event.message_finished:
            return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)


@pytest.mark.parametrize("size", [0, 125, 126, 0xFFFF, 0x10000, 1 << 20])
async def test_messages_of_every_length_encoding_are_echoed(size: int) -> None:
    async with run_server(echo_app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            data = bytes(i % 251 for i in range(size))
            await ws.send(BytesMessage(data=data))
            assert await read_whole_message(ws) == data
            text = "\u00e9" * (size // 2) + "x" * (size % 2)  # size bytes of UTF-8
            await ws.send(TextMessage(data=text))
            assert await read_whole_message(ws) == text


async def test_many_messages_in_one_write_are_answered_in_order() -> None:
    async with run_server(echo_app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            await ws.stream.send_all(b"".join(frame(0x1, b"m%d" % i) for i in range(200)))
            for i in range(200):
                assert await ws.read_message() == f"m{i}"


async def test_message_of_exactly_max_size_in_one_frame_passes_one_more_byte_fails() -> None:
    app = Recorder(echo_app)
    async with run_server(app, ws_max_size=1000) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            await ws.stream.send_all(frame(0x2, b"x" * 1000))
            assert await ws.read_message() == b"x" * 1000
            await ws.stream.send_all(frame(0x2, b"x" * 1001))
            assert (await ws.read_close())[0] == 1009
            assert await ws.expect_eof() == b""
        with trio.fail_after(5):
            await app.done.wait()
    assert app.disconnect["code"] == 1009


async def test_app_that_never_receives_still_answers_pings_and_sees_the_close(
    autojump_clock: Any,
) -> None:
    async def body(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while True:  # raises ClientDisconnected once the peer has closed
            await send({"type": "websocket.send", "text": "tick"})
            await trio.sleep(1)

    app = Recorder(body)
    async with run_server(app, ws_ping_interval=None) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            assert await ws.read_message() == "tick"
            await ws.stream.send_all(frame(0x9, b"are you there"))
            while True:
                event = await ws.next_event()
                if isinstance(event, Pong):
                    break
            assert event.payload == b"are you there"
            await ws.send(CloseConnection(code=1001))
            while not isinstance(event := await ws.next_event(), CloseConnection):
                pass
            assert event.code == 1001
            assert await ws.expect_eof() == b""
        with trio.fail_after(5):
            await app.done.wait()
    assert isinstance(app.error, ClientDisconnected)


async def test_messages_read_while_the_app_was_busy_arrive_in_order(autojump_clock: Any) -> None:
    async def body(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await trio.sleep(10)  # the watcher reads meanwhile (at most ws_max_queue messages)
        await echo_messages(receive, send)

    async with run_server(body, ws_max_queue=3, ws_ping_interval=None) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            await ws.stream.send_all(b"".join(frame(0x1, b"m%d" % i) for i in range(10)))
            await ws.stream.send_all(frame(0x9, b"ping"))
            # The ping (behind ten messages, three of them queued) waits for the app: only
            # a full queue stops the reading.
            for i in range(10):
                assert await ws.read_message() == f"m{i}"
            event = await ws.next_event()
            assert isinstance(event, Pong)
            assert trio.current_time() >= 10


async def test_receive_while_the_watcher_reads_gets_the_next_message(
    autojump_clock: Any,
) -> None:
    woke = trio.Event()

    async def body(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await trio.sleep(IDLE_READ_DELAY * 5)  # the watcher now waits in a read
        woke.set()
        await echo_messages(receive, send)  # takes the reader role back after its read

    async with run_server(body, ws_ping_interval=None) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            await woke.wait()
            await trio.testing.wait_all_tasks_blocked()
            for text in ("first", "second", "third"):
                await ws.send(TextMessage(data=text))
                assert await ws.read_message() == text


async def test_cancelled_receive_loses_no_message(autojump_clock: Any) -> None:
    got: list[Any] = []

    async def body(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        with trio.move_on_after(5):
            got.append(await receive())  # nothing arrives in time
        got.append(await receive())
        await send({"type": "websocket.send", "text": "done"})
        got.append(await receive())

    async with run_server(body, ws_ping_interval=None) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            await trio.sleep(6)
            await ws.send(TextMessage(data="late"))
            assert await ws.read_message() == "done"
            await ws.send(CloseConnection(code=1000))
            assert (await ws.read_close())[0] == 1000
    assert got == [
        {"type": "websocket.receive", "text": "late"},
        {"type": "websocket.disconnect", "code": 1000, "reason": ""},
    ]


async def test_receive_in_a_cancelled_scope_raises_and_takes_no_message(
    autojump_clock: Any,
) -> None:
    # receive() checks for cancellation after its yield, before reading: a message that
    # has already arrived is left for the next receive().
    got: list[Any] = []

    async def body(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "ready"})
        got.append(await receive())  # "first"
        await send({"type": "websocket.send", "text": "again"})
        await trio.sleep(0.1)  # "second" arrives meanwhile
        with trio.CancelScope() as scope_:
            scope_.cancel()
            await receive()
        got.append(scope_.cancelled_caught)
        got.append(await receive())  # still "second"
        got.append(await receive())  # and then the Close

    async with run_server(body, ws_ping_interval=None) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            assert await ws.read_message() == "ready"
            await ws.send(TextMessage(data="first"))
            assert await ws.read_message() == "again"
            await ws.send(TextMessage(data="second"))
            await ws.send(CloseConnection(code=1000))
            assert (await ws.read_close())[0] == 1000
    assert got == [
        {"type": "websocket.receive", "text": "first"},
        True,
        {"type": "websocket.receive", "text": "second"},
        {"type": "websocket.disconnect", "code": 1000, "reason": ""},
    ]


async def receive_while_closing(receive: Any, send: Any) -> Any:
    """The app's ``receive()``, while another task of the app sends a Close (code 4000)
    a second later: the receive is waiting in a read when the close goes out."""
    async with trio.open_nursery() as nursery:

        async def close_soon() -> None:
            await trio.sleep(1)
            await send({"type": "websocket.close", "code": 4000})

        nursery.start_soon(close_soon)
        return await receive()


async def test_close_from_another_task_ends_a_waiting_receive_when_unanswered(
    autojump_clock: Any,
) -> None:
    got: list[Any] = []

    async def body(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        got.append(await receive_while_closing(receive, send))  # waits in a read
        got.append(trio.current_time())

    async with run_server(body, ws_ping_interval=None) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            start = trio.current_time()
            assert (await ws.read_close())[0] == 4000  # and never answered
            assert await ws.expect_eof() == b""
    assert got[0] == {"type": "websocket.disconnect", "code": 1006, "reason": ""}
    assert CLOSE_TIMEOUT <= got[1] - start <= CLOSE_TIMEOUT + 2


async def test_peer_that_does_not_read_blocks_send_with_bounded_buffering() -> None:
    chunk = b"x" * (256 * 1024)
    sent = 0
    stalled = trio.Event()
    finished = trio.Event()

    async def body(scope: Any, receive: Any, send: Any) -> None:
        nonlocal sent
        await receive()
        await send({"type": "websocket.accept"})
        for _ in range(400):  # 100 MiB if nothing pushed back
            with trio.move_on_after(1) as scope_:
                await send({"type": "websocket.send", "bytes": chunk})
            if scope_.cancelled_caught:
                stalled.set()
                break
            sent += 1
        await send({"type": "websocket.send", "bytes": chunk})  # nothing was cut in two
        finished.set()
        await receive()

    async with run_server(body, ws_ping_interval=None) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            with trio.fail_after(20):
                await stalled.wait()
            # Kernel socket buffers plus our outbox limit, far below what the app offered.
            assert sent * len(chunk) < 64 * 1024 * 1024 + OUTBOX_HIGH_WATER
            for _ in range(sent + 2):  # the cancelled send's message was not cut either
                assert await read_whole_message(ws) == chunk
            with trio.fail_after(5):
                await finished.wait()
            await ws.send(CloseConnection(code=1000))
            assert (await ws.read_close())[0] == 1000


async def test_ping_flood_from_a_peer_that_never_reads_is_bounded() -> None:
    pings = frame(0x9, b"p" * 125) * 2000  # 262 KiB of pings, 254 KiB of pongs
    async with run_server(echo_app, ws_ping_interval=None) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            with trio.move_on_after(3):
                sent = 0
                while sent < 200 * len(pings):  # up to 52 MiB of pongs if never paused
                    # socket.send: a cancelled call sent nothing (send_all may send part).
                    part = pings[sent % len(pings) :]
                    sent += await ws.stream.socket.send(part)
            assert sent < 200 * len(pings)  # the server stopped reading
            ws.answer_pings = False
            pongs = 0

            async def read_back() -> None:
                nonlocal pongs
                while True:
                    event = await ws.next_event()
                    if isinstance(event, TextMessage):
                        assert event.data == "end"
                        return
                    assert isinstance(event, Pong)
                    pongs += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_back)  # everything still arrives, in order
                await ws.stream.send_all(pings[sent % len(pings) :])  # the rest of that batch
                await ws.send(TextMessage(data="end"))
            assert pongs == -(-sent // len(pings)) * 2000


async def test_messages_and_pings_interleave_in_order() -> None:
    async with run_server(echo_app) as server:
        ws, _ = await RawWS.open(server.addresses[0])
        async with ws.stream:
            data = b"".join(
                frame(0x1, b"t%d" % i) + frame(0x9, b"p%d" % i) + frame(0x2, b"b%d" % i)
                for i in range(20)
            )
            await ws.stream.send_all(data)
            for i in range(20):
                assert await ws.read_message() == f"t{i}"
                event = await ws.next_event()
                assert isinstance(event, Pong)
                assert event.payload == b"p%d" % i
                assert await ws.read_message() == b"b%d" % i


async def test_over_tls_reads_on_demand_and_an_unanswered_close_is_bounded(
    ca: trustme.CA,  # noqa: F811
    pki: dict[str, str],  # noqa: F811
    autojump_clock: Any,
) -> None:
    got: list[Any] = []

    async def body(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        for _ in range(3):
            got.append(await receive())
            await send({"type": "websocket.send", "text": got[-1]["text"]})
        got.append(await receive_while_closing(receive, send))  # waits in a (TLS) read

    async with run_server(body, ws_ping_interval=None, **tls_options(pki)) as server:
        stream = await open_tls(server, client_context(ca))
        async with stream:
            ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
            await stream.send_all(ws.send(wsproto.events.Request(host="x", target="/")))
            events: list[Any] = []

            async def next_event() -> Any:
                with trio.fail_after(30):
                    while not events:
                        ws.receive_data(bytes(await stream.receive_some(65536)) or None)
                        events.extend(ws.events())
                return events.pop(0)

            assert isinstance(await next_event(), wsproto.events.AcceptConnection)
            for text in ("a", "b", "c"):
                await stream.send_all(ws.send(TextMessage(data=text)))
                event = await next_event()
                assert isinstance(event, TextMessage)
                assert event.data == text
            start = trio.current_time()
            event = await next_event()
            assert isinstance(event, CloseConnection)
            assert event.code == 4000  # and never answered
            event = await next_event()
            assert isinstance(event, CloseConnection)
            assert event.code == 1006  # the server closed the connection
            assert CLOSE_TIMEOUT <= trio.current_time() - start <= CLOSE_TIMEOUT + 3
    assert got[-1] == {"type": "websocket.disconnect", "code": 1006, "reason": ""}
