"""Embedding: ``await nursery.start(serve, app, config)`` inside a trio program.

Covers the Server handle, graceful shutdown (``shutdown``, ``shutdown_nowait``,
``shutdown_trigger``), cancellation at every stage with no leaked task, socket or file
descriptor, errors raised from ``nursery.start``, several servers in one nursery and
serve() beside other tasks.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import hello_app
from wire import Client, connect, read_until_eof

from trioserve import Config, LifespanError, Server, StartupFailed, serve

CONFIG = Config(port=0, access_log=False)


# -- helpers --------------------------------------------------------------------------------


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


@contextmanager
def no_leaks() -> Iterator[None]:
    """Assert that the block leaves no extra file descriptor (socket) open."""
    before = open_fds()
    yield
    assert open_fds() == before


async def assert_refused(address: tuple[str, int] | str) -> None:
    with pytest.raises(OSError):
        stream = await connect(address)
        await stream.aclose()


class LifespanApp:
    """A raw ASGI app recording lifespan events; gates let a test hold each phase."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.startup_gate = trio.Event()
        self.startup_gate.set()
        self.shutdown_gate = trio.Event()
        self.shutdown_gate.set()
        self.in_startup = trio.Event()
        self.in_shutdown = trio.Event()
        self.in_request = trio.Event()
        self.request_gate = trio.Event()
        self.request_gate.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            self.in_startup.set()
            await self.startup_gate.wait()
            self.events.append("startup")
            await send({"type": "lifespan.startup.complete"})
            await receive()
            self.in_shutdown.set()
            try:
                await self.shutdown_gate.wait()
            except trio.Cancelled:
                self.events.append("shutdown cancelled")
                raise
            self.events.append("shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.in_request.set()
        await self.request_gate.wait()
        await hello_app(scope, receive, send)


@asynccontextmanager
async def cancel_after_block(nursery_timeout: float = 10.0) -> AsyncIterator[trio.Nursery]:
    """A nursery that is cancelled when the block ends; its exit must be prompt."""
    with trio.fail_after(nursery_timeout):
        async with trio.open_nursery() as nursery:
            yield nursery
            nursery.cancel_scope.cancel()


# -- the Server handle ------------------------------------------------------------------------


async def test_start_returns_server_after_lifespan_startup_and_listen() -> None:
    app = LifespanApp()
    async with cancel_after_block() as nursery:
        server: Server = await nursery.start(serve, app, CONFIG)
        assert app.events == ["startup"]
        address = server.addresses[0]
        assert isinstance(address, tuple)
        host, port = address
        assert host == "127.0.0.1"
        assert port != 0
        assert server.port == port
        assert server.urls == [f"http://127.0.0.1:{port}"]
        assert server.url == server.urls[0]
        [sock] = server.sockets
        assert sock.getsockname() == ("127.0.0.1", port)
        # Listening already: the first connection is served without any waiting.
        async with await server.open_stream() as stream:
            response, body = await Client(stream).request()
        assert response.status_code == 200
        assert body == b"Hello, world!"


async def test_server_open_stream_connects_to_unix_socket(tmp_path: Any) -> None:
    path = str(tmp_path / "s.sock")
    async with cancel_after_block() as nursery:
        server: Server = await nursery.start(serve, hello_app, Config(uds=path, lifespan="off"))
        assert server.urls == [f"unix:{path}"]
        with pytest.raises(AttributeError, match="UNIX"):
            _ = server.port
        async with await server.open_stream() as stream:
            response, _ = await Client(stream).request()
        assert response.status_code == 200
    assert not os.path.exists(path)


async def test_shutdown_drains_runs_lifespan_shutdown_and_serve_returns() -> None:
    app = LifespanApp()
    with trio.fail_after(10), no_leaks():
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, app, CONFIG)
            address = server.addresses[0]
            await server.shutdown()
            assert app.events == ["startup", "shutdown"]
            # serve() has returned: nothing is left in the nursery.
            assert not nursery.child_tasks
        await assert_refused(address)


