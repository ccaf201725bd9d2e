"""A real nginx (Debian's nginx-light) in front of trioserve, over TCP and a UNIX socket.

nginx runs as a subprocess on loopback with a generated config in a temporary prefix (pid,
logs and temp files there; nothing global). The client connects from 127.0.0.2, so the
address the app sees proves that ``X-Forwarded-For`` from the trusted nginx (127.0.0.1 or
the UNIX socket) was applied.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trustme
import wsproto
import wsproto.events as ws_events
from conftest import run_server
from server_process import started_process
from wire import Client

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
CLIENT_IP = "127.0.0.2"
STARTUP_TIMEOUT = 10.0

if NGINX is None:
    message = "nginx is not installed: `make test` installs nginx-light (apt-get)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Nginx:
    def __init__(self, port: int, tls_port: int | None) -> None:
        self.address = ("127.0.0.1", port)
        self.tls_address = ("127.0.0.1", tls_port) if tls_port else None


@asynccontextmanager
async def run_nginx(
    prefix: Path, upstream: str, *, cert: tuple[str, str] | None = None
) -> AsyncIterator[Nginx]:
    """Start nginx proxying to ``upstream`` (``127.0.0.1:PORT`` or ``unix:/path``)."""
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tls_port = free_port() if cert else None
    tls_server = ""
    if cert:
        tls_server = f"""
        server {{
            listen 127.0.0.1:{tls_port} ssl;
            ssl_certificate {cert[0]};
            ssl_certificate_key {cert[1]};
            location / {{ include {prefix}/proxy.conf; }}
        }}"""
    (prefix / "proxy.conf").write_text(
        textwrap.dedent("""\
        proxy_pass http://app;
        proxy_http_version 1.1;
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_read_timeout 30s;
        """)
    )
    conf = prefix / "nginx.conf"
    conf.write_text(
        textwrap.dedent(f"""\
        # "user" matters only when started as root: workers must reach the tmp prefix.
        user {"root" if os.geteuid() == 0 else "nobody"};
        worker_processes 1;
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log info;
        events {{ worker_connections 128; }}
        http {{
            access_log off;
            client_body_temp_path {prefix}/body;
            proxy_temp_path {prefix}/proxy;
            fastcgi_temp_path {prefix}/fastcgi;
            uwsgi_temp_path {prefix}/uwsgi;
            scgi_temp_path {prefix}/scgi;
            client_max_body_size 64m;
            map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
            upstream app {{ server {upstream}; keepalive 4; }}
            server {{
                listen 127.0.0.1:{port};
                location / {{ include {prefix}/proxy.conf; }}
            }}{tls_server}
        }}
        """)
    )
    process = await trio.lowlevel.open_process(
        [str(NGINX), "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with trio.fail_after(STARTUP_TIMEOUT):
            while True:
                if process.poll() is not None:
                    log = (
                        (prefix / "error.log").read_text()
                        if (prefix / "error.log").exists()
                        else ""
                    )
                    raise RuntimeError(f"nginx exited {process.returncode}: {log}")
                try:
                    probe = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await probe.aclose()
                break
        yield Nginx(port, tls_port)
    finally:
        process.terminate()
        with trio.move_on_after(5, shield=True):
            await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5, shield=True):
                await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


async def open_client(address: tuple[str, int]) -> trio.SocketStream:
    return await trio.open_tcp_stream(*address, local_address=CLIENT_IP)


# -- the app behind nginx ---------------------------------------------------------------------


class App:
    def __init__(self) -> None:
        self.first_chunk_read = trio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"chunk-0\n", "more_body": True})
            # The rest only after the client has seen the first chunk: proves no buffering.
            with trio.fail_after(10):
                await self.first_chunk_read.wait()
            for i in range(1, 5):
                await send(
                    {
                        "type": "http.response.body",
                        "body": f"chunk-{i}\n".encode(),
                        "more_body": True,
                    }
                )
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/upload":
            digest = hashlib.sha256()
            length = 0
            chunks = 0
            while True:
                message = await receive()
                assert message["type"] == "http.request"
                digest.update(message["body"])
                length += len(message["body"])
                chunks += 1
                if not message.get("more_body"):
                    break
            body = json.dumps({"length": length, "sha256": digest.hexdigest(), "chunks": chunks})
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body.encode()})
            return
        info = json.dumps({"client": scope["client"], "scheme": scope["scheme"]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": info})

    async def websocket(self, scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        info = json.dumps({"client": scope["client"], "scheme": scope["scheme"]})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": f"{message.get('text')}|{info}"})


@pytest.fixture(params=["tcp", "unix"])
async def proxied(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Nginx, App]]:
    app = App()
    if request.param == "tcp":
        async with run_server(app) as server:
            host, port = server.addresses[0]
            async with run_nginx(tmp_path / "nginx", f"{host}:{port}") as nginx:
                yield nginx, app
    else:
        path = str(tmp_path / "app.sock")
        async with run_server(app, uds=path, forwarded_allow_ips="unix:") as server:
            assert server.addresses[0] == path
            async with run_nginx(tmp_path / "nginx", f"unix:{path}") as nginx:
                yield nginx, app


async def request_json(address: tuple[str, int], target: str = "/") -> dict[str, Any]:
    stream = await open_client(address)
    async with stream:
        response, body = await Client(stream).request("GET", target)
    assert response.status_code == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


async def test_scope_shows_original_client_and_scheme(proxied: tuple[Nginx, App]) -> None:
    nginx, _ = proxied
    seen = await request_json(nginx.address)
    assert seen == {"client": [CLIENT_IP, 0], "scheme": "http"}


async def test_https_at_nginx_shows_as_https_scheme(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with run_server(App()) as server:
        host, port = server.addresses[0]
        async with run_nginx(tmp_path / "nginx", f"{host}:{port}", cert=(cert, key)) as nginx:
            assert nginx.tls_address is not None
            tcp = await open_client(nginx.tls_address)
            stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
            async with stream:
                response, body = await Client(stream).request()  # type: ignore[arg-type]
    assert response.status_code == 200
    assert json.loads(body) == {"client": [CLIENT_IP, 0], "scheme": "https"}


async def test_chunked_streaming_passes_through_unbuffered(proxied: tuple[Nginx, App]) -> None:
    nginx, app = proxied
    stream = await open_client(nginx.address)
    async with stream:
        client = Client(stream)
        await client.send_raw(
            client.conn.send(h11.Request(method="GET", target="/stream", headers=[("host", "x")]))
            or b""
        )
        await client.send_raw(client.conn.send(h11.EndOfMessage()) or b"")
        response = await client.next_event()
        assert isinstance(response, h11.Response)
        assert response.status_code == 200
        assert (b"transfer-encoding", b"chunked") in response.headers
        body = b""
        while b"chunk-0\n" not in body:
            event = await client.next_event()
            assert isinstance(event, h11.Data), event
            body += event.data
        app.first_chunk_read.set()
        while True:
            event = await client.next_event()
            if isinstance(event, h11.EndOfMessage):
                break
            body += event.data
    assert body == b"".join(f"chunk-{i}\n".encode() for i in range(5))


UPLOAD = os.urandom(1 << 20) * 12  # 12 MiB


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_upload_passes_through(proxied: tuple[Nginx, App], framing: str) -> None:
    nginx, _ = proxied
    stream = await open_client(nginx.address)
    async with stream:
        client = Client(stream)
        headers = [("host", "x")]
        headers.append(
            ("content-length", str(len(UPLOAD)))
            if framing == "content-length"
            else ("transfer-encoding", "chunked")
        )
        await client.send_raw(
            client.conn.send(h11.Request(method="POST", target="/upload", headers=headers)) or b""
        )
        view = memoryview(UPLOAD)
        for start in range(0, len(UPLOAD), 256 * 1024):
            await client.send_raw(
                client.conn.send(h11.Data(data=bytes(view[start : start + 256 * 1024]))) or b""
            )
        await client.send_raw(client.conn.send(h11.EndOfMessage()) or b"")
        response, body = await client.read_response()
    assert response.status_code == 200
    result = json.loads(body)
    assert result["length"] == len(UPLOAD)
    assert result["sha256"] == hashlib.sha256(UPLOAD).hexdigest()
    assert result["chunks"] > 1  # streamed to the app, not one buffered blob


async def test_websocket_passes_through(proxied: tuple[Nginx, App]) -> None:
    nginx, _ = proxied
    stream = await open_client(nginx.address)
    async with stream:
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        await stream.send_all(ws.send(ws_events.Request(host="x", target="/ws")))
        received: list[Any] = []

        async def next_event() -> Any:
            with trio.fail_after(10):
                while not received:
                    data = await stream.receive_some(65536)
                    ws.receive_data(data or None)
                    received.extend(ws.events())
            return received.pop(0)

        assert isinstance(await next_event(), ws_events.AcceptConnection)
        await stream.send_all(ws.send(ws_events.TextMessage(data="hello")))
        reply = await next_event()
        assert isinstance(reply, ws_events.TextMessage)
        text, info = reply.data.split("|", 1)
        assert text == "hello"
        assert json.loads(info) == {"client": [CLIENT_IP, 0], "scheme": "ws"}
        await stream.send_all(ws.send(ws_events.CloseConnection(code=1000)))
        assert isinstance(await next_event(), ws_events.CloseConnection)


# -- SIGTERM through the proxy: a real trioserve process ------------------------------------------

SLOW_APP = """
import trio

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        print("slow request started", flush=True)
        await trio.sleep(1.5)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"done " + scope["path"].encode()})
