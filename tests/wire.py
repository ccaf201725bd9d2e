"""Raw-socket helpers for wire tests: send exact bytes, read responses back, bounded.

Every read is bounded in time (``READ_TIMEOUT``); callers close the streams they open.
"""

from __future__ import annotations

import select
from typing import Any

import h11
import trio
import trio.testing

READ_TIMEOUT = 10.0


async def connect(address: tuple[str, int] | str) -> trio.SocketStream:
    if isinstance(address, str):
        return await trio.open_unix_socket(address)
    return await trio.open_tcp_stream(*address)


async def send_bytewise(stream: trio.abc.SendStream, data: bytes) -> None:
    """Send ``data`` one byte per write, letting the server process each byte.

    Stops quietly when the server has closed the connection (it may reject early).
    """
    for i in range(len(data)):
        try:
            await stream.send_all(data[i : i + 1])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await trio.testing.wait_all_tasks_blocked()


async def send(stream: trio.abc.SendStream, data: bytes, *, bytewise: bool = False) -> None:
    if bytewise:
        await send_bytewise(stream, data)
    else:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def readable(stream: trio.SocketStream) -> bool:
    """Whether the server sent something (or closed) that we have not read yet."""
    return bool(select.select([stream.socket.fileno()], [], [], 0)[0])


async def receive_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    """Read until ``marker`` has been received (or EOF); returns all bytes read."""
    data = b""
    with trio.fail_after(READ_TIMEOUT):
        while marker not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    return data


async def read_until_eof(stream: trio.abc.ReceiveStream, limit: int = 16 * 1024 * 1024) -> bytes:
    """Everything the server sends until it closes (bounded in time and size)."""
    chunks = []
    total = 0
    with trio.fail_after(READ_TIMEOUT):
        while total < limit:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            chunks.append(data)
            total += len(data)
    return b"".join(chunks)


class Client:
    """An h11 client over a real socket, for asserting parsed responses."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> Any:
        with trio.fail_after(READ_TIMEOUT):
            while True:
                event = self.conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                data = await self.stream.receive_some(65536)
                self.conn.receive_data(bytes(data))

    async def read_response(self) -> tuple[h11.Response, bytes]:
        """Read one full response (head + body)."""
        response = await self.next_event()
        while isinstance(response, h11.InformationalResponse):
            response = await self.next_event()
        assert isinstance(response, h11.Response), response
        body = b""
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return response, body
            else:
                raise AssertionError(f"unexpected event {event!r}")

    async def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> tuple[h11.Response, bytes]:
        hdrs = [("host", "test"), *(headers or [])]
        if body:
            hdrs.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        result = await self.read_response()
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return result


def parse_responses(
    data: bytes, methods: list[bytes] | None = None, *, eof: bool = True
) -> list[tuple[h11.Response, bytes]]:
    """Parse the consecutive responses in ``data`` with an independent h11 client.

    Args:
        data: bytes the server sent.
        methods: request method per response (HEAD responses have no body); default GET.
        eof: the server closed after ``data`` (close-delimited bodies end there).

    Raises:
        AssertionError: bytes left over, or a response is incomplete or malformed.
    """
    out: list[tuple[h11.Response, bytes]] = []
    rest = data
    index = 0
    while rest:
        method = methods[index] if methods and index < len(methods) else b"GET"
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method=method, target="/", headers=[("host", "t")]))
        client.send(h11.EndOfMessage())
        client.receive_data(rest)
        head: Any = client.next_event()
        while isinstance(head, h11.InformationalResponse):
            head = client.next_event()
        if head is h11.NEED_DATA and eof:
            client.receive_data(b"")
            head = client.next_event()
        assert isinstance(head, h11.Response), (head, rest[:200])
        body = b""
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA and eof:
                client.receive_data(b"")
                event = client.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"incomplete response: {event!r} after {body[:100]!r}")
        out.append((head, body))
        rest = client.trailing_data[0]
        index += 1
    return out


def header(response: h11.Response, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower-case), or None; it must appear at most once."""
    values = [v for k, v in response.headers if k == name]
    assert len(values) <= 1, (name, values)
    return values[0] if values else None
