"""Graceful shutdown of a real ``python -m trioserve`` process on SIGTERM / SIGINT."""

from __future__ import annotations

import signal
from pathlib import Path

import h11
import pytest
import trio
from server_process import CLI_APP, ServerProcess, clean_env, running_process, started_process
from wire import Client, connect, read_until_eof

from trioserve.connection.http1 import DRAIN_IDLE_GRACE


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "cliapp.py").write_text(CLI_APP)
    return tmp_path


def args(app_dir: Path, *extra: str) -> list[str]:
    return ["cliapp:app", "--app-dir", str(app_dir), "--port", "0", *extra]


async def start_slow_request(server: ServerProcess, seconds: float) -> Client:
    stream = await connect(("127.0.0.1", server.port))
    client = Client(stream)
    request = client.conn.send(
        h11.Request(method="GET", target=f"/slow?{seconds}", headers=[("host", "x")])
    )
    await client.send_raw(request + client.conn.send(h11.EndOfMessage()))
    await server.wait_for("app: slow request started")
    return client


async def assert_refused(port: int) -> None:
    stream: trio.SocketStream | None = None
    try:
        with pytest.raises(OSError):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
    finally:
        if stream is not None:
            await stream.aclose()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_lets_in_flight_request_finish(app_dir: Path, signum: int) -> None:
    with trio.fail_after(20):
        async with started_process(args(app_dir)) as server:
            client = await start_slow_request(server, 3)
            async with client.stream:
                server.signal(signum)
                # Logged once the listeners are closed.
                await server.wait_for(r"Waiting for 1 connection\(s\) to close")
                await assert_refused(server.port)  # no new connections while draining
                response, body = await client.read_response()
            assert (response.status_code, body) == (200, b"slow done")
            assert header_value(response, b"connection") == b"close"
            assert await server.finish() == 0
        assert "app: shutdown" in server.stderr
        assert server.stderr.index("app: shutdown") > server.stderr.index("Shutting down")


def header_value(response: h11.Response, name: bytes) -> bytes | None:
    return dict(response.headers).get(name)


async def test_second_sigint_exits_at_once(app_dir: Path) -> None:
    with trio.fail_after(20):
        async with started_process(args(app_dir)) as server:
            client = await start_slow_request(server, 60)
            async with client.stream:
                server.signal(signal.SIGINT)
                await server.wait_for("shutting down gracefully")
                start = trio.current_time()
                server.signal(signal.SIGINT)
                assert await server.finish() == 0
                assert trio.current_time() - start < 3
                assert await read_until_eof(client.stream) == b""  # aborted, not answered
        assert "exiting now" in server.stderr


async def test_idle_keep_alive_connections_are_closed_after_the_drain_grace(
    app_dir: Path,
) -> None:
    with trio.fail_after(20):
        async with started_process(args(app_dir, "--timeout-keep-alive", "60")) as server:
            async with await connect(("127.0.0.1", server.port)) as stream:
                client = Client(stream)
                response, _ = await client.request()
                assert response.status_code == 200
                start = trio.current_time()
                server.signal(signal.SIGTERM)
                assert await read_until_eof(stream) == b""  # closed by the server
                # Not at once (its next request might have been on the way): once it has
                # been idle for DRAIN_IDLE_GRACE (counted from before `start`); not after 60 s.
                elapsed = trio.current_time() - start
                assert DRAIN_IDLE_GRACE / 2 < elapsed < DRAIN_IDLE_GRACE + 2
            assert await server.finish() == 0


async def test_graceful_timeout_cancels_a_slow_request(app_dir: Path) -> None:
    with trio.fail_after(20):
        async with started_process(args(app_dir, "--timeout-graceful-shutdown", "0.5")) as server:
            client = await start_slow_request(server, 60)
            async with client.stream:
                start = trio.current_time()
                server.signal(signal.SIGTERM)
                assert await read_until_eof(client.stream) == b""
                assert await server.finish() == 0
                assert trio.current_time() - start < 5
        assert "app: shutdown" in server.stderr  # lifespan shutdown still ran


async def test_signal_during_lifespan_startup_exits_promptly(app_dir: Path) -> None:
    env = clean_env(STARTUP_DELAY="60")
    with trio.fail_after(20):
        async with running_process(args(app_dir), env=env) as server:
            await server.wait_for("app: startup")
            start = trio.current_time()
            server.signal(signal.SIGTERM)
            assert await server.finish() == 0
            assert trio.current_time() - start < 3
    assert "trioserve running on" not in server.stderr


async def test_graceful_timeout_ends_a_stream_to_a_client_that_never_reads(
    app_dir: Path,
) -> None:
    """The app's send() waits on a full socket buffer forever: the graceful deadline must
    still cancel it (no shielded, unbounded send), and the process exits 0 promptly."""
    options = args(app_dir, "--timeout-graceful-shutdown", "0.5")
    with trio.fail_after(20):
        async with started_process(options) as server:
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                await stream.send_all(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
                await server.wait_for("app: endless started")
                await trio.sleep(0.3)  # the server fills both socket buffers and blocks
                start = trio.current_time()
                server.signal(signal.SIGTERM)
                assert await server.finish() == 0
                assert trio.current_time() - start < 5
        assert "app: shutdown" in server.stderr
