"""``--workers`` combined with ``--app-loop asyncio`` and with TLS: real process trees.

Each test starts ``python -m trioserve ... --workers 2``, proves that both workers answer
(two distinct pids) with the combined feature in effect, then stops the parent with SIGTERM
and checks exit 0 with no worker left behind.
"""

from __future__ import annotations

import json
import re
import signal
import ssl
from pathlib import Path
from typing import Any

import trio
import trustme
from supervised import get, is_alive, supervised, wait_all_gone
from wire import Client

# Reports, per worker process, the async library the app runs on and the loop that ran its
# lifespan startup (same loop as the request, or the bridge is per call).
ASYNCIO_APP = """
import asyncio
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

HTTPS_STARTUP_RE = re.compile(r"trioserve running on https://127\.0\.0\.1:(?P<port>\d+)")


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
        async with supervised(
            [*base_args(tmp_path, "aioapp:app"), "--app-loop", "asyncio", "--lifespan", "on"]
        ) as server:
            workers = set(await server.wait_ready(2))
            assert len(workers) == 2
            answers = await pids_from_both(fetch, workers)
            assert {answer["library"] for answer in answers} == {"asyncio"}
            assert all(answer["same_loop"] for answer in answers), answers
            await stop_cleanly(server, workers)
    assert "Traceback" not in server.output


async def test_two_workers_serve_tls(tmp_path: Path) -> None:
    (tmp_path / "tlsapp.py").write_text(TLS_APP)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    port = 0

    async def fetch() -> dict[str, Any]:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
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
        async with supervised(
            [*base_args(tmp_path, "tlsapp:app"), *tls], wait_started=False
        ) as server:
            port = int((await server.wait_for(HTTPS_STARTUP_RE, timeout=15))[0]["port"])
            workers = set(await server.wait_ready(2))
            assert len(workers) == 2
            answers = await pids_from_both(fetch, workers)
            assert {(a["scheme"], a["tls_version"] is not None) for a in answers} == {
                ("https", True)
            }
            # Plain HTTP on the TLS port is refused without disturbing the workers.
            plain = await trio.open_tcp_stream("127.0.0.1", port)
            async with plain:
                await plain.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                with trio.fail_after(10):
                    while await plain.receive_some(65536):
                        pass
            assert (await fetch())["scheme"] == "https"
            await stop_cleanly(server, workers)
