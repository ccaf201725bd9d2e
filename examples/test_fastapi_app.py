"""Testing examples/fastapi_app.py against a real trioserve, from pytest-trio.

Installing trioserve registers a pytest plugin with the ``trioserve_server`` fixture:
``server = await trioserve_server(app, **options)`` starts the app (lifespan included) on a
free port, or in memory with ``transport="memory"``, and stops it when the test ends,
however it ends. ``server.client()`` is an ``httpx.AsyncClient`` bound to it and
``server.websocket(path)`` a small WebSocket client. If the app raises for a request, the
call that made it raises the app's own exception (as Starlette's TestClient does), not
just a 500.

Run with ``pytest examples/test_fastapi_app.py`` (needs pytest-trio and httpx).
"""

from __future__ import annotations

import pytest
import trio
from fastapi import FastAPI
from fastapi_app import app

from trioserve.testing import ServerFactory, running

# Not needed with pytest-trio's ``trio_mode = true``; here so the file also runs without it.
pytestmark = pytest.mark.trio


async def test_root_reads_the_lifespan_state(trioserve_server: ServerFactory) -> None:
    server = await trioserve_server(app)
    async with server.client() as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.json() == {"message": "Hello from trioserve"}
    assert response.headers["server"] == "trioserve"


@pytest.mark.parametrize("transport", ["socket", "memory"])
async def test_routes(trioserve_server: ServerFactory, transport: str) -> None:
    server = await trioserve_server(app, transport=transport)
    async with server.client() as client:
        item = await client.get("/items/42", params={"q": "x"})
        echo = await client.post("/echo", json={"a": [1, 2]})
        stream = await client.get("/stream", params={"n": 3})
    assert item.json() == {"item_id": 42, "q": "x"}
    assert echo.json() == {"received": {"a": [1, 2]}}
    assert stream.text == "chunk 0\nchunk 1\nchunk 2\n"


async def test_background_task_runs_after_the_response(trioserve_server: ServerFactory) -> None:
    server = await trioserve_server(app)
    async with server.client() as client:
        assert (await client.post("/background")).json() == {"status": "scheduled"}
        log: list[str] = []
        with trio.fail_after(5):  # the task runs after the response: poll the log
            while "background task done" not in log:
                log = (await client.get("/log")).json()


@pytest.mark.parametrize("transport", ["socket", "memory"])
async def test_websocket_echo(trioserve_server: ServerFactory, transport: str) -> None:
    server = await trioserve_server(app, transport=transport)
    async with server.websocket("/ws") as ws:
        await ws.send_text("hello")
        assert await ws.receive_text() == "echo: hello"
        await ws.send_text("again")
        assert await ws.receive_text() == "echo: again"
        await ws.close()
    assert ws.close_code == 1000


# -- app exceptions --------------------------------------------------------------------------

broken = FastAPI()


@broken.get("/ratio")
async def ratio(a: int, b: int) -> dict[str, float]:
    return {"ratio": a / b}  # b=0: ZeroDivisionError, a bug the test should surface


async def test_an_endpoint_exception_is_raised_at_the_call() -> None:
    # Without pytest.raises this test would fail with the ZeroDivisionError raised
    # inside ratio(), not with a bare "assert 500 == 200".
    async with running(broken) as server, server.client() as client:
        with pytest.raises(ZeroDivisionError):
            await client.get("/ratio", params={"a": 1, "b": 0})


async def test_an_expected_exception_fails_nothing_else(trioserve_server: ServerFactory) -> None:
    server = await trioserve_server(broken)
    async with server.client() as client:
        assert (await client.get("/ratio", params={"a": 1, "b": 4})).json() == {"ratio": 0.25}
        with pytest.raises(ZeroDivisionError):
            await client.get("/ratio", params={"a": 1, "b": 0})
    assert server.app_exceptions == []  # raised at the call: not again at teardown


async def test_exceptions_can_be_left_to_the_500(trioserve_server: ServerFactory) -> None:
    server = await trioserve_server(broken, raise_app_exceptions=False)
    async with server.client() as client:
        assert (await client.get("/ratio", params={"a": 1, "b": 0})).status_code == 500