async def test_shutdown_nowait_returns_at_once_and_serve_finishes() -> None:
    app = LifespanApp()
    with trio.fail_after(10), no_leaks():
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, app, CONFIG)
            server.shutdown_nowait()
            assert server.draining
            assert app.events == ["startup"]
        assert app.events == ["startup", "shutdown"]


async def test_shutdown_lets_in_flight_request_finish_and_refuses_new_connections() -> None:
    app = LifespanApp()
    app.request_gate = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, app, CONFIG)
            address = server.addresses[0]
            async with await connect(address) as stream:
                client = Client(stream)
                await client.send_raw(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                await app.in_request.wait()
                server.shutdown_nowait()
                await trio.testing.wait_all_tasks_blocked()
                await assert_refused(address)
                app.request_gate.set()
                response, body = await client.read_response()
                assert response.status_code == 200
                assert body == b"Hello, world!"
                assert await read_until_eof(stream) == b""
        assert app.events == ["startup", "shutdown"]


async def test_shutdown_trigger_returning_starts_the_drain() -> None:
    app = LifespanApp()
    trigger = trio.Event()
    with trio.fail_after(10), no_leaks():
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                partial(serve, app, CONFIG, shutdown_trigger=trigger.wait)
            )
            assert not server.draining
            trigger.set()
        assert server.draining
        assert app.events == ["startup", "shutdown"]


async def test_shutdown_trigger_is_dropped_when_shutdown_comes_from_elsewhere() -> None:
    app = LifespanApp()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                partial(serve, app, CONFIG, shutdown_trigger=trio.sleep_forever)
            )
            await server.shutdown()
        assert app.events == ["startup", "shutdown"]


async def test_serve_installs_no_signal_handlers() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    async with cancel_after_block() as nursery:
        await nursery.start(serve, hello_app, CONFIG)
        assert {sig: signal.getsignal(sig) for sig in before} == before


# -- cancellation at every stage ------------------------------------------------------------


async def test_cancel_before_startup_finishes_leaves_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = LifespanApp()
    app.startup_gate = trio.Event()  # startup never completes
    tasks = task_count()
    with no_leaks():
        with trio.move_on_after(3) as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, app, CONFIG)
        assert scope.cancelled_caught
        assert app.in_startup.is_set()
        assert app.events == []  # startup never finished: no shutdown either
    assert task_count() == tasks


async def test_cancel_while_idle_closes_listener_and_keep_alive_connections() -> None:
    app = LifespanApp()
    tasks = task_count()
    with trio.fail_after(10), no_leaks():
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, app, CONFIG)
            address = server.addresses[0]
            stream = await connect(address)
            response, _ = await Client(stream).request()
            assert response.status_code == 200
            nursery.cancel_scope.cancel()
        # The keep-alive connection was closed by the server; lifespan shutdown ran.
        assert await read_until_eof(stream) == b""
        await stream.aclose()
        await assert_refused(address)
        assert app.events == ["startup", "shutdown"]
    assert task_count() == tasks


async def test_cancel_during_request_aborts_it_and_leaves_nothing() -> None:
    app = LifespanApp()
    app.request_gate = trio.Event()  # the app never answers
    tasks = task_count()
    with trio.fail_after(10), no_leaks():
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, app, CONFIG)
            address = server.addresses[0]
            stream = await connect(address)
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await app.in_request.wait()
            nursery.cancel_scope.cancel()
        assert await read_until_eof(stream) == b""
        await stream.aclose()
        await assert_refused(address)
        assert app.events == ["startup", "shutdown"]
    assert task_count() == tasks


async def endless_stream_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    chunk = b"x" * 65536
    while True:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def test_cancel_during_streaming_to_a_client_that_stopped_reading_is_prompt() -> None:
    tasks = task_count()
    with trio.fail_after(10), no_leaks():
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(
                serve, endless_stream_app, Config(port=0, lifespan="off", access_log=False)
            )
            stream = await connect(server.addresses[0])
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await stream.receive_some(10)  # the response has started, then: never read
            # Let the server fill the socket buffers and block in send_all.
            await trio.testing.wait_all_tasks_blocked(0.05)
            nursery.cancel_scope.cancel()
        await stream.aclose()
    assert task_count() == tasks


