"""``--workers`` with ``--app-loop asyncio`` and with TLS; restart back-off; the kill
after the graceful-shutdown deadline. Real process trees, bounded.

Each test starts ``python -m trioserve ... --workers 2``, proves what it is about on the
wire or in the process table, then stops the parent with SIGTERM and checks exit 0 with no
worker left behind.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import ssl
from pathlib import Path
from typing import Any

import trio
import trustme
from server_process import (
    WORKER_APP,
    WORKER_STARTED_RE,
    get,
    is_alive,
    live_children,
    started_process,
    wait_all_gone,
)
from wire import Client

from trioserve.workers.supervisor import SHUTDOWN_MARGIN

# Reports, per worker process, the async library the app runs on and the loop that ran its
# lifespan startup (same loop as the request, or the bridge is per call).
ASYNCIO_APP = """
import asyncio
import itertools
import json
import os

import sniffio

startup_loop = []


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                startup_loop.append(id(asyncio.get_running_loop()))
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    await asyncio.sleep(0.02)  # asyncio-only: fails on a bare trio loop
    body = json.dumps({
        "pid": os.getpid(),
        "library": sniffio.current_async_library(),
        "same_loop": startup_loop == [id(asyncio.get_running_loop())],
        "scheme": scope["scheme"],
    }).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""

