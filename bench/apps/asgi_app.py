"""The raw ASGI app every server runs in the benchmarks (no framework).

Routes by path so one import string serves every raw scenario:

* ``/``        hello world (``hello`` and ``close`` scenarios);
* ``/echo``    reads the whole request body and sends it back (``echo64k``);
* ``/stream``  1 MiB sent as 64 chunks of 16 KiB with ``more_body=True`` (``stream1m``);
* websocket    echoes every text or bytes message (``ws``).
"""

from __future__ import annotations

from typing import Any

HELLO = b"Hello, world!"
HELLO_HEADERS = [(b"content-type", b"text/plain")]
CHUNK = b"x" * (16 * 1024)
CHUNKS = 64
STREAM_HEADERS = [(b"content-type", b"application/octet-stream")]
ECHO_HEADERS = [(b"content-type", b"application/octet-stream")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    kind = scope["type"]
    if kind == "http":
        path = scope["path"]
        if path == "/echo":
            await _echo(receive, send)
        elif path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
            for _ in range(CHUNKS):
                await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": HELLO_HEADERS})
            await send({"type": "http.response.body", "body": HELLO})
    elif kind == "websocket":
        await _ws_echo(receive, send)
    elif kind == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _echo(receive: Any, send: Any) -> None:
    parts = []
    more = True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return
        parts.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(parts)
    headers = [*ECHO_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _ws_echo(receive: Any, send: Any) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
