"""WSGI apps: ``--interface wsgi`` (trioserve.wsgi, worker threads), a2wsgi mounted in FastAPI
under ``--app-loop asyncio``, and a stuck app thread that must not keep the process alive.

In-process tests use real time under ``fail_after``: the app runs in worker threads, which
the autojump clock does not see (STYLE.md, Tests: Time).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flask
import h11
import pytest
import trio
from conftest import run_server
from fastapi import FastAPI
from server_process import ServerProcess, started_process
from wire import Client, connect, read_until_eof

from trioserve import Config
from trioserve.app.loading import load_app
from trioserve.wsgi import WSGIMiddleware

TIMEOUT = 10.0
Environ = dict[str, Any]
StartResponse = Callable[..., Any]

ENVIRON_KEYS = (
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "REMOTE_ADDR",
    "HTTP_X_CUSTOM",
    "HTTP_X_SPOOFED",
    "wsgi.url_scheme",
    "wsgi.multithread",
)


def environ_app(environ: Environ, start_response: StartResponse) -> list[bytes]:
    """Answers the environ fields a WSGI app relies on, as JSON."""
    body = json.dumps({key: environ.get(key) for key in ENVIRON_KEYS}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


def make_flask_app(gate: threading.Event | None = None) -> flask.Flask:
    app = flask.Flask("wsgi_test")

    @app.post("/echo")
    def echo() -> bytes:
        return flask.request.get_data()

    @app.get("/stream")
    def stream() -> flask.Response:
        def chunks() -> Iterator[bytes]:
            yield b"first;"
            assert gate is not None
            gate.wait(TIMEOUT)  # set by the test once it has received "first;"
            yield b"second"

        return flask.Response(chunks())

    return app


async def request(port: int, method: str, target: str, **kwargs: Any) -> tuple[h11.Response, bytes]:
    stream = await connect(("127.0.0.1", port))
    async with stream:
        return await Client(stream).request(method, target, **kwargs)


async def next_data(client: Client) -> bytes:
    event = await client.next_event()
    assert isinstance(event, h11.Data), event
    return bytes(event.data)


async def test_wsgi_environ_follows_pep_3333() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_server(environ_app, interface="wsgi", root_path="/app") as server:
            response, body = await request(
                server.port,
                "POST",
                "/caf%C3%A9/x?a=1&b=%20",  # --root-path: a proxy stripped /app
                headers=[
                    ("content-type", "text/plain"),
                    ("x-custom", "one"),
                    ("x-custom", "two"),
                    ("x_spoofed", "dropped"),  # would pose as X-Spoofed
                ],
                body=b"hello",
            )
    assert response.status_code == 200
    assert json.loads(body) == {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "/app",
        "PATH_INFO": "/café/x".encode().decode("latin-1"),  # PEP 3333: bytes as latin-1
        "QUERY_STRING": "a=1&b=%20",
        "CONTENT_TYPE": "text/plain",
        "CONTENT_LENGTH": "5",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": str(server.port),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_X_CUSTOM": "one,two",
        "HTTP_X_SPOOFED": None,
        "wsgi.url_scheme": "http",
        "wsgi.multithread": True,
    }


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_flask_post_body_reaches_the_view(chunked: bool) -> None:
    payload = b"x" * 200_000
    with trio.fail_after(TIMEOUT):
        async with run_server(make_flask_app(), interface="wsgi") as server:
            if not chunked:
                response, body = await request(server.port, "POST", "/echo", body=payload)
            else:
                stream = await connect(("127.0.0.1", server.port))
                async with stream:
                    client = Client(stream)
                    head = h11.Request(
                        method="POST",
                        target="/echo",
                        headers=[("host", "x"), ("transfer-encoding", "chunked")],
                    )
                    data = client.conn.send(head)
                    for start in range(0, len(payload), 65536):
                        data += client.conn.send(h11.Data(data=payload[start : start + 65536]))
                    await client.send_raw(data + client.conn.send(h11.EndOfMessage()))
                    response, body = await client.read_response()
    assert response.status_code == 200
    assert body == payload


async def test_wsgi_input_is_read_as_the_client_sends_it() -> None:
    """The app reads the first line and answers it before the client sends the second."""

    def line_echo(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        stream = environ["wsgi.input"]
        while line := stream.readline():
            yield b"got " + line

    with trio.fail_after(TIMEOUT):
        async with run_server(line_echo, interface="wsgi") as server:
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                client = Client(stream)
                head = h11.Request(
                    method="POST",
                    target="/",
                    headers=[("host", "x"), ("transfer-encoding", "chunked")],
                )
                await client.send_raw(
                    client.conn.send(head) + client.conn.send(h11.Data(data=b"one\ntw"))
                )
                response = await client.next_event()
                assert isinstance(response, h11.Response)
                assert response.status_code == 200
                assert await next_data(client) == b"got one\n"
                await client.send_raw(
                    client.conn.send(h11.Data(data=b"o\n")) + client.conn.send(h11.EndOfMessage())
                )
                assert await next_data(client) == b"got two\n"
                assert isinstance(await client.next_event(), h11.EndOfMessage)


async def test_flask_streaming_response_is_sent_chunk_by_chunk() -> None:
    gate = threading.Event()
    with trio.fail_after(TIMEOUT):
        async with run_server(make_flask_app(gate), interface="wsgi") as server:
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                client = Client(stream)
                head = h11.Request(method="GET", target="/stream", headers=[("host", "x")])
                await client.send_raw(client.conn.send(head) + client.conn.send(h11.EndOfMessage()))
                response = await client.next_event()
                assert isinstance(response, h11.Response)
                assert (b"transfer-encoding", b"chunked") in response.headers
                # The generator is still blocked on the gate: this chunk left on its own.
                assert await next_data(client) == b"first;"
                gate.set()
                assert await next_data(client) == b"second"
                assert isinstance(await client.next_event(), h11.EndOfMessage)


class Closing:
    """A response iterable that records ``close()`` (PEP 3333: the server must call it)."""

    def __init__(self, chunks: list[bytes], fail_after: int | None = None) -> None:
        self.chunks = chunks
        self.fail_after = fail_after
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        for index, chunk in enumerate(self.chunks):
            if index == self.fail_after:
                raise ZeroDivisionError("boom mid-stream")
            yield chunk

    def close(self) -> None:
        self.closed.set()


async def test_iterable_close_is_called_and_sequence_gets_content_length() -> None:
    result = Closing([b"a", b"b"])

    def app(environ: Environ, start_response: StartResponse) -> Any:
        start_response("201 Created", [("X-Test", "1")])
        return result if environ["PATH_INFO"] == "/closing" else [b"whole"]

    with trio.fail_after(TIMEOUT):
        async with run_server(app, interface="wsgi") as server:
            response, body = await request(server.port, "GET", "/closing")
            assert (response.status_code, body) == (201, b"ab")
            assert (b"x-test", b"1") in response.headers
            # (close() runs in the app's thread after the body's end has gone out: the
            # client may see the response first.)
            assert await trio.to_thread.run_sync(result.closed.wait, TIMEOUT)
            response, body = await request(server.port, "GET", "/list")
            assert (b"content-length", b"5") in response.headers
            assert body == b"whole"


async def test_wsgi_app_exception_is_500_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def failing(environ: Environ, start_response: StartResponse) -> list[bytes]:
        raise ZeroDivisionError("boom in the view")

    with trio.fail_after(TIMEOUT):
        async with run_server(failing, interface="wsgi") as server:
            response, body = await request(server.port, "GET", "/")
    assert response.status_code == 500
    assert b"boom" not in body  # no traceback to the client
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == ["Exception in ASGI application"]
    assert errors[0].exc_info is not None
    assert "boom in the view" in str(errors[0].exc_info[1])


async def test_wsgi_exception_after_the_head_aborts_and_closes_iterable() -> None:
    result = Closing([b"partial", b"never"], fail_after=1)

    def app(environ: Environ, start_response: StartResponse) -> Any:
        start_response("200 OK", [])
        return result

    with trio.fail_after(TIMEOUT):
        async with run_server(app, interface="wsgi") as server:
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                data = await read_until_eof(stream)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b"partial" in data
    assert not data.endswith(b"0\r\n\r\n")  # no clean end of the chunked body
    assert result.closed.is_set()


async def test_start_response_exc_info_replaces_head_until_sent() -> None:
    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("changed my mind")
        except ValueError:
            start_response("503 Service Unavailable", [("Retry-After", "1")], sys.exc_info())
        return [b"later"]

    with trio.fail_after(TIMEOUT):
        async with run_server(app, interface="wsgi") as server:
            response, body = await request(server.port, "GET", "/")
    assert (response.status_code, body) == (503, b"later")
    assert (b"retry-after", b"1") in response.headers


async def test_hard_stop_abandons_a_stuck_wsgi_thread() -> None:
    """serve() returns promptly although the app's thread is blocked; when the thread wakes
    up, its next send fails (the request is over) and the iterable is still closed."""
    stuck = threading.Event()
    release = threading.Event()
    closed = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        try:
            yield b"first"
            stuck.set()
            release.wait(TIMEOUT)
            yield b"too late"
        finally:
            closed.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_and_wait, app)
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                await trio.to_thread.run_sync(stuck.wait, TIMEOUT)
                start = trio.current_time()
                nursery.cancel_scope.cancel()
        assert trio.current_time() - start < 2
        release.set()
        await trio.to_thread.run_sync(closed.wait, TIMEOUT)
    assert closed.is_set()


async def run_and_wait(app: Any, *, task_status: Any) -> None:
    async with run_server(app, interface="wsgi") as server:
        task_status.started(server)
        await trio.sleep_forever()


async def test_thread_limit_bounds_concurrent_requests() -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    def app(environ: Environ, start_response: StartResponse) -> list[bytes]:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        start_response("200 OK", [])
        return [b"ok"]

    with trio.fail_after(TIMEOUT):
        async with (
            run_server(WSGIMiddleware(app, threads=2)) as server,
            trio.open_nursery() as nursery,
        ):
            for _ in range(6):
                nursery.start_soon(request, server.port, "GET", "/")
    assert peak == 2


def test_interface_option_selects_the_adapter() -> None:
    def asgi2(scope: Any) -> Any:
        raise AssertionError("not called")

    def loaded(app: object, interface: Any) -> object:
        return load_app(app, Config(interface=interface))

    assert loaded(asgi2, "auto") is not asgi2  # detected, adapted
    assert loaded(asgi2, "asgi2") is not asgi2
    assert loaded(asgi2, "asgi3") is asgi2
    flask_app = make_flask_app()
    assert loaded(flask_app, "wsgi") is flask_app
    with pytest.raises(ValueError, match="interface"):
        Config(interface="wsgi2")  # type: ignore[arg-type]


async def test_wsgi_middleware_mounted_in_fastapi_on_trio() -> None:
    """The README's recipe: trioserve.wsgi.WSGIMiddleware under a FastAPI mount, on trio."""
    app = FastAPI()
    app.mount("/v1", WSGIMiddleware(environ_app))
    with trio.fail_after(TIMEOUT):
        async with run_server(app) as server:
            response, body = await request(server.port, "GET", "/v1/hello?x=1")
    assert response.status_code == 200
    environ = json.loads(body)
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("/v1", "/hello")
    assert environ["QUERY_STRING"] == "x=1"


