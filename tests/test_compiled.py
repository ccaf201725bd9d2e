"""The mypyc-compiled build and the pure one: which one runs, and who says so.

``make test`` runs the whole suite twice, on the pure package and on the compiled one
(``TRIOSERVE_EXPECT_COMPILED`` names the build each run means to test: a run that silently
tested the other build would prove nothing). Behaviour is the same by construction, so
the rest of the suite is the test of the compiled build; what is here is what mypyc has
been seen to get wrong in this code, and the reporting.
"""

from __future__ import annotations

import importlib.machinery
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import hello_app, run_server
from server_process import CONSOLE_SCRIPT

import trioserve
from trioserve.compiled import COMPILED_MODULES, build_description, compiled_modules
from trioserve.connection.stream import ConnectionStream
from trioserve.protocol.scope import ConnectionFacts


def test_suite_runs_on_the_build_it_names() -> None:
    compiled = compiled_modules()
    expected = os.environ.get("TRIOSERVE_EXPECT_COMPILED")
    if expected == "1":
        assert compiled == list(COMPILED_MODULES), "make test-compiled runs a pure build"
    elif expected == "0":
        assert compiled == [], "make test-pure runs compiled modules (stale .so files?)"
    else:  # a bare pytest run: either build, but never a mix
        assert compiled in ([], list(COMPILED_MODULES))


def test_no_module_off_the_list_is_compiled() -> None:
    # A stale extension module (an earlier build's, say of a module since taken off the
    # list) would shadow its source unnoticed: compiled_modules() looks at the list only.
    package = Path(trioserve.__file__).parent
    found = set()
    for path in package.rglob("*"):
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if path.name.endswith(suffix):
                parts = path.relative_to(package.parent).parts
                found.add(".".join([*parts[:-1], path.name.removesuffix(suffix)]))
                break  # (the longest suffix comes first: ".cpython-311-...so", ".so")
    assert found <= set(COMPILED_MODULES)
    assert found == set(compiled_modules())


def test_version_names_the_build() -> None:
    result = subprocess.run(
        [CONSOLE_SCRIPT, "--version"], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip().endswith(f", {build_description()})")
    expected = "compiled (mypyc)" if compiled_modules() else "pure Python"
    assert expected in result.stdout


async def test_debug_start_line_names_the_build(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="trioserve")
    async with run_server(hello_app):
        pass
    assert f"hot path: {build_description()}" in caplog.messages


async def test_socket_reads_lose_no_bytes() -> None:
    # mypyc evaluates a call inside a slice bound twice: ``scratch[: os.readv(...)]`` read
    # the socket twice, and the first read's bytes were lost.
    ours, peer = trio.socket.socketpair()
    with ours, peer:
        facts = ConnectionFacts(client=("127.0.0.1", 1), server=("127.0.0.1", 2))
        stream = ConnectionStream(
            trio.SocketStream(ours), memoryview(bytearray(1024)), facts, lambda: None
        )
        assert stream.fast
        assert stream.receive_nowait() is None
        await peer.send(b"first")
        assert stream.receive_nowait() == b"first"
        with trio.fail_after(5):
            await peer.send(b"second")
            assert await stream.receive() == b"second"
            await peer.send(b"third")
            assert await stream.receive(wait_first=True) == b"third"


def test_compiled_modules_import_from_the_installed_package() -> None:
    # The compiled run must not pick up the checkout's sources (make test-compiled runs in
    # tests/): a child process started from here sees the same build as the tests.
    probe = "from trioserve.compiled import compiled_modules; print(len(compiled_modules()))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=30
    )
    assert int(result.stdout) == len(compiled_modules())


def test_websocket_classes_without_mypy_extensions() -> None:
    # connection.ws_reader takes mypyc_attr from mypy_extensions (mypy's), which an install
    # without mypy lacks: the modules still import, and the interpreted H2WebSocket still
    # subclasses the (compiled: allow_interpreted_subclasses) WebSocketSession.
    probe = (
        "import sys; sys.modules['mypy_extensions'] = None\n"
        "from trioserve.connection.http2_websocket import H2WebSocket\n"
        "from trioserve.connection.websocket import WebSocketConnection, WebSocketSession\n"
        "from trioserve.protocol.ws_websockets import WebsocketsEngine\n"
        "assert issubclass(H2WebSocket, WebSocketSession)\n"
        "engine = WebsocketsEngine(1 << 20, None)\n"
        "message = engine.receive_message(bytes([0x82, 0x82, 0, 0, 0, 0]) + b'hi')\n"
        "print(message)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip() == "{'type': 'websocket.receive', 'bytes': b'hi'}"


def test_websockets_protocol_subclass_stays_interpreted() -> None:
    # ws_websockets._Protocol subclasses websockets' ServerProtocol, whose interpreted code
    # reads and writes its attributes per frame: it must stay an ordinary class (instances
    # with a __dict__, attributes settable from outside), also compiled.
    from trioserve.protocol.ws_websockets import WebsocketsEngine

    protocol = WebsocketsEngine(1 << 20, None)._protocol
    assert "__dict__" in dir(protocol)
    protocol.some_new_attribute = 1  # type: ignore[attr-defined]
    assert vars(protocol)["some_new_attribute"] == 1
