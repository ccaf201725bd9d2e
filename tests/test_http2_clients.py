"""HTTP/2 with real clients: nghttp, h2load, httpx, curl and a headless Chromium.

Each client talks to the real server (``serve()``, in this process) over a real socket,
cleartext (prior knowledge, ``Upgrade: h2c``) or TLS (ALPN). A client missing from the
machine skips its test; ``scripts/install-chromium.sh`` (the Makefile's ``test`` target)
installs Chromium, nghttp and h2load.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
from conftest import run_server
from test_http2 import echo, hello
from test_tls import ca, pki, tls_options  # noqa: F401 (fixtures)

UPLOAD_SIZE = 3 * 1024 * 1024


def needs(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"needs {tool}")


async def run(*args: str, timeout: float = 60) -> str:
    """Run a client to completion; its exit status must be 0. Returns its stdout."""
    with trio.fail_after(timeout):
        result = await trio.run_process(
            list(args), capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
    return result.stdout.decode()


async def app(scope: Any, receive: Any, send: Any) -> None:
    """``/echo`` echoes the body; anything else is ``test_http2.hello``."""
    if scope["type"] == "http" and scope["path"] == "/echo":
        await echo(scope, receive, send)
    else:
        await hello(scope, receive, send)


# -- nghttp -----------------------------------------------------------------------------------


@needs("nghttp")
@pytest.mark.parametrize("mode", ["prior-knowledge", "upgrade", "tls"])
async def test_nghttp_is_served(mode: str, pki: dict[str, str]) -> None:  # noqa: F811
    """``nghttp -nv``: the frame exchange ends in a 200 (nghttp's request is stream 13 after
    its priority streams; an upgraded request is stream 1)."""
    options = tls_options(pki) if mode == "tls" else {}
    async with run_server(app, **options) as server:
        scheme = "https" if mode == "tls" else "http"
        flags = ["-u"] if mode == "upgrade" else []
        out = await run("nghttp", "-nv", *flags, f"{scheme}://127.0.0.1:{server.port}/n?x=1")
    stream = 1 if mode == "upgrade" else 13
    assert f"recv (stream_id={stream}) :status: 200" in out, out
    assert "recv RST_STREAM" not in out
    assert "recv GOAWAY" not in out.split("send GOAWAY")[0]  # (nghttp says goodbye first)
    if mode == "tls":
        assert "The negotiated protocol: h2" in out


# -- h2load -----------------------------------------------------------------------------------


def h2load_counts(out: str) -> dict[str, int]:
    """The ``requests:`` line of h2load's summary as numbers."""
    line = re.search(r"^requests: (.*)$", out, re.MULTILINE)
    assert line, out
    return {name: int(n) for n, name in re.findall(r"(\d+) (\w+)", line.group(1))}


@needs("h2load")
@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
async def test_h2load_has_no_failed_or_errored_request(
    tls: bool,
    pki: dict[str, str],  # noqa: F811
) -> None:
    """h2load, 10 connections with 10 streams each: every request succeeds."""
    options = tls_options(pki) if tls else {}
    async with run_server(app, **options) as server:
        scheme = "https" if tls else "http"
        out = await run(
            "h2load", "-n", "2000", "-c", "10", "-m", "10",
            f"{scheme}://127.0.0.1:{server.port}/load",
        )  # fmt: skip
    counts = h2load_counts(out)
    assert counts["succeeded"] == counts["total"] == 2000, out
    assert counts["failed"] == counts["errored"] == counts["timeout"] == 0, out
    assert "2000 2xx" in out
    if tls:
        assert "Application protocol: h2" in out


@needs("h2load")
async def test_h2load_uploads_through_the_stream_windows() -> None:
    """h2load POSTing 1 MiB bodies on 10 streams per connection: all echoed whole."""
    with tempfile.NamedTemporaryFile() as data:
        data.write(os.urandom(1024 * 1024))
        data.flush()
        async with run_server(app) as server:
            out = await run(
                "h2load", "-n", "100", "-c", "2", "-m", "10", "-d", data.name,
                f"http://127.0.0.1:{server.port}/echo",
            )  # fmt: skip
    counts = h2load_counts(out)
    assert counts["succeeded"] == 100 and counts["failed"] == counts["errored"] == 0, out
    assert re.search(r"traffic: .* \((\d+)\) total", out)


# -- httpx ------------------------------------------------------------------------------------