"""


async def test_sigterm_drains_in_flight_requests_through_nginx_without_502(
    tmp_path: Path,
) -> None:
    (tmp_path / "slow_app.py").write_text(SLOW_APP)
    async with started_process(
        [
            "slow_app:app",
            "--app-dir",
            str(tmp_path),
            "--port",
            "0",
            "--lifespan",
            "off",
            "--timeout-graceful-shutdown",
            "20",
        ]
    ) as server:
        host, port = server.address
        async with run_nginx(tmp_path / "nginx", f"{host}:{port}") as nginx:
            assert (await request_json_text(nginx.address, "/warm")) == (200, b"done /warm")
            results: list[tuple[int, bytes]] = []

            async def slow() -> None:
                results.append(await request_json_text(nginx.address, "/slow"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow)
                await server.wait_for("slow request started", "any")
                server.process.send_signal(signal.SIGTERM)
                await server.wait_for("Shutting down", "any")
                # The listener is closed at once: new connections are refused...
                with trio.fail_after(5):
                    while True:
                        try:
                            probe = await trio.open_tcp_stream(host, port)
                        except OSError:
                            break
                        await probe.aclose()
                        await trio.sleep(0.02)
            # ...while the in-flight request through nginx completes normally.
            assert results == [(200, b"done /slow")]
            with trio.fail_after(10):
                assert await server.process.wait() == 0
    assert "Received SIGTERM" in server.stderr


async def request_json_text(address: tuple[str, int], target: str) -> tuple[int, bytes]:
    stream = await open_client(address)
    async with stream:
        response, body = await Client(stream).request("GET", target)
    return response.status_code, body
