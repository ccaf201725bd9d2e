"""Access-log templates, JSON logs, --log-config for both loggers, colours."""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import Recorder, run_server
from server_process import started_process
from wire import Client, connect, receive_until

from trioserve import ClientDisconnected, Config
from trioserve.access_format import (
    DEFAULT_ACCESS_FORMAT,
    TIMED_ACCESS_FORMAT,
    access_fields,
    compile_access_format,
    status_phrase,
)
from trioserve.errors import ConfigError
from trioserve.logs import JSONFormatter, LevelPrefixFormatter
from trioserve.message_trace import TRACE_LOG_LEVEL, elided

SCOPE: dict[str, Any] = {
    "type": "http",
    "method": "POST",
    "path": "/items/1",
    "raw_path": b"/items/1",
    "query_string": b"a=1&b=2",
    "http_version": "1.1",
    "scheme": "https",
    "client": ("203.0.113.7", 5555),
    "headers": [(b"x-request-id", b"req-42"), (b"user-agent", b"curl/8")],
}

# -- templates ----------------------------------------------------------------------------------


def test_access_fields_from_scope_and_response() -> None:
    assert access_fields(SCOPE, 201, 17, 0.0123456) == {
        "client": "203.0.113.7:5555",
        "method": "POST",
        "path": "/items/1",
        "query": "a=1&b=2",
        "target": "/items/1?a=1&b=2",
        "http_version": "1.1",
        "scheme": "https",
        "status": 201,
        "status_phrase": "Created",
        "bytes": 17,
        "duration": "0.012346",
        "duration_ms": "12.3",
        "request_id": "req-42",
    }


def test_access_fields_defaults_for_missing_values() -> None:
    fields = access_fields(
        {**SCOPE, "client": None, "headers": [], "query_string": b""}, None, 0, 0.0
    )
    assert (fields["client"], fields["status"], fields["request_id"], fields["target"]) == (
        "-",
        "-",
        "-",
        "/items/1",
    )


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            "{client} {method} {path} {query} {status} {bytes} {request_id}",
            "203.0.113.7:5555 POST /items/1 a=1&b=2 201 17 req-42",
        ),
        (
            '"{method} {target} HTTP/{http_version}" {status} {duration_ms}ms',
            '"POST /items/1?a=1&b=2 HTTP/1.1" 201 12.3ms',
        ),
        (
            DEFAULT_ACCESS_FORMAT,
            '203.0.113.7:5555 - "POST /items/1?a=1&b=2 HTTP/1.1" 201 Created',
        ),
        (
            TIMED_ACCESS_FORMAT,
            '203.0.113.7:5555 - "POST /items/1?a=1&b=2 HTTP/1.1" 201 Created 12.3ms',
        ),
        ("ua={header:User-Agent} missing={header:x-nope}", "ua=curl/8 missing=-"),
        ("{{literal}} {scheme}", "{literal} https"),
        ("", ""),
    ],
)
def test_access_template_renders(template: str, expected: str) -> None:
    rendered = compile_access_format(template).render(
        access_fields(SCOPE, 201, 17, 0.0123456), SCOPE["headers"]
    )
    assert rendered == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{nope}", "unknown field {nope}"),
        ("{status", "unmatched '{'"),
        ("status}", "unmatched '}'"),
        ("{header:bad name}", "bad header name 'bad name'"),
    ],
)
def test_bad_access_template_is_a_config_error(template: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(access_log_format=template)


def test_log_format_must_be_text_or_json() -> None:
    with pytest.raises(ConfigError, match="log_format must be one of text, json"):
        Config(log_format="xml")


# -- formatters ---------------------------------------------------------------------------------


def record(msg: str = "hello %s", args: tuple[Any, ...] = ("world",), **extra: Any) -> Any:
    rec = logging.LogRecord("trioserve.server", logging.WARNING, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_json_formatter_plain_record() -> None:
    data = json.loads(JSONFormatter().format(record()))
    assert data["message"] == "hello world"
    assert data["level"] == "WARNING"
    assert data["logger"] == "trioserve.server"
    assert data["time"].endswith("Z")


def test_json_formatter_traceback_stays_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record()
        rec.exc_info = sys.exc_info()
    line = JSONFormatter().format(rec)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc_info"]


def test_json_formatter_access_record_has_fields() -> None:
    rec = record(
        "%s",
        ("line",),
        asgi_scope=SCOPE,
        status_code=200,
        body_bytes=3,
        duration=0.5,
        aborted=False,
    )
    data = json.loads(JSONFormatter().format(rec))
    assert data["client"] == "203.0.113.7:5555"
    assert (data["status"], data["bytes"], data["duration"]) == (200, 3, 0.5)
    assert data["request_id"] == "req-42"
    assert data["aborted"] is False


def test_level_prefix_colors() -> None:
    assert (
        LevelPrefixFormatter("%(levelprefix)s%(message)s", use_colors=True).format(record())
        == "\x1b[33mWARNING\x1b[0m:  hello world"
    )
    assert (
        LevelPrefixFormatter("%(levelprefix)s%(message)s", use_colors=False).format(record())
        == "WARNING:  hello world"
    )


class _FakeTTY:
    def isatty(self) -> bool:
        return True


def test_colors_default_to_tty_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert LevelPrefixFormatter(use_colors=None).use_colors is False  # pytest captures stderr
    monkeypatch.setattr(sys, "stderr", _FakeTTY())
    assert LevelPrefixFormatter(use_colors=None).use_colors is True
    assert LevelPrefixFormatter(use_colors=False).use_colors is False


# -- the access line from a real server (in-process) --------------------------------------------


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_records() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger("trioserve.access")
    handler = ListHandler()
    saved = (logger.level, logger.disabled)
    logger.setLevel(logging.INFO)
    logger.disabled = False
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.disabled = saved[1]


async def body_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b"12345", "more_body": True})
    await send({"type": "http.response.body", "body": b"678"})


