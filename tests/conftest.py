"""Shared fixtures: an in-process server on 127.0.0.1:0 and sample apps."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from trioserve import Config, Server, serve
from trioserve.protocol.http1_parser import H11Connection, HTTPParser
from trioserve.protocol.httptools_parser import HttptoolsConnection

BASE_CONFIG = Config(port=0, lifespan="off", access_log=False)
# The parser run_server() uses; test modules that mark themselves with
# ``pytestmark = pytest.mark.usefixtures("both_parsers")`` run each test on both.
HTTP_IMPL = "h11"
# The WebSocket engine run_server() asks for (None: the config's default, ``--ws auto``);
# ``pytest.mark.usefixtures("both_ws_engines")`` runs each test on wsproto and websockets.
WS_IMPL: str | None = None


def server_parser() -> HTTPParser:
    """A server-side parser of the kind ``HTTP_IMPL`` names, for sans-IO tests."""
    if HTTP_IMPL == "httptools":
        return HttptoolsConnection()
    return H11Connection(max_incomplete_event_size=16 * 1024)


@pytest.fixture(params=["h11", "httptools"])
def both_parsers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per HTTP parser (``--http h11`` and ``--http httptools``)."""
    monkeypatch.setattr(sys.modules[__name__], "HTTP_IMPL", request.param)
    return str(request.param)


@pytest.fixture(params=["wsproto", "websockets"])
def both_ws_engines(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per WebSocket engine (``--ws wsproto`` and ``--ws websockets``)."""
    monkeypatch.setattr(sys.modules[__name__], "WS_IMPL", request.param)
    return str(request.param)


async def read_body(receive: Any) -> bytes:
    """What an app reads of the request body: every ``http.request`` message's body until
    one says no ``more_body`` (an ``http.disconnect`` ends it too)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def hello_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": b"Hello, world!"})


class Recorder:
    """An app that reads the whole body, records it and echoes ``METHOD PATH BODY``.

    When ``receive()`` answers ``http.disconnect`` before the body ended it records that
    and returns without a response (as a careful app would).
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        record: dict[str, Any] = {"scope": scope, "body": b"", "pieces": 0, "disconnect": False}
        self.requests.append(record)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                record["disconnect"] = True
                return
            record["body"] += message.get("body", b"")
            record["pieces"] += 1
            if not message.get("more_body", False):
                break
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        text = f"{scope['method']} {scope['path']} ".encode() + record["body"]
        await send({"type": "http.response.body", "body": text})

    @property
    def paths(self) -> list[str]:
        return [r["scope"]["path"] for r in self.requests]


@asynccontextmanager
async def run_server(app: Any, **options: Any) -> AsyncIterator[Server]:
    """Run ``app`` with ``BASE_CONFIG`` overridden by ``options``; hard-stop on exit."""
    engine = {} if WS_IMPL is None else {"ws": WS_IMPL}
    config = dataclasses.replace(BASE_CONFIG, **{"http": HTTP_IMPL, **engine, **options})
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, app, config)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


# The virtual clock of tests whose peers talk over real sockets (replaces pytest-trio's
# ``autojump_clock``, whose threshold is 0). At 0 the clock jumps to the next deadline as soon
# as every task waits, even while bytes one task has sent are still inside the kernel on their
# way to another: under load loopback delivery is deferred (to ksoftirqd), and a timeout then
# fires "early" or a wait is measured a whole timer long. A jump now needs every task to have
# waited this many real seconds, far longer than any delivery takes; it stays small next to
# the seconds of virtual time the tests skip.
AUTOJUMP_THRESHOLD = 0.05


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP_THRESHOLD)


def connection_tasks() -> list[trio.lowlevel.Task]:
    """The connection tasks of this run's in-process servers: one per accepted connection.

    ``connect()`` returns once the kernel completed the handshake, before the server's
    ``accept()`` took the connection: a test about accepted connections waits for these.
    """
    found: list[trio.lowlevel.Task] = []

    def walk(task: trio.lowlevel.Task) -> None:
        if task.name.endswith(".serve_connection"):
            found.append(task)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root)
    return found


@pytest.fixture
def server_factory() -> Callable[..., Any]:
    return run_server
