"""Helpers for the HTTP/1.1 wire tests: byte-exact sending, response parsing, sample apps.

Everything here is bounded in time (``READ_TIMEOUT``) and closes what it opens.
"""

from __future__ import annotations

import select
from typing import Any

import h11
import trio
import trio.testing

READ_TIMEOUT = 10.0


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


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = b""
    with trio.fail_after(READ_TIMEOUT):
        while len(data) < n:
            chunk = await stream.receive_some(n - len(data))
            if not chunk:
                break
            data += chunk
    return data


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
    values = [v for k, v in response.headers if k == name]
    assert len(values) <= 1, (name, values)
    return values[0] if values else None


class Recorder:
    """An app that reads the whole body, records it and echoes ``METHOD PATH BODY``.

    When ``receive()`` answers ``http.disconnect`` before the body ended it records that
    and returns without a response (as a careful app would).
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        record: dict[str, Any] = {"scope": scope, "body": b"", "pieces": 0, "disconnect": False}
        self.requests.append(record)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                record["disconnect"] = True
                return
            record["body"] += message.get("body", b"")
            record["pieces"] += 1
            if not message.get("more_body", False):
                break
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        text = f"{scope['method']} {scope['path']} ".encode() + record["body"]
        await send({"type": "http.response.body", "body": text})

    @property
    def paths(self) -> list[str]:
        return [r["scope"]["path"] for r in self.requests]
