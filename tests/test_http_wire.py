"""HTTP/1.1 on the wire: raw sockets against an in-process server, exact bytes.

Framing, keep-alive, pipelining (also while an app call still runs), chunked bodies both
ways, HEAD/204/304, HTTP/1.0, Expect: 100-continue, backpressure in both directions, the
complete ASGI scope over TCP and UNIX sockets, and request-smuggling vectors. Edge-case
vectors are sent whole and one byte per write.
"""

from __future__ import annotations

import contextvars
import dataclasses
from pathlib import Path
from typing import Any

import conftest
import h11
import pytest
import trio
import trio.testing
from conftest import Recorder, hello_app, run_server
from wire import (
    Client,
    connect,
    header,
    parse_responses,
    read_until_eof,
    readable,
    receive_until,
    send,
)

from trioserve import Server, serve
from trioserve.connection.stream import READ_BUFFER_SIZE
from trioserve.protocol.response_extensions import HTTP_EXTENSIONS

pytestmark = pytest.mark.usefixtures("both_parsers")  # every test on h11 and httptools

BYTEWISE = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
EXACT = {"date_header": False, "server_header": False}  # deterministic response bytes


def get(path: str = "/", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n" + extra + b"\r\n"


# -- keep-alive and pipelining -----------------------------------------------------------


async def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    app = Recorder()
    async with run_server(app) as server, await connect(server.addresses[0]) as stream:
        client = Client(stream)
        for i, method in enumerate(["GET", "POST", "PUT", "DELETE", "GET"]):
            body = f"body{i}".encode() if method in ("POST", "PUT") else b""
            response, data = await client.request(method, f"/r{i}", body=body)
            assert response.status_code == 200
            assert data == f"{method} /r{i} ".encode() + body
            assert header(response, b"connection") is None
    ports = {r["scope"]["client"][1] for r in app.requests}
    assert len(ports) == 1  # one connection


@BYTEWISE
async def test_pipelined_requests_are_answered_in_order(bytewise: bool) -> None:
    app = Recorder()
    raw = (
        get("/1")
        + b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        + b"POST /3 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n"
        + b"HEAD /4 HTTP/1.1\r\nHost: t\r\n\r\n"
        + get("/5", b"Connection: close\r\n")
    )
    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        await send(stream, raw, bytewise=bytewise)
        data = await read_until_eof(stream)
    responses = parse_responses(data, [b"GET", b"POST", b"POST", b"HEAD", b"GET"])
    assert [body for _, body in responses] == [
        b"GET /1 ",
        b"POST /2 abc",
        b"POST /3 xy",
        b"",
        b"GET /5 ",
    ]
    assert app.paths == ["/1", "/2", "/3", "/4", "/5"]
    assert header(responses[3][0], b"content-length") == b"8"  # "HEAD /4 ", as for GET
    assert header(responses[4][0], b"connection") == b"close"


async def test_a_hard_stop_lets_no_pipelined_request_reach_the_app() -> None:
    """A hard stop that comes while a request is served ends the connection once that
    response is out: the requests pipelined behind it never start an app call."""
    called: list[str] = []
    server_scope = trio.CancelScope()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        called.append(scope["path"])
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": b"done"})
        server_scope.cancel()  # the hard stop, while the connection task runs this call

    async def run(task_status: trio.TaskStatus[Server]) -> None:
        config = dataclasses.replace(conftest.BASE_CONFIG, http=conftest.HTTP_IMPL)
        with server_scope:
            await serve(app, config, task_status=task_status)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(run)
        async with await connect(server.addresses[0]) as stream:
            await stream.send_all(get("/1") + get("/2") + get("/3"))
            data = await read_until_eof(stream)
    assert called == ["/1"]
    [(response, body)] = parse_responses(data, [b"GET"])
    assert (response.status_code, body) == (200, b"done")


async def test_pipelined_request_answered_while_previous_app_call_still_runs() -> None:
    release = trio.Event()
    background_done: list[str] = []

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": scope["path"].encode()})
        if scope["path"] == "/bg":
            # Like Starlette's BackgroundTasks: work after the response is complete.
            assert (await receive())["type"] == "http.disconnect"
            await release.wait()
            background_done.append(scope["path"])

    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        await stream.send_all(get("/bg") + get("/next"))
        data = await receive_until(stream, b"/next")
        assert [b for _, b in parse_responses(data, eof=False)] == [b"/bg", b"/next"]
        assert background_done == []
        # Still keep-alive: a third request is served too.
        await stream.send_all(get("/third"))
        data = await receive_until(stream, b"/third")
        assert [b for _, b in parse_responses(data, eof=False)] == [b"/third"]
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert background_done == ["/bg"]


async def test_connection_closes_only_after_every_app_call_returned() -> None:
    release = trio.Event()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": b"done"})
        await release.wait()

    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        await stream.send_all(get("/", b"Connection: close\r\n"))
        data = await receive_until(stream, b"done")
        assert data.endswith(b"\r\n\r\ndone")
        await trio.testing.wait_all_tasks_blocked()
        assert not readable(stream)  # no EOF while the app call runs
        release.set()
        assert await read_until_eof(stream) == b""


# -- framing --------------------------------------------------------------------------


@BYTEWISE
async def test_chunked_request_body_with_extensions_and_trailers(bytewise: bool) -> None:
    app = Recorder()
    raw = (
        b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;name=value\r\nabc\r\n0A\r\n0123456789\r\n1\r\n\n\r\n0\r\nX-Trailer: yes\r\n\r\n"
        + get("/after", b"Connection: close\r\n")
    )
    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        await send(stream, raw, bytewise=bytewise)
        data = await read_until_eof(stream)
    responses = parse_responses(data)
    assert [b for _, b in responses] == [b"POST /c abc0123456789\n", b"GET /after "]
    assert app.requests[0]["body"] == b"abc0123456789\n"


@BYTEWISE
async def test_content_length_request_body(bytewise: bool) -> None:
    app = Recorder()
    raw = (
        b"PUT /cl HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world"
    )
    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        await send(stream, raw, bytewise=bytewise)
        data = await read_until_eof(stream)
    # (h11 normalises the framing headers it manages: "Connection: close" is its own.)
    assert data == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n"
        b"Connection: close\r\n\r\nPUT /cl hello world"
    )