async def test_access_line_uses_template_and_forwarded_client(
    access_records: list[logging.LogRecord],
) -> None:
    template = "{client} {method} {target} {status} {bytes}B id={request_id}"
    async with run_server(body_app, access_log=True, access_log_format=template) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            await Client(stream).request(
                "GET",
                "/x?y=1",
                headers=[("x-forwarded-for", "198.51.100.4"), ("x-request-id", "abc")],
            )
        with trio.fail_after(5):
            while not access_records:
                await trio.sleep(0.01)
    [rec] = access_records
    assert rec.getMessage() == "198.51.100.4:0 GET /x?y=1 201 8B id=abc"
    assert rec.status_code == 201  # type: ignore[attr-defined]


async def wait_for_records(records: list[logging.LogRecord], count: int = 1) -> None:
    with trio.fail_after(5):
        while len(records) < count:
            await trio.sleep(0.01)


async def test_default_access_line_is_uvicorns(access_records: list[logging.LogRecord]) -> None:
    async with run_server(body_app, access_log=True) as server:
        stream = await connect(server.addresses[0])
        port = stream.socket.getsockname()[1]
        async with stream:
            await Client(stream).request("GET", "/x?y=1")
        await wait_for_records(access_records)
    [rec] = access_records
    # uvicorn's exact line: log parsers written for uvicorn keep working.
    assert rec.getMessage() == f'127.0.0.1:{port} - "GET /x?y=1 HTTP/1.1" 201 Created'
    # ... and uvicorn's "INFO:     " prefix from the default formatter.
    formatter = LevelPrefixFormatter("%(levelprefix)s%(message)s", use_colors=False)
    assert formatter.format(rec).startswith("INFO:     127.0.0.1:")


@pytest.mark.parametrize(
    ("status", "phrase"),
    [(200, "OK"), (404, "Not Found"), (499, "Client Closed Request"), (599, ""), (None, "-")],
)
def test_status_phrase(status: int | None, phrase: str) -> None:
    assert status_phrase(status) == phrase


@pytest.mark.usefixtures("both_parsers")
async def test_abandoned_upload_is_logged_499_not_500(
    access_records: list[logging.LogRecord],
) -> None:
    # Half of a Content-Length body, then the client leaves: nothing was answered and the
    # server did not fail, so the line must not inflate the 5xx count (nginx: 499).
    app = Recorder()
    async with run_server(app, access_log=True) as server:
        stream = await connect(server.addresses[0])
        port = stream.socket.getsockname()[1]
        async with stream:
            await stream.send_all(
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345"
            )
            await trio.testing.wait_all_tasks_blocked()
        await wait_for_records(access_records)
    assert app.requests[0]["disconnect"]  # the app did see the upload abandoned
    [rec] = access_records
    assert rec.getMessage() == (
        f'127.0.0.1:{port} - "POST /upload HTTP/1.1" 499 Client Closed Request'
    )
    assert (rec.status_code, rec.aborted) == (499, True)  # type: ignore[attr-defined]


async def test_response_cut_short_is_marked_aborted(
    access_records: list[logging.LogRecord],
) -> None:
    # The app started a 200 and the client left mid-body: the status stays the app's, the
    # line says the response did not complete.
    gone = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await gone.wait()
        with pytest.raises(ClientDisconnected):
            while True:  # until the write finds the peer gone
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})

    async with run_server(app, access_log=True) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            await Client(stream).send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await receive_until(stream, b"x")
        gone.set()
        await wait_for_records(access_records)
    [rec] = access_records
    assert rec.getMessage().endswith('"GET / HTTP/1.1" 200 OK (aborted)')