async def test_cancel_during_endless_stream_to_a_fast_reader_is_prompt() -> None:
    # The client keeps reading, so the server's writes rarely block: cancellation must still
    # reach the app at its next send() (the non-blocking write fast path checks for it).
    tasks = task_count()
    received = 0
    sends = 0

    async def counting_stream_app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal sends
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            await send({"type": "http.response.body", "body": b"x" * 16384, "more_body": True})
            sends += 1

    async def read_all(stream: trio.SocketStream) -> None:
        nonlocal received
        while data := await stream.receive_some(65536):
            received += len(data)

    with trio.fail_after(10), no_leaks():
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as server_scope:
                async with trio.open_nursery() as nursery:
                    server: Server = await nursery.start(
                        serve, counting_stream_app, Config(port=0, lifespan="off", access_log=False)
                    )
                    stream = await connect(server.addresses[0])
                    await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                    outer.start_soon(read_all, stream)
                    while received < 1024 * 1024:
                        await trio.sleep(0.01)
                    server_scope.cancel()
                    sends_at_cancel = sends
        await stream.aclose()
    # At most the send() already past its write when the cancel came completes; every
    # later one raises Cancelled at once (without the check: tens of thousands more).
    assert sends - sends_at_cancel <= 1
    assert task_count() == tasks


async def test_cancel_during_graceful_drain_stops_in_flight_requests() -> None:
    app = LifespanApp()
    app.request_gate = trio.Event()
    with trio.fail_after(10), no_leaks():
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, app, CONFIG)
            stream = await connect(server.addresses[0])
            await stream.send_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await app.in_request.wait()
            server.shutdown_nowait()  # the drain waits for the request...
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()  # ...until the hard stop
        assert await read_until_eof(stream) == b""
        await stream.aclose()
        assert app.events == ["startup", "shutdown"]


async def test_cancel_during_lifespan_shutdown_returns_promptly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = LifespanApp()
    app.shutdown_gate = trio.Event()  # lifespan shutdown never completes
    tasks = task_count()
    with no_leaks():
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, app, CONFIG)
            address = server.addresses[0]
            server.shutdown_nowait()
            await app.in_shutdown.wait()
            start = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - start < 6  # bounded (shielded cleanup has a deadline)
        await assert_refused(address)
    assert task_count() == tasks


async def test_cancelled_serve_still_runs_lifespan_shutdown_shielded_and_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    app = LifespanApp()
    app.shutdown_gate = trio.Event()
    config = Config(port=0, access_log=False, timeout_graceful_shutdown=3)

    async def finish_shutdown_later() -> None:
        await app.in_shutdown.wait()
        await trio.sleep(1)  # the app's shutdown takes a second, inside the shield
        app.shutdown_gate.set()

    async with trio.open_nursery() as outer:
        outer.start_soon(finish_shutdown_later)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, app, config)
            nursery.cancel_scope.cancel()
    assert app.events == ["startup", "shutdown"]

    # An app whose shutdown never ends is abandoned after timeout_graceful_shutdown.
    stuck = LifespanApp()
    stuck.shutdown_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, stuck, config)
        start = trio.current_time()
        nursery.cancel_scope.cancel()
    assert 3 <= trio.current_time() - start < 5
    assert stuck.events == ["startup", "shutdown cancelled"]


# -- errors are exceptions from nursery.start -------------------------------------------------


async def test_startup_failure_raises_lifespan_error_carrying_the_app_exception() -> None:
    class DatabaseDown(Exception):
        pass

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        raise DatabaseDown("no database")

    with trio.fail_after(10), no_leaks():
        async with trio.open_nursery() as nursery:
            with pytest.raises(StartupFailed) as info:
                await nursery.start(serve, app, Config(port=0, lifespan="on"))
    assert StartupFailed is LifespanError
    assert isinstance(info.value.app_exception, DatabaseDown)


