"""HTTP/2 through the real server (``serve()``): negotiation on one listener (prior
knowledge, ALPN over TLS, ``Upgrade: h2c``), every transport (TCP, UNIX socket, ``--fd``,
the PROXY protocol, the testing module's memory streams), and the request cycle's
behaviour per stream (503, ClientDisconnected, graceful shutdown).

The raw frame client is ``test_http2.Client``; real clients are curl and httpx.
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import subprocess
import warnings
from pathlib import Path
from typing import Any

import h2.events
import pytest
import trio
from conftest import connection_tasks, run_server
from h2.errors import ErrorCodes
from test_http2 import Client, client, echo, hello
from test_tls import ca, pki, tls_options  # noqa: F401 (fixtures)

from trioserve.errors import ClientDisconnected
from trioserve.testing import running

# A request head whose body follows in DATA frames.
POST_HEAD = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/up"),
    (b":authority", b"x"),
]


async def curl(*args: str) -> tuple[int, bytes]:
    """Run curl; its exit code and what it printed (the body, then ``-w`` output)."""
    result = await trio.run_process(
        ["curl", "-s", "--max-time", "10", *args],
        capture_stdout=True,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return result.returncode, result.stdout


async def headers_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the scope's HTTP version, client and header names, as JSON."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = {
        "http_version": scope["http_version"],
        "client": scope["client"],
        "headers": sorted(name.decode() for name, _ in scope["headers"]),
    }
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def test_curl_prior_knowledge_and_http1_are_served_on_the_same_port() -> None:
    async with run_server(hello) as server:
        url = f"http://127.0.0.1:{server.port}/c?q"
        h2 = await curl("--http2-prior-knowledge", "-w", " %{http_version}", url)
        h1 = await curl("--http1.1", "-w", " %{http_version}", url)
    assert h2 == (0, b"2 GET /c b'q' 2")
    assert h1 == (0, b"1.1 GET /c b'q' 1.1")


async def test_no_http2_leaves_the_preface_to_http1() -> None:
    async with run_server(hello, http2=False) as server:
        url = f"http://127.0.0.1:{server.port}/"
        h2_code, _ = await curl("--http2-prior-knowledge", url)
        h1 = await curl("--http2", "-w", " %{http_version}", url)  # (asks for h2c: refused)
    assert h2_code != 0
    assert h1 == (0, b"1.1 GET / b'' 1.1")


async def test_curl_http2_over_tls_negotiates_h2_by_alpn(pki: dict[str, str]) -> None:  # noqa: F811
    async with run_server(hello, **tls_options(pki)) as server:
        url = f"https://127.0.0.1:{server.port}/t"
        cacert = ("--cacert", pki["ca.pem"])
        h2 = await curl("--http2", *cacert, "-w", " %{http_version}", url)
        h1 = await curl("--http1.1", *cacert, "-w", " %{http_version}", url)
    assert h2 == (0, b"2 GET /t b'' 2")
    assert h1 == (0, b"1.1 GET /t b'' 1.1")


async def test_tls_without_http2_offers_only_http1(pki: dict[str, str]) -> None:  # noqa: F811
    async with run_server(hello, http2=False, **tls_options(pki)) as server:
        url = f"https://127.0.0.1:{server.port}/t"
        result = await curl("--http2", "--cacert", pki["ca.pem"], "-w", " %{http_version}", url)
    assert result == (0, b"1.1 GET /t b'' 1.1")


async def test_curl_upgrade_h2c_answers_the_request_as_stream_1(both_parsers: str) -> None:
    async with run_server(headers_app) as server:
        url = f"http://127.0.0.1:{server.port}/up"
        code, out = await curl("--http2", "-w", "\n%{http_version}", url)
        # A request with a body is not upgraded (RFC 7540 §3.2): HTTP/1.1 answers it.
        post = await curl("--http2", "-d", "x=1", "-w", "\n%{http_version}", url)
    body, version = out.split(b"\n")
    assert (code, version) == (0, b"2")
    seen = json.loads(body)
    assert seen["http_version"] == "2"
    # The HTTP/1.1 fields of the upgrade are not the HTTP/2 request's.
    assert not {"connection", "upgrade", "http2-settings"} & set(seen["headers"])
    assert "host" in seen["headers"]
    assert post[1].endswith(b"\n1.1")


@pytest.mark.parametrize("preface_early", [False, True], ids=["after-101", "with-request"])
async def test_h2c_upgrade_on_the_wire_answers_101_then_stream_1(
    both_parsers: str, preface_early: bool
) -> None:
    async with run_server(hello) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            c = Client(stream)
            c.conn = h2.connection.H2Connection(c.conn.config)
            settings = c.conn.initiate_upgrade_connection()
            # (The client's preface may follow the request at once, RFC 7540 §3.5.)
            await stream.send_all(
                b"GET /wire HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n"
                + (c.conn.data_to_send() if preface_early else b"")
            )  # fmt: skip
            received = b""
            with trio.fail_after(5):
                while b"\r\n\r\n" not in received:
                    received += await stream.receive_some(65536)
            head, _, rest = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            await c.flush()  # the client's preface and SETTINGS
            c.events += c.conn.receive_data(rest)
            with trio.fail_after(5):
                headers, body = await c.response(1)
    assert headers[b":status"] == b"200"
    assert body == b"2 GET /wire b''"


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    received = b""
    while data := await stream.receive_some(65536):
        received += data
    return received


@pytest.mark.parametrize("split", [1, 5, 23])
async def test_preface_arriving_in_pieces_is_still_http2(split: int) -> None:
    # The first read may hold only a prefix of the preface: the rest is waited for.
    async with run_server(hello) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            c = Client(stream)
            sid = await c.request("/split")
            data = c.conn.data_to_send()
            await stream.send_all(data[:split])
            await trio.sleep(0.05)  # (the server reads the prefix alone)
            await stream.send_all(data[split:])
            with trio.fail_after(5):
                headers, body = await c.response(sid)
    assert headers[b":status"] == b"200"
    assert body == b"2 GET /split b''"


async def test_http1_request_starting_like_the_preface_is_http1(both_parsers: str) -> None:
    # "P" could begin the preface: the server reads on until the bytes tell.
    async with run_server(hello) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"P")
            await trio.sleep(0.05)
            await stream.send_all(b"UT /p HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            with trio.fail_after(5):
                received = await read_to_eof(stream)
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.endswith(b"1.1 PUT /p b''")


async def test_preface_begun_and_stalled_is_closed_at_the_head_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with run_server(hello, timeout_request_header=3, timeout_keep_alive=60) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"PRI * HT")
            start = trio.current_time()
            with trio.fail_after(30):
                received = await read_to_eof(stream)
            waited = trio.current_time() - start
    assert received == b""  # (closed without an answer: no protocol was spoken yet)
    assert 3 <= waited < 10


async def test_hard_stop_while_a_fresh_connection_is_silent_closes_its_socket() -> None:
    # The connection waits in connection.edge for its first bytes (HTTP/2 or HTTP/1.1?):
    # a hard stop then must close the socket there, not leave it to the garbage collector.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with run_server(hello) as server:
            client = await trio.open_tcp_stream("127.0.0.1", server.port)
            with trio.fail_after(5):
                while not connection_tasks():
                    await trio.sleep(0.01)
        with trio.fail_after(5):
            assert await client.receive_some(10) == b""  # (the server's end is closed)
        await client.aclose()
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


async def test_unix_socket_speaks_http2(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    async with run_server(hello, uds=path):
        result = await curl(
            "--unix-socket", path, "--http2-prior-knowledge", "-w", " %{http_version}",
            "http://localhost/u",
        )  # fmt: skip
    assert result == (0, b"2 GET /u b'' 2")


async def test_inherited_fd_speaks_http2() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    async with run_server(hello, fd=sock.detach()):  # (the server adopts and closes it)
        result = await curl(
            "--http2-prior-knowledge", "-w", " %{http_version}", f"http://127.0.0.1:{port}/fd"
        )
    assert result == (0, b"2 GET /fd b'' 2")


async def test_proxy_protocol_then_prior_knowledge() -> None:
    async with run_server(headers_app, proxy_protocol=True) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n")
            c = Client(stream)
            await c.flush()
            with trio.fail_after(5):
                _, body = await c.response(await c.request("/p"))
    seen = json.loads(body)
    assert seen["http_version"] == "2"
    assert seen["client"] == ["203.0.113.7", 56324]


@pytest.mark.parametrize("transport", ["socket", "memory"])
async def test_running_with_http2_gives_an_http2_client(transport: Any) -> None:
    async with (
        running(hello, transport=transport, http2=True) as server,
        server.client() as client,
    ):
        response = await client.get("/r?x")
        upload = await client.post("/e", content=b"y" * 300_000)
    assert response.http_version == "HTTP/2"
    assert response.text == "2 GET /r b'x'"
    assert upload.http_version == "HTTP/2"
    assert response.status_code == 200


async def test_running_without_http2_keeps_http1_clients() -> None:
    async with running(hello) as server, server.client() as client:
        response = await client.get("/")
    assert response.http_version == "HTTP/1.1"


async def test_memory_transport_upload_is_received_whole() -> None:
    big = bytes(range(256)) * 4000  # (past the default windows: flow control both ways)
    async with (
        running(echo, transport="memory", http2=True) as server,
        server.client() as client,
    ):
        response = await client.post("/", content=big)
    assert response.content == big


async def test_limit_concurrency_answers_503_per_stream_and_the_connection_lives() -> None:
    release = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/hold":
            await release.wait()
        await hello(scope, receive, send)

    async with run_server(app, limit_concurrency=1, metrics=True) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            c = Client(stream)
            await c.flush()
            with trio.fail_after(5):
                held = await c.request("/hold")
                await trio.sleep(0.1)  # (the first stream's app is running)
                refused, body = await c.response(await c.request("/second"))
                release.set()
                head, _ = await c.response(held)
        assert server.metrics is not None
        assert server.metrics.concurrency_rejections == 1  # (counted as on HTTP/1.1)
    assert refused[b":status"] == b"503"
    assert body == b"Service Unavailable\n"
    assert head[b":status"] == b"200"


async def test_reset_stream_makes_send_raise_client_disconnected() -> None:
    outcome: list[BaseException] = []
    streaming = trio.Event()
    done = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/next":
            return await hello(scope, receive, send)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await send({"type": "http.response.body", "body": b"a", "more_body": True})
            streaming.set()
            while True:
                await trio.sleep(0.01)
                await send({"type": "http.response.body", "body": b"b", "more_body": True})
        except ClientDisconnected as exc:
            outcome.append(exc)
            raise
        finally:
            done.set()

    async with run_server(app) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            c = Client(stream)
            await c.flush()
            sid = await c.request("/stream")
            with trio.fail_after(5):
                await streaming.wait()
                c.conn.reset_stream(sid, ErrorCodes.CANCEL)
                await c.flush()
                await done.wait()
                # The connection lives on: another stream is answered.
                head, _ = await c.response(await c.request("/next"))
    assert len(outcome) == 1 and isinstance(outcome[0], ClientDisconnected)
    assert head[b":status"] == b"200"


async def test_client_goaway_ends_the_streams_in_flight_as_disconnects(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """h2 sends nothing after a GOAWAY it received (h2load sends one when its run ends,
    with streams in flight): a stream whose app is waiting sees a disconnect (then its
    send() raises ClientDisconnected, or the connection's close cancels it), a request that
    arrived with the GOAWAY reaches no app, and nothing is logged as an app's error."""
    outcome: list[object] = []
    called: list[str] = []
    waiting = trio.Event()
    done = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope["path"])
        if scope["path"] != "/held":
            return await hello(scope, receive, send)
        try:
            await receive()  # (the bodiless request)
            waiting.set()
            outcome.append((await receive())["type"])
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"late"})
        except (ClientDisconnected, trio.Cancelled) as exc:
            outcome.append(type(exc))
            raise
        finally:
            done.set()

    async with run_server(app) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            c = Client(stream)
            await c.flush()
            await c.request("/held")
            with trio.fail_after(5):
                await waiting.wait()
                # A new request and the GOAWAY in one write: h2 reads both at once.
                sid = c.conn.get_next_available_stream_id()
                c.conn.send_headers(
                    sid,
                    [
                        (b":method", b"GET"),
                        (b":scheme", b"http"),
                        (b":path", b"/late"),
                        (b":authority", b"x"),
                    ],
                    end_stream=True,
                )
                c.conn.close_connection()
                await c.flush()
                while await stream.receive_some(65536):
                    pass  # (the server closes the connection)
                await done.wait()
        with trio.fail_after(5):  # (the server serves the next client as before)
            fresh = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with fresh:
                c = Client(fresh)
                head, _ = await c.response(await c.request("/next"))
    assert head[b":status"] == b"200"
    assert called == ["/held", "/next"]
    assert outcome[0] == "http.disconnect"
    assert outcome[1:] in ([ClientDisconnected], [trio.Cancelled])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_graceful_shutdown_sends_goaway_and_lets_the_stream_in_flight_finish() -> None:
    release = trio.Event()
    started = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await release.wait()
        await hello(scope, receive, send)

    async with run_server(app) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            c = Client(stream)
            await c.flush()
            sid = await c.request("/slow")
            with trio.fail_after(5):
                await started.wait()
                server.shutdown_nowait()
                goaways: list[h2.events.ConnectionTerminated] = []
                while not goaways:
                    goaways += [
                        e
                        for e in await c.read_event()
                        if isinstance(e, h2.events.ConnectionTerminated)
                    ]
                release.set()
                # (h2 ends its state machine at the first GOAWAY: read the frames by hand.)
                rest = b""
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    rest += data
    assert goaways[0].error_code == ErrorCodes.NO_ERROR
    assert goaways[0].last_stream_id == 2**31 - 1
    # The stream in flight was answered, then the second GOAWAY named it as the last one.
    assert b"2 GET /slow" in rest
    assert rest.endswith(b"\x00\x00\x00" + bytes([sid]) + b"\x00\x00\x00\x00")


