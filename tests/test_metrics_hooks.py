"""What the connection code counts for ``/metrics`` (issue 20), in process: each counter
checked against what went over real sockets (``Server.metrics``; the Prometheus side is
``test_metrics.py``)."""

from __future__ import annotations

import ssl
from typing import Any

import h2.connection
import pytest
import trio
import trio.testing
import trustme
from conftest import Recorder, run_server
from test_http2 import Client as H2Client
from test_http2_serving import curl
from wire import Client, connect, parse_responses, read_until_eof, receive_until

from trioserve import Server
from trioserve.connection import request_cycle as request_cycle_module
from trioserve.connection import state as state_module
from trioserve.metrics import Sample

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
CLOSE = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def sample(server: Server) -> Sample:
    assert server.metrics is not None
    return server.metrics.sample()


async def settled(server: Server, **expected: float) -> Sample:
    """The server's sample once it shows ``expected`` (a connection is closed, an app call
    ends, a few scheduler turns after the client has seen the last bytes)."""
    with trio.fail_after(5):
        while True:
            now = sample(server)
            if all(now.get(key) == value for key, value in expected.items()):
                return now
            await trio.sleep(0.01)


async def exchange(server: Server, data: bytes) -> bytes:
    """Send ``data`` on a new connection; everything the server sends until it closes."""
    stream = await connect(server.addresses[0])
    async with stream:
        await stream.send_all(data)
        return await read_until_eof(stream)


async def waiting_hello(scope: Any, receive: Any, send: Any) -> None:
    """Answers after a wait: the connection moves to a new task for every request."""
    await trio.sleep(0)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hi"})