async def test_single_shot_response_is_one_write_with_content_length() -> None:
    async with (
        run_server(hello_app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(get("/"))
        data = await receive_until(stream, b"world!")
    assert data == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n\r\nHello, world!"
    )


async def streaming_app(scope: Any, receive: Any, send_: Any) -> None:
    await send_(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    for piece in (b"abc", b"", b"de"):
        await send_({"type": "http.response.body", "body": piece, "more_body": True})
    await send_({"type": "http.response.body", "body": b""})


async def test_streamed_response_is_chunked_on_the_wire() -> None:
    async with (
        run_server(streaming_app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(get("/") + get("/", b"Connection: close\r\n"))
        data = await read_until_eof(stream)
    one = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert data.startswith(one)
    assert [b for _, b in parse_responses(data)] == [b"abcde", b"abcde"]


async def test_head_response_has_headers_but_no_body_and_keeps_connection() -> None:
    app = Recorder()
    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        await stream.send_all(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n" + get("/g"))
        data = await receive_until(stream, b"GET /g ")
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 8\r\n\r\n"
    assert data == head + head.replace(b"8", b"7") + b"GET /g "


async def test_head_with_streamed_body_sends_no_body() -> None:
    async with (
        run_server(streaming_app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n" + get("/"))
        data = await receive_until(stream, b"0\r\n\r\n")
    responses = parse_responses(data, [b"HEAD", b"GET"], eof=False)
    assert [b for _, b in responses] == [b"", b"abcde"]
    assert b"abc" not in data.split(b"\r\n\r\n", 2)[1]


@pytest.mark.parametrize("status", [204, 304])
async def test_204_and_304_have_no_body_and_no_content_length(status: int) -> None:
    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await send_({"type": "http.response.start", "status": status, "headers": []})
        await send_({"type": "http.response.body", "body": b"must not be sent"})

    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        await stream.send_all(get("/") + get("/", b"Connection: close\r\n"))
        data = await read_until_eof(stream)
    reason = {204: b"No Content", 304: b"Not Modified"}[status]
    first = b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason)
    assert data == first + b"HTTP/1.1 %d %s\r\nConnection: close\r\n\r\n" % (status, reason)


# -- HTTP/1.0 -------------------------------------------------------------------------


async def test_http10_without_keep_alive_gets_framed_response_then_close() -> None:
    async with (
        run_server(hello_app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
        data = await read_until_eof(stream)
    assert data == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n"
        b"Connection: close\r\n\r\nHello, world!"
    )


@BYTEWISE
async def test_http10_keep_alive_request_is_answered_and_closed(bytewise: bool) -> None:
    # h11 does not implement HTTP/1.0 keep-alive: the answer is complete, framed by
    # Content-Length, says "Connection: close", and the server then closes.
    app = Recorder()
    raw = b"POST /k HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"
    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        await send(stream, raw, bytewise=bytewise)
        data = await read_until_eof(stream)
    [(response, body)] = parse_responses(data)
    assert body == b"POST /k hi"
    assert header(response, b"content-length") == b"10"
    assert header(response, b"connection") == b"close"
    assert app.requests[0]["scope"]["http_version"] == "1.0"


async def test_http10_streamed_response_is_close_delimited() -> None:
    async with (
        run_server(streaming_app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
        data = await read_until_eof(stream)
    assert data == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nConnection: close\r\n\r\nabcde"
    )


# -- Expect: 100-continue ---------------------------------------------------------------


EXPECT_HEAD = b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"


async def test_100_continue_is_sent_to_a_client_that_also_says_connection_close() -> None:
    # (The httptools parser ignored the expectation when Connection: close came with it.)
    head = EXPECT_HEAD.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    async with (
        run_server(Recorder(), **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(head)
        assert await receive_until(stream, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        await stream.send_all(b"hello")
        [(response, body)] = parse_responses(await read_until_eof(stream))
        assert (response.status_code, body) == (200, b"POST /u hello")


async def test_100_continue_is_sent_only_when_the_app_first_awaits_receive() -> None:
    may_read = trio.Event()
    app = Recorder()

    async def gated(scope: Any, receive: Any, send_: Any) -> None:
        await may_read.wait()
        await app(scope, receive, send_)

    async with run_server(gated, **EXACT) as server, await connect(server.addresses[0]) as stream:
        await stream.send_all(EXPECT_HEAD)
        await trio.testing.wait_all_tasks_blocked()
        assert not readable(stream)  # no 100 before the app asks for the body
        may_read.set()
        assert await receive_until(stream, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        await stream.send_all(b"hello")
        data = await receive_until(stream, b"hello")
        [(response, body)] = parse_responses(data, eof=False)
        assert (response.status_code, body) == (200, b"POST /u hello")
        assert header(response, b"connection") is None
        # The connection stays usable.
        await stream.send_all(get("/again"))
        data = await receive_until(stream, b"/again ")
        assert parse_responses(data, eof=False)[0][1] == b"GET /again "


async def test_100_continue_not_sent_when_app_answers_without_reading() -> None:
    async with (
        run_server(hello_app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(EXPECT_HEAD)
        with trio.fail_after(2):  # well below the keep-alive timeout
            data = await read_until_eof(stream)
    assert data == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n"
        b"content-length: 13\r\n\r\nHello, world!"
    )


async def test_100_continue_client_sending_body_anyway_still_gets_one_response() -> None:
    async with (
        run_server(hello_app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(EXPECT_HEAD + b"hello" + get("/next"))
        data = await read_until_eof(stream)
    [(response, body)] = parse_responses(data)
    assert (response.status_code, body) == (200, b"Hello, world!")


# -- backpressure ----------------------------------------------------------------------


UPLOAD_SIZE = 64 * 1024 * 1024
# Real seconds without any task running or any I/O event: the sockets have settled.
SETTLE = 0.05


async def test_request_body_is_streamed_in_pieces_with_backpressure() -> None:
    proceed = trio.Event()
    first_piece = trio.Event()
    pieces: list[int] = []

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        while True:
            message = await receive()
            assert message["type"] == "http.request"
            pieces.append(len(message["body"]))
            if len(pieces) == 1:
                first_piece.set()
                await proceed.wait()
            if not message["more_body"]:
                break
        body = str(sum(pieces)).encode()
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": body})

    sent = 0
    chunk = b"x" * 65536

    async def upload(stream: trio.SocketStream) -> None:
        nonlocal sent
        await stream.send_all(
            b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % UPLOAD_SIZE
        )
        while sent < UPLOAD_SIZE:
            await stream.send_all(chunk)
            sent += len(chunk)

    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload, stream)
            with trio.fail_after(10):
                await first_piece.wait()
            # Bytes in flight inside the kernel do not count as a running task: settled
            # means nothing moved for SETTLE real seconds.
            await trio.testing.wait_all_tasks_blocked(SETTLE)
            # The app asked once: the server read no further than that, so the client is
            # blocked by TCP flow control with most of the upload still unsent.
            assert len(pieces) == 1
            assert 0 < pieces[0] <= READ_BUFFER_SIZE
            assert sent < UPLOAD_SIZE // 4
            proceed.set()
        data = await receive_until(stream, str(UPLOAD_SIZE).encode())
    assert parse_responses(data, eof=False)[0][1] == str(UPLOAD_SIZE).encode()
    assert len(pieces) > 100
    assert max(pieces) <= READ_BUFFER_SIZE  # each piece is what one read brought


async def test_response_is_streamed_with_backpressure_to_a_slow_client() -> None:
    chunks_total = 1024
    chunk = b"y" * 65536
    sent_chunks = 0

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        nonlocal sent_chunks
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(chunks_total):
            await send_({"type": "http.response.body", "body": chunk, "more_body": True})
            sent_chunks += 1
        await send_({"type": "http.response.body", "body": b""})

    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        await stream.send_all(get("/", b"Connection: close\r\n"))
        with trio.fail_after(10):
            while not sent_chunks:  # the request is in (it may take a while to arrive)
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked(SETTLE)
        # The client reads nothing: the app is blocked inside send() long before the end.
        assert 0 < sent_chunks < chunks_total // 4
        client = Client(stream)
        client.conn.send(h11.Request(method="GET", target="/", headers=[("host", "t")]))
        client.conn.send(h11.EndOfMessage())
        response = await client.next_event()
        assert isinstance(response, h11.Response)
        assert header(response, b"transfer-encoding") == b"chunked"
        received = 0
        while not isinstance(event := await client.next_event(), h11.EndOfMessage):
            received += len(event.data)
        assert await read_until_eof(stream) == b""
    assert sent_chunks == chunks_total
    assert received == chunks_total * len(chunk)


# -- the ASGI scope -------------------------------------------------------------------


class ScopeApp:
    """Lifespan-aware app that records every http scope."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.states_on_entry: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send_: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    scope["state"]["db"] = "connection"
                    await send_({"type": "lifespan.startup.complete"})
                else:
                    await send_({"type": "lifespan.shutdown.complete"})
                    return
        self.scopes.append(scope)
        self.states_on_entry.append(dict(scope["state"]))
        scope["state"]["leak"] = True  # must not reach the next request
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": b"ok"})


SCOPE_REQUEST = (
    b"GET /caf%C3%A9/a%20b?x=1&y=%20 HTTP/1.1\r\nHost: example.com\r\nX-Dup: 1\r\n"
    b"Accept: */*\r\nx-dup: 2\r\n\r\n"
)


def expected_scope(client: Any, server: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/mnt/caf\u00e9/a b",
        "raw_path": b"/mnt/caf%C3%A9/a%20b",
        "query_string": b"x=1&y=%20",
        "root_path": "/mnt",
        "headers": [
            (b"host", b"example.com"),
            (b"x-dup", b"1"),
            (b"accept", b"*/*"),
            (b"x-dup", b"2"),
        ],
        "client": client,
        "server": server,
        "state": {"db": "connection"},
        "extensions": HTTP_EXTENSIONS,
    }


async def test_http_scope_is_complete_and_exact_over_tcp() -> None:
    app = ScopeApp()
    async with (
        run_server(app, lifespan="on", root_path="/mnt") as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(SCOPE_REQUEST + SCOPE_REQUEST[:-2] + b"Connection: close\r\n\r\n")
        data = await read_until_eof(stream)
        local = stream.socket.getsockname()
    assert [b for _, b in parse_responses(data)] == [b"ok", b"ok"]
    address = server.addresses[0]
    assert isinstance(address, tuple)
    host, port = address
    want = expected_scope((local[0], local[1]), (host, port))
    assert len(app.scopes) == 2
    first, second = app.scopes
    assert first["state"] == {"db": "connection", "leak": True}
    first["state"] = {"db": "connection"}
    assert first == want
    # A fresh copy of the lifespan state per request: the first request's change is gone.
    assert app.states_on_entry == [{"db": "connection"}, {"db": "connection"}]
    assert second["state"] is not first["state"]
    second["state"] = {"db": "connection"}
    second["headers"] = second["headers"][:-1]
    assert second == want
    assert type(first["raw_path"]) is bytes
    assert type(first["query_string"]) is bytes


async def test_http_scope_over_unix_socket(tmp_path: Path) -> None:
    app = ScopeApp()
    path = str(tmp_path / "s.sock")
    async with run_server(app, uds=path, lifespan="on", root_path="/mnt") as server:
        assert server.addresses[0] == path
        async with await connect(path) as stream:
            await stream.send_all(SCOPE_REQUEST + get("/", b"Connection: close\r\n"))
            data = await read_until_eof(stream)
    assert [b for _, b in parse_responses(data)] == [b"ok", b"ok"]
    scope = app.scopes[0]
    scope["state"] = {"db": "connection"}
    assert scope == expected_scope(None, (path, None))


async def test_http_scope_http10_and_no_host() -> None:
    app = ScopeApp()
    async with (
        run_server(app, lifespan="on") as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(b"OPTIONS * HTTP/1.0\r\n\r\n")
        await read_until_eof(stream)
    [scope] = app.scopes
    assert (scope["http_version"], scope["method"], scope["path"], scope["raw_path"]) == (
        "1.0",
        "OPTIONS",
        "*",
        b"*",
    )
    assert scope["headers"] == []


# -- request smuggling and malformed framing -----------------------------------------------


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
POST = b"POST / HTTP/1.1\r\nHost: t\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"

SMUGGLING_VECTORS = [
    pytest.param(
        POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        id="cl-then-te",
    ),
    pytest.param(
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n",
        400,
        id="te-then-cl",
    ),
    pytest.param(
        POST + b"Content-Length: 0\r\nContent-Length: 37\r\n\r\n",
        400,
        id="conflicting-content-lengths",
    ),
    pytest.param(POST + b"Content-Length: 0, 37\r\n\r\n", 400, id="content-length-list"),
    pytest.param(POST + b"Content-Length: +0\r\n\r\n", 400, id="content-length-plus"),
    pytest.param(POST + b"Content-Length: -1\r\n\r\n", 400, id="content-length-negative"),
    pytest.param(POST + b"Content-Length: 0x0\r\n\r\n", 400, id="content-length-hex"),
    pytest.param(POST + b"Content-Length : 0\r\n\r\n", 400, id="space-before-colon"),
    pytest.param(
        POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        400,
        id="obs-fold-transfer-encoding",
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nX-A: b\r\n\tc\r\n\r\n", 400, id="obs-fold-tab"),
    pytest.param(b"GET / HTTP/1.1\r\n Host: t\r\n\r\n", 400, id="continuation-first-line"),
    pytest.param(
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, id="te-in-http10"
    ),
    # RFC 9112 §6.3: chunked not the final coding (or applied twice, §6.1) is a 400; an
    # unsupported coding before a final chunked is a 501 (§6.1).
    pytest.param(
        POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400, id="unknown-transfer-coding"
    ),
    pytest.param(POST + b"Transfer-Encoding: gzip\r\n\r\n0\r\n\r\n", 400, id="te-gzip-only"),
    pytest.param(
        POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400, id="chunked-gzip"
    ),
    pytest.param(
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n",
        400,
        id="chunked-then-gzip-field",
    ),
    pytest.param(
        POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400, id="chunked-chunked"
    ),
    pytest.param(
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        id="te-twice",
    ),
    pytest.param(
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, id="gzip-chunked"
    ),
    pytest.param(
        POST + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        501,
        id="gzip-then-chunked-field",
    ),
    pytest.param(CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n", 400, id="chunk-size-not-hex"),
    pytest.param(CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n", 400, id="chunk-size-negative"),
    pytest.param(CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", 400, id="chunk-size-0x"),
    pytest.param(
        CHUNKED + b"1" + b"0" * 30 + b"\r\nhello\r\n0\r\n\r\n", 400, id="chunk-size-overflow"
    ),
    pytest.param(CHUNKED + b"3\r\nhello\r\n0\r\n\r\n", 400, id="chunk-longer-than-size"),
    pytest.param(CHUNKED + b"5\r\nhello\n0\r\n\r\n", 400, id="chunk-data-bare-lf"),
    pytest.param(CHUNKED + b"5\r\nhelloXX0\r\n\r\n", 400, id="chunk-data-no-crlf"),
    pytest.param(b"GET / HTTP/1.1\rHost: t\r\n\r\n", 400, id="bare-cr-request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nX: a\rb\r\n\r\n", 400, id="bare-cr-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n", 400, id="nul-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, id="two-hosts"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="no-host"),
    pytest.param(b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n", 400, id="space-in-target"),
    pytest.param(b"G(T / HTTP/1.1\r\nHost: t\r\n\r\n", 400, id="bad-method-token"),
    pytest.param(b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505, id="http-2-version"),
    pytest.param(b"GET /\r\n\r\n", 400, id="http-0.9"),
]


@BYTEWISE
@pytest.mark.parametrize(("raw", "status"), SMUGGLING_VECTORS)
async def test_smuggling_vector_is_rejected_and_next_client_served(
    raw: bytes, status: int, bytewise: bool
) -> None:
    app = Recorder()
    async with run_server(app, **EXACT) as server:
        async with await connect(server.addresses[0]) as stream:
            await send(stream, raw + SMUGGLED, bytewise=bytewise)
            data = await read_until_eof(stream)
        # Exactly one response, the rejection, and it closes the connection.
        [(response, body)] = parse_responses(data)
        assert response.status_code == status
        assert header(response, b"connection") == b"close"
        assert body == response.reason + b"\n"
        assert data.count(b"HTTP/1.1 ") == 1
        assert "/smuggled" not in app.paths
        assert all(r["disconnect"] for r in app.requests)  # no request was answered
        # The server keeps serving everyone else.
        async with await connect(server.addresses[0]) as stream:
            response, body = await Client(stream).request("GET", "/next")
        assert (response.status_code, body) == (200, b"GET /next ")


async def test_content_length_body_is_never_parsed_as_a_request() -> None:
    app = Recorder()
    body = SMUGGLED
    raw = POST + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        await stream.send_all(raw)
        data = await read_until_eof(stream)
    [(_response, echoed)] = parse_responses(data)
    assert echoed == b"POST / " + SMUGGLED
    assert app.paths == ["/"]


async def test_unread_body_is_discarded_before_next_request() -> None:
    # The app answers without reading the body: its bytes must not become a request.
    async with (
        run_server(hello_app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        body = SMUGGLED
        await stream.send_all(
            POST
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
            + get("/real", b"Connection: close\r\n")
        )
        data = await read_until_eof(stream)
    assert [b for _, b in parse_responses(data)] == [b"Hello, world!", b"Hello, world!"]


async def test_h11_client_parses_every_response_header() -> None:
    # Default headers present and well-formed when enabled.
    async with run_server(hello_app) as server, await connect(server.addresses[0]) as stream:
        response, _ = await Client(stream).request()
    assert header(response, b"server") == b"trioserve"
    date = header(response, b"date")
    assert date is not None
    assert date.endswith(b" GMT")
    assert isinstance(response, h11.Response)


# -- framework-shaped apps ---------------------------------------------------------------


async def test_starlette_background_task_does_not_block_the_next_pipelined_request() -> None:
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    release = trio.Event()
    finished: list[str] = []

    async def work() -> None:
        await release.wait()
        finished.append("work")

    async def slow(request: Any) -> PlainTextResponse:
        return PlainTextResponse("slow", background=BackgroundTask(work))

    async def fast(request: Any) -> PlainTextResponse:
        return PlainTextResponse("fast")

    app = Starlette(routes=[Route("/slow", slow), Route("/fast", fast)])
    async with (
        run_server(app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(get("/slow") + get("/fast"))
        data = await receive_until(stream, b"fast")
        assert [b for _, b in parse_responses(data, eof=False)] == [b"slow", b"fast"]
        assert finished == []
        release.set()
        await stream.send_all(get("/fast", b"Connection: close\r\n"))
        data = await read_until_eof(stream)
        assert [b for _, b in parse_responses(data)] == [b"fast"]
    assert finished == ["work"]


async def test_disconnect_listener_task_is_released_when_response_completes() -> None:
    # The pre-2.4 Starlette pattern: a task awaits receive() (for http.disconnect) while
    # another sends the response; the listener must get http.disconnect once the
    # response is complete, and the next pipelined request must still be read.
    heard: list[Any] = []
    next_sent = trio.Event()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        assert (await receive())["type"] == "http.request"

        async def listen() -> None:
            heard.append(await receive())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            if scope["path"] == "/a":
                await next_sent.wait()  # the listener has read /b's bytes meanwhile
            await send_({"type": "http.response.start", "status": 200, "headers": []})
            await send_({"type": "http.response.body", "body": scope["path"].encode()})

    async with (
        run_server(app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(get("/a"))
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_all(get("/b", b"Connection: close\r\n"))
        await trio.testing.wait_all_tasks_blocked()
        assert heard == []  # pipelined bytes are not a disconnect
        next_sent.set()
        data = await read_until_eof(stream)
    assert [b for _, b in parse_responses(data)] == [b"/a", b"/b"]
    assert heard == [{"type": "http.disconnect"}, {"type": "http.disconnect"}]


@pytest.mark.parametrize(
    ("size", "extra"),
    [
        pytest.param(4 * 1024 * 1024, b"Connection: close\r\n", id="connection-close"),
        pytest.param(8 * 1024 * 1024, b"", id="keep-alive-body-too-large-to-drain"),
    ],
)
async def test_response_survives_closing_with_an_unread_request_body(
    size: int, extra: bytes
) -> None:
    # The app answers without reading a large body. Closing with unread input would make
    # the kernel reset the connection and could destroy the response in flight; the
    # server must close gracefully (lingering close, RFC 9112 §9.6).
    async with run_server(hello_app, **EXACT) as server:
        for _ in range(3):
            async with await connect(server.addresses[0]) as stream:
                head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n" % size + extra
                await stream.send_all(head + b"\r\n")

                async def upload(stream: trio.SocketStream = stream) -> None:
                    try:
                        await stream.send_all(b"u" * size)
                    except trio.BrokenResourceError:
                        pass

                data = b""
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(upload)
                    with trio.fail_after(10):
                        # A reset (instead of FIN after the response) fails the test.
                        while chunk := await stream.receive_some(65536):
                            data += chunk
            [(response, body)] = parse_responses(data)
            assert (response.status_code, body) == (200, b"Hello, world!")


async def test_limit_concurrency_holds_for_requests_arriving_together() -> None:
    release = trio.Event()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await release.wait()
        await hello_app(scope, receive, send_)

    async with run_server(app, limit_concurrency=1, **EXACT) as server:
        streams = [await connect(server.addresses[0]) for _ in range(3)]
        try:
            for stream in streams:
                await stream.send_all(get("/", b"Connection: close\r\n"))
            # Until two requests were answered (with 503) while the app holds the third.
            with trio.fail_after(10):
                while sum(readable(stream) for stream in streams) < 2:
                    await trio.sleep(0.01)
            release.set()
            statuses = []
            for stream in streams:
                data = await read_until_eof(stream)
                statuses.append(parse_responses(data)[0][0].status_code)
        finally:
            for stream in streams:
                await stream.aclose()
    assert sorted(statuses) == [200, 503, 503]


async def test_head_keeps_the_app_content_length_without_sending_a_body() -> None:
    # What a file response does for HEAD: declare the size, send nothing.
    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await send_(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"1000")],
            }
        )
        await send_({"type": "http.response.body", "body": b""})

    async with (
        run_server(app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(b"HEAD /f HTTP/1.1\r\nHost: t\r\n\r\n" * 2)
        data = await receive_until(
            stream, b"\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"
        )
    assert data == b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" * 2


@BYTEWISE
@pytest.mark.parametrize(
    "body", [b" starts with a space", b"\tstarts with a tab", b"a\n b\n\tc", b"\n \n "]
)
async def test_fold_like_bytes_in_a_body_are_not_obs_fold(body: bytes, bytewise: bool) -> None:
    # The obs-fold screen must stop at the end of the head, also when the blank line and
    # the body arrive in separate reads.
    app = Recorder()
    raw = POST + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        await send(stream, raw, bytewise=bytewise)
        data = await read_until_eof(stream)
    [(response, echoed)] = parse_responses(data)
    assert (response.status_code, echoed) == (200, b"POST / " + body)


async def test_concurrent_send_from_two_app_tasks_is_serialized() -> None:
    """An app whose tasks call send() at once: the writes take turns (as uvicorn's
    synchronous transport writes do), never interleaving bytes nor raising trio's
    BusyResourceError. Chunks larger than the socket buffer force waiting writes."""
    chunk_size, chunks = 256 * 1024, 8

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await send_({"type": "http.response.start", "status": 200, "headers": []})

        async def writer(byte: bytes) -> None:
            for _ in range(chunks):
                await send_(
                    {"type": "http.response.body", "body": byte * chunk_size, "more_body": True}
                )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, b"a")
            nursery.start_soon(writer, b"b")
        await send_({"type": "http.response.body", "body": b""})

    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        response, body = await Client(stream).request("GET", "/")
    assert response.status_code == 200
    assert len(body) == 2 * chunks * chunk_size
    assert body.count(b"a") == body.count(b"b") == chunks * chunk_size
    # Each app chunk arrives whole: the body is a sequence of single-byte runs.
    runs = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    assert all(run in (b"a" * chunk_size, b"b" * chunk_size) for run in runs)


async def test_connect_method_gets_501_and_never_reaches_the_app() -> None:
    app = Recorder()
    async with run_server(app, **EXACT) as server:
        async with await connect(server.addresses[0]) as stream:
            await stream.send_all(
                b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
            )
            data = await read_until_eof(stream)
        [(response, _)] = parse_responses(data)
        assert response.status_code == 501
        assert header(response, b"connection") == b"close"
        assert app.requests == []
        async with await connect(server.addresses[0]) as stream:
            response, _ = await Client(stream).request("GET", "/next")
        assert response.status_code == 200


async def test_invalid_utf8_in_the_path_reaches_a_fastapi_path_parameter() -> None:
    """``/%FF`` becomes U+FFFD in ``path`` (``raw_path`` keeps the bytes), so an app that
    encodes the path answers 200 instead of a client-triggered 500."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/items/{name}")
    async def item(name: str) -> dict[str, str]:
        return {"name": name}

    async with run_server(app, **EXACT) as server, await connect(server.addresses[0]) as stream:
        response, body = await Client(stream).request("GET", "/items/%FF")
    assert response.status_code == 200
    assert body == '{"name":"\ufffd"}'.encode()


async def test_many_headers_and_non_ascii_header_values_reach_the_scope_exactly() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        seen.append(scope["headers"])
        await hello_app(scope, receive, send_)

    value = "caf\u00e9 \u2603".encode()  # UTF-8 bytes: obs-text, passed through as bytes
    many = b"".join(b"X-H%d: v%d\r\n" % (i, i) for i in range(200))
    raw = b"GET / HTTP/1.1\r\nHost: t\r\nX-Name: " + value + b"\r\n" + many + b"\r\n"
    async with run_server(app, **EXACT) as server:
        async with await connect(server.addresses[0]) as stream:
            await stream.send_all(raw)
            data = await receive_until(stream, b"world!")
        assert parse_responses(data, eof=False)[0][0].status_code == 200
        # A non-token byte in a header *name* is malformed: 400.
        async with await connect(server.addresses[0]) as stream:
            await stream.send_all("GET / HTTP/1.1\r\nHost: t\r\nX-N\u00e4me: v\r\n\r\n".encode())
            data = await read_until_eof(stream)
        assert parse_responses(data)[0][0].status_code == 400
    [headers] = seen
    assert headers[:2] == [(b"host", b"t"), (b"x-name", value)]
    assert headers[2:] == [(b"x-h%d" % i, b"v%d" % i) for i in range(200)]


# -- the app call runs in the connection's task until it first waits ----------------------

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


async def test_contextvars_set_by_an_app_do_not_leak_into_the_next_request() -> None:
    # Apps that answer without waiting run in the connection's own task: each call still
    # gets a context of its own, as a task of its own would.
    seen: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(REQUEST_ID.get(None))
        REQUEST_ID.set(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    async with (
        run_server(app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(get("/a") + get("/b") + get("/c", b"Connection: close\r\n"))
        data = await read_until_eof(stream)
    assert [b for _, b in parse_responses(data)] == [b"/a", b"/b", b"/c"]
    assert seen == [None, None, None]


@pytest.mark.parametrize("wait_at", ["before-start", "between-start-and-body", "after-body"])
async def test_an_app_that_waits_hands_the_connection_on(wait_at: str) -> None:
    # The first wait moves the connection's reading to a new task; pipelined requests are
    # still answered in order, and an app still running after its response (BackgroundTasks)
    # does not hold up the next one.
    release = trio.Event()
    done: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/wait" and wait_at == "before-start":
            await trio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if path == "/wait" and wait_at == "between-start-and-body":
            await trio.sleep(0.01)
        await send({"type": "http.response.body", "body": path.encode()})
        if path == "/wait" and wait_at == "after-body":
            await release.wait()
        done.append(path)

    async with (
        run_server(app, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(get("/wait") + get("/next") + get("/last"))
        data = await receive_until(stream, b"/last")
        assert [b for _, b in parse_responses(data, eof=False)] == [b"/wait", b"/next", b"/last"]
        release.set()
        await stream.send_all(get("/bye", b"Connection: close\r\n"))
        data = await read_until_eof(stream)
        assert [b for _, b in parse_responses(data)] == [b"/bye"]
    assert sorted(done) == ["/bye", "/last", "/next", "/wait"]


async def test_a_pipelining_client_does_not_starve_other_connections() -> None:
    # Apps that never wait still give the scheduler a turn once per request: a second
    # connection is answered while the first one's long pipeline is being served.
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        calls.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    flood_size = 1000
    async with (
        run_server(app, **EXACT) as server,
        await connect(server.addresses[0]) as flood,
        await connect(server.addresses[0]) as other,
    ):
        await flood.send_all(get("/f") * (flood_size - 1) + get("/f", b"Connection: close\r\n"))
        await other.send_all(get("/other", b"Connection: close\r\n"))
        data = await read_until_eof(other)
        assert [b for _, b in parse_responses(data)] == [b"/other"]
        flood_data = await read_until_eof(flood)
        assert len(parse_responses(flood_data)) == flood_size
    assert calls.index("/other") < flood_size - 10, calls.index("/other")


@pytest.mark.parametrize("ws", ["none", "auto"])
async def test_upgrade_the_server_does_not_take_is_answered_and_so_is_the_next_request(
    ws: str,
) -> None:
    """A request asking to switch to a protocol trioserve does not speak (h2c) is an
    ordinary request; bytes pipelined behind its head are the next request, not the new
    protocol (llhttp stops at such a head: they must be parsed once the response is done)."""
    recorder = Recorder()
    async with run_server(recorder, ws=ws) as server, await connect(server.addresses[0]) as s:
        await s.send_all(
            b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        responses = parse_responses(await read_until_eof(s))
    assert [(r.status_code, body) for r, body in responses] == [
        (200, b"GET /a "),
        (200, b"GET /b "),
    ]
    assert recorder.paths == ["/a", "/b"]


UPGRADE_H2C = b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
UPGRADE_WS = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
UPGRADE_WS += b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
LENGTH_35 = b"Content-Length: 35\r\n\r\n" + SMUGGLED  # (the body: a request, 35 bytes)
CHUNKED_SMUGGLED = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
    len(SMUGGLED),
    SMUGGLED,
)
UPGRADE_BODY_VECTORS = [
    pytest.param(POST + UPGRADE_H2C + LENGTH_35, "auto", id="h2c-length"),
    pytest.param(POST + UPGRADE_H2C + LENGTH_35, "none", id="h2c-length-ws-none"),
    pytest.param(POST + UPGRADE_H2C + CHUNKED_SMUGGLED, "auto", id="h2c-chunked"),
    pytest.param(POST + UPGRADE_H2C + CHUNKED_SMUGGLED, "none", id="h2c-chunked-ws-none"),
    pytest.param(POST + UPGRADE_WS + LENGTH_35, "auto", id="post-websocket"),
    pytest.param(POST + UPGRADE_WS + CHUNKED_SMUGGLED, "none", id="post-websocket-ws-none"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: t\r\n" + UPGRADE_WS + LENGTH_35,
        "none",
        id="get-websocket-ws-none",
    ),
]


@BYTEWISE
@pytest.mark.parametrize(("raw", "ws"), UPGRADE_BODY_VECTORS)
async def test_the_body_of_an_upgrade_not_taken_is_a_body_never_a_request(
    raw: bytes, ws: str, bytewise: bool
) -> None:
    """A request that offers an upgrade trioserve does not take (h2c, or a WebSocket
    handshake that is not a GET or with --ws none) is plain HTTP, body included: the body
    goes to the app, and what follows it is the next request (h11 switches only when the
    server answers 101). llhttp alone would end the message at the head and parse the
    body as the next request: request smuggling."""
    recorder = Recorder()
    async with (
        run_server(recorder, ws=ws, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await send(stream, raw + get("/next", b"Connection: close\r\n"), bytewise=bytewise)
        responses = parse_responses(await read_until_eof(stream))
    method = raw[: raw.index(b" ")]
    assert [(r.status_code, b) for r, b in responses] == [
        (200, method + b" / " + SMUGGLED),
        (200, b"GET /next "),
    ]
    assert recorder.paths == ["/", "/next"]
