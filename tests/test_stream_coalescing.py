"""Streamed body chunks are coalesced into fewer writes, never delayed.

The app's ``send()`` of a ``more_body`` chunk may leave the bytes buffered while the app
keeps producing chunks back to back; the moment the app waits for anything else, the
connection task writes them. These tests pin the wire behaviour of that: no delay for an
app that pauses, bytes in order, nothing lost when the app ends early, fewer syscalls.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import trio
from conftest import run_server
from wire import connect, parse_responses, read_until_eof, receive_until

from trioserve.connection.stream import JOIN_BYTES, ConnectionStream
from trioserve.protocol.scope import ConnectionFacts

pytestmark = pytest.mark.usefixtures("both_parsers")  # every test on h11 and httptools

GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


async def test_chunk_of_a_pausing_app_arrives_while_the_app_waits() -> None:
    # The app sends one chunk, then waits until the client has it: if the chunk stayed
    # buffered until the app's next send, this would deadlock (fail_after fires).
    got_first = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first-chunk", "more_body": True})
        await got_first.wait()
        await send({"type": "http.response.body", "body": b"second-chunk", "more_body": True})
        await got_first.wait()
        await send({"type": "http.response.body", "body": b""})

    with trio.fail_after(5):
        async with run_server(app) as server, await connect(server.addresses[0]) as stream:
            await stream.send_all(GET)
            data = await receive_until(stream, b"first-chunk")
            got_first.set()
            data += await receive_until(stream, b"0\r\n\r\n")
    [(response, body)] = parse_responses(data, eof=False)
    assert response.status_code == 200
    assert body == b"first-chunksecond-chunk"


async def test_chunk_arrives_while_the_app_waits_for_receive() -> None:
    # A server-sent-events style app: one event, then it waits for the client to leave.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: hi\n\n", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass

    with trio.fail_after(5):
        async with run_server(app) as server, await connect(server.addresses[0]) as stream:
            await stream.send_all(GET)
            data = await receive_until(stream, b"data: hi\n\n")
    assert data.startswith(b"HTTP/1.1 200 ")


async def test_back_to_back_chunks_are_written_together_and_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunks = [bytes([65 + i % 26]) * 1000 for i in range(200)]  # 200 kB in 1 kB chunks
    calls = 0
    real_writev = os.writev

    def counting_writev(fd: int, buffers: Any) -> int:
        nonlocal calls
        calls += 1
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", counting_writev)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with trio.fail_after(10):
        async with run_server(app) as server, await connect(server.addresses[0]) as stream:
            await stream.send_all(GET[:-2] + b"Connection: close\r\n\r\n")
            data = await read_until_eof(stream)
    [(_, body)] = parse_responses(data)
    assert body == b"".join(chunks)
    # One write per chunk would be 200 writev calls.
    assert calls < 20


async def test_chunks_sent_before_the_app_returns_early_still_arrive() -> None:
    # The app returns without finishing its response: what it did send reaches the client,
    # then the connection closes (the response is incomplete).
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial-1", "more_body": True})
        await send({"type": "http.response.body", "body": b"partial-2", "more_body": True})

    with trio.fail_after(5):
        async with run_server(app) as server, await connect(server.addresses[0]) as stream:
            await stream.send_all(GET)
            data = await read_until_eof(stream)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b"partial-1" in data
    assert b"partial-2" in data
    assert not data.endswith(b"0\r\n\r\n")  # not presented as complete


async def test_chunks_then_an_app_error_still_arrive_before_the_close() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"before-error", "more_body": True})
        raise RuntimeError("boom")

    with trio.fail_after(5):
        async with (
            run_server(app, log_level="critical") as server,
            await connect(server.addresses[0]) as stream,
        ):
            await stream.send_all(GET)
            data = await read_until_eof(stream)
    assert b"before-error" in data
    assert not data.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize("chunks", [1, 600, 5000])
async def test_thousands_of_tiny_chunks_sent_back_to_back_all_arrive(chunks: int) -> None:
    # Coalescing must respect the kernel's limit on pieces per vectored write (IOV_MAX):
    # 5000 one-byte chunks are 15000 pieces with their chunk framing.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(chunks):
            body = b"%d," % i
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with trio.fail_after(10):
        async with run_server(app) as server, await connect(server.addresses[0]) as stream:
            await stream.send_all(GET + GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            data = await read_until_eof(stream)
    expected = b"".join(b"%d," % i for i in range(chunks))
    assert [body for _, body in parse_responses(data)] == [expected, expected]


async def test_a_large_streamed_response_to_a_slow_reader_arrives_whole() -> None:
    # Writes the socket does not take at once continue piece by piece (no joined copy),
    # across many waits for the peer; every byte arrives in order.
    chunk = bytes(range(256)) * 64  # 16 KiB

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(256):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with trio.fail_after(20):
        async with run_server(app) as server, await connect(server.addresses[0]) as stream:
            await stream.send_all(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            data = b""
            while True:
                piece = await stream.receive_some(7000)
                if not piece:
                    break
                data += piece
                await trio.sleep(0)
    [(_, body)] = parse_responses(data)
    assert body == chunk * 256


@pytest.mark.parametrize("body_size", [5, JOIN_BYTES - 4, JOIN_BYTES + 1])
async def test_a_head_and_its_body_reach_a_reader_whole_when_the_socket_is_full(
    body_size: int,
) -> None:
    """Two pieces are joined into one write up to JOIN_BYTES, else written as pieces:
    either way, a write that finds the socket full waits and sends the rest in order."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.setblocking(False)
    filler = bytearray()
    while True:  # the socket full: the write below cannot go out at once
        try:
            filler += b"f" * a.send(b"f" * 4096)
        except BlockingIOError:
            break
    broken: list[bool] = []
    server = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    client = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    stream = ConnectionStream(
        server,
        memoryview(bytearray(1024)),
        ConnectionFacts(None, None),
        lambda: broken.append(True),
    )
    head, body = b"HTTP/1.1 200 OK\r\n\r\n", b"b" * body_size
    expected = bytes(filler) + head + body
    received = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def read_all() -> None:
                # (Runs only once the write below has found the socket full and waits.)
                while len(received) < len(expected):
                    received.extend(await client.receive_some(65536))

            nursery.start_soon(read_all)
            await stream.write([head, body], last=True)
    await server.aclose()
    await client.aclose()
    assert bytes(received) == expected
    assert not broken