async def test_startup_failed_message_raises_lifespan_error() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "config missing"})

    with trio.fail_after(10), no_leaks():
        async with trio.open_nursery() as nursery:
            with pytest.raises(LifespanError, match="config missing"):
                await nursery.start(serve, app, CONFIG)


async def test_port_in_use_raises_oserror_from_nursery_start() -> None:
    app = LifespanApp()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(10), no_leaks():
            async with trio.open_nursery() as nursery:
                with pytest.raises(OSError) as info:
                    await nursery.start(serve, app, Config(port=port, access_log=False))
    assert info.value.errno == errno.EADDRINUSE
    assert str(port) in str(info.value)
    # Lifespan had started; it was shut down again before the error surfaced.
    assert app.events == ["startup", "shutdown"]


# -- several servers, other tasks -------------------------------------------------------------


def text_app(text: bytes) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": text})

    return app


async def get_body(server: Server) -> bytes:
    async with await server.open_stream() as stream:
        _, body = await Client(stream).request()
    return body


async def test_serve_loads_an_import_string_as_run_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "embedded_string_app.py").write_text("from conftest import hello_app as app\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # app_dir is added: undo it after
    config = Config(port=0, access_log=False, app_dir=str(tmp_path))
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, "embedded_string_app:app", config)
        async with await connect(server.addresses[0]) as stream:
            response, body = await Client(stream).request()
        assert response.status_code == 200
        assert body == b"Hello, world!"
        await server.shutdown()


@pytest.mark.parametrize("not_an_app", [42, None])
async def test_serve_refuses_a_non_callable_app_at_once(not_an_app: object) -> None:
    with no_leaks():
        async with trio.open_nursery() as nursery:
            with pytest.raises(TypeError, match="or its import string such as 'main:app'"):
                await nursery.start(serve, not_an_app, CONFIG)


