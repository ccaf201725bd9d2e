"""The ASGI response extensions: ``http.response.pathsend`` (files, os.sendfile), early hints
(103) and response trailers, on the wire, on both parsers (issue 19)."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any, Literal

import h11
import httpx
import pytest
import trio
import trio.testing
import trustme
from conftest import connection_tasks, run_server
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from test_http_messages import writer_for
from wire import Client, connect, header, parse_responses, read_until_eof

import trioserve.testing
from trioserve.connection.stream import SMALL_FILE_BYTES, ConnectionStream
from trioserve.errors import AppProtocolError
from trioserve.protocol.response_extensions import (
    EARLY_HINT,
    PATHSEND,
    TRAILERS,
    FileRegion,
    accepts_trailers,
)
from trioserve.protocol.scope import ConnectionFacts, http_scope, websocket_scope

MIB = 1024 * 1024
SIZES = [0, 1, 64 * 1024, SMALL_FILE_BYTES + 1, MIB + 3]


def make_file(directory: Path, size: int, name: str | None = None) -> Path:
    path = directory / (name or f"f{size}.bin")
    path.write_bytes(os.urandom(size))  # (random: a misplaced piece would show)
    return path


def pathsend_app(
    path: Path | str, headers: list[tuple[bytes, bytes]] | None = None, *, body: bytes = b""
) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/hello":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"hi"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers or []})
        if body:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.pathsend", "path": str(path)})

    return app


async def exchange(server: Any, request: bytes, *, limit: int = 16 * MIB) -> bytes:
    stream = await connect(server.addresses[0])
    try:
        await stream.send_all(request)
        return await read_until_eof(stream, limit)
    finally:
        await stream.aclose()


GET_CLOSE = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- scope -------------------------------------------------------------------------------


def test_http_scope_advertises_the_response_extensions_websocket_scope_does_not() -> None:
    facts = ConnectionFacts(("1.2.3.4", 5), ("0.0.0.0", 80))
    scope = http_scope(b"GET", b"/", b"1.1", [], facts, None)
    assert scope["extensions"] == {PATHSEND: {}, EARLY_HINT: {}, TRAILERS: {}}
    other = http_scope(b"GET", b"/", b"1.1", [], facts, None)
    other["extensions"]["x"] = {}
    assert "x" not in http_scope(b"GET", b"/", b"1.1", [], facts, None)["extensions"]
    ws = websocket_scope(b"/", b"1.1", [], facts, None)
    assert set(ws["extensions"]) == {"websocket.http.response"}


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        (b"trailers", True),
        (b"gzip, Trailers", True),
        (b"trailers;q=0.5", True),
        (b"gzip", False),
        (b"trailersx", False),
    ],
)
def test_te_trailers_is_recognised(value: bytes, accepted: bool) -> None:
    assert accepts_trailers([(b"te", value)]) is accepted


# -- pathsend ----------------------------------------------------------------------------

pytestmark_parsers = pytest.mark.usefixtures("both_parsers")


@pytestmark_parsers
@pytest.mark.parametrize("size", SIZES)
async def test_pathsend_sends_the_file_with_its_length_on_a_kept_alive_connection(
    tmp_path: Path, size: int
) -> None:
    path = make_file(tmp_path, size)
    async with (
        run_server(pathsend_app(path)) as server,
        await connect(server.addresses[0]) as stream,
    ):
        client = Client(stream)
        for _ in range(2):
            response, body = await client.request()
            assert response.status_code == 200
            assert header(response, b"content-length") == b"%d" % size
            assert body == path.read_bytes()
        response, body = await client.request(target="/hello")
        assert body == b"hi"


@pytestmark_parsers
@pytest.mark.parametrize("size", [0, 10, MIB])
async def test_pathsend_to_head_sends_the_length_and_no_body(tmp_path: Path, size: int) -> None:
    path = make_file(tmp_path, size)
    async with run_server(pathsend_app(path)) as server:
        request = b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n"
        data = await exchange(server, request + request.replace(b"HEAD", b"GET", 1) + GET_CLOSE)
    (head, body), (_get, get_body), _ = parse_responses(data, [b"HEAD", b"GET", b"GET"])
    assert header(head, b"content-length") == b"%d" % size
    assert body == b""
    assert get_body == path.read_bytes()


@pytestmark_parsers
@pytest.mark.parametrize("size", [5, MIB])
async def test_pathsend_with_chunked_framing_and_to_http10(tmp_path: Path, size: int) -> None:
    path = make_file(tmp_path, size)
    app = pathsend_app(path, [(b"transfer-encoding", b"chunked")], body=b"abc")
    async with run_server(app) as server:
        data = await exchange(server, GET_CLOSE)
        assert b"\r\ntransfer-encoding: chunked\r\n" in data.lower()
        [(_response, body)] = parse_responses(data)
        assert body == b"abc" + path.read_bytes()
        # HTTP/1.0: no chunks; the file's size as its length (no streamed body first).
        data = await exchange(server, b"GET / HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.endswith(b"abc" + path.read_bytes())


@pytestmark_parsers
async def test_pathsend_to_http10_declares_the_files_length(tmp_path: Path) -> None:
    path = make_file(tmp_path, MIB)
    async with run_server(pathsend_app(path)) as server:
        data = await exchange(server, b"GET / HTTP/1.0\r\n\r\n")
    [(response, body)] = parse_responses(data)
    assert header(response, b"content-length") == b"%d" % MIB
    assert body == path.read_bytes()


@pytestmark_parsers
@pytest.mark.parametrize("delta", [-1, 1])
async def test_pathsend_file_longer_or_shorter_than_declared_answers_500(
    tmp_path: Path, delta: int, caplog: pytest.LogCaptureFixture
) -> None:
    size = MIB
    path = make_file(tmp_path, size)
    app = pathsend_app(path, [(b"content-length", b"%d" % (size + delta))])
    async with run_server(app) as server:
        data = await exchange(server, GET_CLOSE)
    [(response, body)] = parse_responses(data)
    assert response.status_code == 500
    assert body == b"Internal Server Error\n"
    assert "Content-Length" in caplog.text


@pytestmark_parsers
@pytest.mark.parametrize("where", ["missing", "directory", "relative", "fifo", "not-a-str"])
async def test_pathsend_path_that_cannot_be_sent_answers_500(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    paths: dict[str, Any] = {
        "missing": tmp_path / "nope",
        "directory": tmp_path,
        "relative": "some/file",
        "not-a-str": 42,
    }
    if where == "fifo":
        os.mkfifo(tmp_path / "fifo")  # (opening it for reading must not wait for a writer)
        paths["fifo"] = tmp_path / "fifo"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        target = paths[where]
        await send(
            {"type": "http.response.pathsend", "path": str(target) if where != "not-a-str" else 42}
        )

    before = open_fds()
    with trio.fail_after(5):
        async with run_server(app) as server:
            data = await exchange(server, GET_CLOSE)
    [(response, _body)] = parse_responses(data)
    assert response.status_code == 500
    assert "pathsend" in caplog.text or "'path'" in caplog.text
    assert open_fds() == before


@pytestmark_parsers
async def test_pathsend_before_start_or_twice_is_an_app_error(tmp_path: Path) -> None:
    path = make_file(tmp_path, 10)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/before":
            await send({"type": "http.response.pathsend", "path": str(path)})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": str(path)})
        with pytest.raises(AppProtocolError, match="after the response completed"):
            await send({"type": "http.response.pathsend", "path": str(path)})

    async with run_server(app) as server:
        data = await exchange(server, GET_CLOSE.replace(b"/", b"/before", 1))
        assert data.startswith(b"HTTP/1.1 500 ")
        [(_response, body)] = parse_responses(await exchange(server, GET_CLOSE))
    assert body == path.read_bytes()


@pytest.mark.parametrize("fast", [True, False], ids=["sendfile", "pieces"])
async def test_write_file_past_the_files_end_raises_and_breaks_the_stream(
    tmp_path: Path, fast: bool
) -> None:
    """A file that shrank after its size was taken: the region promises bytes that never
    come, the stream is broken (the connection will close, never hang the client)."""
    path = make_file(tmp_path, 3 * SMALL_FILE_BYTES)
    broken: list[bool] = []
    client: Any
    if fast:
        a, b = socket.socketpair()
        server_stream: Any = trio.SocketStream(trio.socket.from_stdlib_socket(a))
        client = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    else:
        server_stream, client = trio.testing.memory_stream_pair()
    stream = ConnectionStream(
        server_stream,
        memoryview(bytearray(1024)),
        ConnectionFacts(None, None),
        lambda: broken.append(True),
    )
    assert stream.fast is fast
    fd = os.open(path, os.O_RDONLY)
    received = bytearray()
    try:
        region = FileRegion(fd, 0, 4 * SMALL_FILE_BYTES, str(path))
        async with trio.open_nursery() as nursery:

            async def read_all() -> None:
                while data := await client.receive_some(MIB):
                    received.extend(data)

            nursery.start_soon(read_all)
            with pytest.raises(AppProtocolError, match="short of"):
                await stream.write_file([b"head", region])
            await server_stream.aclose()
    finally:
        os.close(fd)
        await client.aclose()
    assert stream.broken and broken
    # (Read in pieces, the file's end shows before the last piece is written.)
    expected = b"head" + path.read_bytes()
    assert bytes(received) == expected if fast else expected.startswith(received)


@pytestmark_parsers
async def test_pathsend_to_a_slow_reader_leaves_other_clients_fast(tmp_path: Path) -> None:
    size = 50 * MIB
    path = make_file(tmp_path, size)
    async with run_server(pathsend_app(path)) as server:
        slow = await connect(server.addresses[0])
        slow.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await slow.send_all(GET_CLOSE)
        # The slow client reads nothing: its response fills the socket buffers and its
        # task waits; meanwhile every other client is served at once.
        await trio.sleep(0.2)
        with trio.fail_after(2):
            for _ in range(20):
                data = await exchange(server, GET_CLOSE.replace(b"/", b"/hello", 1))
                assert data.endswith(b"\r\n\r\nhi")
        with trio.fail_after(30):
            data = await read_until_eof(slow, size + MIB)
        await slow.aclose()
    [(_response, body)] = parse_responses(data)
    assert len(body) == size
    assert body == path.read_bytes()


@pytestmark_parsers
async def test_client_leaving_mid_file_leaks_no_descriptor(
    tmp_path: Path,
) -> None:
    path = make_file(tmp_path, 50 * MIB)
    async with run_server(pathsend_app(path)) as server:
        await exchange(server, GET_CLOSE.replace(b"/", b"/hello", 1))  # (warm up)
        before = open_fds()
        for _ in range(3):
            stream = await connect(server.addresses[0])
            await stream.send_all(GET_CLOSE)
            received = 0
            while received < 2 * MIB:
                received += len(await stream.receive_some(MIB))
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            await stream.aclose()  # (a reset: the server's next send fails)
        # Every connection ends (its task closes the socket); the files are closed too.
        with trio.fail_after(5):
            while connection_tasks() or open_fds() != before:
                await trio.sleep(0.01)
        assert not [fd for fd in os.listdir("/proc/self/fd") if _is_file_of(fd, path)]


def _is_file_of(fd: str, path: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == str(path)
    except OSError:
        return False


@pytestmark_parsers
async def test_pathsend_over_tls_reads_the_file_in_pieces(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    path = make_file(tmp_path, 3 * MIB + 7)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    options = {"ssl_certfile": str(tmp_path / "cert.pem"), "ssl_keyfile": str(tmp_path / "key.pem")}
    async with run_server(pathsend_app(path), **options) as server:
        address = server.addresses[0]
        assert isinstance(address, tuple)
        stream = await trio.open_ssl_over_tcp_stream(*address, ssl_context=context)
        async with stream:
            client = Client(stream)
            for _ in range(2):
                _response, body = await client.request()
                assert body == path.read_bytes()


async def test_testing_client_in_memory_gets_the_file_hints_and_trailers(tmp_path: Path) -> None:
    path = make_file(tmp_path, MIB)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.early_hint", "links": [b"</a.css>; rel=preload"]})
        trailers = scope["path"] == "/t"
        await send({"type": "http.response.start", "status": 200, "trailers": trailers})
        if trailers:
            await send({"type": "http.response.body", "body": b"abc"})
            await send({"type": "http.response.trailers", "headers": [(b"x-sum", b"9")]})
        else:
            await send({"type": "http.response.pathsend", "path": str(path)})

    transports: list[tuple[Literal["memory", "socket"], bool]] = [
        ("memory", False),
        ("socket", True),
    ]
    for transport, h11_client in transports:
        async with (
            trioserve.testing.running(app, transport=transport) as server,
            server.client(h11=h11_client) as client,
        ):
            response = await client.get("/")
            assert response.content == path.read_bytes()
            assert response.extensions["informational_responses"] == [
                (103, [(b"link", b"</a.css>; rel=preload")])
            ]
            response = await client.get("/t", headers={"te": "trailers"})
            assert response.content == b"abc"
            assert response.extensions["trailers"] == [(b"x-sum", b"9")]


# -- early hints -------------------------------------------------------------------------


def hinting_app(links: Any) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.early_hint", "links": links})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


@pytestmark_parsers
async def test_early_hint_sends_103_with_links_before_the_response() -> None:
    app = hinting_app([b"</a.css>; rel=preload; as=style", b"</b.js>; rel=preload; as=script"])
    async with run_server(app) as server:
        data = await exchange(server, GET_CLOSE)
    assert data.startswith(
        b"HTTP/1.1 103 Early Hints\r\n"
        b"link: </a.css>; rel=preload; as=style\r\n"
        b"link: </b.js>; rel=preload; as=script\r\n\r\n"
        b"HTTP/1.1 200 OK\r\n"
    )
    assert data.endswith(b"\r\n\r\nok")


@pytestmark_parsers
async def test_early_hint_before_the_body_is_read_still_lets_100_continue_through() -> None:
    # Any 1xx ends h11's wait for 100-continue; the client still waits for its 100.
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.early_hint", "links": [b"</a.css>; rel=preload"]})
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async with run_server(app) as server:
        stream = await connect(("127.0.0.1", server.port))
        async with stream:
            await stream.send_all(
                b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                b"Content-Length: 4\r\nConnection: close\r\n\r\n"
            )
            seen = b""
            with trio.fail_after(5):  # (without the 100 the client would wait for ever)
                while b"HTTP/1.1 100 Continue\r\n\r\n" not in seen:
                    seen += await stream.receive_some(65536)
                await stream.send_all(b"ping")
                seen += await read_until_eof(stream)
    assert seen.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n")
    assert seen.endswith(b"\r\n\r\nping")


@pytestmark_parsers
async def test_early_hint_is_dropped_for_an_http10_client() -> None:
    async with run_server(hinting_app([b"</a.css>; rel=preload"])) as server:
        data = await exchange(server, b"GET / HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"103" not in data


@pytestmark_parsers
@pytest.mark.parametrize(
    "links",
    [
        pytest.param([b"</a>\r\nx-injected: 1"], id="crlf"),
        pytest.param([b"</a>\0"], id="nul"),
        pytest.param(["</a>"], id="str-link"),
        pytest.param(b"</a>", id="bytes-not-list"),
        pytest.param(None, id="missing"),
    ],
)
async def test_early_hint_with_invalid_links_answers_500_and_sends_no_103(links: Any) -> None:
    async with run_server(hinting_app(links)) as server:
        data = await exchange(server, GET_CLOSE)
    assert data.startswith(b"HTTP/1.1 500 ")
    assert b"injected" not in data


@pytestmark_parsers
async def test_early_hint_after_start_is_an_app_error() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.early_hint", "links": [b"</a>"]})

    async with run_server(app) as server:
        data = await exchange(server, GET_CLOSE)
    assert data.startswith(b"HTTP/1.1 500 ")


# -- trailers ----------------------------------------------------------------------------


def trailing_app(
    headers: list[tuple[bytes, bytes]] | None = None,
    trailers: list[list[tuple[bytes, bytes]]] | None = None,
) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": headers or [],
                "trailers": True,
            }
        )
        await send({"type": "http.response.body", "body": b"ab", "more_body": True})
        await send({"type": "http.response.body", "body": b"c"})
        parts = trailers or [[(b"x-checksum", b"900150983cd24fb0")]]
        for index, fields in enumerate(parts):
            more = index < len(parts) - 1
            await send({"type": "http.response.trailers", "headers": fields, "more_trailers": more})

    return app


TE_CLOSE = b"GET / HTTP/1.1\r\nHost: t\r\nTE: trailers\r\nConnection: close\r\n\r\n"


@pytestmark_parsers
async def test_trailers_are_sent_to_a_client_that_accepts_them() -> None:
    app = trailing_app(trailers=[[(b"x-a", b"1")], [(b"x-b", b"2"), (b"grpc-status", b"0")]])
    async with run_server(app) as server:
        data = await exchange(server, TE_CLOSE)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked" in head
    assert body == b"2\r\nab\r\n1\r\nc\r\n0\r\nx-a: 1\r\nx-b: 2\r\ngrpc-status: 0\r\n\r\n"
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "t")]))
    client.receive_data(data)
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        assert event is not h11.NEED_DATA
    assert event.headers.raw_items() == [
        (b"x-a", b"1"),
        (b"x-b", b"2"),
        (b"grpc-status", b"0"),
    ]


@pytestmark_parsers
async def test_trailers_are_dropped_for_a_client_that_did_not_ask() -> None:
    async with run_server(trailing_app()) as server:
        data = await exchange(server, GET_CLOSE)
        assert data.endswith(b"\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")
        # HTTP/1.0 (no chunks: the close ends the body), and HEAD (no body at all).
        data = await exchange(server, b"GET / HTTP/1.0\r\nTE: trailers\r\n\r\n")
        assert data.endswith(b"\r\n\r\nabc")
        data = await exchange(server, TE_CLOSE.replace(b"GET", b"HEAD"))
        assert data.endswith(b"\r\n\r\n")
        assert b"x-checksum" not in data


@pytestmark_parsers
async def test_trailers_turn_a_declared_length_into_chunks_when_accepted() -> None:
    async with run_server(trailing_app([(b"content-length", b"3")])) as server:
        data = await exchange(server, TE_CLOSE)
        assert b"content-length" not in data.lower()
        assert data.endswith(
            b"\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\nx-checksum: 900150983cd24fb0\r\n\r\n"
        )
        data = await exchange(server, GET_CLOSE)
        [(response, body)] = parse_responses(data)
        assert header(response, b"content-length") == b"3"
        assert body == b"abc"


@pytestmark_parsers
@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([(b"content-length", b"3")], id="content-length"),
        pytest.param([(b"Transfer-Encoding", b"chunked")], id="transfer-encoding"),
        pytest.param([(b"x-a", b"1\r\nx-injected: 1")], id="crlf"),
        pytest.param([(b"x a", b"1")], id="bad-name"),
    ],
)
async def test_trailers_with_forbidden_or_invalid_fields_abort_the_response(
    fields: list[tuple[bytes, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    async with run_server(trailing_app(trailers=[fields])) as server:
        data = await exchange(server, TE_CLOSE)
    # The head and body left; the response cannot end cleanly: no last chunk, a close.
    assert data.endswith(b"\r\n\r\n2\r\nab\r\n1\r\nc\r\n")
    assert b"injected" not in data
    assert "trailers" in caplog.text or "header" in caplog.text


@pytestmark_parsers
async def test_trailers_out_of_order_are_app_errors() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        announce = scope["path"] != "/unannounced"
        await send({"type": "http.response.start", "status": 200, "trailers": announce})
        if scope["path"] == "/early":
            await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.trailers", "headers": []})

    async with run_server(app) as server:
        for target in [b"/unannounced", b"/early"]:
            data = await exchange(server, TE_CLOSE.replace(b"/", target, 1))
            # (Unannounced: nothing left yet, a 500; early: the head left, an abort.)
            assert data.startswith(b"HTTP/1.1 500 ") or not data.endswith(b"0\r\n\r\n")


# -- FastAPI -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("static")
    for size in [0, 1, 64 * 1024, 50 * MIB]:
        make_file(root, size)
    return root


def fastapi_app(root: Path) -> FastAPI:
    app = FastAPI()

    @app.api_route("/download/{name}", methods=["GET", "HEAD"])
    async def download(name: str) -> FileResponse:
        return FileResponse(root / name)

    app.mount("/static", StaticFiles(directory=root), name="static")
    return app


@pytestmark_parsers
@pytest.mark.parametrize("size", [0, 1, 64 * 1024, 50 * MIB])
@pytest.mark.parametrize("route", ["download", "static"])
async def test_fastapi_file_response_and_static_files_send_the_files_bytes(
    static_dir: Path, size: int, route: str
) -> None:
    expected = (static_dir / f"f{size}.bin").read_bytes()
    sent: list[str] = []
    app = fastapi_app(static_dir)

    async def recording_app(scope: Any, receive: Any, send: Any) -> None:
        async def recording_send(message: Any) -> None:
            sent.append(message["type"])
            await send(message)

        await app(scope, receive, recording_send)

    async with (
        run_server(recording_app) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        for _ in range(2):  # (kept alive)
            response = await client.get(f"/{route}/f{size}.bin")
            assert response.status_code == 200
            assert response.headers["content-length"] == str(size)
            assert response.content == expected
    # Starlette saw the extension advertised: the file went by path, not in chunks.
    assert sent == ["http.response.start", "http.response.pathsend"] * 2


@pytestmark_parsers
@pytest.mark.parametrize("route", ["download", "static"])
async def test_fastapi_range_requests_and_head(static_dir: Path, route: str) -> None:
    expected = (static_dir / f"f{50 * MIB}.bin").read_bytes()
    url = f"/{route}/f{50 * MIB}.bin"
    async with (
        run_server(fastapi_app(static_dir)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
    ):
        response = await client.get(url, headers={"range": "bytes=10-19"})
        assert response.status_code == 206
        assert response.content == expected[10:20]
        response = await client.get(url, headers={"range": f"bytes={MIB}-"})
        assert response.status_code == 206
        assert response.content == expected[MIB:]
        response = await client.head(url)
        assert response.status_code == 200
        assert response.headers["content-length"] == str(50 * MIB)
        assert response.content == b""
        response = await client.get(url)
        assert response.content == expected


# -- curl --------------------------------------------------------------------------------


@pytestmark_parsers
async def test_curl_shows_the_early_hint_and_the_trailers() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.early_hint", "links": [b"</a.css>; rel=preload"]})
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.body", "body": b"hello"})
        await send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"abc")]})

    async with run_server(app) as server:
        result = await trio.run_process(
            ["curl", "-sv", "--raw", "-H", "TE: trailers", server.url],
            capture_stdout=True,
            capture_stderr=True,
            stdin=subprocess.DEVNULL,
        )
    verbose = result.stderr.decode()
    assert "< HTTP/1.1 103 Early Hints" in verbose
    assert "< link: </a.css>; rel=preload" in verbose
    assert "< HTTP/1.1 200 OK" in verbose
    assert result.stdout == b"5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n"


@pytestmark_parsers
@pytest.mark.parametrize(("value", "status"), [(False, 200), ("yes", 500), (1, 500)])
async def test_trailers_flag_must_be_a_bool(value: Any, status: int) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "trailers": value})
        await send({"type": "http.response.body", "body": b"abc"})

    async with run_server(app) as server:
        data = await exchange(server, TE_CLOSE)
    [(response, body)] = parse_responses(data)
    assert response.status_code == status
    if status == 200:
        assert header(response, b"content-length") == b"3"
        assert body == b"abc"


# -- the response writer, sans-IO ------------------------------------------------------


@pytestmark_parsers
@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        pytest.param(b"GET", [], (b"content-length", b"7"), id="length-declared"),
        pytest.param(b"HEAD", [], (b"content-length", b"7"), id="head-declares-too"),
        pytest.param(
            b"GET",
            [(b"transfer-encoding", b"chunked")],
            (b"transfer-encoding", b"chunked"),
            id="chunked",
        ),
    ],
)
def test_writer_frames_a_file_region_like_a_complete_body(
    tmp_path: Path,
    method: bytes,
    headers: list[tuple[bytes, bytes]],
    expected: tuple[bytes, bytes],
) -> None:
    writer, _, client = writer_for(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
    writer.start({"status": 200, "headers": headers})
    region = FileRegion(-1, 0, 7, "/f")
    pieces = writer.file_pieces(region)
    assert writer.complete and writer.body_bytes == (0 if method == b"HEAD" else 7)
    assert (region in pieces) is (method != b"HEAD")
    head = b"".join(piece for piece in pieces if isinstance(piece, bytes))
    client.receive_data(head.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    response = client.next_event()
    assert isinstance(response, h11.Response)
    assert expected in [(name.lower(), value) for name, value in response.headers.raw_items()]


@pytestmark_parsers
@pytest.mark.parametrize("declared", [b"6", b"8"])
def test_writer_refuses_a_file_longer_or_shorter_than_declared_before_the_head(
    declared: bytes,
) -> None:
    writer, _, _ = writer_for()
    writer.start({"status": 200, "headers": [(b"content-length", declared)]})
    with pytest.raises(AppProtocolError, match="Content-Length"):
        writer.file_pieces(FileRegion(-1, 0, 7, "/f"))
    assert not writer.started  # (the server can still answer 500)


@pytestmark_parsers
async def test_pathsend_on_plain_tcp_goes_through_sendfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file reaches a plain socket without passing through Python: ``os.sendfile``
    moves it, in as many calls as the socket's buffer needs (partial sends)."""
    path = make_file(tmp_path, 8 * MIB)
    moved: list[int] = []
    sendfile = os.sendfile

    def counting_sendfile(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = sendfile(out_fd, in_fd, offset, count)
        moved.append(sent)
        return sent

    monkeypatch.setattr(os, "sendfile", counting_sendfile)
    async with run_server(pathsend_app(path)) as server:
        [(_, body)] = parse_responses(await exchange(server, GET_CLOSE))
    assert body == path.read_bytes()
    assert sum(moved) == 8 * MIB
    assert len(moved) > 1  # (8 MiB never fits a loopback socket's buffer at once)
