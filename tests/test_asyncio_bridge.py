"""--app-loop asyncio: asyncio-bound apps on the trio server through trio-asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import sniffio
import trio
import trio.testing
import trio_asyncio
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from wire import Client, connect, header, read_until_eof

from trioserve import Config, Server, serve
from trioserve.app.asyncio_bridge import AsyncioApp, open_app_loop
from trioserve.app.call import needs_asyncio
from trioserve.errors import AppProtocolError, LifespanError
from trioserve.testing import WebSocketClosed, running

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

# -- the asyncio-bound FastAPI app ----------------------------------------------------------


async def echo_handler(stream: trio.SocketStream) -> None:
    """A trio echo server: what an asyncio client library would talk to."""
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            async for data in stream:
                await stream.send_all(data)


@contextlib.asynccontextmanager
async def open_echo_server() -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, echo_handler, 0, host="127.0.0.1"))
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


def make_asyncio_app(
    echo_port: int = 0,
    ws_events: list[str] | None = None,
    ws_done: trio.Event | None = None,
) -> FastAPI:
    """A FastAPI app that only works on an asyncio event loop."""
    ws_events = [] if ws_events is None else ws_events
    ws_done = trio.Event() if ws_done is None else ws_done

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # asyncio objects made at startup and used by every request: they must all live
        # on the one loop the server keeps open.
        queue: asyncio.Queue[int] = asyncio.Queue(maxsize=1)
        counter = asyncio.create_task(count_forever(queue))
        yield {"queue": queue, "startup_loop": asyncio.get_running_loop()}
        counter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await counter

    async def count_forever(queue: asyncio.Queue[int]) -> None:
        n = 0
        while True:
            n += 1
            await queue.put(n)

    app = FastAPI(lifespan=lifespan)

    @app.get("/info")
    async def info(request: Request) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return {
            "library": sniffio.current_async_library(),
            "loop": type(loop).__name__,
            "same_loop_as_startup": loop is request.state.startup_loop,
            "in_task": asyncio.current_task() is not None,
        }

    @app.get("/work")
    async def work(request: Request) -> dict[str, Any]:
        await asyncio.sleep(0.001)
        local: asyncio.Queue[str] = asyncio.Queue()
        await local.put("queued")
        from_startup = await request.state.queue.get()
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", echo_port)
            try:
                writer.write(b"ping over asyncio")
                await writer.drain()
                echoed = await reader.readexactly(len(b"ping over asyncio"))
            finally:
                writer.close()
                await writer.wait_closed()
        timed_out = False
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(10)
        except TimeoutError:
            timed_out = True
        return {
            "queue": await local.get(),
            "from_startup": from_startup > 0,
            "echo": echoed.decode(),
            "timed_out": timed_out,
        }

    @app.get("/sync")
    def sync_endpoint() -> dict[str, str]:
        # FastAPI runs `def` endpoints in anyio's thread pool, on its asyncio backend.
        return {"thread": "ok"}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        # Messages go through an asyncio.Queue to an asyncio task that echoes them back.
        await websocket.accept()
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        async def echo() -> None:
            while (text := await queue.get()) is not None:
                async with asyncio.timeout(5):
                    await asyncio.sleep(0.001)
                await websocket.send_text(f"{sniffio.current_async_library()}: {text}")

        task = asyncio.create_task(echo())
        try:
            while True:
                text = await websocket.receive_text()
                if text == "fail":
                    raise ValueError("boom in websocket")
                await queue.put(text)
        except WebSocketDisconnect:
            await queue.put(None)
            await task
            ws_events.append("disconnected")
            ws_done.set()

    @app.get("/fail")
    async def fail() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom on asyncio")

    return app


async def get_json(client: Client, target: str) -> tuple[int, Any]:
    response, body = await client.request("GET", target)
    return response.status_code, json.loads(body) if body.startswith(b"{") else body


# -- HTTP ------------------------------------------------------------------------------------


async def test_fastapi_app_runs_on_asyncio_loop_over_http() -> None:
    with trio.fail_after(20):
        async with (
            open_echo_server() as echo_port,
            running(make_asyncio_app(echo_port), app_loop="asyncio") as server,
        ):
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                client = Client(stream)
                assert await get_json(client, "/info") == (
                    200,
                    {
                        "library": "asyncio",
                        "loop": "TrioEventLoop",
                        "same_loop_as_startup": True,
                        "in_task": True,
                    },
                )
                # Twice on one keep-alive connection: each call is its own asyncio task.
                for _ in range(2):
                    assert await get_json(client, "/work") == (
                        200,
                        {
                            "queue": "queued",
                            "from_startup": True,
                            "echo": "ping over asyncio",
                            "timed_out": True,
                        },
                    )
                assert await get_json(client, "/sync") == (200, {"thread": "ok"})


async def test_same_app_on_trio_loop_fails_with_a_hint(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "trioserve")
    with trio.fail_after(10):
        async with running(
            make_asyncio_app(), app_loop="trio", lifespan="off", raise_app_exceptions=False
        ) as server:
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                status, _ = await get_json(Client(stream), "/work")
    assert status == 500
    hints = [r for r in caplog.records if "--app-loop asyncio" in r.getMessage()]
    assert len(hints) == 1
    assert hints[0].levelno == logging.WARNING
    assert "no running event loop" in hints[0].getMessage()
    assert "\n" not in hints[0].getMessage()


async def test_asyncio_lifespan_failure_under_trio_loop_is_hinted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """lifespan=auto would call this "lifespan unsupported"; the hint names the cause."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            asyncio.get_running_loop()  # e.g. creating an asyncpg pool
        else:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    caplog.set_level(logging.INFO, "trioserve")
    with trio.fail_after(10):
        async with running(app, lifespan="auto"):
            pass
    assert any("--app-loop asyncio" in r.getMessage() for r in caplog.records)


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


