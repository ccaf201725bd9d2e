"""Errors on the wire: app exceptions, invalid app messages, malformed and oversized
requests, the concurrency limit, and client disconnects (STYLE.md §1.8)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing
from conftest import Recorder, hello_app, run_server
from wire import Client, connect, header, parse_responses, read_until_eof, receive_until, send

import trioserve
from trioserve.errors import AppProtocolError

pytestmark = pytest.mark.usefixtures("both_parsers")  # every test on h11 and httptools

EXACT = {"date_header": False, "server_header": False}
SECRET = "secret-detail-1234"
GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
GET_CLOSE = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
ERROR_500 = (
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 22\r\nconnection: close\r\n\r\nInternal Server Error\n"
)


def error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


async def fetch(server: trioserve.Server, raw: bytes = GET, *, bytewise: bool = False) -> bytes:
    async with await connect(server.addresses[0]) as stream:
        await send(stream, raw, bytewise=bytewise)
        return await read_until_eof(stream)


def with_ok(app: Any) -> Any:
    """``app``, except that ``GET /ok`` is answered by ``hello_app`` (liveness probe)."""

    async def wrapped(scope: Any, receive: Any, send_: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/ok":
            await hello_app(scope, receive, send_)
        else:
            await app(scope, receive, send_)

    return wrapped


async def assert_still_serving(server: trioserve.Server) -> None:
    async with await connect(server.addresses[0]) as stream:
        response, _ = await Client(stream).request("GET", "/ok")
    assert response.status_code == 200


# -- the app raises ---------------------------------------------------------------------


START = {"type": "http.response.start", "status": 200, "headers": []}


async def raise_before_start(scope: Any, receive: Any, send_: Any) -> None:
    raise RuntimeError(SECRET)


async def raise_after_held_start(scope: Any, receive: Any, send_: Any) -> None:
    await send_(START)  # held until the first body: a clean 500 is still possible
    raise RuntimeError(SECRET)


@pytest.mark.parametrize("app", [raise_before_start, raise_after_held_start])
async def test_app_raising_before_response_gets_500_and_one_logged_traceback(
    app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_server(with_ok(app), **EXACT) as server:
        data = await fetch(server)
    assert data == ERROR_500
    assert SECRET.encode() not in data
    assert b"Traceback" not in data
    [record] = error_records(caplog)
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert str(record.exc_info[1]) == SECRET
    assert (
        sum("Traceback" in (r.exc_text or "") or r.exc_info is not None for r in caplog.records)
        == 1
    )


async def test_app_raising_in_exception_group_gets_500_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Any, receive: Any, send_: Any) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raise_before_start, scope, receive, send_)

    async with run_server(with_ok(app), **EXACT) as server:
        data = await fetch(server)
        await assert_still_serving(server)
    assert data == ERROR_500
    assert len(error_records(caplog)) == 1


async def test_app_raising_after_response_started_truncates_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await send_(START)
        await send_({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError(SECRET)

    async with run_server(with_ok(app), **EXACT) as server:
        data = await fetch(server, GET + GET)
        await assert_still_serving(server)
    # The chunked body never ends and no second response follows: the client can tell.
    assert data == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n"
    [record] = error_records(caplog)
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == SECRET


async def test_app_returning_without_response_gets_500(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Any, receive: Any, send_: Any) -> None:
        return

    async with run_server(with_ok(app), **EXACT) as server:
        data = await fetch(server)
    assert data == ERROR_500
    [record] = error_records(caplog)
    assert "without starting response" in record.getMessage()


async def test_app_returning_mid_response_truncates(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await send_({**START, "headers": [(b"content-length", b"10")]})
        await send_({"type": "http.response.body", "body": b"12345", "more_body": True})

    async with run_server(with_ok(app), **EXACT) as server:
        data = await fetch(server, GET + GET)
    assert data == b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345"
    [record] = error_records(caplog)
    assert "without completing response" in record.getMessage()


# -- invalid messages from the app ------------------------------------------------------


BODY = {"type": "http.response.body", "body": b"x"}

INVALID_BEFORE_START = [
    pytest.param([{"type": "http.response.bogus"}], id="unknown-type"),
    pytest.param([{"type": "websocket.send", "text": "x"}], id="websocket-type"),
    pytest.param(["not a dict"], id="not-a-dict"),
    pytest.param([{"status": 200}], id="no-type"),
    pytest.param([BODY], id="body-before-start"),
    pytest.param([{**START, "status": "200"}], id="status-str"),
    pytest.param([{**START, "status": None}], id="status-none"),
    pytest.param([{**START, "headers": [("content-type", "text/plain")]}], id="header-str"),
    pytest.param([{**START, "headers": [(b"x", 1)]}], id="header-value-int"),
    pytest.param([{**START, "headers": [(b"x\r\ny", b"1")]}, BODY], id="header-crlf"),
    pytest.param([START, {"type": "http.response.body", "body": "text"}], id="body-str"),
    pytest.param([START, START], id="start-twice"),
]


@pytest.mark.parametrize("messages", INVALID_BEFORE_START)
async def test_invalid_message_before_response_is_logged_and_answered_500(
    messages: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    raised: list[BaseException] = []

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        try:
            for message in messages:
                await send_(message)
        except BaseException as exc:
            raised.append(exc)
            raise

    async with run_server(with_ok(app), **EXACT) as server:
        data = await fetch(server, GET + GET)
        await assert_still_serving(server)
    [exc] = raised
    assert isinstance(exc, AppProtocolError)
    [record] = error_records(caplog)
    assert record.exc_info is not None
    assert record.exc_info[1] is exc
    assert data == ERROR_500


def content_length_app(length: bytes, bodies: list[tuple[bytes, bool]]) -> Any:
    """An app declaring ``Content-Length: length``, then sending ``(body, more_body)``s."""

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await send_({**START, "headers": [(b"content-length", length)]})
        for body, more_body in bodies:
            await send_({"type": "http.response.body", "body": body, "more_body": more_body})

    return app


@pytest.mark.parametrize(
    ("length", "bodies", "reason"),
    [
        pytest.param(
            b"10",
            [(b"12345", False)],
            "ended at 5 bytes, short of its Content-Length 10",
            id="short",
        ),
        pytest.param(
            b"5",
            [(b"x" * 10, False)],
            "longer than its Content-Length 5 (10 bytes sent)",
            id="long",
        ),
        pytest.param(
            b"5",
            [(b"x" * 10, True), (b"", False)],
            "longer than its Content-Length 5 (10 bytes sent)",
            id="long-first-chunk",
        ),
    ],
)
async def test_body_contradicting_content_length_before_the_head_left_gets_500(
    length: bytes, bodies: list[tuple[bytes, bool]], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_server(with_ok(content_length_app(length, bodies)), **EXACT) as server:
        data = await fetch(server, GET + GET)
        await assert_still_serving(server)
    # The head was still held (it leaves with the first body): a clean 500, never an empty
    # reply (curl: "Empty reply from server"; nginx: 502), and a log line naming the fault.
    assert data == ERROR_500
    [record] = error_records(caplog)
    assert isinstance(record.exc_info[1] if record.exc_info else None, AppProtocolError)
    assert reason in str(record.exc_info[1] if record.exc_info else "")


@pytest.mark.parametrize(
    ("length", "bodies", "sent", "reason"),
    [
        pytest.param(
            b"10",
            [(b"12345", True), (b"", False)],
            b"12345",
            "ended at 5 bytes, short of its Content-Length 10",
            id="short",
        ),
        pytest.param(
            b"5",
            [(b"123", True), (b"456", False)],
            b"123",
            "longer than its Content-Length 5 (6 bytes sent)",
            id="long",
        ),
    ],
)
async def test_body_contradicting_content_length_after_the_head_left_closes(
    length: bytes,
    bodies: list[tuple[bytes, bool]],
    sent: bytes,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with run_server(with_ok(content_length_app(length, bodies)), **EXACT) as server:
        data = await fetch(server, GET + GET)
        await assert_still_serving(server)
    # A body was accepted, so the head was committed (written, or coalesced with it): what
    # fits the declared length is written, never a byte past it, and the connection closes
    # (the client sees the truncation; the pipelined GET is not answered).
    assert data == b"HTTP/1.1 200 OK\r\ncontent-length: %s\r\n\r\n%s" % (length, sent)
    [record] = error_records(caplog)
    assert isinstance(record.exc_info[1] if record.exc_info else None, AppProtocolError)
    assert reason in str(record.exc_info[1] if record.exc_info else "")


async def test_invalid_message_after_response_started_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await send_(START)
        await send_({"type": "http.response.body", "body": b"ab", "more_body": True})
        await send_({"type": "http.response.body", "body": 42})

    async with run_server(with_ok(app), **EXACT) as server:
        data = await fetch(server, GET + GET)
        await assert_still_serving(server)
    assert data == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n"
    [record] = error_records(caplog)
    assert isinstance(record.exc_info[1] if record.exc_info else None, AppProtocolError)


async def test_send_after_response_complete_raises_in_the_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    raised: list[BaseException] = []

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        await send_(START)
        await send_({"type": "http.response.body", "body": b"done"})
        try:
            await send_({"type": "http.response.body", "body": b"more"})
        except AppProtocolError as exc:
            raised.append(exc)
            raise

    async with run_server(with_ok(app), **EXACT) as server:
        data = await fetch(server, GET_CLOSE)
    assert data == b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nConnection: close\r\n\r\ndone"
    assert len(raised) == 1
    assert len(error_records(caplog)) == 1


# -- malformed and oversized requests ----------------------------------------------------


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, id="tls"),
        pytest.param(b"HELLO\r\n\r\n", id="garbage-line"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\nno-colon\r\n\r\n", id="no-colon"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: t\r\n: empty-name\r\n\r\n", id="empty-name"),
        pytest.param(b"\r\n\r\n", id="empty-lines"),
    ],
)
async def test_malformed_request_gets_400_and_server_keeps_serving(
    raw: bytes, bytewise: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve")
    async with run_server(hello_app, **EXACT) as server:
        data = await fetch(server, raw, bytewise=bytewise)
        await assert_still_serving(server)
    [(response, _)] = parse_responses(data)
    assert response.status_code == 400
    assert header(response, b"connection") == b"close"
    assert error_records(caplog) == []
    rejected = [r for r in caplog.records if "invalid HTTP request" in r.getMessage()]
    assert len(rejected) == 1
    assert rejected[0].levelno == logging.INFO
    assert rejected[0].exc_info is None


LIMIT = 4096


@pytest.mark.parametrize(
    ("raw", "bytewise"),
    [
        pytest.param(
            b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", False, id="long-request-line"
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 8000 + b"\r\n\r\n",
            False,
            id="long-header-one-write",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-A: 12345678\r\n" * 400 + b"\r\n",
            False,
            id="many-headers-one-write",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: t\r\n" + b"X-A: 12345678\r\n" * 300,
            True,
            id="many-headers-bytewise-never-ending",
        ),
        pytest.param(b"GET /" + b"a" * (LIMIT + 10), True, id="request-line-bytewise"),
    ],
)
async def test_oversized_request_head_gets_431(raw: bytes, bytewise: bool) -> None:
    async with run_server(hello_app, h11_max_incomplete_event_size=LIMIT, **EXACT) as server:
        data = await fetch(server, raw, bytewise=bytewise)
        await assert_still_serving(server)
    [(response, _)] = parse_responses(data)
    assert response.status_code == 431
    assert header(response, b"connection") == b"close"


async def test_head_just_under_the_limit_is_accepted() -> None:
    app = Recorder()
    async with run_server(with_ok(app), h11_max_incomplete_event_size=LIMIT, **EXACT) as server:
        raw = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * (LIMIT - 200) + b"\r\n\r\n"
        async with await connect(server.addresses[0]) as stream:
            await stream.send_all(raw)
            data = await receive_until(stream, b"GET / ")
    assert parse_responses(data, eof=False)[0][0].status_code == 200


# -- --limit-concurrency -------------------------------------------------------------------


async def test_limit_concurrency_answers_503_past_the_limit() -> None:
    release = trio.Event()
    slow_started = trio.Event()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        if scope["path"] == "/slow":
            slow_started.set()
            await release.wait()
        await hello_app(scope, receive, send_)

    async with run_server(with_ok(app), limit_concurrency=1, **EXACT) as server:
        async with await connect(server.addresses[0]) as slow:
            await slow.send_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            with trio.fail_after(10):  # the request may still be inside the kernel
                await slow_started.wait()
            data = await fetch(server, GET)
            [(response, body)] = parse_responses(data)
            assert response.status_code == 503
            assert header(response, b"connection") == b"close"
            assert body == b"Service Unavailable\n"
            release.set()
            data = await receive_until(slow, b"world!")
            assert parse_responses(data, eof=False)[0][0].status_code == 200
        await trio.testing.wait_all_tasks_blocked()
        await assert_still_serving(server)


# -- client disconnects ---------------------------------------------------------------------


async def test_disconnect_delivered_to_app_awaiting_receive_and_send_raises() -> None:
    events: list[Any] = []
    done = trio.Event()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        events.append(await receive())  # the (empty) body
        events.append(await receive())  # blocks until the client leaves
        try:
            await send_(START)
            await send_({"type": "http.response.body", "body": b"late"})
        except OSError as exc:
            events.append(exc)
        events.append(await receive())
        events.append(await receive())
        done.set()

    async with run_server(with_ok(app), **EXACT) as server:
        stream = await connect(server.addresses[0])
        await stream.send_all(GET)
        with trio.fail_after(10):  # until the request arrived (it may be in the kernel)
            while not events:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert len(events) == 1
        await stream.aclose()
        with trio.fail_after(2):
            await done.wait()
    assert events[0] == {"type": "http.request", "body": b"", "more_body": False}
    assert events[1] == {"type": "http.disconnect"}
    assert isinstance(events[2], trioserve.ClientDisconnected)
    assert isinstance(events[2], OSError)
    assert events[3] == events[4] == {"type": "http.disconnect"}


async def test_disconnect_delivered_mid_body() -> None:
    events: list[Any] = []
    done = trio.Event()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        while True:
            message = await receive()
            events.append(message["type"])
            if message["type"] == "http.disconnect":
                break
        done.set()

    async with run_server(with_ok(app), **EXACT) as server:
        stream = await connect(server.addresses[0])
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
        with trio.fail_after(10):  # mid-body: the app has the first piece
            while not events:
                await trio.sleep(0.01)
        await stream.aclose()
        with trio.fail_after(2):
            await done.wait()
        await assert_still_serving(server)
    assert events == ["http.request", "http.disconnect"]


async def test_streaming_to_a_client_that_left_raises_client_disconnected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcome: list[Any] = []
    done = trio.Event()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        try:
            await send_(START)
            while True:
                await send_({"type": "http.response.body", "body": b"z" * 65536, "more_body": True})
        except trioserve.ClientDisconnected as exc:
            outcome.append(exc)
            outcome.append(await receive())
            raise  # escaping ClientDisconnected is the peer's doing, not an app error
        finally:
            done.set()

    async with run_server(with_ok(app), **EXACT) as server:
        stream = await connect(server.addresses[0])
        await stream.send_all(GET)
        await receive_until(stream, b"zzzz")
        await stream.aclose()
        with trio.fail_after(5):
            await done.wait()
        await assert_still_serving(server)
    assert isinstance(outcome[0], trioserve.ClientDisconnected)
    assert outcome[1] == {"type": "http.disconnect"}
    assert error_records(caplog) == []


async def test_client_gone_before_app_responds_is_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    proceed = trio.Event()
    done = trio.Event()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        try:
            await proceed.wait()
            await hello_app(scope, receive, send_)
        finally:
            done.set()

    async with run_server(with_ok(app), **EXACT) as server:
        stream = await connect(server.addresses[0])
        await stream.send_all(GET)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        proceed.set()
        with trio.fail_after(2):
            await done.wait()
        await assert_still_serving(server)
    assert error_records(caplog) == []


async def test_request_then_eof_is_answered_then_closed() -> None:
    async with run_server(hello_app, **EXACT) as server:
        async with await connect(server.addresses[0]) as stream:
            await stream.send_all(GET)
            await stream.send_eof()
            data = await read_until_eof(stream)
        assert data == (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
            b"content-length: 13\r\n\r\nHello, world!"
        )
        await assert_still_serving(server)


async def test_half_closed_client_is_a_disconnect_once_the_app_listens() -> None:
    """A request followed by a half-close (shutdown(SHUT_WR)): EOF means "client gone",
    as in uvicorn. An app that then listens gets http.disconnect and its send() raises;
    an app that answers without listening is still answered (the test above), where
    uvicorn drops the response."""
    events: list[Any] = []
    done = trio.Event()

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        try:
            events.append(await receive())  # the body, already buffered
            events.append(await receive())  # sees the EOF
            await send_(START)
        except trioserve.ClientDisconnected:
            events.append("send raised")
        finally:
            done.set()

    async with run_server(with_ok(app), **EXACT) as server:
        async with await connect(server.addresses[0]) as stream:
            await stream.send_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
            await stream.send_eof()
            with trio.fail_after(2):
                await done.wait()
            assert await read_until_eof(stream) == b""
        await assert_still_serving(server)
    assert events == [
        {"type": "http.request", "body": b"hi", "more_body": False},
        {"type": "http.disconnect"},
        "send raised",
    ]


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_starlette_is_disconnected_polling_sees_the_client_leave(method: str) -> None:
    """``Request.is_disconnected()`` awaits receive() in an already-cancelled scope: the
    disconnect must be found without waiting (a non-blocking read)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    polls: list[bool] = []
    done = trio.Event()

    async def endpoint(request: Request) -> PlainTextResponse:
        try:
            for _ in range(200):
                polls.append(await request.is_disconnected())
                if polls[-1]:
                    break
                await trio.sleep(0.01)
        finally:
            done.set()
        return PlainTextResponse("late")

    app = Starlette(routes=[Route("/", endpoint, methods=["GET", "POST"])])
    raw = b"%s / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc" % method.encode()
    async with run_server(app, **EXACT) as server:
        stream = await connect(server.addresses[0])
        await stream.send_all(raw)
        with trio.fail_after(2):
            while len(polls) < 3:  # the app is polling, the client still there
                await trio.sleep(0.01)
        await stream.aclose()
        with trio.fail_after(2):
            await done.wait()
    assert polls[-1] is True
    assert not any(polls[:-1])