async def test_client_reset_right_after_its_request_is_logged_as_its_tcp_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A client that connects, sends its request and resets at once (SO_LINGER 0): by the
    # time the server accepts, getpeername() fails (ENOTCONN). The request is still read
    # and answered (in vain) and must name its TCP peer, never a UNIX socket.
    caplog.set_level(logging.DEBUG, "trioserve")
    clients: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        clients.append(scope["client"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    ports: list[int] = []
    async with run_server(app, access_log=True) as server:
        address = server.addresses[0]
        assert isinstance(address, tuple)  # (TCP)
        for _ in range(5):
            # (Blocking stdlib calls with no checkpoint between them: the server cannot
            # accept before the reset.)
            sock = socket.create_connection(address)
            ports.append(sock.getsockname()[1])
            sock.sendall(b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        with trio.fail_after(5):
            while len(clients) < len(ports):
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
    assert sorted(clients) == sorted(("127.0.0.1", port) for port in ports)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("trioserve")]
    assert not [m for m in messages if "unix" in m]
    access = [r.getMessage() for r in caplog.records if r.name == "trioserve.access"]
    assert sorted(m.split(" ", 1)[0] for m in access) == sorted(f"127.0.0.1:{p}" for p in ports)


# -- the CLI, as a real process ------------------------------------------------------------------

APP = (
    "conftest:hello_app",
    "--app-dir",
    str(Path(__file__).parent),
    "--port",
    "0",
    "--lifespan",
    "off",
)


async def hit(address: tuple[str, int], headers: list[tuple[str, str]] | None = None) -> None:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        response, _ = await Client(stream).request(headers=headers)
        assert response.status_code == 200


async def test_cli_json_logs_one_object_per_line() -> None:
    async with started_process(
        [*APP, "--log-format", "json", "--access-log-format", "{method} {path} {status}"]
    ) as server:
        await hit(server.address, [("x-request-id", "r-1")])
        await server.wait_for('"status": 200', "any")
        assert await server.stop() == 0
    lines = (server.stderr + server.stdout).splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    access = [r for r in records if r["logger"] == "trioserve.access"]
    assert len(access) == 1
    assert access[0]["message"] == "GET / 200"
    assert access[0]["request_id"] == "r-1"
    assert access[0]["bytes"] == 13
    assert any("running on" in r["message"] for r in records)


async def test_cli_log_config_is_honoured_for_error_and_access_loggers(tmp_path: Path) -> None:
    error_log = tmp_path / "error.log"
    access_log = tmp_path / "access.log"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "CUSTOM %(name)s %(message)s"}},
        "handlers": {
            "error": {
                "class": "logging.FileHandler",
                "filename": str(error_log),
                "formatter": "plain",
            },
            "access": {
                "class": "logging.FileHandler",
                "filename": str(access_log),
                "formatter": "plain",
            },
        },
        "loggers": {
            "trioserve.error": {"handlers": ["error"], "level": "INFO", "propagate": False},
            "trioserve.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }
    path = tmp_path / "log.json"
    path.write_text(json.dumps(config))
    # The startup line goes to the file, so find the port another way: a UNIX socket.
    sock = str(tmp_path / "s.sock")
    args = [a for a in APP if a not in ("--port", "0")]
    async with started_process(
        [*args, "--uds", sock, "--log-config", str(path)], ready_file=error_log
    ) as server:
        stream = await trio.open_unix_socket(sock)
        async with stream:
            response, _ = await Client(stream).request()
        assert response.status_code == 200
        assert await server.stop() == 0
    assert "CUSTOM trioserve.runner trioserve running on unix:" in error_log.read_text()
    assert 'CUSTOM trioserve.access - - "GET / HTTP/1.1" 200' in access_log.read_text()
    assert "running on" not in server.stderr  # nothing went to the default handler


@pytest.mark.parametrize(
    ("flag", "colored"), [("--use-colors", True), (None, False), ("--no-use-colors", False)]
)
async def test_cli_use_colors(flag: str | None, colored: bool) -> None:
    async with started_process([*APP, *([flag] if flag else [])]) as server:
        assert await server.stop() == 0
    assert ("\x1b[32mINFO\x1b[0m:" in server.stderr) is colored
    assert ("\x1b[" in server.stderr) is colored


# -- --log-level trace ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        pytest.param(
            {"type": "http.request", "body": b"secret", "more_body": False},
            {"type": "http.request", "body": "<6 bytes>", "more_body": False},
            id="body",
        ),
        pytest.param(
            {"type": "http.response.start", "status": 200, "headers": [(b"a", b"b")]},
            {"type": "http.response.start", "status": 200, "headers": "<1 headers>"},
            id="headers",
        ),
        pytest.param(
            {"type": "websocket.send", "bytes": None, "text": "héllo"},
            {"type": "websocket.send", "bytes": None, "text": "<5 chars>"},
            id="ws-text",
        ),
        pytest.param(
            {"type": "lifespan", "state": {"db": object()}, "extensions": {"tls": {}}},
            {"type": "lifespan", "state": "<...>", "extensions": "<...>"},
            id="app-objects",
        ),
        pytest.param("not a message", "not a message", id="garbage-passes"),
    ],
)
def test_traced_messages_show_sizes_not_contents(message: Any, shown: Any) -> None:
    assert elided(message) == shown


