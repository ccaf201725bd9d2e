"""examples/fastapi_app.py end to end: a real trioserve on a real socket, httpx as client."""

from __future__ import annotations

import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from server_process import CONSOLE_SCRIPT, get, started_process

from trioserve import Config, Server, serve
from trioserve.app.loading import load_app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
async def client(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setattr(sys, "path", list(sys.path))
    config = Config(port=0, app_dir=str(EXAMPLES), lifespan="on", access_log=False)
    app = load_app("fastapi_app:app", config)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, app, config)
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
                yield http
        finally:
            nursery.cancel_scope.cancel()


async def test_json_route_reads_lifespan_state(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.json() == {"message": "Hello from trioserve"}
    assert response.headers["server"] == "trioserve"


async def test_path_and_query_parameters(client: httpx.AsyncClient) -> None:
    response = await client.get("/items/42", params={"q": "a b"})
    assert response.json() == {"item_id": 42, "q": "a b"}
    assert (await client.get("/items/not-a-number")).status_code == 422


async def test_json_body_round_trip(client: httpx.AsyncClient) -> None:
    payload = {"name": "trio", "tags": ["async", "structured"], "n": 3}
    response = await client.post("/echo", json=payload)
    assert response.json() == {"received": payload}


async def test_streaming_response_is_chunked(client: httpx.AsyncClient) -> None:
    async with client.stream("GET", "/stream", params={"n": 3}) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    assert body == b"chunk 0\nchunk 1\nchunk 2\n"


async def log_entries(client: httpx.AsyncClient, wanted: str) -> list[str]:
    """The app's log once it contains ``wanted`` (work after the response is bounded)."""
    with trio.fail_after(5):
        while True:
            entries: list[str] = (await client.get("/log")).json()
            if wanted in entries:
                return entries
            await trio.sleep(0.01)


async def test_background_task_runs_after_the_response(client: httpx.AsyncClient) -> None:
    response = await client.post("/background")
    assert response.json() == {"status": "scheduled"}
    assert "background task done" in await log_entries(client, "background task done")


async def test_dependency_with_yield_is_closed(client: httpx.AsyncClient) -> None:
    response = await client.get("/me")
    assert response.json() == {"user": "alice"}
    entries = await log_entries(client, "session closed")
    assert entries.index("session opened") < entries.index("session closed")


async def test_file_response(client: httpx.AsyncClient) -> None:
    response = await client.get("/source")
    expected = (EXAMPLES / "fastapi_app.py").read_bytes()
    assert response.status_code == 200
    assert response.content == expected
    assert response.headers["content-length"] == str(len(expected))
    assert response.headers["content-type"].startswith("text/x-python")


async def test_keep_alive_many_requests(client: httpx.AsyncClient) -> None:
    for i in range(20):
        response = await client.get(f"/items/{i}")
        assert response.json()["item_id"] == i


async def test_make_run_command_serves_the_example_and_stops_on_sigint() -> None:
    # The exact command of the Makefile's `run` target (so it cannot drift), on a free port.
    root = Path(__file__).resolve().parent.parent
    recipe = re.search(r"^run:.*\n\t(?P<cmd>.+)$", (root / "Makefile").read_text(), re.M)
    assert recipe is not None
    makefile = (root / "Makefile").read_text()
    cmd = recipe["cmd"].replace("$(VENV)/bin/trioserve", CONSOLE_SCRIPT)
    # The run target's variables (make run PORT=9000) take their defaults from the Makefile.
    for name, value in re.findall(r"^(\w+) \?= (.+)$", makefile, re.M):
        cmd = cmd.replace(f"$({name})", value.strip())
    command = cmd.split()
    assert command[0] == CONSOLE_SCRIPT
    assert "$(" not in cmd
    with trio.fail_after(30):
        async with started_process(
            [*command[1:], "--port", "0"], cwd=root, console_script=True
        ) as server:
            status, body = await get(server.address[1])
            assert status == 200
            assert json.loads(body) == {"message": "Hello from trioserve"}
            server.signal(signal.SIGINT)
            assert await server.finish() == 0
