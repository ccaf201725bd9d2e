"""trioserve.testing: running(), RunningServer, the WebSocket client, in-memory mode and the
``trioserve_server`` pytest fixture (its teardown checked with pytester)."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import traceback
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import read_body
from wire import Client, read_until_eof

from trioserve import LifespanError
from trioserve.errors import AppLoadError
from trioserve.testing import (
    RunningServer,
    ServerFactory,
    Transport,
    WebSocketClosed,
    WebSocketRejected,
    running,
)

pytest_plugins = ["pytester"]

TRANSPORTS: list[Transport] = ["socket", "memory"]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class AppError(Exception):
    pass


async def app(scope: Any, receive: Any, send: Any) -> None:
    """HTTP: / (hello), /echo (request body), /boom (raises), /slow (waits for a gate);
    WebSocket: /ws echo ("close:<code>" closes, "boom" raises), /deny rejects;
    lifespan: counts startups in its state."""
    if scope["type"] == "lifespan":
        await receive()
        scope["state"]["started"] = True
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"]
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        if path == "/ws-boom":
            raise AppError("before accept")
        if path == "/deny":
            await send({"type": "websocket.close"})
            return
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text == "boom":
                raise AppError("from the websocket")
            if text is not None and text.startswith("close:"):
                await send({"type": "websocket.close", "code": int(text[6:]), "reason": "asked"})
                return
            if text is not None:
                await send({"type": "websocket.send", "text": f"echo: {text}"})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"][::-1]})
    if path == "/boom":
        raise AppError("from the endpoint")
    if path == "/partial":  # the head and a first chunk have left when it raises
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise AppError("mid-response")
    if path == "/headers":
        names = sorted(name.decode() for name, _ in scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": " ".join(names).encode()})
        return
    body = await read_body(receive)
    if path == "/slow":  # waits for the lifespan state's gate, if any, else forever
        gate = scope["state"].get("gate")
        await (gate.wait() if gate is not None else trio.sleep_forever())
    if path == "/client":
        body = repr(scope["client"]).encode()
    if path == "/state":
        body = repr(sorted(scope["state"])).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body or b"hello"})


# -- running() ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_running_serves_http_through_client(transport: Transport) -> None:
    async with running(app, transport=transport) as server, server.client() as client:
        response = await client.get("/")
        assert response.status_code == 200
        assert response.text == "hello"
        response = await client.post("/echo", content=b"payload" * 10000)
        assert response.content == b"payload" * 10000
        assert (await client.get("/state")).text == "['started']"
        async with client.stream("POST", "/echo", content=b"streamed") as streamed:
            assert [chunk async for chunk in streamed.aiter_bytes()] == [b"streamed"]


async def test_running_socket_urls_and_port() -> None:
    async with running(app) as server:
        assert isinstance(server, RunningServer)
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server.ws_url == f"ws://127.0.0.1:{server.port}"
        assert server.addresses == [("127.0.0.1", server.port)]
        async with httpx.AsyncClient() as client:  # the URL is a real one
            assert (await client.get(server.url + "/")).text == "hello"


async def test_memory_transport_opens_no_socket_and_keeps_scope_addresses() -> None:
    before = open_fds()
    async with running(app, transport="memory") as server:
        assert server.url == "http://testserver"
        assert server.ws_url == "ws://testserver"
        assert server.addresses == []
        with pytest.raises(AttributeError, match="in-memory"):
            _ = server.port
        async with server.client() as client:
            assert (await client.get("/client")).text == "('testclient', 50000)"
        async with server.websocket("/ws") as ws:
            await ws.send_text("x")
            assert await ws.receive_text() == "echo: x"
        assert open_fds() == before
    assert open_fds() == before


async def test_memory_and_socket_transports_put_the_same_bytes_on_the_wire() -> None:
    wire: dict[str, bytes] = {}
    for transport in TRANSPORTS:
        async with running(app, transport=transport, date_header=False) as server:
            stream = await server.open_stream()
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                wire[transport] = await read_until_eof(stream)
    assert wire["memory"] == wire["socket"]
    assert wire["memory"].startswith(b"HTTP/1.1 200 OK\r\n")
    assert wire["memory"].endswith(b"\r\n\r\nhello")


async def test_startup_failure_is_raised_on_entry_unwrapped() -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no config"})

    before = open_fds()
    with pytest.raises(LifespanError, match="no config"):
        async with running(failing):
            pytest.fail("the block must not run")
    assert open_fds() == before


async def test_port_in_use_is_raised_on_entry() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="cannot bind"):
            async with running(app, port=taken.getsockname()[1]):
                pytest.fail("the block must not run")


STRING_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"loaded from a string"})


def create_app():
    return app
"""