def _cyclic() -> BaseException:
    first, second = ValueError("a"), ValueError("b")
    first.__context__, second.__context__ = second, first
    return first


@pytest.mark.parametrize(
    ("exc", "found"),
    [
        pytest.param(RuntimeError("no running event loop"), True, id="get_running_loop"),
        pytest.param(
            sniffio.AsyncLibraryNotFoundError("unknown async library"), True, id="sniffio"
        ),
        pytest.param(
            RuntimeError("<Queue> is bound to a different event loop"), True, id="loop-bound"
        ),
        pytest.param(
            TypeError("trio.run received unrecognized yield message <Future>."),
            True,
            id="awaited-future",
        ),
        pytest.param(
            _chained(KeyError("x"), RuntimeError("no running event loop")), True, id="as-cause"
        ),
        pytest.param(
            ExceptionGroup("g", [ValueError(), RuntimeError("no running event loop")]),
            True,
            id="in-group",
        ),
        pytest.param(ValueError("no running event loop"), False, id="other-type"),
        pytest.param(RuntimeError("boom"), False, id="other-message"),
        pytest.param(_cyclic(), False, id="cyclic-context"),
    ],
)
def test_needs_asyncio_recognizes_asyncio_failures(exc: BaseException, found: bool) -> None:
    assert (needs_asyncio(exc) is not None) is found


async def test_unrelated_app_error_gets_no_hint(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "trioserve")
    with trio.fail_after(10):
        async with running(
            make_asyncio_app(), app_loop="asyncio", raise_app_exceptions=False
        ) as server:
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                client = Client(stream)
                response, _ = await client.request("GET", "/fail")
                assert response.status_code == 500
                # The server goes on serving after an asyncio-side exception.
                status, body = await get_json(client, "/info")
                assert status == 200
                assert body["library"] == "asyncio"
    # The app's own exception object reaches the server, as on trio.
    assert [type(e) for e in server.app_exceptions] == [ValueError]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], ValueError)
    assert not any("--app-loop" in r.getMessage() for r in caplog.records)