async def test_request_body_timeout_answers_408_on_the_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    told: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/next":
            return await hello(scope, receive, send)
        while True:
            message = await receive()
            told.append(message)
            if message["type"] == "http.disconnect":
                return

    async with run_server(app, timeout_request_body=5) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            c = Client(stream)
            await c.flush()
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, POST_HEAD)
            c.conn.send_data(sid, b"part")  # ... and then nothing more
            await c.flush()
            with trio.fail_after(30):
                head: dict[bytes, bytes] = {}
                ended = reset = None
                while ended is None:  # (the 408, then RST_STREAM NO_ERROR: stop sending)
                    for event in await c.read_event():
                        if isinstance(event, h2.events.ResponseReceived):
                            head = dict(event.headers or ())
                        elif isinstance(event, h2.events.StreamEnded):
                            ended = event
                        elif isinstance(event, h2.events.StreamReset):
                            reset = event
                other, _ = await c.response(await c.request("/next"))
    assert head[b":status"] == b"408"
    if reset is not None:
        assert reset.error_code == ErrorCodes.NO_ERROR
    assert told[0] == {"type": "http.request", "body": b"part", "more_body": True}
    assert told[-1] == {"type": "http.disconnect"}
    assert other[b":status"] == b"200"  # (one stream's slow body costs only that stream)