@pytest.fixture
def string_app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module in its own directory (found through ``app_dir``); its unique name."""
    name = f"string_app_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(STRING_APP)
    monkeypatch.setattr(sys, "path", list(sys.path))  # app_dir is added: undo it after
    return name


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("attr", "factory"), [("app", False), ("create_app", True)])
async def test_running_loads_an_import_string(
    string_app_module: str, tmp_path: Path, transport: Transport, attr: str, factory: bool
) -> None:
    async with (
        running(
            f"{string_app_module}:{attr}",
            transport=transport,
            app_dir=str(tmp_path),
            factory=factory,
        ) as server,
        server.client() as client,
    ):
        response = await client.get("/")
    assert (response.status_code, response.text) == (200, "loaded from a string")


async def test_running_refuses_an_import_string_that_does_not_load(tmp_path: Path) -> None:
    with pytest.raises(AppLoadError, match='Could not import module "no_such_module"'):
        async with running("no_such_module:app", app_dir=str(tmp_path)):
            pytest.fail("the block must not run")


@pytest.mark.parametrize("not_an_app", [42, None, b"main:app"])
async def test_running_refuses_a_non_callable_at_once(not_an_app: object) -> None:
    with pytest.raises(TypeError, match=r"ASGI app .* or its import string such as 'main:app'"):
        async with running(not_an_app):
            pytest.fail("the block must not run")


async def test_unknown_transport_is_rejected() -> None:
    with pytest.raises(ValueError, match="transport"):
        async with running(app, transport="carrier-pigeon"):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_block_exception_is_raised_as_is_and_server_stopped(transport: Transport) -> None:
    before = open_fds()
    with pytest.raises(KeyError):
        async with running(app, transport=transport) as server:
            client = server.client()  # left open: closed by running()
            assert (await client.get("/")).status_code == 200
            raise KeyError("test failure")
    assert client.is_closed
    assert open_fds() == before
    with pytest.raises(OSError):
        stream = await server.open_stream()
        await stream.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cancelling_the_block_stops_the_server_and_leaks_nothing(
    transport: Transport,
) -> None:
    before = open_fds()
    with trio.move_on_after(0.2) as scope:
        async with running(app, transport=transport) as server:
            stream = await server.open_stream()
            await stream.send_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert await read_until_eof(stream) == b""
    await stream.aclose()
    assert open_fds() == before


# -- app exceptions -------------------------------------------------------------------------


async def raw_get(server: RunningServer, target: str) -> bytes:
    """A request the testing clients did not make (no request id): raw bytes."""
    stream = await server.open_stream()
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
        return await read_until_eof(stream)


def app_frames(error: BaseException) -> list[str]:
    return [frame.f_code.co_name for frame, _ in traceback.walk_tb(error.__traceback__)]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("path", "message"),
    [("/boom", "from the endpoint"), ("/partial", "mid-response")],
    ids=["before-response-start", "after-response-start"],
)
async def test_app_exception_is_raised_at_the_client_call(
    transport: Transport, path: str, message: str
) -> None:
    async with running(app, transport=transport) as server, server.client() as client:
        with pytest.raises(AppError, match=message) as info:
            await client.get(path)
        # The app's own traceback is there, not a 500 or a ReadError.
        assert "app" in app_frames(info.value)
        assert server.app_exceptions == []  # raised once: not again at the block's end
        assert (await client.get("/")).text == "hello"  # the client still works


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_app_exception_is_raised_at_the_call_of_a_streamed_request(
    transport: Transport,
) -> None:
    async with running(app, transport=transport) as server, server.client() as client:
        with pytest.raises(AppError, match="mid-response"):
            async with client.stream("GET", "/partial") as response:
                await response.aread()


async def test_app_exception_keeps_its_own_context() -> None:
    async def chained(scope: Any, receive: Any, send: Any) -> None:
        try:
            scope["no such key"]
        except KeyError as exc:
            raise AppError("while handling") from exc

    async with running(chained, lifespan="off") as server, server.client() as client:
        with pytest.raises(AppError) as info:
            await client.get("/")
    assert isinstance(info.value.__cause__, KeyError)


async def test_app_does_not_see_the_request_id_header() -> None:
    async with running(app, transport="memory") as server, server.client() as client:
        assert (await client.get("/headers")).text == (
            "accept accept-encoding connection host user-agent"
        )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_websocket_app_exception_is_raised_at_receive(transport: Transport) -> None:
    async with running(app, transport=transport) as server:
        async with server.websocket("/ws") as ws:
            await ws.send_text("boom")
            with pytest.raises(AppError, match="from the websocket"):
                await ws.receive()
        with pytest.raises(AppError, match="before accept"):
            async with server.websocket("/ws-boom"):
                pytest.fail("the handshake failed")
        assert server.app_exceptions == []


async def test_websocket_app_exception_is_not_raised_with_raise_app_exceptions_false() -> None:
    async with (
        running(app, transport="memory", raise_app_exceptions=False) as server,
        server.websocket("/ws") as ws,
    ):
        await ws.send_text("boom")
        with pytest.raises(WebSocketClosed) as closed:
            await ws.receive()
        assert closed.value.code == 1011


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_lone_app_exception_of_a_raw_request_is_raised_bare_at_block_exit(
    transport: Transport,
) -> None:
    with pytest.raises(AppError, match="from the endpoint") as info:
        async with running(app, transport=transport) as server:
            assert (await raw_get(server, "/boom")).startswith(b"HTTP/1.1 500 ")
            assert len(server.app_exceptions) == 1
    assert "app" in app_frames(info.value)


async def test_several_app_exceptions_are_raised_in_a_group_at_block_exit() -> None:
    with pytest.RaisesGroup(
        pytest.RaisesExc(AppError, match="from the endpoint"),
        pytest.RaisesExc(AppError, match="mid-response"),
    ):
        async with running(app) as server:
            await raw_get(server, "/boom")
            await raw_get(server, "/partial")


async def test_block_failure_and_app_exceptions_are_raised_together() -> None:
    with pytest.RaisesGroup(AppError, AssertionError):
        async with running(app) as server:
            response = await raw_get(server, "/boom")
            assert response.startswith(b"HTTP/1.1 200 "), "the test's own failure"


async def test_uncaught_call_exception_leaves_the_block_once_and_bare() -> None:
    with pytest.raises(AppError, match="from the endpoint"):
        async with running(app) as server, server.client() as client:
            await client.get("/boom")


async def test_raise_app_exceptions_false_only_collects() -> None:
    async with running(app, raise_app_exceptions=False) as server, server.client() as client:
        assert (await client.get("/boom")).status_code == 500
    assert [type(exc) for exc in server.app_exceptions] == [AppError]


async def test_expected_app_exceptions_can_be_cleared() -> None:
    async with running(app) as server:
        assert (await raw_get(server, "/boom")).startswith(b"HTTP/1.1 500 ")
        [error] = server.app_exceptions
        assert str(error) == "from the endpoint"
        server.app_exceptions.clear()


async def test_client_disconnect_is_not_an_app_exception() -> None:
    async def endless(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:  # ClientDisconnected escapes once the client is gone
            await send({"type": "http.response.body", "body": b"x" * 1000, "more_body": True})
            await trio.sleep(0)

    async with running(endless, lifespan="off") as server:
        stream = await server.open_stream()
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await stream.receive_some(100)
        await stream.aclose()
        await trio.sleep(0.05)
        assert server.app_exceptions == []


# -- drain ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_drain_finishes_in_flight_requests_and_refuses_new_ones(transport: Transport) -> None:
    gate = trio.Event()

    async def lifespan_gate(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            scope["state"]["gate"] = gate
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await app(scope, receive, send)

    async with running(lifespan_gate, transport=transport) as server:
        stream = await server.open_stream()
        async with stream:
            client = Client(stream)
            await client.send_raw(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.drain)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(OSError):
                    refused = await server.open_stream()
                    await refused.aclose()
                gate.set()
                response, body = await client.read_response()
            assert response.status_code == 200
            assert body == b"hello"


async def test_drain_grace_bounds_in_flight_requests(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def forever(scope: Any, receive: Any, send: Any) -> None:
        await trio.sleep_forever()

    async with running(forever, lifespan="off", transport="memory") as server:
        stream = await server.open_stream()
        await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await server.drain(grace=2.5)
        assert trio.current_time() - start == pytest.approx(2.5)
        assert await read_until_eof(stream) == b""
        await stream.aclose()


# -- MockClock: server timeouts follow trio's clock -------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_keep_alive_timeout_follows_mock_clock(
    transport: Transport, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(app, transport=transport, timeout_keep_alive=8) as server:
        stream = await server.open_stream()
        async with stream:
            response, _ = await Client(stream).request()
            assert response.status_code == 200
            start = trio.current_time()
            assert await read_until_eof(stream) == b""
            assert trio.current_time() - start == pytest.approx(8)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_websocket_ping_timeout_follows_mock_clock(
    transport: Transport, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(
        app, transport=transport, ws_ping_interval=20.0, ws_ping_timeout=20.0
    ) as server:
        # A client that keeps receiving answers the pings: still open a minute later.
        async with server.websocket("/ws") as ws:
            with trio.move_on_after(60):
                await ws.receive()
            await ws.send_text("still there")
            assert await ws.receive_text() == "echo: still there"
        # A client that never reads does not: the server drops it after interval + timeout.
        async with server.websocket("/ws") as ws:
            await trio.sleep(100)  # virtual seconds: more than interval + timeout
            with pytest.raises(WebSocketClosed) as closed:
                while True:
                    await ws.receive()
            assert closed.value.code == 1011


# -- the WebSocket client --------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_websocket_text_bytes_and_close_codes(transport: Transport) -> None:
    async with running(app, transport=transport) as server:
        async with server.websocket("/ws") as ws:
            await ws.send_text("hi")
            assert await ws.receive_text() == "echo: hi"
            await ws.send_bytes(b"\x00\x01\x02")
            assert await ws.receive_bytes() == b"\x02\x01\x00"
            await ws.send("again")
            assert await ws.receive() == "echo: again"
            await ws.send_text("close:4321")
            with pytest.raises(WebSocketClosed) as closed:
                await ws.receive()
            assert (closed.value.code, closed.value.reason) == (4321, "asked")
            assert ws.close_code == 4321
            with pytest.raises(WebSocketClosed):
                await ws.send_text("too late")
        async with server.websocket("/ws") as ws:
            await ws.close(code=1001)
            assert ws.close_code == 1001  # the server echoed our code
            await ws.close()  # idempotent


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_websocket_rejection_raises_with_status(transport: Transport) -> None:
    async with running(app, transport=transport) as server:
        with pytest.raises(WebSocketRejected) as info:
            async with server.websocket("/deny"):
                pytest.fail("the handshake was rejected")
    assert info.value.status_code == 403


async def test_websocket_receive_type_checks() -> None:
    async with running(app, transport="memory") as server, server.websocket("/ws") as ws:
        await ws.send_text("x")
        with pytest.raises(TypeError, match="binary"):
            await ws.receive_bytes()
        await ws.send_bytes(b"x")
        with pytest.raises(TypeError, match="text"):
            await ws.receive_text()


async def test_websocket_client_sends_subprotocols_and_headers() -> None:
    seen: dict[str, Any] = {}

    async def ws_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        seen["subprotocols"] = scope["subprotocols"]
        seen["headers"] = dict(scope["headers"])
        seen["path"] = scope["path"]
        seen["query"] = scope["query_string"]
        await receive()
        await send({"type": "websocket.accept", "subprotocol": "b"})
        await receive()

    async with (
        running(ws_app, lifespan="off") as server,
        server.websocket("/p?q=1", subprotocols=["a", "b"], headers=[("x-token", "t")]) as ws,
    ):
        assert ws.subprotocol == "b"
    assert seen["subprotocols"] == ["a", "b"]
    assert seen["headers"][b"x-token"] == b"t"
    assert seen["headers"][b"host"] == f"127.0.0.1:{server.port}".encode()
    assert (seen["path"], seen["query"]) == ("/p", b"q=1")


# -- isolation and the fixture ----------------------------------------------------------------


async def test_two_servers_in_one_test_are_isolated() -> None:
    async def named(name: str) -> Any:
        async def named_app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await receive()
                scope["state"]["name"] = name
                await send({"type": "lifespan.startup.complete"})
                await receive()
                await send({"type": "lifespan.shutdown.complete"})
                return
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": scope["state"]["name"].encode()})

        return named_app

    async with running(await named("a")) as a, running(await named("b")) as b:
        assert a.port != b.port
        async with a.client() as ca, b.client() as cb:
            assert (await ca.get("/")).text == "a"
            assert (await cb.get("/")).text == "b"


async def test_fixture_starts_several_servers(trioserve_server: ServerFactory) -> None:
    one = await trioserve_server(app)
    two = await trioserve_server(app, transport="memory")
    assert one.port
    async with one.client() as c1, two.client() as c2:
        assert (await c1.get("/")).text == "hello"
        assert (await c2.get("/")).text == "hello"


async def test_fixture_startup_failure_raises_in_the_test(
    trioserve_server: ServerFactory,
) -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "nope"})

    with pytest.raises(LifespanError):
        await trioserve_server(failing)
    assert (await (await trioserve_server(app)).client().get("/")).text == "hello"


async def test_fixture_app_exceptions_can_be_turned_off(trioserve_server: ServerFactory) -> None:
    server = await trioserve_server(app, raise_app_exceptions=False)
    async with server.client() as client:
        assert (await client.get("/boom")).status_code == 500


# -- the fixture's teardown, in a separate pytest run (pytester) -------------------------------

INNER_APP = """
import pathlib
import pytest
import trio