async def test_app_cancelling_its_own_task_is_an_app_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncio.CancelledError is a BaseException: it must not escape into the server."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(1)

    caplog.set_level(logging.ERROR, "trioserve")
    with trio.fail_after(10):
        async with running(
            app, app_loop="asyncio", lifespan="off", raise_app_exceptions=False
        ) as server:
            for _ in range(2):
                stream = await connect(("127.0.0.1", server.port))
                async with stream:
                    response, _ = await Client(stream).request("GET", "/")
                    assert response.status_code == 500
    assert sum(r.getMessage() == "Exception in ASGI application" for r in caplog.records) == 2


# -- WebSocket -------------------------------------------------------------------------------


async def test_fastapi_websocket_on_asyncio_loop() -> None:
    events: list[str] = []
    done = trio.Event()
    with trio.fail_after(10):
        async with running(
            make_asyncio_app(ws_events=events, ws_done=done), app_loop="asyncio"
        ) as server:
            async with server.websocket("/ws") as ws:
                for text in ("one", "two"):
                    await ws.send_text(text)
                    assert await ws.receive_text() == f"asyncio: {text}"
            # The client's close reaches the app as WebSocketDisconnect, in asyncio.
            await done.wait()
    assert events == ["disconnected"]


async def test_asyncio_exception_in_websocket_closes_1011() -> None:
    with trio.fail_after(10):
        async with (
            running(make_asyncio_app(), app_loop="asyncio", raise_app_exceptions=False) as server,
            server.websocket("/ws") as ws,
        ):
            await ws.send_text("fail")
            with pytest.raises(WebSocketClosed) as closed:
                await ws.receive()
            assert closed.value.code == 1011
    assert [type(e) for e in server.app_exceptions] == [ValueError]


# -- cancellation across the bridge ------------------------------------------------------------


