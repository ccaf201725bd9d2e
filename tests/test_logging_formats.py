"""Access-log templates, JSON logs, --log-config for both loggers, colours."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import run_server
from server_process import started_process
from wire import Client, connect

from trioserve import Config
from trioserve.access_format import access_fields, compile_access_format
from trioserve.errors import ConfigError
from trioserve.logs import JSONFormatter, LevelPrefixFormatter

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


async def test_default_access_line_is_unchanged(access_records: list[logging.LogRecord]) -> None:
    async with run_server(body_app, access_log=True) as server:
        stream = await connect(server.addresses[0])
        async with stream:
            await Client(stream).request("GET", "/x?y=1")
        with trio.fail_after(5):
            while not access_records:
                await trio.sleep(0.01)
    message = access_records[0].getMessage()
    assert message.startswith("127.0.0.1:")
    assert ' - "GET /x?y=1 HTTP/1.1" 201 ' in message
    assert message.endswith("ms")


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
