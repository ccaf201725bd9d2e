"""The ceiling: trio + h11 with no ASGI layer, hello world only (bench-only).

One task per connection, one read and one write per request, the Date header cached once
a second: what this stack does when nothing else is in the way.
Usage: python bench/apps/trio_h11_min.py PORT
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate

import h11
import trio

BODY = b"Hello, world!"
_date = [0, b""]


def date_header() -> bytes:
    now = int(time.time())
    if now != _date[0]:
        _date[0] = now
        _date[1] = formatdate(now, usegmt=True).encode()
    return _date[1]


async def handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                headers = [
                    (b"content-type", b"text/plain"),
                    (b"content-length", b"13"),
                    (b"date", date_header()),
                    (b"server", b"trio-h11-min"),
                ]
                out = conn.send(h11.Response(status_code=200, headers=headers))
                out += conn.send(h11.Data(data=BODY))
                out += conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                continue
            if isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
                continue
            if isinstance(event, h11.Data):
                continue
            break  # ConnectionClosed, PAUSED
    except (h11.RemoteProtocolError, trio.BrokenResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def serve(handler: Callable[[trio.SocketStream], Awaitable[None]]) -> None:
    """Serve ``handler`` on 127.0.0.1, on the port the command line names, until stopped."""
    trio.run(functools.partial(trio.serve_tcp, handler, int(sys.argv[1]), host="127.0.0.1"))


if __name__ == "__main__":
    serve(handle)
