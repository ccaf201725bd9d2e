"""The floor under ``--http httptools``: trio + httptools with no ASGI layer, hello world
only (bench-only).

One task per connection, one read and one write per batch of requests, the Date header
cached once a second, ``Connection: close`` honoured: what trio and llhttp cost when
nothing else is in the way (the issue 21 notes in RESULTS.md compare trioserve's
connection and ASGI layer with it).
Usage: python bench/apps/trio_httptools_min.py PORT
"""

from __future__ import annotations

import httptools
import trio
from trio_h11_min import BODY, date_header, serve

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n"


class Requests:
    """httptools' callbacks: counts the requests completed, notes a Connection: close."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.done = 0
        self.close = False

    def on_message_complete(self) -> None:
        self.done += 1
        if not self.parser.should_keep_alive():
            self.close = True


def response(close: bool) -> bytes:
    extra = b"connection: close\r\n" if close else b""
    return (
        HEAD
        + b"date: "
        + date_header()
        + b"\r\nserver: trio-httptools-min\r\n"
        + extra
        + b"\r\n"
        + BODY
    )


async def handle(stream: trio.SocketStream) -> None:
    requests = Requests()
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            requests.parser.feed_data(data)
            if requests.done:
                out = response(False) * (requests.done - 1) + response(requests.close)
                requests.done = 0
                await stream.send_all(out)
                if requests.close:
                    break
    except (httptools.HttpParserError, trio.BrokenResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


if __name__ == "__main__":
    serve(handle)
