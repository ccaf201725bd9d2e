"""Raw-socket helpers for wire tests: send exact bytes, read responses back, bounded."""

from __future__ import annotations

from typing import Any

import h11
import trio

READ_TIMEOUT = 10.0


async def connect(address: tuple[str, int] | str) -> trio.SocketStream:
    if isinstance(address, str):
        return await trio.open_unix_socket(address)
    return await trio.open_tcp_stream(*address)


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
        self, method: str = "GET", target: str = "/", headers: list[tuple[str, str]] | None = None,
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


def header(response: h11.Response, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key == name:
            return value
    return None
