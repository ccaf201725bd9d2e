"""trioserve's listening socket: every connection waiting in the backlog is taken at once."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from trioserve.connection.listeners import ACCEPT_BURST, SocketListener


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@contextlib.asynccontextmanager
async def listener_with_clients(
    count: int, *, burst: int = ACCEPT_BURST
) -> AsyncIterator[tuple[SocketListener, list[socket.socket]]]:
    """A listener and ``count`` clients already connected to it (in its backlog)."""
    sock = listening_socket()
    listener = SocketListener(sock, burst=burst)
    clients = [socket.create_connection(sock.getsockname()) for _ in range(count)]
    try:
        yield listener, clients
    finally:
        for client in clients:
            client.close()
        await listener.aclose()


async def test_connections_waiting_in_the_backlog_are_accepted_in_one_go() -> None:
    async with listener_with_clients(10) as (listener, clients):
        streams = [await listener.accept()]
        # The other nine were taken with the first: no further wait on the listener.
        assert len(listener._waiting) == 9
        for _ in range(9):
            streams.append(await listener.accept())
        # Each stream is a real, connected socket: bytes flow both ways.
        for index, (client, stream) in enumerate(zip(clients, streams, strict=True)):
            client.sendall(b"%d" % index)
            assert await stream.receive_some(10) == b"%d" % index
            await stream.send_all(b"ok")
            assert client.recv(10) == b"ok"
            await stream.aclose()


async def test_a_burst_is_bounded() -> None:
    async with listener_with_clients(ACCEPT_BURST + 5) as (listener, _):
        stream = await listener.accept()
        assert len(listener._waiting) == ACCEPT_BURST - 1
        await stream.aclose()


async def test_closing_wakes_a_waiting_accept_and_later_accepts_fail() -> None:
    listener = SocketListener(listening_socket())
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await listener.accept()

        nursery.start_soon(accept)
        await trio.testing.wait_all_tasks_blocked()
        await listener.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()


async def test_a_shared_socket_takes_one_connection_per_wakeup() -> None:
    # Several worker processes accept on one socket: none may grab the whole backlog.
    async with listener_with_clients(3, burst=1) as (listener, _):
        for _ in range(3):
            stream = await listener.accept()
            assert not listener._waiting
            await stream.aclose()
