"""The admin listener (``--admin-bind``/``--admin-uds``): /livez, /readyz and
``--shutdown-delay``, on real processes (a single one and ``--workers 2``)."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import h11
import trio
from server_process import ServerProcess, clean_env, get, running_process, started_process
from wire import Client

HEALTH_APP = """
import os
import time

import trio

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup" and os.path.exists("slow-start"):
                await trio.sleep(2.0)  # a replacement worker's startup takes a while
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["path"] == "/block":
        open("slow-start", "w").close()
        time.sleep(4.0)  # blocks the worker's event loop: no heartbeat
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def health_args(tmp_path: Path, admin_port: int, *extra: str) -> list[str]:
    (tmp_path / "health_app.py").write_text(HEALTH_APP)
    return [
        "health_app:app",
        "--app-dir",
        str(tmp_path),
        "--port",
        "0",
        "--admin-bind",
        f"127.0.0.1:{admin_port}",
        *extra,
    ]


async def probe(port: int, target: str) -> int:
    """The status of GET ``target`` on the admin port; 0 when nothing answers."""
    try:
        with trio.fail_after(5):
            status, _ = await get(port, target)
    except OSError:
        return 0
    return status


async def wait_status(port: int, target: str, wanted: int, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while await probe(port, target) != wanted:
            await trio.sleep(0.02)


async def test_readyz_goes_503_on_sigterm_while_the_app_is_served_for_the_shutdown_delay(
    tmp_path: Path,
) -> None:
    admin = free_port()
    async with started_process(
        health_args(tmp_path, admin, "--shutdown-delay", "1.5"), cwd=tmp_path
    ) as server:
        assert await probe(admin, "/readyz") == 200
        assert await probe(admin, "/livez") == 200
        assert await probe(admin, "/nope") == 404
        server.signal(signal.SIGTERM)
        await wait_status(admin, "/readyz", 503, timeout=1.5)
        # Not ready, but still serving normally: new connections are accepted.
        status, _ = await get(server.port, "/")
        assert status == 200
        assert "Shutting down" not in server.stderr
        await server.wait_for("Shutting down", timeout=5)
        with trio.fail_after(5):  # then the listener closes, and the process ends
            while True:
                try:
                    await get(server.port, "/")
                except (OSError, trio.BrokenResourceError, h11.RemoteProtocolError):
                    break  # (refused, or reset by a listener closing under the connection)
                await trio.sleep(0.02)
        assert await server.finish() == 0
    assert "Not ready any more; serving 1.5s more" in server.stderr


async def test_workers_parent_delays_the_drain_and_reports_not_ready(tmp_path: Path) -> None:
    admin = free_port()
    async with started_process(
        health_args(tmp_path, admin, "--workers", "2", "--shutdown-delay", "1.5"), cwd=tmp_path
    ) as server:
        await server.wait_ready(2)
        await wait_status(admin, "/readyz", 200)
        server.signal(signal.SIGTERM)
        await wait_status(admin, "/readyz", 503, timeout=1.5)
        status, _ = await get(server.port, "/")
        assert status == 200  # the workers were not told to drain yet
        assert "Shutting down" not in server.stderr
        await server.wait_for("Shutting down", count=2, timeout=5)
        assert await server.finish() == 0
    assert "serving 1.5s more before stopping the workers" in server.stderr


async def test_livez_is_503_while_a_blocked_worker_is_being_replaced(tmp_path: Path) -> None:
    admin = free_port()
    async with started_process(
        health_args(tmp_path, admin, "--workers", "2", "--timeout-worker-healthcheck", "1"),
        cwd=tmp_path,
    ) as server:
        await server.wait_ready(2)
        assert await probe(admin, "/livez") == 200
        async with trio.open_nursery() as nursery:

            async def blocked_request() -> None:
                try:
                    await get(server.port, "/block")
                except Exception:  # the worker is killed under it
                    pass

            nursery.start_soon(blocked_request)
            await wait_status(admin, "/livez", 503, timeout=5)
            await server.wait_for("sent no heartbeat", timeout=5)
            # Live again once the replacement (slow lifespan startup) is ready.
            await wait_status(admin, "/livez", 200, timeout=10)
            await server.wait_ready(3)
        assert await probe(admin, "/readyz") == 200
        metrics = await get(admin, "/metrics")
        assert b"trioserve_worker_healthcheck_failures_total 1.0" in metrics[1]
        assert b'trioserve_worker_exits_total{cause="blocked"} 1.0' in metrics[1]
        assert await server.stop() == 0


async def test_admin_endpoints_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    (tmp_path / "health_app.py").write_text(HEALTH_APP)
    args = ["health_app:app", "--app-dir", str(tmp_path), "--port", "0"]
    async with started_process([*args, "--admin-uds", str(path)], cwd=tmp_path) as server:
        stream = await trio.open_unix_socket(str(path))
        async with stream:
            response, body = await Client(stream).request("GET", "/readyz")
        assert (response.status_code, body) == (200, b"ready\n")
        assert await server.stop() == 0


async def run_to_exit(args: list[str], env: dict[str, str] | None = None) -> ServerProcess:
    async with running_process(args, env=env) as server:
        assert await server.finish() == 2
    return server


async def test_admin_options_are_checked(tmp_path: Path) -> None:
    (tmp_path / "health_app.py").write_text(HEALTH_APP)
    base = ["health_app:app", "--app-dir", str(tmp_path)]
    server = await run_to_exit([*base, "--port", "8765", "--admin-bind", "127.0.0.1:8765"])
    assert "admin_bind must not use the app's port 8765" in server.stderr
    server = await run_to_exit([*base, "--admin-bind", "nonsense"])
    assert "admin_bind must be HOST:PORT" in server.stderr
    # Without the [metrics] extra: one line, exit 2 (prometheus_client hidden from imports:
    # the check finds the package without importing it).
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['prometheus_client'] = None\n")
    env = clean_env(PYTHONPATH=str(hide))
    server = await run_to_exit([*base, "--admin-bind", "127.0.0.1:0"], env=env)
    assert "pip install 'trioserve[metrics]'" in server.stderr
    assert "Traceback" not in server.stderr