class CarelessApp:
    """Reads the body until it ends or http.disconnect, then answers 200 regardless."""

    def __init__(self) -> None:
        self.send_errors: list[BaseException] = []

    async def __call__(self, scope: Any, receive: Any, send_: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        try:
            await send_(START)
            await send_({"type": "http.response.body", "body": b"careless"})
        except OSError as exc:
            self.send_errors.append(exc)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="chunk-size-not-hex"),
        pytest.param(b"3\r\nhello\r\n0\r\n\r\n", id="chunk-longer-than-size"),
        pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="chunk-data-no-crlf"),
        pytest.param(b"5\r\nhello\r\nGET /x HTTP/1.1\r\n\r\n", id="request-as-chunk"),
    ],
)
async def test_malformed_body_gets_400_even_when_the_app_ignores_the_disconnect(
    body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    app = CarelessApp()
    raw = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    async with run_server(with_ok(app), **EXACT) as server:
        data = await fetch(server, raw)
        await assert_still_serving(server)
    [(response, _)] = parse_responses(data)
    assert response.status_code == 400
    assert header(response, b"connection") == b"close"
    assert b"careless" not in data
    assert [type(e) for e in app.send_errors] == [trioserve.ClientDisconnected]
    assert error_records(caplog) == []


# -- --limit-request-body --------------------------------------------------------------------

BODY_LIMIT = 1000


def body_limit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "request body too large" in r.getMessage()]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001,
            id="body-sent",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n" + b"x" * 10,
            id="body-partly-sent",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\nExpect: 100-continue\r\n\r\n",
            id="expect-100-continue",
        ),
    ],
)
async def test_content_length_over_limit_request_body_gets_413_without_calling_the_app(
    raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve")
    app = Recorder()
    async with run_server(with_ok(app), limit_request_body=BODY_LIMIT, **EXACT) as server:
        data = await fetch(server, raw)
        await assert_still_serving(server)
    # (Not "HTTP/1.1 100 Continue" first: a client waiting for it learns at once.)
    assert data.startswith(b"HTTP/1.1 413 ")
    [(response, _)] = parse_responses(data)
    assert header(response, b"connection") == b"close"
    assert app.requests == []  # the app was never called
    [record] = body_limit_records(caplog)
    assert record.levelno == logging.INFO
    assert record.exc_info is None
    assert "1001" in record.getMessage()
    assert error_records(caplog) == []


async def test_default_limit_request_body_refuses_a_declared_body_over_100_mib() -> None:
    app = Recorder()
    raw = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (100 * 1024 * 1024 + 1)
    async with run_server(app, **EXACT) as server:
        data = await fetch(server, raw)
    assert parse_responses(data)[0][0].status_code == 413
    assert app.requests == []


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_chunked_body_over_limit_request_body_gets_413_after_the_app_read_some(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trioserve")
    app = Recorder()
    async with run_server(with_ok(app), limit_request_body=BODY_LIMIT, **EXACT) as server:
        async with await connect(server.addresses[0]) as stream:
            await stream.send_all(
                b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                + chunk(b"a" * 600)
            )
            with trio.fail_after(10):  # the app has the first 600 bytes
                while not (app.requests and app.requests[0]["pieces"]):
                    await trio.sleep(0.01)
            # 1200 bytes in all: the second chunk crosses the limit and is never handed over,
            # whatever the client sends after it.
            await send(stream, chunk(b"b" * 600) + chunk(b"c" * 600) * 100)
            data = await read_until_eof(stream)
        await assert_still_serving(server)
    [(response, _)] = parse_responses(data)
    assert response.status_code == 413
    assert header(response, b"connection") == b"close"
    [record] = app.requests
    assert record["body"] == b"a" * 600
    assert record["disconnect"] is True
    assert len(body_limit_records(caplog)) == 1
    assert error_records(caplog) == []


@pytest.mark.parametrize(
    ("limit", "size"),
    [
        pytest.param(BODY_LIMIT, BODY_LIMIT, id="at-the-limit"),
        pytest.param(0, 300_000, id="limit-0-disables"),
    ],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_within_limit_request_body_is_served(
    limit: int, size: int, chunked: bool
) -> None:
    app = Recorder()
    body = bytes(i % 251 for i in range(size))
    if chunked:
        framing = b"Transfer-Encoding: chunked\r\n\r\n"
        raw = framing + b"".join(chunk(body[i : i + 400]) for i in range(0, size, 400))
        raw += b"0\r\n\r\n"
    else:
        raw = b"Content-Length: %d\r\n\r\n" % size + body
    async with (
        run_server(app, limit_request_body=limit, **EXACT) as server,
        await connect(server.addresses[0]) as stream,
    ):
        await stream.send_all(b"POST /up HTTP/1.1\r\nHost: t\r\n" + raw + GET_CLOSE)
        data = await read_until_eof(stream)
    [(first, echoed), (second, _)] = parse_responses(data)
    assert (first.status_code, echoed) == (200, b"POST /up " + body)
    assert second.status_code == 200  # the connection was kept alive
    assert app.requests[0]["disconnect"] is False


async def post_body_over_limit(first: list[Any]) -> tuple[bytes, list[Any]]:
    """POST a chunked body over ``BODY_LIMIT`` to an app that sends ``first`` and then reads
    until ``http.disconnect``; check that the server still serves afterwards.

    Returns: the bytes the server sent back, and the messages the app received.
    """
    messages: list[Any] = []

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        for message in first:
            await send_(message)
        while True:
            messages.append(await receive())
            if messages[-1]["type"] == "http.disconnect":
                return

    raw = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"x" * 1200)
    async with run_server(with_ok(app), limit_request_body=BODY_LIMIT, **EXACT) as server:
        data = await fetch(server, raw)
        await assert_still_serving(server)
    return data, messages


async def test_body_over_limit_request_body_gets_413_while_the_apps_head_is_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The app's head is held until its first body: nothing has left yet.
    data, messages = await post_body_over_limit([START])
    [(response, _)] = parse_responses(data)
    assert response.status_code == 413
    assert header(response, b"connection") == b"close"
    assert messages == [{"type": "http.disconnect"}]
    assert error_records(caplog) == []


async def test_body_over_limit_request_body_cuts_a_response_already_streaming(
    caplog: pytest.LogCaptureFixture,
) -> None:
    streaming = {"type": "http.response.body", "body": b"streaming", "more_body": True}
    data, messages = await post_body_over_limit([START, streaming])
    # The head left with a 200: the response is cut (its chunked body never ends).
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b"9\r\nstreaming\r\n")
    assert messages == [{"type": "http.disconnect"}]
    assert error_records(caplog) == []  # the peer's doing, not the app's


# -- a bug in trioserve's own connection code -------------------------------------------


class BuggyParser:
    """A parser (h11's or httptools') whose first ``start_next_cycle`` raises: a bug in
    trioserve's own connection code once a response is complete. (A wrapper rather than a
    patched method: the compiled build's classes take no monkeypatching.)"""

    struck = False

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def start_next_cycle(self) -> None:
        if not BuggyParser.struck:
            BuggyParser.struck = True
            raise RuntimeError(SECRET)
        self._real.start_next_cycle()


@pytest.mark.parametrize("app_waits", [False, True], ids=["inline", "moved-on"])
async def test_a_bug_in_the_connection_task_is_logged_and_costs_only_that_connection(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, app_waits: bool
) -> None:
    # The bug strikes after the response: in the connection's first task when the app
    # answered inline, in the task the serving moved on to when the app waited.
    import trioserve.connection.state as state_module
    from trioserve.protocol import httptools_parser

    for module, name in (
        (state_module, "H11Connection"),
        (httptools_parser, "HttptoolsConnection"),
    ):
        real_class = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda real_class=real_class, **kw: BuggyParser(real_class(**kw))
        )
    monkeypatch.setattr(BuggyParser, "struck", False)

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        if app_waits:
            await trio.sleep(0)
        await hello_app(scope, receive, send_)

    async with run_server(with_ok(app), **EXACT) as server:
        received = await fetch(server, b"GET /bug HTTP/1.1\r\nHost: t\r\n\r\n")
        await assert_still_serving(server)
    assert BuggyParser.struck
    assert received.startswith(b"HTTP/1.1 200 ")  # (answered; then closed by the bug)
    assert SECRET.encode() not in received
    (record,) = error_records(caplog)
    assert record.getMessage().endswith(" - internal error in connection task")
    assert record.exc_info is not None and str(record.exc_info[1]) == SECRET