def trace_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == TRACE_LOG_LEVEL]


async def test_trace_level_logs_connections_and_each_asgi_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(TRACE_LOG_LEVEL, "trioserve")  # before serve(): it decides at start
    async with run_server(body_app) as server:
        stream = await connect(server.addresses[0])
        peer = f"127.0.0.1:{stream.socket.getsockname()[1]}"
        async with stream:
            await Client(stream).request("POST", "/t?q=1", body=b"hello")
        with trio.fail_after(5):
            while f"{peer} - HTTP connection lost" not in trace_lines(caplog):
                await trio.sleep(0.01)
    lines = trace_lines(caplog)
    assert lines[0] == f"{peer} - HTTP connection made"
    [started] = [line for line in lines if "Started" in line]
    number = started.split("[", 1)[1].split("]", 1)[0]
    asgi = f"{peer} - ASGI [{number}]"
    assert started.startswith(f"{asgi} Started scope={{'type': 'http', ")
    assert "'path': '/t', " in started
    assert "'headers': '<2 headers>'" in started  # host, content-length
    assert lines[2:] == [
        f"{asgi} Send {{'type': 'http.response.start', 'status': 201, 'headers': '<0 headers>'}}",
        f"{asgi} Send {{'type': 'http.response.body', 'body': '<5 bytes>', 'more_body': True}}",
        f"{asgi} Send {{'type': 'http.response.body', 'body': '<3 bytes>'}}",
        f"{asgi} Completed",
        f"{peer} - HTTP connection lost",
    ]
    assert not [line for line in lines if "hello" in line or "12345" in line]  # no bodies


async def test_trace_level_logs_what_the_app_receives_and_how_it_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(TRACE_LOG_LEVEL, "trioserve")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise RuntimeError("boom")

    async with run_server(app) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            response, _ = await Client(stream).request("POST", "/", body=b"hello")
        assert response.status_code == 500
    lines = trace_lines(caplog)
    assert any(
        line.endswith("Receive {'type': 'http.request', 'body': '<5 bytes>', 'more_body': False}")
        for line in lines
    )
    assert [line.split("] ", 1)[1] for line in lines if "ASGI [" in line][-1] == "Raised exception"
    assert not [line for line in lines if line.endswith("Completed")]


async def test_without_trace_the_app_gets_the_servers_own_receive_and_send(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Zero cost when trace is off: no wrapper between the app and the connection.
    caplog.set_level(logging.DEBUG, "trioserve")
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((receive, send))
        await body_app(scope, receive, send)

    async with run_server(app) as server, await connect(server.addresses[0]) as stream:
        await Client(stream).request()
    [(receive, send)] = seen
    assert type(receive.__self__).__name__ == type(send.__self__).__name__ == "RequestCycle"
    assert not trace_lines(caplog)


async def test_cli_log_level_trace_prints_uvicorns_trace_lines() -> None:
    async with started_process([*APP, "--log-level", "trace"]) as server:
        await hit(server.address)
        await server.wait_for(r"TRACE:    127\.0\.0\.1:\d+ - HTTP connection lost\n")
        assert await server.stop() == 0
    assert re.search(r"TRACE:    127\.0\.0\.1:\d+ - HTTP connection made\n", server.stderr)
    assert re.search(
        r"TRACE:    127\.0\.0\.1:\d+ - ASGI \[\d+\] Send \{'type': 'http\.response\.start', "
        r"'status': 200, 'headers': '<1 headers>'\}\n",
        server.stderr,
    )
    # The access line on stdout is uvicorn's, level prefix included.
    assert re.search(
        r'^INFO:     127\.0\.0\.1:\d+ - "GET / HTTP/1\.1" 200 OK$', server.stdout, re.MULTILINE
    )
