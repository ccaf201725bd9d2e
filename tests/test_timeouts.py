"""Keep-alive, request-head and graceful-shutdown timeouts, on a virtual clock.

Every test takes the ``autojump_clock`` fixture: ``trio.sleep(6)`` costs nothing and the
server's deadlines are checked against ``trio.current_time()`` exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing
from conftest import hello_app, run_server
from wire import Client, connect, parse_responses, read_until_eof, readable, receive_until

pytestmark = pytest.mark.usefixtures("both_parsers")  # every test on h11 and httptools

EXACT = {"date_header": False, "server_header": False}
GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n\r\nHello, world!"


async def test_idle_keep_alive_connection_closed_after_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trioserve")
    async with (
        run_server(hello_app, timeout_keep_alive=5, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(GET)
        assert await receive_until(stream, b"world!") == RESPONSE
        start = trio.current_time()
        await trio.sleep(4.9)
        assert not readable(stream)
        assert await read_until_eof(stream) == b""
        assert 5.0 <= trio.current_time() - start < 5.1
    assert not [
        r
        for r in caplog.records
        if r.levelno >= logging.INFO and r.name.startswith("trioserve.http")
    ]


async def test_keep_alive_timer_restarts_after_each_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        run_server(hello_app, timeout_keep_alive=5, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        client = Client(stream)
        start = trio.current_time()
        for _ in range(3):
            response, _ = await client.request()
            assert response.status_code == 200
            await trio.sleep(4)
        assert not readable(stream)
        assert await read_until_eof(stream) == b""
        assert 13.0 <= trio.current_time() - start < 13.1


async def test_slow_request_head_is_dropped_after_timeout_request_header(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve")
    async with (
        run_server(hello_app, timeout_keep_alive=5, timeout_request_header=10, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(b"GET / HTTP/1.1\r\n")
        start = trio.current_time()
        closed_at = None
        # Trickle one header line per second: progress does not extend the deadline.
        for i in range(30):
            await trio.sleep(1)
            if readable(stream):
                closed_at = trio.current_time()
                break
            await stream.send_all(b"X-%d: y\r\n" % i)
        assert closed_at is not None
        assert 10.0 <= closed_at - start <= 11.0  # seen on the next 1 s tick
        assert await read_until_eof(stream) == b""
    slow = [r for r in caplog.records if "not received in time" in r.getMessage()]
    assert len(slow) == 1
    assert slow[0].levelno == logging.INFO
    assert slow[0].exc_info is None


async def test_slow_app_and_slow_upload_are_not_cut_by_head_or_keep_alive_timeouts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def app(scope: Any, receive: Any, send_: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await trio.sleep(8)  # longer than either timeout
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": body})

    async with (
        run_server(app, timeout_keep_alive=5, timeout_request_header=6, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n")
        for i in range(20):  # 40 s of upload, one byte every 2 s
            await trio.sleep(2)
            await stream.send_all(b"%d" % (i % 10))
        data = await receive_until(stream, b"\r\n\r\n0123456789")
        [(response, body)] = parse_responses(data, eof=False)
        assert (response.status_code, body) == (200, b"01234567890123456789")


async def test_graceful_drain_closes_idle_at_once_and_waits_for_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app_started = trio.Event()
    app_finished = trio.Event()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        if scope["path"] == "/slow":
            app_started.set()
            await trio.sleep(3)
        await hello_app(scope, receive, send_)
        if scope["path"] == "/slow":
            app_finished.set()

    async with run_server(
        app, timeout_keep_alive=60, timeout_graceful_shutdown=10, **EXACT
    ) as server:
        idle = await connect(server.addresses[0])
        busy = await connect(server.addresses[0])
        async with idle, busy:
            await idle.send_all(GET)
            assert await receive_until(idle, b"world!") == RESPONSE
            await busy.send_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            # Not wait_all_tasks_blocked(): the request may still be inside the kernel.
            await app_started.wait()
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.shutdown)
                # The idle keep-alive connection is closed without delay.
                assert await read_until_eof(idle) == b""
                assert trio.current_time() == start
                # New connections are refused.
                with pytest.raises(OSError):
                    await connect(server.addresses[0])
                # The in-flight request completes, announcing the close.
                data = await read_until_eof(busy)
            assert trio.current_time() - start == pytest.approx(3.0)
            [(response, body)] = parse_responses(data)
            assert (response.status_code, body) == (200, b"Hello, world!")
            assert (b"connection", b"close") in [(k.lower(), v) for k, v in response.headers]
            assert app_finished.is_set()


async def test_graceful_drain_cancels_in_flight_requests_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started = trio.Event()
    cancelled = trio.Event()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        started.set()
        try:
            await trio.sleep(3600)
        except trio.Cancelled:
            cancelled.set()
            raise

    async with (
        run_server(app, timeout_graceful_shutdown=8, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(GET)
        await started.wait()
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.shutdown)
            assert await read_until_eof(stream) == b""
        assert 8.0 <= trio.current_time() - start < 8.1
        assert cancelled.is_set()