async def test_request_body_over_the_limit_answers_413() -> None:
    async with run_server(echo, limit_request_body=1000) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            c = Client(stream)
            await c.flush()
            with trio.fail_after(5):
                head, _ = await c.response(await c.request("/", "POST", body=b"x" * 2000))
                small, body = await c.response(await c.request("/", "POST", body=b"y" * 10))
    assert head[b":status"] == b"413"
    assert (small[b":status"], body) == (b"200", b"y" * 10)


async def test_unread_bodies_are_credited_back_to_the_connection_window() -> None:
    """An app that answers without reading its body: the connection's window must not
    shrink by that body each time, or the connection would stall after a few requests."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await trio.sleep(0.05)  # (the whole body has arrived and waits on the stream)
        await hello(scope, receive, send)

    async with run_server(app, h2_initial_window_size=65535) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            c = Client(stream)
            await c.flush()
            with trio.fail_after(10):
                for _ in range(12):  # 12 x 60 KB > the 256 KB connection window
                    sid = c.conn.get_next_available_stream_id()
                    c.conn.send_headers(sid, POST_HEAD)
                    for offset in range(0, 60_000, 15_000):
                        c.conn.send_data(sid, b"z" * 15_000, end_stream=offset == 45_000)
                    await c.flush()
                    head, _ = await c.response(sid)
                    assert head[b":status"] == b"200"


async def test_early_hints_pathsend_and_trailers_travel_over_http2(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"f" * 300_000)  # (past a stream's default window: flow control)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.early_hint", "links": [b"</s.css>; rel=preload"]})
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.pathsend", "path": str(path)})
        await send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")]})

    async with run_server(app) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            c = Client(stream)
            await c.flush()
            with trio.fail_after(5):
                head, body = await c.response(await c.request("/f"))
    hints = [e for e in c.events if isinstance(e, h2.events.InformationalResponseReceived)]
    trailers = [e for e in c.events if isinstance(e, h2.events.TrailersReceived)]
    assert dict(hints[0].headers or ())[b"link"] == b"</s.css>; rel=preload"
    assert head[b":status"] == b"200"
    assert body == path.read_bytes()
    assert dict(trailers[0].headers or ())[b"grpc-status"] == b"0"


def test_http_scope_names_http2_as_version_2() -> None:
    from trioserve.protocol.scope import ConnectionFacts, http_scope

    facts = ConnectionFacts(client=None, server=None)
    versions = [
        http_scope(b"GET", b"/", v, [], facts, None)["http_version"] for v in (b"2", b"1.1", b"1.0")
    ]
    assert versions == ["2", "1.1", "1.0"]


async def test_body_contradicting_its_content_length_is_refused_as_on_http1() -> None:
    # Before the head left: 500. After it (the first piece went out): the stream is reset,
    # never a body that does not match its Content-Length (RFC 9113 §8.1.1).
    async def app(scope: Any, receive: Any, send: Any) -> None:
        length = [(b"content-length", b"10")]
        await send({"type": "http.response.start", "status": 200, "headers": length})
        if scope["path"] == "/short":
            await send({"type": "http.response.body", "body": b"12345"})
        else:
            await send({"type": "http.response.body", "body": b"12345", "more_body": True})
            await send({"type": "http.response.body", "body": b"123456"})

    async with run_server(app) as server, client(server.port) as c:
        with trio.fail_after(5):
            head, _ = await c.response(await c.request("/short"))
            assert head[b":status"] == b"500"
            sid = await c.request("/long")
            with pytest.raises(AssertionError, match="INTERNAL_ERROR"):
                await c.response(sid)
            assert c.bodies.get(sid, b"") == b"12345"


async def test_framing_fields_in_trailers_are_refused_as_on_http1() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.body", "body": b"ok"})
        await send({"type": "http.response.trailers", "headers": [(b"content-length", b"2")]})

    async with run_server(app) as server, client(server.port) as c:
        with trio.fail_after(5):
            sid = await c.request("/")
            with pytest.raises(AssertionError, match="INTERNAL_ERROR"):
                await c.response(sid)
    trailers = [e for e in c.events if isinstance(e, h2.events.TrailersReceived)]
    assert trailers == []