async def test_httpx_http2_over_tls_multiplexes_and_uploads(
    ca: trustme.CA,  # noqa: F811
    pki: dict[str, str],  # noqa: F811
) -> None:
    """httpx with ``http2=True`` negotiates h2 by ALPN; concurrent requests share it."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    body = os.urandom(UPLOAD_SIZE)
    versions: list[str] = []
    async with (
        run_server(app, **tls_options(pki)) as server,
        httpx.AsyncClient(http2=True, verify=context) as client,
    ):
        base = f"https://127.0.0.1:{server.port}"

        async def get(i: int) -> None:
            response = await client.get(f"{base}/m{i}")
            assert response.status_code == 200
            assert response.text == f"2 GET /m{i} b''"
            versions.append(response.http_version)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(get, i)
        upload = await client.post(f"{base}/echo", content=body)
    assert set(versions) == {"HTTP/2"}
    assert upload.http_version == "HTTP/2"
    assert upload.content == body


async def test_httpx_prior_knowledge_on_cleartext() -> None:
    """httpx with ``http1=False, http2=True`` speaks h2c with prior knowledge."""
    async with (
        run_server(app) as server,
        httpx.AsyncClient(http1=False, http2=True) as client,
    ):
        response = await client.get(f"http://127.0.0.1:{server.port}/pk?a=b")
    assert response.http_version == "HTTP/2"
    assert response.text == "2 GET /pk b'a=b'"


# -- curl -------------------------------------------------------------------------------------


@needs("curl")
async def test_curl_parallel_transfers_share_one_connection(pki: dict[str, str]) -> None:  # noqa: F811
    """``curl --parallel`` multiplexes 20 URLs over one h2 connection (TLS)."""
    async with run_server(app, **tls_options(pki)) as server:
        urls = [f"https://127.0.0.1:{server.port}/p{i}" for i in range(20)]
        out = await run(
            "curl", "-s", "--http2", "--parallel", "--cacert",
            pki["ca.pem"], "-w", "|%{http_version} %{num_connects}\n", *urls,
        )  # fmt: skip
    lines = [line for line in out.splitlines() if "|" in line]
    assert len(lines) == 20
    assert {line.split("|")[1].split()[0] for line in lines} == {"2"}
    assert sum(int(line.split()[-1]) for line in lines) == 1, out  # one connect in all


@needs("curl")
@pytest.mark.parametrize("mode", ["prior-knowledge", "tls"])
async def test_curl_uploads_3_mb_over_http2(
    mode: str,
    pki: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    body = os.urandom(UPLOAD_SIZE)
    (tmp_path / "body").write_bytes(body)
    options = tls_options(pki) if mode == "tls" else {}
    async with run_server(app, **options) as server:
        if mode == "tls":
            flags = ["--http2", "--cacert", pki["ca.pem"]]
            url = f"https://127.0.0.1:{server.port}/echo"
        else:
            flags = ["--http2-prior-knowledge"]
            url = f"http://127.0.0.1:{server.port}/echo"
        await run(
            "curl", "-s", *flags, "--data-binary", f"@{tmp_path / 'body'}",
            "-o", str(tmp_path / "out"), "-w", "%{http_version}", url,
        )  # fmt: skip
    assert (tmp_path / "out").read_bytes() == body


@needs("curl")
async def test_curl_upgrade_with_a_body_stays_on_http1() -> None:
    """curl asks for h2c only on a bodiless request; a POST is answered over HTTP/1.1."""
    async with run_server(app) as server:
        out = await run(
            "curl", "-s", "--http2", "--data-binary", "abc", "-w", " %{http_version}",
            f"http://127.0.0.1:{server.port}/echo",
        )  # fmt: skip
    assert out == "abc 1.1"


# -- headless Chromium ------------------------------------------------------------------------

# The page's test: a streamed response read chunk by chunk, a 3 MB upload, a WebSocket
# echo, then what the Resource Timing API says about the protocol of each request.
PAGE_SCRIPT = """
async () => {
  const out = {};
  const streamed = await fetch('/stream');
  const reader = streamed.body.getReader();
  out.chunks = [];
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    out.chunks.push(new TextDecoder().decode(value));
  }
  const upload = new Uint8Array(%d);
  for (let i = 0; i < upload.length; i++) upload[i] = i %% 251;
  out.upload = await (await fetch('/upload', {method: 'POST', body: upload})).text();
  out.ws = await new Promise((resolve, reject) => {
    const ws = new WebSocket('wss://' + location.host + '/ws');
    ws.onopen = () => ws.send('ping over ws');
    ws.onmessage = (e) => { resolve(e.data); ws.close(); };
    ws.onerror = () => reject(new Error('websocket error'));
  });
  out.protocols = performance.getEntries()
    .filter((e) => e.nextHopProtocol !== undefined)
    .map((e) => [new URL(e.name).pathname, e.nextHopProtocol]);
  return JSON.stringify(out);
}
""" % (UPLOAD_SIZE,)  # noqa: UP031 (a JavaScript body full of braces)


CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--ignore-certificate-errors", "--remote-debugging-port=0",
)  # fmt: skip


async def browser_app(scope: Any, receive: Any, send: Any) -> None:
    """The page, ``/stream`` (three chunks, a pause between them), ``/upload``, ``/ws``."""
    if scope["type"] == "lifespan":
        return
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        message = await receive()
        text = f"{message.get('text')} ({scope['http_version']})"
        await send({"type": "websocket.send", "text": text})
        await receive()  # websocket.disconnect
        return
    path = scope["path"]
    if path == "/upload":
        size = 0
        checksum = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            checksum = (checksum + sum(chunk)) % 1_000_000_007
            if not message.get("more_body"):
                break
        body = f"{size} {checksum} {scope['http_version']}".encode()
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": body})
        return
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})  # fmt: skip
        for i in range(3):
            await send({"type": "http.response.body", "body": b"chunk%d;" % i, "more_body": True})
            await trio.sleep(0.2)
        await send({"type": "http.response.body", "body": b""})
        return
    html = b"<!doctype html><title>h2</title><p>trioserve</p>"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/html; charset=utf-8")]})  # fmt: skip
    await send({"type": "http.response.body", "body": html})


def devtools_evaluate(ws_url: str, page_url: str, script: str) -> Any:
    """Navigate Chromium's page to ``page_url`` and await ``script`` there (DevTools protocol).

    Runs in a worker thread with its own asyncio loop (the ``websockets`` client is asyncio).
    """
    import websockets.asyncio.client

    async def session() -> Any:
        async with websockets.asyncio.client.connect(ws_url, max_size=None) as ws:
            next_id = 0

            async def call(method: str, **params: Any) -> Any:
                nonlocal next_id
                next_id += 1
                await ws.send(json.dumps({"id": next_id, "method": method, "params": params}))
                while True:
                    reply = json.loads(await ws.recv())
                    if reply.get("id") == next_id:
                        assert "error" not in reply, reply
                        return reply["result"]

            await call("Page.enable")
            await call("Page.navigate", url=page_url)
            for _ in range(200):
                state = await call("Runtime.evaluate", expression="document.readyState")
                if state["result"].get("value") == "complete":
                    break
                await asyncio.sleep(0.05)
            result = await call(
                "Runtime.evaluate",
                expression=f"({script})()",
                awaitPromise=True,
                returnByValue=True,
            )
            assert "exceptionDetails" not in result, result
            return json.loads(result["result"]["value"])

    return asyncio.run(asyncio.wait_for(session(), 60))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="scripts/install-chromium.sh")
async def test_chromium_speaks_h2_for_the_page_fetches_upload_and_websocket(
    pki: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Headless Chromium on an https page: the Resource Timing entries say ``h2``."""
    profile = tmp_path / "profile"
    profile.mkdir()
    async with run_server(browser_app, **tls_options(pki)) as server:
        page_url = f"https://127.0.0.1:{server.port}/"
        async with trio.open_nursery() as nursery:
            browser = await nursery.start(
                trio.run_process,
                ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            )
            try:
                with trio.fail_after(30):
                    port_file = profile / "DevToolsActivePort"
                    while not port_file.exists() or len(port_file.read_text().split()) < 2:
                        await trio.sleep(0.1)
                port = port_file.read_text().split()[0]
                async with httpx.AsyncClient() as local:
                    targets = (await local.get(f"http://127.0.0.1:{port}/json/list")).json()
                page = next(t for t in targets if t["type"] == "page")
                result = await trio.to_thread.run_sync(
                    devtools_evaluate, page["webSocketDebuggerUrl"], page_url, PAGE_SCRIPT
                )
            finally:
                browser.terminate()
    checksum = sum(i % 251 for i in range(UPLOAD_SIZE)) % 1_000_000_007
    assert result["chunks"] and "".join(result["chunks"]) == "chunk0;chunk1;chunk2;"
    assert result["upload"] == f"{UPLOAD_SIZE} {checksum} 2"
    # The WebSocket went over HTTP/2 (RFC 8441: the server offers extended CONNECT).
    assert result["ws"] == "ping over ws (2)"
    protocols = dict(result["protocols"])
    assert protocols["/"] == "h2", result["protocols"]
    assert protocols["/stream"] == protocols["/upload"] == "h2", result["protocols"]
