"""Keep-alive, request-head and graceful-shutdown timeouts, on a virtual clock.

Every test takes the ``autojump_clock`` fixture: ``trio.sleep(6)`` costs nothing and the
server's deadlines are checked against ``trio.current_time()`` exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import h11
import pytest
import trio
import trio.testing
from conftest import hello_app, read_body, run_server
from wire import (
    Client,
    connect,
    header,
    parse_responses,
    read_until_eof,
    readable,
    receive_until,
)

from trioserve.connection.http1 import DRAIN_IDLE_GRACE

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
        if r.levelno >= logging.INFO and r.name.startswith("trioserve.connection")
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
        body = await read_body(receive)
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


async def test_graceful_drain_closes_idle_after_its_grace_and_waits_for_in_flight(
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
                # The keep-alive connection, idle since its response (at `start`), is closed
                # once it has been idle for DRAIN_IDLE_GRACE (its next request might have
                # been on the way: see the next tests).
                assert await read_until_eof(idle) == b""
                assert trio.current_time() - start == DRAIN_IDLE_GRACE
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


async def test_graceful_drain_answers_the_next_request_of_an_idle_connection_with_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The client's next request crosses the drain (under load it is usually already on the
    # wire): it is answered, with Connection: close, instead of meeting a closed socket.
    async with (
        run_server(hello_app, timeout_keep_alive=60, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        client = Client(stream)
        response, _ = await client.request()
        assert header(response, b"connection") is None  # kept alive
        server.shutdown_nowait()
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(DRAIN_IDLE_GRACE * 0.9)
        response, body = await client.request()
        assert (response.status_code, body) == (200, b"Hello, world!")
        assert header(response, b"connection") == b"close"
        assert await read_until_eof(stream) == b""


async def test_graceful_drain_answers_a_request_after_a_response_that_promised_keep_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The response's head left (keep-alive) before the drain began: the client may send
    # its next request as soon as the body ends, so that request is answered too.
    release = trio.Event()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/wait":  # (the head leaves with the first body chunk)
            await send_({"type": "http.response.body", "body": b"1", "more_body": True})
            await release.wait()
        await send_({"type": "http.response.body", "body": b"done"})

    async with (
        run_server(app, timeout_keep_alive=60, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        client = Client(stream)
        await client.send_raw(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n")
        client.conn.send(h11.Request(method="GET", target="/wait", headers=[("host", "t")]))
        client.conn.send(h11.EndOfMessage())
        response = await client.next_event()
        assert header(response, b"connection") is None  # the head promised keep-alive
        assert (await client.next_event()).data == b"1"
        server.shutdown_nowait()
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        assert (await client.next_event()).data == b"done"
        assert type(await client.next_event()) is h11.EndOfMessage
        client.conn.start_next_cycle()
        response, body = await client.request()
        assert (response.status_code, body) == (200, b"done")
        assert header(response, b"connection") == b"close"
        assert await read_until_eof(stream) == b""


async def test_graceful_drain_closes_a_connection_idle_for_the_grace_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        run_server(hello_app, timeout_keep_alive=60, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        response, _ = await Client(stream).request()
        assert response.status_code == 200
        await trio.sleep(DRAIN_IDLE_GRACE + 5)
        start = trio.current_time()
        server.shutdown_nowait()
        assert await read_until_eof(stream) == b""
        assert trio.current_time() == start


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


# -- --timeout-request-body -----------------------------------------------------------------


class BodyReader:
    """Reads the whole body, records what it got and, at a disconnect, when; answers 200."""

    def __init__(self) -> None:
        self.body = b""
        self.disconnected_at: float | None = None

    async def __call__(self, scope: Any, receive: Any, send_: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected_at = trio.current_time()
                return
            self.body += message["body"]
            if not message["more_body"]:
                break
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        await send_({"type": "http.response.body", "body": b"got %d" % len(self.body)})


def body_timeout_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "request body timed out" in r.getMessage()]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_stalled_request_body_gets_408_after_timeout_request_body(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, chunked: bool
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve")
    app = BodyReader()
    if chunked:
        head = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        pieces = [b"3\r\nabc\r\n", b"3\r\ndef\r\n"]
    else:
        head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
        pieces = [b"abc", b"def"]
    async with (
        run_server(app, timeout_request_body=5, timeout_keep_alive=60, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(head + pieces[0])
        # Body arriving within the timeout keeps it waiting: the timeout is between reads.
        await trio.sleep(4)
        assert not readable(stream)
        await stream.send_all(pieces[1])
        sent_at = trio.current_time()
        data = await read_until_eof(stream)  # then nothing more: the body stalls
        closed_after = trio.current_time() - sent_at
    assert data.startswith(b"HTTP/1.1 408 ")
    [(response, _)] = parse_responses(data)
    assert (b"connection", b"close") in response.headers
    assert 5.0 <= closed_after < 5.1
    assert app.body == b"abcdef"
    assert app.disconnected_at is not None
    assert 5.0 <= app.disconnected_at - sent_at < 5.1
    [record] = body_timeout_records(caplog)
    assert record.levelno == logging.INFO
    assert record.exc_info is None


async def test_content_length_longer_than_the_body_sent_gets_408_instead_of_hanging(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = BodyReader()
    async with (
        run_server(app, **EXACT) as server,  # the default --timeout-request-body: 60 s
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello")
        start = trio.current_time()
        await trio.sleep(59)
        assert not readable(stream)
        data = await read_until_eof(stream)
        assert 60.0 <= trio.current_time() - start < 60.1
    [(response, _)] = parse_responses(data)
    assert response.status_code == 408
    assert app.body == b"hello"


async def test_request_body_timeout_does_not_apply_while_the_app_is_busy_or_streaming(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Only a wait for *body* is bounded: not the app's own work before it reads, nor its
    wait for a disconnect while it streams a long response."""

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await trio.sleep(20)  # before reading the body
        message = await receive()
        await send_({"type": "http.response.start", "status": 200, "headers": []})
        async with trio.open_nursery() as nursery:

            async def stream_slowly() -> None:
                for _ in range(3):
                    await trio.sleep(10)
                    await send_({"type": "http.response.body", "body": b".", "more_body": True})
                await send_({"type": "http.response.body", "body": message["body"]})

            nursery.start_soon(stream_slowly)
            assert await receive() == {"type": "http.disconnect"}  # after the response

    async with (
        run_server(app, timeout_request_body=5, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nok")
        await trio.sleep(45)
        data = await receive_until(stream, b"\r\n0\r\n\r\n")  # the chunked body's end
    [(response, body)] = parse_responses(data, eof=False)
    assert (response.status_code, body) == (200, b"...ok")