EVENTS = pathlib.Path("events.txt")


def record(event):
    with EVENTS.open("a") as f:
        f.write(event + "\\n")


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        record("startup")
        await send({"type": "lifespan.startup.complete"})
        await receive()
        record("shutdown")
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await receive()
        return
    if scope["path"] == "/boom":
        raise ValueError("raised by the endpoint")
    if scope["path"] == "/slow":
        await trio.sleep_forever()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


async def start(trioserve_server):
    server = await trioserve_server(app)
    pathlib.Path("port.txt").write_text(str(server.port))
    async with server.client() as client:
        assert (await client.get("/")).text == "hello"
    return server
"""


def assert_torn_down(pytester: pytest.Pytester) -> None:
    events = (pytester.path / "events.txt").read_text().split()
    assert events == ["startup", "shutdown"]
    port = int((pytester.path / "port.txt").read_text())
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


FAILING_TESTS = {
    "assertion": """
        async def test_inner(trioserve_server):
            await start(trioserve_server)
            assert False, "the test fails"
    """,
    "fail_after": """
        async def test_inner(trioserve_server, autojump_clock):
            await start(trioserve_server)
            with trio.fail_after(5):
                await trio.sleep_forever()
    """,
    "cancelled_by_crashing_fixture": """
        @pytest.fixture
        async def crasher(nursery):
            crash_now = trio.Event()
            async def crash():
                await crash_now.wait()
                raise RuntimeError("background task crashed")
            nursery.start_soon(crash)
            return crash_now

        async def test_inner(trioserve_server, crasher):
            await start(trioserve_server)
            crasher.set()  # pytest-trio now cancels this test
            await trio.sleep_forever()
    """,
    "app_exception": """
        async def test_inner(trioserve_server):
            server = await start(trioserve_server)
            async with server.client() as client:
                assert (await client.get("/boom")).status_code == 500
    """,
}


@pytest.mark.parametrize("case", FAILING_TESTS)
def test_fixture_tears_down_when_the_test_fails(pytester: pytest.Pytester, case: str) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_inner=INNER_APP + textwrap.dedent(FAILING_TESTS[case]))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert_torn_down(pytester)
    if case == "app_exception":
        # The app's own traceback fails the test, not a bare 500.
        result.stdout.fnmatch_lines(
            [
                '*raise ValueError("raised by the endpoint")*',
                "*ValueError: raised by the endpoint*",
            ]
        )


@pytest.mark.parametrize("waiting_in", ["sleep", "request"])
def test_fixture_tears_down_on_pytest_timeout(pytester: pytest.Pytester, waiting_in: str) -> None:
    """The timeout's report stands alone: a request still waiting is cancelled with the
    test before the servers (and the clients' sockets) close, so no httpx.ReadError."""
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    wait = {
        "sleep": "await trio.sleep_forever()",
        "request": "await server.client().get('/slow')",
    }[waiting_in]
    pytester.makepyfile(
        test_inner=INNER_APP
        + textwrap.dedent(f"""
        @pytest.mark.timeout(1)
        async def test_inner(trioserve_server):
            server = await start(trioserve_server)
            {wait}
    """)
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    # The fixture noticed the coming pytest-timeout, cancelled the test and tore down.
    result.stdout.fnmatch_lines(["*PytestTimeoutNear: the test is about to exceed*1s*"])
    result.stdout.no_fnmatch_line("*Timeout (>1.0s) from pytest-timeout*")
    result.stdout.no_fnmatch_line("*ReadError*")
    result.stdout.no_fnmatch_line("*another task closed this fd*")
    result.stdout.no_fnmatch_line("*Cancelled*")
    assert_torn_down(pytester)


def test_fixture_with_trio_mark_and_passing_test(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\n")  # no trio_mode: the trio mark instead
    pytester.makepyfile(
        test_inner=INNER_APP
        + textwrap.dedent("""
        @pytest.mark.trio
        async def test_inner(trioserve_server):
            await start(trioserve_server)
    """)
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert_torn_down(pytester)


@pytest.mark.parametrize("fails", [False, True], ids=["passes", "fails"])
def test_fixture_works_from_anyio_tests(pytester: pytest.Pytester, fails: bool) -> None:
    pytester.makeini("[pytest]\n")  # an anyio project: no trio_mode
    pytester.makepyfile(
        test_inner=INNER_APP
        + textwrap.dedent(f"""
        @pytest.fixture
        def anyio_backend():
            return "trio"

        @pytest.mark.anyio
        async def test_inner(trioserve_server):
            server = await start(trioserve_server)
            async with server.websocket("/") as ws:
                pass
            assert not {fails}
    """)
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    if fails:
        result.assert_outcomes(failed=1)
    else:
        result.assert_outcomes(passed=1)
    assert_torn_down(pytester)


def test_pytest_plugin_is_registered_by_entry_point(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--fixtures", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*trioserve_server*"])


def test_inner_app_module_is_valid_python() -> None:
    compile(INNER_APP, "inner", "exec")
    assert Path(__file__).name == "test_testing.py"


XDIST_TESTS = """
import os
import pathlib

import pytest
import trio


def record(line):
    with pathlib.Path("events.txt").open("a") as f:
        f.write(line + "\\n")


def make_app(name):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await receive()
            record(f"startup {name} {os.getpid()}")
            await send({"type": "lifespan.startup.complete"})
            await receive()
            record(f"shutdown {name} {os.getpid()}")
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = name.encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
    return app


@pytest.mark.parametrize("n", range(6))
async def test_parallel(trioserve_server, n):
    a = await trioserve_server(make_app(f"a{n}"))
    b = await trioserve_server(make_app(f"b{n}"))
    assert a.port != b.port
    async with a.client() as ca, b.client() as cb:
        for _ in range(5):
            assert (await ca.get("/")).text == f"a{n}"
            assert (await cb.get("/")).text == f"b{n}"
            await trio.sleep(0.01)  # overlap with the other worker's servers
"""


def test_fixture_servers_are_isolated_under_pytest_xdist(pytester: pytest.Pytester) -> None:
    """``pytest -n 2``: every test gets its own servers (free ports, own lifespan), and
    each server's lifespan ends before its test ends, in whichever worker runs it."""
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_inner=XDIST_TESTS)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=6)
    lines = (pytester.path / "events.txt").read_text().split("\n")
    events = [line.split() for line in lines if line]
    names = [f"{s}{n}" for n in range(6) for s in "ab"]
    assert sorted(name for kind, name, _ in events if kind == "startup") == sorted(names)
    assert sorted(name for kind, name, _ in events if kind == "shutdown") == sorted(names)
    assert len({pid for _, _, pid in events}) == 2  # really run by two workers