# -- real processes -------------------------------------------------------------------------

A2WSGI_APP = """
import time

from a2wsgi import WSGIMiddleware
from fastapi import FastAPI
from flask import Flask, request

flask_app = Flask(__name__)


@flask_app.route("/")
def flask_main():
    return f"Hello, {request.args.get('name', 'World')} from Flask!"


@flask_app.route("/sleep")
def sleepy():
    print("app: sleeping", flush=True)
    time.sleep(3600)
    return "never"


app = FastAPI()


@app.get("/v2")
def read_main():
    return {"message": "Hello World"}


app.mount("/v1", WSGIMiddleware(flask_app))
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "wsgiapps.py").write_text(A2WSGI_APP)
    return tmp_path


def args(app_dir: Path, app: str, *extra: str) -> list[str]:
    return [app, "--app-dir", str(app_dir), "--port", "0", *extra]


async def test_fastapi_with_a2wsgi_mount_works_under_app_loop_asyncio(app_dir: Path) -> None:
    with trio.fail_after(30):
        async with started_process(
            args(app_dir, "wsgiapps:app", "--app-loop", "asyncio")
        ) as server:
            for _ in range(2):  # a2wsgi's pool thread is reused for the second request
                response, body = await request(server.port, "GET", "/v1/?name=trio")
                assert (response.status_code, body) == (200, b"Hello, trio from Flask!")
            response, body = await request(server.port, "GET", "/v2")
            assert (response.status_code, json.loads(body)) == (200, {"message": "Hello World"})
            assert await server.stop() == 0
    assert "Traceback" not in server.stderr


async def sigterm_with_stuck_thread(server: ServerProcess, target: str) -> float:
    """Leave a request stuck in the app's thread, SIGTERM; return the seconds until exit."""
    stream = await connect(("127.0.0.1", server.port))
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        await server.wait_for("app: sleeping", "stdout")
        start = trio.current_time()
        server.signal(signal.SIGTERM)
        assert await server.finish(timeout=10) == 0
        return trio.current_time() - start


@pytest.mark.parametrize(
    ("app", "options"),
    [
        pytest.param("wsgiapps:app", ["--app-loop", "asyncio"], id="a2wsgi-asyncio"),
        pytest.param("wsgiapps:flask_app", ["--interface", "wsgi"], id="interface-wsgi"),
    ],
)
async def test_stuck_app_thread_does_not_delay_exit_past_graceful_timeout(
    app_dir: Path, app: str, options: list[str]
) -> None:
    grace = 1.0
    with trio.fail_after(30):
        async with started_process(
            args(app_dir, app, *options, "--timeout-graceful-shutdown", str(grace))
        ) as server:
            target = "/v1/sleep" if app == "wsgiapps:app" else "/sleep"
            elapsed = await sigterm_with_stuck_thread(server, target)
    assert elapsed < grace + 3, server.stderr
    assert "Application shutdown complete" in server.stderr