@pytest.mark.usefixtures("both_parsers")
async def test_bytes_and_keepalive_reuses_are_those_on_the_wire() -> None:
    pipelined = (
        GET
        + GET
        + b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
    async with run_server(Recorder(), metrics=True) as server:
        answered = await exchange(server, pipelined)
        now = await settled(server, connections_open=0)
    assert [r.status_code for r, _ in parse_responses(answered)] == [200, 200, 200]
    assert now["received_bytes"] == len(pipelined)
    assert now["sent_bytes"] == len(answered)
    assert now["connections"] == 1
    assert now["keepalive_reuses"] == 2
    assert now["requests|GET|2xx|1.1"] == 2
    assert now["requests|POST|2xx|1.1"] == 1
    assert now["request_duration_seconds|bucket|+Inf"] == 3
    assert now["requests_in_flight"] == 0


@pytest.mark.usefixtures("both_parsers")
async def test_keepalive_reuses_are_counted_when_the_app_waits() -> None:
    # Each request's wait hands the connection to a new task (connection.http1): the
    # first request it reads there reuses the connection too.
    async with run_server(waiting_hello, metrics=True) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            client = Client(stream)
            seen = []
            for _ in range(3):
                response, _ = await client.request()
                assert response.status_code == 200
                seen.append(sample(server)["keepalive_reuses"])
        now = await settled(server, connections_open=0)
    assert seen == sorted(seen)  # (derived at scrape time: never goes down)
    assert now["keepalive_reuses"] == 2
    assert now["requests|GET|2xx|1.1"] == 3


@pytest.mark.usefixtures("both_parsers")
async def test_a_refused_request_on_a_used_connection_is_a_keepalive_reuse() -> None:
    release = trio.Event()
    blocked = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/block":
            blocked.set()
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async with run_server(app, metrics=True, limit_concurrency=1) as server:
        used = await connect(server.addresses[0])
        holder = await connect(server.addresses[0])
        async with used, holder:
            client = Client(used)
            assert (await client.request())[0].status_code == 200
            await holder.send_all(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
            await blocked.wait()
            await used.send_all(GET)  # its second request: refused, but a reuse
            assert (await read_until_eof(used)).startswith(b"HTTP/1.1 503 ")
            assert (await exchange(server, GET)).startswith(b"HTTP/1.1 503 ")  # a first one
            release.set()
            assert b"ok" in await receive_until(holder, b"ok")
        now = await settled(server, connections_open=0, requests_in_flight=0)
    assert now["concurrency_rejections"] == 2
    assert now["requests|GET|2xx|1.1"] == 2
    assert now["keepalive_reuses"] == 1


@pytest.mark.parametrize(
    ("options", "duration"),
    [
        ({}, 0.3),  # HTTP/1.1: from the clock read for its Date header
        ({"date_header": False}, 0.0),  # no Date header: read by the request cycle
    ],
)
async def test_a_request_is_timed_from_the_clock_its_date_header_read(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], duration: float
) -> None:
    # The Date header's clock reads 1000.0 and the request cycle's 1000.3: an HTTP/1.1
    # request's start is the read made for its Date header, not a second one.
    monkeypatch.setattr(state_module, "time", lambda: 1000.0)
    monkeypatch.setattr(request_cycle_module, "time", lambda: 1000.3)
    async with run_server(Recorder(), metrics=True, **options) as server:
        assert (await exchange(server, CLOSE)).startswith(b"HTTP/1.1 200 ")
        now = await settled(server, connections_open=0)
    assert now["request_duration_seconds|sum"] == pytest.approx(duration)
    fast = now["request_duration_seconds|bucket|0.005"]
    assert (fast, now["request_duration_seconds|bucket|0.5"]) == ((0, 1) if duration else (1, 1))


async def test_a_clock_stepped_back_during_a_request_counts_no_negative_duration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (Timed by the wall clock, as the Date header: a step back of 1 s mid-request.)
    monkeypatch.setattr(state_module, "time", lambda: 1000.0)
    monkeypatch.setattr(request_cycle_module, "time", lambda: 999.0)
    async with run_server(Recorder(), metrics=True) as server:
        assert (await exchange(server, CLOSE)).startswith(b"HTTP/1.1 200 ")
        now = await settled(server, connections_open=0)
    assert now["request_duration_seconds|sum"] == 0.0
    assert now["request_duration_seconds|bucket|0.005"] == 1


async def test_an_http2_request_is_timed_by_the_request_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (HTTP/2 reads the Date header's clock when the head is sent, not before the cycle.)
    monkeypatch.setattr(state_module, "time", lambda: 1000.0)
    monkeypatch.setattr(request_cycle_module, "time", lambda: 1000.3)
    async with run_server(Recorder(), metrics=True) as server:
        url = f"http://127.0.0.1:{server.port}/two"
        assert await curl("--http2-prior-knowledge", url) == (0, b"GET /two ")
        now = await settled(server, connections_open=0)
    assert now["request_duration_seconds|sum"] == 0.0
    assert now["request_duration_seconds|bucket|0.005"] == 1


@pytest.mark.parametrize(
    ("status", "bucket"),
    [(204, "2xx"), (499, "none"), (799, "none")],  # (an app may send 200-999)
)
async def test_statuses_are_counted_by_class(status: int, bucket: str) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with run_server(app, metrics=True) as server:
        for _ in range(2):  # (the second time the label set is known)
            assert (await exchange(server, CLOSE)).startswith(b"HTTP/1.1 %d " % status)
        now = await settled(server, connections_open=0)
    assert now[f"requests|GET|{bucket}|1.1"] == 2


async def test_in_flight_gauges_and_concurrency_rejections() -> None:
    release = trio.Event()
    http_called = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            await release.wait()  # then closed with 1000
        elif scope["type"] == "http":
            http_called.set()
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"late"})

    async with run_server(app, metrics=True, limit_concurrency=2) as server:
        http = await connect(server.addresses[0])
        ws = await connect(server.addresses[0])
        async with http, ws:
            await http.send_all(GET)
            await ws.send_all(UPGRADE)
            assert (await receive_until(ws, b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
            await http_called.wait()
            assert (await exchange(server, GET)).startswith(b"HTTP/1.1 503 ")  # 2 calls run
            held = await settled(server, connections_open=2)
            release.set()
            assert b"late" in await receive_until(http, b"late")
        done = await settled(server, connections_open=0, websockets_in_flight=0)
    assert held["requests_in_flight"] == 1
    assert held["websockets_in_flight"] == 1
    assert held["websocket_sessions"] == 1
    assert held["concurrency_rejections"] == 1
    assert held["connections"] == 3
    assert done["requests_in_flight"] == 0
    assert done["websocket_sessions"] == 1
    assert done["requests|GET|2xx|1.1"] == 1  # (not the 503: it never reached the app)
    assert done["keepalive_reuses"] == 0  # (three connections, one request each)


@pytest.mark.usefixtures("both_parsers")
async def test_protocol_errors_are_counted_by_status() -> None:
    chunked_too_long = (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n"
        + b"x" * 20
        + b"\r\n0\r\n\r\n"
    )
    cases = [
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", 413),
        (chunked_too_long, 413),  # found while the app reads the body
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 8000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (UPGRADE.replace(b"Sec-WebSocket-Key", b"X-Not-The-Key"), 400),  # bad upgrade
    ]
    options = {"limit_request_body": 10, "h11_max_incomplete_event_size": 4096}
    async with run_server(Recorder(), metrics=True, **options) as server:
        for data, status in cases:
            answer = await exchange(server, data)
            assert answer.startswith(b"HTTP/1.1 %d " % status), (data[:60], answer[:60])
        now = await settled(server, connections_open=0)
    errors = {key: value for key, value in now.items() if key.startswith("protocol_errors|")}
    assert errors == {
        "protocol_errors|413": 2,
        "protocol_errors|501": 1,
        "protocol_errors|431": 1,
        "protocol_errors|400": 2,
    }
    assert now["requests|POST|4xx|1.1"] == 1  # the chunked one reached the app


async def test_a_request_the_client_left_is_counted_with_no_status() -> None:
    app = Recorder()  # returns without a response when told http.disconnect
    async with run_server(app, metrics=True) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            await stream.send_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            await stream.send_eof()  # gone before the rest of the body
            assert await read_until_eof(stream) == b""
        now = await settled(server, connections_open=0, requests_in_flight=0)
    assert app.requests[0]["disconnect"]
    assert now["requests|POST|none|1.1"] == 1
    assert not any(key.startswith("requests|POST|4xx") for key in now)  # (logged as 499)


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("metrics-pki")
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(root / "cert.pem")
    cert.private_key_pem.write_to_path(root / "key.pem")
    return {"ssl_certfile": str(root / "cert.pem"), "ssl_keyfile": str(root / "key.pem")}


async def test_tls_handshake_failures_are_counted_and_bytes_are_the_plaintext(
    ca: trustme.CA, tls_files: dict[str, str]
) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n12345"
    async with run_server(Recorder(), metrics=True, **tls_files) as server:
        assert (await exchange(server, GET)) == b""  # plain HTTP to the TLS port
        tcp = await connect(server.addresses[0])
        stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1", https_compatible=True)
        async with stream:
            await stream.send_all(request)
            answer = await read_until_eof(stream)
        now = await settled(server, connections_open=0)
    [(response, body)] = parse_responses(answer)
    assert (response.status_code, body) == (200, b"POST / 12345")
    assert now["tls_handshake_failures"] == 1
    assert now["connections"] == 2
    assert now["requests|POST|2xx|1.1"] == 1
    # What HTTP read and wrote, not the TLS records.
    assert (now["received_bytes"], now["sent_bytes"]) == (len(request), len(answer))


async def test_a_connection_in_its_tls_handshake_is_open_until_it_times_out(
    autojump_clock: trio.testing.MockClock, tls_files: dict[str, str]
) -> None:
    async with run_server(
        Recorder(), metrics=True, timeout_request_header=4.0, **tls_files
    ) as server:
        tcp = await connect(server.addresses[0])  # and silent
        async with tcp:
            during = await settled(server, connections=1)
            assert await read_until_eof(tcp) == b""
        after = await settled(server, connections_open=0)
    assert during["connections_open"] == 1  # not one of the live HTTP connections yet
    assert during["tls_handshake_failures"] == 0
    assert after["tls_handshake_failures"] == 1


async def test_http2_requests_are_counted_by_the_same_request_cycle() -> None:
    async with run_server(Recorder(), metrics=True) as server:
        url = f"http://127.0.0.1:{server.port}/two"
        for _ in range(2):
            assert await curl("--http2-prior-knowledge", url) == (0, b"GET /two ")
        now = await settled(server, connections_open=0)
    assert now["requests|GET|2xx|2"] == 2
    assert now["requests_in_flight"] == 0
    assert now["connections"] == 2


class Tally(trio.abc.HalfCloseableStream):
    """A client's socket stream that counts the bytes it sends and receives."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sent = 0
        self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)
        self.sent += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_http2_bytes_are_those_on_the_wire() -> None:
    # connection.http2 frames the raw stream, not a ConnectionStream: it counts its own
    # reads and writes, and the preface connection.edge read for it.
    async with run_server(Recorder(), metrics=True) as server:
        tally = Tally(await connect(server.addresses[0]))
        async with tally:
            client = H2Client(tally)  # type: ignore[arg-type]
            await client.flush()
            for _ in range(2):
                head, body = await client.response(await client.request("/two"))
                assert (head[b":status"], body) == (b"200", b"GET /two ")
            await tally.send_eof()  # (the server reads EOF: nothing more to send)
            await read_until_eof(tally)
        now = await settled(server, connections_open=0)
    assert now["requests|GET|2xx|2"] == 2
    assert now["keepalive_reuses"] == 0  # (streams of one connection: not keep-alive)
    assert tally.sent > 24 and tally.received > 0  # (the preface alone is 24 bytes)
    assert (now["received_bytes"], now["sent_bytes"]) == (tally.sent, tally.received)


@pytest.mark.usefixtures("both_parsers")
async def test_h2c_upgrade_bytes_are_counted_once() -> None:
    # The upgrade request and the preface sent with it are read by the HTTP/1.1 stream,
    # which counts them; the HTTP/2 connection counts only what it reads itself.
    async with run_server(Recorder(), metrics=True) as server:
        tally = Tally(await connect(server.addresses[0]))
        async with tally:
            client = H2Client(tally)  # type: ignore[arg-type]
            client.conn = h2.connection.H2Connection(client.conn.config)
            settings = client.conn.initiate_upgrade_connection()
            await tally.send_all(
                b"GET /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n"
                + client.conn.data_to_send()  # (the preface at once: RFC 7540 §3.5)
            )  # fmt: skip
            switching = b""
            while not switching.endswith(b"\r\n\r\n"):  # (the 101 alone: then h2 frames)
                switching += await tally.receive_some(1)
            assert switching.startswith(b"HTTP/1.1 101 ")
            head, body = await client.response(1)
            assert (head[b":status"], body) == (b"200", b"GET /up ")
            head, body = await client.response(await client.request("/two"))
            assert (head[b":status"], body) == (b"200", b"GET /two ")
            await tally.send_eof()
            await read_until_eof(tally)
        now = await settled(server, connections_open=0)
    assert now["requests|GET|2xx|2"] == 2
    # The upgrade is the connection's first request; its streams are not keep-alive reuses.
    assert now["keepalive_reuses"] == 0
    assert (now["received_bytes"], now["sent_bytes"]) == (tally.sent, tally.received)