async def test_keyboard_interrupt_in_a_server_task_leaves_serve_bare() -> None:
    """A Ctrl-C that trio raises inside a connection task comes out of serve() as itself
    (the caller's nursery may still wrap it, once), and lifespan shutdown ran."""
    app = LifespanApp()

    async def interrupted(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise KeyboardInterrupt
        await app(scope, receive, send)

    with pytest.RaisesGroup(KeyboardInterrupt):  # the test's own nursery, not serve's
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(serve, interrupted, CONFIG)
            stream = await connect(server.addresses[0])
            await Client(stream).send_raw(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await trio.sleep_forever()
    await stream.aclose()
    assert app.events[-1] == "shutdown"


async def test_two_servers_in_one_nursery_serve_their_own_apps() -> None:
    config = Config(port=0, lifespan="off", access_log=False)
    with trio.fail_after(10), no_leaks():
        async with trio.open_nursery() as nursery:
            one: Server = await nursery.start(serve, text_app(b"one"), config)
            two: Server = await nursery.start(serve, text_app(b"two"), config)
            assert one.port != two.port
            assert await get_body(one) == b"one"
            assert await get_body(two) == b"two"
            await one.shutdown()
            await assert_refused(one.addresses[0])
            assert await get_body(two) == b"two"  # the other server is unaffected
            await two.shutdown()


async def test_serve_shares_a_trio_program_with_other_tasks_without_threads() -> None:
    threads = threading.active_count()
    ticks: list[int] = []

    async def background_job() -> None:
        while True:
            ticks.append(len(ticks))
            await trio.sleep(0.001)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(background_job)
            server: Server = await nursery.start(serve, hello_app, CONFIG)
            bodies = [await get_body(server) for _ in range(5)]
            assert threading.active_count() == threads
            nursery.cancel_scope.cancel()
    assert bodies == [b"Hello, world!"] * 5
    assert ticks


# -- the examples, run as real processes --------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class ExampleProcess:
    """An example script running as a subprocess, its output collected as it comes."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = bytearray()
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                self.output.extend(data)
                self._changed.set()
                self._changed = trio.Event()

    async def wait_for(self, pattern: bytes) -> re.Match[bytes]:
        while not (match := re.search(pattern, self.output)):
            if self.process.returncode is not None:
                raise AssertionError(f"exited early: {self.output.decode()}")
            await self._changed.wait()
        return match


@asynccontextmanager
async def run_example(script: str, *args: str) -> AsyncIterator[ExampleProcess]:
    process = await trio.lowlevel.open_process(
        [sys.executable, str(EXAMPLES / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    example = ExampleProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            nursery.start_soon(example.pump, process.stdout)
            yield example
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()


async def http_get(host: str, port: int, target: str) -> tuple[int, bytes]:
    async with await trio.open_tcp_stream(host, port) as stream:
        response, body = await Client(stream).request(target=target)
    return response.status_code, body


async def test_embed_in_trio_example_drains_and_exits_cleanly_on_sigint() -> None:
    with trio.fail_after(20):
        async with run_example("embed_in_trio.py", "0") as example:
            match = await example.wait_for(rb"serving on http://([\d.]+):(\d+)")
            host, port = match.group(1).decode(), int(match.group(2))
            status, body = await http_get(host, port, "/")
            assert status == 200
            assert body.startswith(b"ticks: ")
            async with trio.open_nursery() as nursery:
                slow: list[tuple[int, bytes]] = []

                async def in_flight() -> None:
                    slow.append(await http_get(host, port, "/slow"))

                nursery.start_soon(in_flight)
                await example.wait_for(b"app: slow request started")
                example.process.send_signal(signal.SIGINT)
            assert await example.process.wait() == 0
            assert slow[0][0] == 200  # the in-flight request finished during the drain
            await example.wait_for(rb"stopped cleanly after \d+ ticks")
    output = example.output.decode()
    assert "received SIGINT: draining" in output
    assert "app: lifespan shutdown" in output
    assert "Traceback" not in output


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_embedding_snippet() -> str:
    """The README's "Embedded in a trio program" code block."""
    text = README.read_text()
    start = text.index("```python\n", text.index("Embedded in a trio program:")) + 10
    return text[start : text.index("```", start)]


async def test_readme_embedding_snippet_exits_cleanly_on_sigint(tmp_path: Path) -> None:
    snippet = readme_embedding_snippet()
    assert "port=8000" in snippet
    (tmp_path / "embed.py").write_text(snippet.replace("port=8000", "port=0"))
    (tmp_path / "main.py").write_text(
        "async def app(scope, receive, send):\n"
        "    if scope['type'] == 'lifespan':\n"
        "        while (await receive())['type'] == 'lifespan.startup':\n"
        "            await send({'type': 'lifespan.startup.complete'})\n"
        "        print('app: lifespan shutdown', flush=True)\n"
        "        await send({'type': 'lifespan.shutdown.complete'})\n"
    )
    with trio.fail_after(20):
        async with run_example(str(tmp_path / "embed.py")) as example:
            await example.wait_for(rb"serving on \['http://127.0.0.1:\d+'\]")
            example.process.send_signal(signal.SIGINT)
            assert await example.process.wait() == 0
    output = example.output.decode()
    assert "app: lifespan shutdown" in output
    assert "Traceback" not in output


async def test_run_programmatically_example_serves_and_stops_on_sigterm() -> None:
    with trio.fail_after(20):
        async with run_example("run_programmatically.py", "0") as example:
            match = await example.wait_for(rb"running on http://([\d.]+):(\d+)")
            status, body = await http_get(match.group(1).decode(), int(match.group(2)), "/")
            assert (status, body) == (200, b"Hello from trioserve.run()\n")
            example.process.send_signal(signal.SIGTERM)
            assert await example.process.wait() == 0
    assert "Traceback" not in example.output.decode()
