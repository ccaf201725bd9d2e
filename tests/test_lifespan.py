"""Lifespan: auto/on/off, startup before accept, failures, state, shutdown on every exit."""

from __future__ import annotations

import dataclasses
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import BASE_CONFIG, run_server
from server_process import running_process
from wire import Client, connect

from trioserve import Server, serve
from trioserve.errors import LifespanError


class LifespanApp:
    """An app with a scripted lifespan that records what it saw; answers HTTP with its state."""

    def __init__(
        self,
        *,
        startup: str = "complete",  # complete | failed | raise | return | block
        shutdown: str = "complete",  # complete | failed | hang
    ) -> None:
        self.startup = startup
        self.shutdown = shutdown
        self.events: list[str] = []
        self.release_startup = trio.Event()
        self.in_startup = trio.Event()
        self.http_states: list[dict[str, Any] | None] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(scope, receive, send)
            return
        state = scope.get("state")
        self.http_states.append(None if state is None else dict(state))
        if state is not None:
            state["mutated_by_request"] = True  # must not leak into the next request
            state["shared_list"].append(len(self.http_states))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def lifespan(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        self.events.append("startup")
        self.in_startup.set()
        if self.startup == "block":
            await self.release_startup.wait()
        if self.startup == "raise":
            raise RuntimeError("database unreachable")
        if self.startup == "return":
            return
        if self.startup == "failed":
            await send({"type": "lifespan.startup.failed", "message": "no database"})
            return
        scope["state"]["greeting"] = "hello"
        scope["state"]["shared_list"] = []
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        assert message["type"] == "lifespan.shutdown"
        self.events.append("shutdown")
        if self.shutdown == "hang":
            await trio.sleep_forever()
        if self.shutdown == "failed":
            await send({"type": "lifespan.shutdown.failed", "message": "flush failed"})
            return
        await send({"type": "lifespan.shutdown.complete"})
        self.events.append("shutdown-complete")


async def get(server: Server, target: str = "/") -> int:
    async with await connect(server.addresses[0]) as stream:
        response, _ = await Client(stream).request(target=target)
        return response.status_code


async def test_lifespan_on_runs_startup_and_shutdown() -> None:
    app = LifespanApp()
    async with trio.open_nursery() as nursery:
        config = dataclasses.replace(BASE_CONFIG, lifespan="on")
        server: Server = await nursery.start(serve, app, config)
        assert app.events == ["startup"]
        assert await get(server) == 200
        await server.shutdown()
    assert app.events == ["startup", "shutdown", "shutdown-complete"]


async def test_lifespan_off_never_calls_the_app_with_lifespan() -> None:
    app = LifespanApp()
    async with run_server(app, lifespan="off") as server:
        assert await get(server) == 200
    assert app.events == []
    assert app.http_states == [None]


@pytest.mark.parametrize("startup", ["raise", "return"])
async def test_lifespan_auto_tolerates_apps_without_lifespan(
    startup: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = LifespanApp(startup=startup)
    with caplog.at_level(logging.INFO, logger="trioserve"):
        async with run_server(app, lifespan="auto") as server:
            assert await get(server) == 200
    assert app.events == ["startup"]
    assert "ASGI 'lifespan' protocol appears unsupported." in caplog.messages
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("startup", "mode", "summary"),
    [
        pytest.param("raise", "on", "RuntimeError: database unreachable", id="on-raise"),
        pytest.param("return", "on", "returned without answering", id="on-return"),
        pytest.param("failed", "on", "no database", id="on-failed-message"),
        pytest.param("failed", "auto", "no database", id="auto-failed-message"),
    ],
)
async def test_startup_failure_raises_lifespan_error_and_logs_once(
    startup: str, mode: str, summary: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = LifespanApp(startup=startup)
    config = dataclasses.replace(BASE_CONFIG, lifespan=mode)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            with pytest.raises(LifespanError) as info:
                await nursery.start(serve, app, config)
    assert str(info.value).startswith("Application startup failed: ")
    assert summary in str(info.value)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    if startup == "raise":
        assert errors[0].exc_info is not None  # the traceback, once
        assert isinstance(info.value.app_exception, RuntimeError)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_startup_completes_before_the_socket_accepts() -> None:
    app = LifespanApp(startup="block")
    port = free_port()
    config = dataclasses.replace(BASE_CONFIG, lifespan="on", port=port)
    started: list[Server] = []

    async def start(nursery: trio.Nursery) -> None:
        started.append(await nursery.start(serve, app, config))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start, nursery)
            await app.in_startup.wait()
            with pytest.raises(OSError):  # refused: nothing listens during startup
                await trio.open_tcp_stream("127.0.0.1", port)
            assert not started
            app.release_startup.set()
            while not started:
                await trio.sleep(0.01)
            assert started[0].port == port
            assert await get(started[0]) == 200
            nursery.cancel_scope.cancel()


async def test_state_is_copied_into_every_request_scope() -> None:
    app = LifespanApp()
    async with run_server(app, lifespan="on") as server:
        assert await get(server) == 200
        assert await get(server) == 200
    first, second = app.http_states
    assert first is not None
    assert second is not None
    assert first["greeting"] == second["greeting"] == "hello"
    # A request's changes to the dict itself do not reach the next request (a copy) ...
    assert "mutated_by_request" not in second
    # ... but the values are shared (a shallow copy, as the ASGI spec describes).
    assert second["shared_list"] == [1, 2]


async def test_shutdown_runs_when_serve_is_cancelled() -> None:
    app = LifespanApp()
    with trio.fail_after(5):
        async with run_server(app, lifespan="on") as server:
            assert await get(server) == 200
    assert app.events == ["startup", "shutdown", "shutdown-complete"]


async def test_hanging_shutdown_is_bounded_when_cancelled(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    app = LifespanApp(shutdown="hang")
    start = trio.current_time()
    async with run_server(app, lifespan="on", timeout_graceful_shutdown=3.0):
        pass
    assert trio.current_time() - start == pytest.approx(3.0, abs=0.5)
    assert app.events == ["startup", "shutdown"]
    assert "Application shutdown did not finish in 3.0s" in caplog.messages


async def test_hanging_shutdown_without_grace_is_bounded_by_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from trioserve.app.lifespan import CANCELLED_SHUTDOWN_TIMEOUT

    app = LifespanApp(shutdown="hang")
    start = trio.current_time()
    async with run_server(app, lifespan="on"):
        pass
    assert trio.current_time() - start == pytest.approx(CANCELLED_SHUTDOWN_TIMEOUT, abs=0.5)


async def test_shutdown_failed_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    app = LifespanApp(shutdown="failed")
    async with trio.open_nursery() as nursery:
        config = dataclasses.replace(BASE_CONFIG, lifespan="on")
        server: Server = await nursery.start(serve, app, config)
        await server.shutdown()
    assert "Application shutdown failed: flush failed" in caplog.messages


async def test_shutdown_runs_when_binding_fails() -> None:
    app = LifespanApp()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = dataclasses.replace(BASE_CONFIG, lifespan="on", port=taken.getsockname()[1])
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                with pytest.raises(OSError, match="Address already in use"):
                    await nursery.start(serve, app, config)
    assert app.events == ["startup", "shutdown", "shutdown-complete"]


FAILING_APP = """
from contextlib import asynccontextmanager

from starlette.applications import Starlette


@asynccontextmanager
async def lifespan(app):
    raise RuntimeError("database unreachable")
    yield


app = Starlette(lifespan=lifespan)
"""


async def test_cli_startup_failure_exits_3_with_the_error_shown_once(tmp_path: Path) -> None:
    (tmp_path / "failing.py").write_text(FAILING_APP)
    args = ["failing:app", "--app-dir", str(tmp_path), "--port", "0"]
    async with running_process(args) as process:
        assert await process.finish(timeout=15) == 3
    stderr = process.stderr
    assert stderr.count("RuntimeError: database unreachable") == 1, stderr
    assert stderr.count("Traceback") == 1, stderr
    assert stderr.rstrip().endswith("Application startup failed. Exiting.")
    assert "trioserve running on" not in stderr