TLS_APP = """
import itertools
import json
import os


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    tls = scope["extensions"].get("tls")
    body = json.dumps({
        "pid": os.getpid(),
        "scheme": scope["scheme"],
        "tls_version": tls and tls["tls_version"],
    }).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""


def base_args(app_dir: Path, app: str) -> list[str]:
    return [
        app,
        "--app-dir",
        str(app_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--workers",
        "2",
        "--no-access-log",
    ]


async def pids_from_both(fetch: Any, workers: set[int]) -> list[dict[str, Any]]:
    """Concurrent requests until both workers have answered; every answer is returned."""
    answers: list[dict[str, Any]] = []

    async def one() -> None:
        answers.append(await fetch())

    for _ in range(30):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
        if {answer["pid"] for answer in answers} == workers:
            break
    assert {answer["pid"] for answer in answers} == workers
    return answers


async def stop_cleanly(server: Any, workers: set[int]) -> None:
    server.signal(signal.SIGTERM)
    assert await server.wait_exit() == 0
    await wait_all_gone(sorted(workers), timeout=5)
    assert not any(is_alive(pid) for pid in workers)


async def test_two_workers_run_the_app_on_asyncio(tmp_path: Path) -> None:
    (tmp_path / "aioapp.py").write_text(ASYNCIO_APP)

    async def fetch() -> dict[str, Any]:
        status, body = await get(server.port)
        assert status == 200, body
        answer: dict[str, Any] = json.loads(body)
        return answer

    with trio.fail_after(40):
        async with started_process(
            [*base_args(tmp_path, "aioapp:app"), "--app-loop", "asyncio", "--lifespan", "on"]
        ) as server:
            workers = set(await server.wait_ready(2))
            assert len(workers) == 2
            answers = await pids_from_both(fetch, workers)
            assert {answer["library"] for answer in answers} == {"asyncio"}
            assert all(answer["same_loop"] for answer in answers), answers
            await stop_cleanly(server, workers)
    assert "Traceback" not in server.stderr


async def test_two_workers_serve_tls(tmp_path: Path) -> None:
    (tmp_path / "tlsapp.py").write_text(TLS_APP)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    context = ssl.create_default_context()
    ca.configure_trust(context)

    async def fetch() -> dict[str, Any]:
        tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
        stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
        async with stream:
            response, body = await Client(stream).request(  # type: ignore[arg-type]
                headers=[("connection", "close")]
            )
        assert response.status_code == 200, body
        answer: dict[str, Any] = json.loads(body)
        return answer

    tls = ["--ssl-certfile", str(cert_path), "--ssl-keyfile", str(key_path)]
    with trio.fail_after(40):
        async with started_process([*base_args(tmp_path, "tlsapp:app"), *tls]) as server:
            assert server.url.startswith("https://")
            workers = set(await server.wait_ready(2))
            assert len(workers) == 2
            answers = await pids_from_both(fetch, workers)
            assert {(a["scheme"], a["tls_version"] is not None) for a in answers} == {
                ("https", True)
            }
            # Plain HTTP on the TLS port is refused without disturbing the workers.
            plain = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with plain:
                await plain.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                with trio.fail_after(10):
                    while await plain.receive_some(65536):
                        pass
            assert (await fetch())["scheme"] == "https"
            await stop_cleanly(server, workers)


# Lifespan startup fails while a "broken" file exists next to the app (a bad deploy that
# arrives after the workers booted).
FLAKY_APP = WORKER_APP.replace(
    'if os.environ.get("WORKER_APP_FAIL"):',
    'if os.path.exists(os.path.join(os.path.dirname(__file__), "broken")):',
)


async def test_a_worker_failing_after_boot_is_restarted_with_growing_back_off(
    tmp_path: Path,
) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY_APP)
    with trio.fail_after(40):
        async with started_process(base_args(tmp_path, "flaky:app")) as server:
            first = await server.wait_ready(2)
            (tmp_path / "broken").touch()
            os.kill(first[0], signal.SIGKILL)
            # Note when each replacement starts: every one of them fails its startup.
            starts: list[float] = []
            while len(starts) < 6:
                await server.wait_for(WORKER_STARTED_RE, count=3 + len(starts), timeout=15)
                starts.append(trio.current_time())
            gaps = [b - a for a, b in itertools.pairwise(starts)]
            # Each gap is one failed start-up plus the back-off (0.1, 0.2, 0.4, 0.8, 1.6 s);
            # without a back-off they would all be equal.
            assert gaps[-1] - gaps[0] >= 1.0, gaps
            assert server.process.returncode is None  # one worker still serves
            status, body = await get(server.port)
            assert (status, int(body)) == (200, first[1])
            (tmp_path / "broken").unlink()
            workers = set(await server.wait_ready(3, timeout=20))
            server.signal(signal.SIGTERM)
            assert await server.wait_exit() == 0
            await wait_all_gone(sorted(workers), timeout=5)
    assert server.stderr.count("database unreachable") >= 5


async def test_sigterm_kills_a_worker_still_busy_after_the_graceful_timeout(
    tmp_path: Path,
) -> None:
    """--timeout-graceful-shutdown 1: a worker whose loop is blocked cannot drain; the
    parent kills it after 1 s + SHUTDOWN_MARGIN and still exits 0, leaving no orphan."""
    (tmp_path / "workerapp.py").write_text(WORKER_APP)
    # The health check (5 s by default) would replace the blocked worker first.
    extra = ["--timeout-graceful-shutdown", "1", "--timeout-worker-healthcheck", "60"]
    with trio.fail_after(40):
        async with started_process([*base_args(tmp_path, "workerapp:app"), *extra]) as server:
            workers = await server.wait_ready(2)
            blocked = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with blocked:
                await blocked.send_all(b"GET /block?60 HTTP/1.1\r\nHost: t\r\n\r\n")
                await server.wait_for("app: blocking the loop")
                start = trio.current_time()
                server.signal(signal.SIGTERM)
                assert await server.wait_exit(timeout=20) == 0
                elapsed = trio.current_time() - start
            assert 1 + SHUTDOWN_MARGIN - 0.5 <= elapsed < 1 + SHUTDOWN_MARGIN + 5, elapsed
            await wait_all_gone(workers, timeout=5)
            assert live_children(server.pid) == []
    # Only the blocked worker was killed; the idle one drained in time.
    killed = [
        pid for pid in workers if f"[{pid}] did not stop in time; killing it" in server.stderr
    ]
    assert len(killed) == 1, server.stderr