async def test_client_disconnect_reaches_the_asyncio_task() -> None:
    """http.disconnect crosses trio → asyncio; the app's cancellation stays in asyncio."""
    events: list[str] = []
    work_cancelled = trio.Event()

    async def long_work() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append("work cancelled")
            work_cancelled.set()
            raise

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        assert (await receive())["type"] == "http.request"
        work = asyncio.create_task(long_work())
        listener = asyncio.create_task(receive())  # receive() is a real coroutine
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"working", "more_body": True})
        done, _ = await asyncio.wait({work, listener}, return_when=asyncio.FIRST_COMPLETED)
        assert listener in done
        events.append(listener.result()["type"])
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work

    with trio.fail_after(10):
        async with running(app, app_loop="asyncio", lifespan="off") as server:
            stream = await connect(("127.0.0.1", server.port))
            client = Client(stream)
            await client.send_raw(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            response = await client.next_event()
            assert response.status_code == 200
            assert (await client.next_event()).data == b"working"
            await stream.aclose()
            await work_cancelled.wait()
    assert events == ["http.disconnect", "work cancelled"]


async def test_graceful_shutdown_deadline_cancels_the_asyncio_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """trio → asyncio: the drain deadline cancels the app's asyncio task and waits for it."""
    started = trio.Event()
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        assert (await receive())["type"] == "http.request"
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append("cancelled")
            await asyncio.sleep(0.5)  # asyncio cleanup still runs before serve() returns
            events.append("cleanup done")
            try:
                # The client is still connected: on its own this would wait forever.
                await receive()
            except asyncio.CancelledError:
                events.append("receive cancelled too")
            raise

    with trio.fail_after(60):  # virtual time: a hang fails fast
        async with running(
            app, app_loop="asyncio", lifespan="off", timeout_graceful_shutdown=2.0
        ) as server:
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                await started.wait()
                before = trio.current_time()
                await server.drain()
                assert 2.0 <= trio.current_time() - before < 3.0
                assert events == ["cancelled", "cleanup done", "receive cancelled too"]
                assert await read_until_eof(stream) == b""


async def test_asyncio_timeout_on_receive_leaves_connection_usable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """asyncio → trio: a cancelled receive() had no effect; the next request is served."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            async with asyncio.timeout(1.0):
                message = await receive()
            body = b"got " + message["body"]
        except TimeoutError:
            body = b"timed out"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async with running(app, app_loop="asyncio", lifespan="off") as server:
        stream = await connect(("127.0.0.1", server.port))
        async with stream:
            client = Client(stream)
            conn = client.conn
            await client.send_raw(
                conn.send(
                    h11.Request(
                        method="POST", target="/", headers=[("host", "x"), ("content-length", "5")]
                    )
                )
            )
            response, body = await client.read_response()
            assert (response.status_code, body) == (200, b"timed out")
            # The body arrives late: the server drains it and reuses the connection.
            await client.send_raw(
                conn.send(h11.Data(data=b"hello")) + conn.send(h11.EndOfMessage())
            )
            conn.start_next_cycle()
            response, body = await client.request("POST", "/", body=b"abc")
            assert (response.status_code, body) == (200, b"got abc")


async def test_receive_cancelled_after_trio_received_keeps_the_message() -> None:
    """The message trio consumed for a receive() the app then cancelled comes next."""
    messages = iter(
        [{"type": "http.request", "body": b"1"}, {"type": "http.request", "body": b"2"}]
    )
    received = asyncio.Event()

    async def trio_receive() -> Any:
        received.set()
        return next(messages)

    async def trio_send(message: Any) -> None:
        raise AssertionError("not used")

    async def app(scope: Any, receive: Any, send: Any) -> list[bytes]:
        first = asyncio.create_task(receive())
        await received.wait()  # trio has consumed message 1 and resolved the future
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return [(await receive())["body"], (await receive())["body"]]

    bodies: list[bytes] = []

    async def collect(scope: Any, receive: Any, send: Any) -> None:
        bodies.extend(await app(scope, receive, send))

    with trio.fail_after(5):
        async with trio_asyncio.open_loop() as loop:
            await AsyncioApp(collect, loop)({"type": "http"}, trio_receive, trio_send)
    assert bodies == [b"1", b"2"]


async def test_send_after_the_call_returned_is_an_app_protocol_error() -> None:
    leftover: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        leftover.append(send)

    async def trio_receive() -> Any:
        raise AssertionError("not used")

    async def trio_send(message: Any) -> None:
        raise AssertionError("not used")

    async def late_send() -> None:
        await leftover[0]({"type": "http.response.start", "status": 200})

    with trio.fail_after(5):
        async with trio_asyncio.open_loop() as loop:
            await AsyncioApp(app, loop)({"type": "http"}, trio_receive, trio_send)
            with pytest.raises(AppProtocolError, match="after the ASGI call returned"):
                await loop.run_aio_coroutine(late_send())


# -- crossings: one trio wake-up per receive()/send(), the start held for the body ------------


async def test_hello_crosses_once_and_runs_in_the_calling_trio_task() -> None:
    """The start waits for the body (the server sends them together anyway) and both are
    sent by the trio task awaiting the app: no task spawned per send()."""
    caller: list[object] = []
    events: list[Any] = []

    async def trio_receive() -> Any:
        raise AssertionError("not used")

    async def trio_send(message: Any) -> None:
        events.append((message["type"], trio.lowlevel.current_task() is caller[0]))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        events.append("start returned")
        await send({"type": "http.response.body", "body": b"hi"})
        events.append("body returned")

    with trio.fail_after(5):
        async with trio_asyncio.open_loop() as loop:
            caller.append(trio.lowlevel.current_task())
            await AsyncioApp(app, loop)({"type": "http"}, trio_receive, trio_send)
    assert events == [
        "start returned",
        ("http.response.start", True),
        ("http.response.body", True),
        "body returned",
    ]


async def test_held_start_is_sent_when_the_app_returns_and_its_error_is_the_apps() -> None:
    sent: list[Any] = []

    async def trio_receive() -> Any:
        raise AssertionError("not used")

    async def trio_send(message: Any) -> None:
        if message.get("status") == 999:
            raise AppProtocolError("invalid status 999")
        sent.append(message)

    async def start_only(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": scope["status"], "headers": []})

    with trio.fail_after(5):
        async with trio_asyncio.open_loop() as loop:
            # As on trio: the server sees the start, then "returned without completing".
            await AsyncioApp(start_only, loop)(
                {"type": "http", "status": 200}, trio_receive, trio_send
            )
            assert [m["status"] for m in sent] == [200]
            with pytest.raises(AppProtocolError, match="999"):
                await AsyncioApp(start_only, loop)(
                    {"type": "http", "status": 999}, trio_receive, trio_send
                )
    assert len(sent) == 1


async def test_held_start_goes_before_a_receive() -> None:
    """The server must know the response started before the app reads (100-continue)."""
    events: list[str] = []

    async def trio_receive() -> Any:
        events.append("receive")
        return {"type": "http.disconnect"}

    async def trio_send(message: Any) -> None:
        events.append(message["type"])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        assert (await receive())["type"] == "http.disconnect"

    with trio.fail_after(5):
        async with trio_asyncio.open_loop() as loop:
            await AsyncioApp(app, loop)({"type": "http"}, trio_receive, trio_send)
    assert events == ["http.response.start", "receive"]


async def test_websocket_messages_are_never_held() -> None:
    events: list[str] = []

    async def trio_receive() -> Any:
        return {"type": "websocket.connect"}

    async def trio_send(message: Any) -> None:
        events.append(message["type"])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        events.append("accept returned")
        await send({"type": "websocket.close", "code": 1000})

    with trio.fail_after(5):
        async with trio_asyncio.open_loop() as loop:
            await AsyncioApp(app, loop)({"type": "websocket"}, trio_receive, trio_send)
    assert events == ["websocket.accept", "accept returned", "websocket.close"]


async def test_concurrent_receive_and_send_do_not_wait_for_each_other() -> None:
    """A receive() blocked in trio (Starlette's disconnect listener) while another task
    sends: the send runs beside it, and the blocked receive is cancelled when the app
    returns, before the app call does."""
    body_sent = trio.Event()
    receive_cancelled: list[bool] = []

    async def trio_receive() -> Any:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            receive_cancelled.append(True)
            raise

    async def trio_send(message: Any) -> None:
        if message["type"] == "http.response.body":
            body_sent.set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        listener = asyncio.create_task(receive())
        await asyncio.sleep(0)  # the listener's receive() is in trio now
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})
        assert not listener.done()

    with trio.fail_after(5):
        async with trio_asyncio.open_loop() as loop:
            await AsyncioApp(app, loop)({"type": "http"}, trio_receive, trio_send)
            assert body_sent.is_set()
            assert receive_cancelled == [True]


async def test_trio_cancel_reaches_calls_in_flight_on_both_paths() -> None:
    """Cancelling the caller cancels the app's task and both its blocked calls (the one
    the caller performs and the one beside it); the cancellation is raised once the
    asyncio task has ended."""
    blocked = trio.Event()
    cancelled: list[str] = []
    app_saw: list[str] = []

    async def trio_receive() -> Any:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append("receive")
            raise

    async def trio_send(message: Any) -> None:
        if message["type"] == "http.response.body":
            blocked.set()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                cancelled.append("send")
                raise

    async def app(scope: Any, receive: Any, send: Any) -> None:
        listener = asyncio.create_task(receive())
        await asyncio.sleep(0)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"x"})
        except asyncio.CancelledError:
            app_saw.append("cancelled")
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            raise

    with trio.fail_after(5):
        async with trio_asyncio.open_loop() as loop:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        AsyncioApp(app, loop), {"type": "http"}, trio_receive, trio_send
                    )
                    await blocked.wait()
                    scope.cancel()
            assert scope.cancelled_caught
    assert sorted(cancelled) == ["receive", "send"]
    assert app_saw == ["cancelled"]


async def test_ready_asyncio_callbacks_run_in_one_trio_step() -> None:
    """open_app_loop's loop runs the asyncio callbacks that are ready together (as
    asyncio's loop does), not one per trio scheduler batch."""
    ticks = 0
    seen: list[int] = []

    async def ticker() -> None:  # counts trio scheduler batches
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for _ in range(3):
            asyncio.get_running_loop().call_soon(lambda: seen.append(ticks))
        await asyncio.sleep(0.01)

    with trio.fail_after(5):
        async with (
            open_app_loop(app, Config(app_loop="asyncio")) as bridged,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(ticker)
            await bridged({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
    assert len(seen) == 3
    assert len(set(seen)) == 1, seen


# -- lifespan, embedding, process ------------------------------------------------------------


async def test_lifespan_state_and_shutdown_through_the_bridge() -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        lock = asyncio.Lock()  # loop-bound once used
        async with lock:
            events.append(f"startup on {sniffio.current_async_library()}")
        yield {"lock": lock, "loop": asyncio.get_running_loop()}
        async with lock:
            await asyncio.sleep(0.01)
            events.append(f"shutdown on {sniffio.current_async_library()}")

    app = FastAPI(lifespan=lifespan)

    @app.get("/")
    async def root(request: Request) -> dict[str, bool]:
        async with request.state.lock:
            return {"same_loop": asyncio.get_running_loop() is request.state.loop}

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            config = Config(port=0, app_loop="asyncio", lifespan="on", access_log=False)
            server: Server = await nursery.start(serve, app, config)
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                assert await get_json(Client(stream), "/") == (200, {"same_loop": True})
            await server.shutdown()
    assert events == ["startup on asyncio", "shutdown on asyncio"]


async def test_lifespan_startup_failure_on_asyncio_is_raised_as_is() -> None:
    """The CLI's exit code 3 needs the LifespanError itself, not the loop's exception group."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await asyncio.sleep(0)
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            config = Config(port=0, app_loop="asyncio", lifespan="on", access_log=False)
            with pytest.raises(LifespanError, match="no database"):
                await nursery.start(serve, app, config)


async def test_embedding_reuses_an_already_open_loop() -> None:
    seen: list[object] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(asyncio.get_running_loop())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with trio.fail_after(10):
        async with (
            trio_asyncio.open_loop() as loop,
            running(app, app_loop="asyncio", lifespan="off") as server,
        ):
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                response, _ = await Client(stream).request()
                assert response.status_code == 204
    assert seen == [loop]


async def test_trio_loop_is_the_default_and_untouched() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = sniffio.current_async_library().encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    with trio.fail_after(10):
        async with running(app, lifespan="off") as server:
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                response, body = await Client(stream).request()
    assert body == b"trio"
    assert header(response, b"server") == b"trioserve"


CLI_APP = textwrap.dedent("""
    import asyncio
    import sniffio
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    async def root():
        await asyncio.sleep(0.001)
        return {"library": sniffio.current_async_library()}
""")


async def test_cli_app_loop_asyncio_subprocess(tmp_path: Path) -> None:
    (tmp_path / "aioapp.py").write_text(CLI_APP)
    sock = str(tmp_path / "s.sock")
    command = [
        sys.executable,
        "-m",
        "trioserve",
        "aioapp:app",
        "--app-dir",
        str(tmp_path),
        "--uds",
        sock,
        "--app-loop",
        "asyncio",
        "--no-access-log",
    ]
    log = tmp_path / "stderr.log"
    with trio.fail_after(30), log.open("wb") as stderr:
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(
                    trio.run_process, command, check=False, stdout=subprocess.DEVNULL, stderr=stderr
                )
            )
            try:
                while not os.path.exists(sock):
                    assert process.returncode is None, log.read_text()
                    await trio.sleep(0.05)
                stream = await connect(sock)
                async with stream:
                    response, body = await Client(stream).request()
                assert response.status_code == 200
                assert json.loads(body) == {"library": "asyncio"}
            finally:
                process.send_signal(signal.SIGTERM)
    assert process.returncode == 0, log.read_text()
