"""The ``trioserve`` command: real subprocess runs, click CliRunner checks, option drift."""

from __future__ import annotations

import contextvars
import dataclasses
import gc
import json
import logging
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import trio
from click.testing import CliRunner
from conftest import hello_app
from server_process import CLI_APP, clean_env, running_process, started_process
from wire import Client, connect, header

from trioserve import Config, __version__
from trioserve.cli import main, uvicorn_variables_warning
from trioserve.errors import ConfigError
from trioserve.testing import running

# uvicorn's access line (the default): no duration, the status code and its phrase.
ACCESS_RE = re.compile(r'127\.0\.0\.1:\d+ - "GET /x\?q=1 HTTP/1\.1" 200 OK\n')


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "cliapp.py").write_text(CLI_APP)
    return tmp_path


def app_args(app_dir: Path, *extra: str, target: str = "cliapp:app") -> list[str]:
    return [target, "--app-dir", str(app_dir), *extra]


async def get(address: tuple[str, int] | str, target: str = "/") -> tuple[Any, bytes]:
    async with await connect(address) as stream:
        return await Client(stream).request(target=target)


# -- startup line, access log, exit code ------------------------------------------------


@pytest.mark.parametrize("console_script", [False, True], ids=["python-m", "console-script"])
async def test_port_zero_prints_the_real_port_and_logs_each_request(
    app_dir: Path, console_script: bool
) -> None:
    async with started_process(
        app_args(app_dir, "--port", "0"), console_script=console_script
    ) as server:
        assert server.port != 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        response, body = await get(("127.0.0.1", server.port), "/x?q=1")
        assert (response.status_code, body) == (200, b"hello")
        await server.wait_for(ACCESS_RE, which="stdout")
        assert await server.stop() == 0
    assert len(ACCESS_RE.findall(server.stdout)) == 1
    assert "app: shutdown" in server.stderr


async def test_server_process_freezes_its_startup_objects(app_dir: Path) -> None:
    # The process the CLI owns: what startup made is out of the collector's full walks.
    async with started_process(app_args(app_dir, "--port", "0")) as server:
        response, body = await get(("127.0.0.1", server.port), "/gc")
        assert response.status_code == 200
        assert int(body) > 10_000  # (the modules, the app, trio, h11: all of them)
        assert await server.stop() == 0


async def test_embedded_serve_leaves_the_collector_alone() -> None:
    async with running(hello_app) as server, server.client() as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert gc.get_freeze_count() == 0  # (a program embedding trioserve owns its collector)


async def test_no_access_log(app_dir: Path) -> None:
    async with started_process(app_args(app_dir, "--port", "0", "--no-access-log")) as server:
        response, _ = await get(("127.0.0.1", server.port), "/x?q=1")
        assert response.status_code == 200
        assert await server.stop() == 0
    assert '"GET' not in server.stdout + server.stderr


async def test_log_level_debug_shows_debug_lines(app_dir: Path) -> None:
    async with started_process(app_args(app_dir, "--port", "0", "--log-level", "debug")) as srv:
        assert await srv.stop() == 0
    assert re.search(r"DEBUG: +listening on http://127\.0\.0\.1:\d+", srv.stderr)


def free_port(family: socket.AddressFamily = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_connectable(port: int) -> None:
    with trio.fail_after(15):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def test_log_level_warning_hides_info_and_access_lines(app_dir: Path) -> None:
    port = free_port()
    async with running_process(
        app_args(app_dir, "--port", str(port), "--log-level", "warning")
    ) as server:
        await wait_connectable(port)
        response, _ = await get(("127.0.0.1", port), "/x?q=1")
        assert response.status_code == 200
        assert await server.stop() == 0
    assert "INFO" not in server.stderr
    assert server.stdout == ""


LOG_CONFIG_DICT = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"custom": {"format": "CUSTOM %(name)s %(levelname)s %(message)s"}},
    "handlers": {
        "err": {
            "class": "logging.StreamHandler",
            "formatter": "custom",
            "stream": "ext://sys.stderr",
        },
    },
    "loggers": {
        "trioserve": {"handlers": ["err"], "level": "INFO", "propagate": False},
    },
}
LOG_CONFIG_INI = """
[loggers]
keys=root,trioserve

[handlers]
keys=err

[formatters]
keys=custom

[logger_root]
level=WARNING
handlers=

[logger_trioserve]
level=INFO
handlers=err
propagate=0
qualname=trioserve

[handler_err]
class=StreamHandler
formatter=custom
args=(sys.stderr,)

[formatter_custom]
format=CUSTOM %(name)s %(levelname)s %(message)s
"""


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".ini"])
async def test_log_config_file(app_dir: Path, suffix: str) -> None:
    path = app_dir / f"logging{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(LOG_CONFIG_DICT))
    elif suffix == ".yaml":
        yaml = pytest.importorskip("yaml")  # an extra of [test]; the json case runs anyway
        path.write_text(yaml.safe_dump(LOG_CONFIG_DICT))
    else:
        path.write_text(LOG_CONFIG_INI)
    async with started_process(
        app_args(app_dir, "--port", "0", "--log-config", str(path))
    ) as server:
        response, _ = await get(("127.0.0.1", server.port), "/x?q=1")
        assert response.status_code == 200
        assert await server.stop() == 0
    assert re.search(r"CUSTOM trioserve\.\S+ INFO trioserve running on", server.stderr)
    # The access logger is a child of "trioserve": the file's handler formats it too.
    assert re.search(r"CUSTOM trioserve\.access INFO " + ACCESS_RE.pattern, server.stderr)


async def test_env_file_is_loaded_before_the_app(app_dir: Path) -> None:
    env_file = app_dir / "app.env"
    env_file.write_text("FROM_ENV_FILE=loaded\n")
    args = app_args(app_dir, "--port", "0", "--env-file", str(env_file))
    async with started_process(args) as server:
        _, body = await get(("127.0.0.1", server.port), "/scope")
        assert await server.stop() == 0
    assert json.loads(body)["env"] == "loaded"


async def test_header_options(app_dir: Path) -> None:
    args = app_args(
        app_dir,
        "--port",
        "0",
        "--header",
        "X-A: 1",
        "--header",
        "x-b:two",
        "--no-server-header",
        "--no-date-header",
    )
    async with started_process(args) as server:
        response, _ = await get(("127.0.0.1", server.port))
        assert await server.stop() == 0
    assert header(response, b"x-a") == b"1"
    assert header(response, b"x-b") == b"two"
    assert header(response, b"server") is None
    assert header(response, b"date") is None


async def test_server_and_date_headers_by_default(app_dir: Path) -> None:
    async with started_process(app_args(app_dir, "--port", "0")) as server:
        response, _ = await get(("127.0.0.1", server.port))
        assert await server.stop() == 0
    assert header(response, b"server") == b"trioserve"
    assert header(response, b"date") is not None


async def test_root_path(app_dir: Path) -> None:
    async with started_process(app_args(app_dir, "--port", "0", "--root-path", "/api")) as srv:
        _, body = await get(("127.0.0.1", srv.port), "/scope")
        assert await srv.stop() == 0
    assert json.loads(body)["root_path"] == "/api"


async def test_uds(app_dir: Path) -> None:
    path = str(app_dir / "s.sock")
    async with started_process(app_args(app_dir, "--uds", path)) as server:
        assert server.url == f"unix:{path}"
        response, body = await get(path, "/scope")
        assert response.status_code == 200
        assert await server.stop() == 0
    assert json.loads(body)["server"] == [path, None]
    assert not Path(path).exists()  # removed on exit


async def test_fd_serves_an_inherited_socket(app_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        fd = sock.fileno()
        args = app_args(app_dir, "--fd", str(fd))
        async with started_process(args, pass_fds=[fd]) as server:
            assert server.port == port
            response, _ = await get(("127.0.0.1", port))
            assert response.status_code == 200
            assert await server.stop() == 0


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the backlog")
async def test_backlog_is_passed_to_listen(app_dir: Path) -> None:
    async with started_process(app_args(app_dir, "--port", "0", "--backlog", "7")) as server:
        ss = subprocess.run(
            ["ss", "-ltnH", f"sport = :{server.port}"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        assert await server.stop() == 0
    # For a listening socket ss shows the backlog in the Send-Q column.
    columns = ss.stdout.split()
    assert (columns[0], columns[2]) == ("LISTEN", "7")


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_host(app_dir: Path) -> None:
    async with started_process(app_args(app_dir, "--host", "::1", "--port", "0")) as server:
        assert server.url == f"http://[::1]:{server.port}"
        response, body = await get(("::1", server.port), "/scope")
        assert await server.stop() == 0
    assert response.status_code == 200
    assert json.loads(body)["server"] == ["::1", server.port]


async def test_trioserve_environment_variables(app_dir: Path) -> None:
    env = clean_env(
        TRIOSERVE_APP="cliapp:app",
        TRIOSERVE_APP_DIR=str(app_dir),
        TRIOSERVE_PORT="0",
        TRIOSERVE_ACCESS_LOG="false",
        TRIOSERVE_HEADER="X-From-Env:yes",
        TRIOSERVE_ROOT_PATH="/env",
    )
    async with started_process([], env=env) as server:
        response, body = await get(("127.0.0.1", server.port), "/scope")
        assert await server.stop() == 0
    assert header(response, b"x-from-env") == b"yes"
    assert json.loads(body)["root_path"] == "/env"
    assert '"GET' not in server.stdout


async def test_factory_option(app_dir: Path) -> None:
    args = app_args(app_dir, "--port", "0", "--factory", target="cliapp:make_app")
    async with started_process(args) as server:
        response, _ = await get(("127.0.0.1", server.port))
        assert await server.stop() == 0
    assert response.status_code == 200


# -- errors: one clear line, a non-zero exit code ---------------------------------------


async def run_to_exit(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    async with running_process(args, env=env) as server:
        code = await server.finish(timeout=15)
    return code, server.stderr


@pytest.mark.parametrize(
    ("target", "message"),
    [
        pytest.param(
            "cliapp",
            'Import string "cliapp" must be in format "<module>:<attribute>".',
            id="no-colon",
        ),
        pytest.param("nosuchmodule:app", 'Could not import module "nosuchmodule".', id="module"),
        pytest.param(
            "cliapp:nope", 'Attribute "nope" not found in module "cliapp".', id="attribute"
        ),
    ],
)
async def test_bad_import_string_exits_1_with_one_line(
    app_dir: Path, target: str, message: str
) -> None:
    code, stderr = await run_to_exit(app_args(app_dir, "--port", "0", target=target))
    assert code == 1
    assert stderr.strip() == f"Error loading ASGI app. {message}"


async def test_port_in_use_exits_1_with_one_line(app_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = await run_to_exit(app_args(app_dir, "--port", str(port)))
    assert code == 1
    error_lines = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert error_lines == [f"Error: cannot bind to 127.0.0.1:{port}: Address already in use"]
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param(
            ["--uds", "/tmp/x.sock", "--fd", "3"],
            {},
            "Error: --uds and --fd are mutually exclusive",
            id="uds-and-fd",
        ),
        pytest.param(
            ["--port", "70000"],
            {},
            "Error: port must be between 0 and 65535, got 70000",
            id="port-range",
        ),
        pytest.param(["--port", "abc"], {}, "'abc' is not a valid integer", id="port-type"),
        pytest.param(["--lifespan", "maybe"], {}, "'maybe' is not one of", id="choice"),
        pytest.param(
            [],
            {"WEB_CONCURRENCY": "0"},
            "Error: workers must be between 1 and 4096, got 0",
            id="web-concurrency",
        ),
        pytest.param(
            [],
            {"TRIOSERVE_PORT": "-5"},
            "Error: port must be between 0 and 65535, got -5",
            id="env-port",
        ),
    ],
)
async def test_bad_values_exit_2(
    app_dir: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    code, stderr = await run_to_exit(app_args(app_dir, *args), env=clean_env(**env))
    assert code == 2
    assert message in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr


# -- in-process checks with click's CliRunner -------------------------------------------


@pytest.fixture
def runner() -> Iterator[CliRunner]:
    """A CliRunner; the logging setup a run may install is undone afterwards."""
    names = ("trioserve", "trioserve.access")
    saved = [
        (
            logging.getLogger(n),
            logging.getLogger(n).handlers[:],
            logging.getLogger(n).level,
            logging.getLogger(n).propagate,
            logging.getLogger(n).disabled,
        )
        for n in names
    ]
    yield CliRunner()
    for logger, handlers, level, propagate, disabled in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


def test_click_options_match_config_fields() -> None:
    # --version and the uvicorn-only options (refused or no-ops) pass no value.
    destinations = {
        param.name
        for param in main.params
        if isinstance(param, click.Option) and param.expose_value
    }
    assert destinations == {f.name for f in dataclasses.fields(Config)}


def test_every_option_reads_a_trioserve_environment_variable() -> None:
    for param in main.params:
        if isinstance(param, click.Option) and param.expose_value:
            envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
            assert f"TRIOSERVE_{str(param.name).upper()}" in envvars, param.name


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"trioserve {__version__} (Python ")


def test_help_lists_uvicorn_flags(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for flag in (
        "--host",
        "--port",
        "--uds",
        "--fd",
        "--app-dir",
        "--factory",
        "--root-path",
        "--log-level",
        "--access-log / --no-access-log",
        "--log-config",
        "--env-file",
        "--lifespan",
        "--header",
        "--timeout-graceful-shutdown",
        "--workers",
    ):
        assert flag in result.output, flag
    assert "WEB_CONCURRENCY" in result.output


def test_missing_app_argument_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(main, [], env={"TRIOSERVE_APP": None})
    assert result.exit_code == 2
    assert "Missing argument 'APP'" in result.output


def test_conflicting_options_are_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(main, ["main:app", "--uds", "/tmp/a.sock", "--fd", "3"])
    assert result.exit_code == 2
    assert "--uds and --fd are mutually exclusive" in result.output


def test_bad_import_string_exit_code(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["nosuchmodule_cli:app", "--app-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert 'Could not import module "nosuchmodule_cli".' in result.output


def test_missing_log_config_file_exit_code(runner: CliRunner, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    result = runner.invoke(main, ["main:app", "--log-config", missing])
    assert result.exit_code == 2
    assert f"log_config file not found: {missing}" in result.output


def test_bool_value_option_takes_false(runner: CliRunner) -> None:
    # --ws-per-message-deflate is on by default and takes a value, as uvicorn's does.
    option = next(p for p in main.params if p.name == "ws_per_message_deflate")
    assert isinstance(option, click.Option)
    assert not option.is_flag
    ctx = main.make_context("trioserve", ["main:app", "--ws-per-message-deflate", "false"])
    assert ctx.params["ws_per_message_deflate"] is False


@pytest.mark.parametrize(
    ("env", "args", "workers"),
    [
        pytest.param({}, [], 1, id="default"),
        pytest.param({"WEB_CONCURRENCY": "3"}, [], 3, id="web-concurrency"),
        pytest.param(
            {"WEB_CONCURRENCY": "3", "TRIOSERVE_WORKERS": "2"}, [], 2, id="trioserve-wins"
        ),
        pytest.param({"WEB_CONCURRENCY": "3"}, ["--workers", "5"], 5, id="flag-wins"),
    ],
)
def test_workers_from_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], args: list[str], workers: int
) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.delenv("TRIOSERVE_WORKERS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ctx = main.make_context("trioserve", ["main:app", *args])
    assert ctx.params["workers"] == workers


def test_run_rejects_unknown_options() -> None:
    import trioserve

    with pytest.raises(ConfigError, match="unknown option\\(s\\): prot"):
        trioserve.run("main:app", prot=8000)


async def test_run_serves_an_app_object(app_dir: Path) -> None:
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import trioserve, cliapp; "
        "trioserve.run(cliapp.app, port=0, headers=['X-Run: 1'])"
    )
    async with started_process(["-c", script, str(app_dir)], python_args=True) as server:
        response, _ = await get(("127.0.0.1", server.port))
        assert await server.stop() == 0
    assert header(response, b"x-run") == b"1"
    assert "app: shutdown" in server.stderr


@pytest.mark.parametrize(
    ("suffix", "content"),
    [
        pytest.param(".json", "{not json", id="json"),
        pytest.param(".yaml", "a: [unclosed", id="yaml"),
        pytest.param(".ini", "[loggers]\nkeys=root\n", id="ini-missing-sections"),
        pytest.param(".ini", "garbage without a section", id="ini-garbage"),
        pytest.param(
            ".json",
            '{"version": 1, "handlers": {"h": {"class": "no.Such"}}}',
            id="dictconfig-error",
        ),
    ],
)
def test_malformed_log_config_is_a_one_line_usage_error(
    runner: CliRunner, tmp_path: Path, suffix: str, content: str
) -> None:
    path = tmp_path / f"logging{suffix}"
    path.write_text(content)
    result = runner.invoke(main, ["main:app", "--log-config", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: invalid log_config {path}: ")
    assert result.exception is None or isinstance(result.exception, SystemExit)


async def test_apps_own_os_error_keeps_its_traceback(tmp_path: Path) -> None:
    (tmp_path / "reads_file.py").write_text("open('settings-that-do-not-exist.toml')\napp = 1\n")
    code, stderr = await run_to_exit(["reads_file:app", "--app-dir", str(tmp_path)])
    assert code == 1
    assert "Traceback" in stderr
    assert "FileNotFoundError" in stderr
    assert "settings-that-do-not-exist.toml" in stderr


# -- uvicorn habits: its options, its environment variables, run(log_config=dict) ---------

# Every option of `uvicorn --help`, read from uvicorn 0.55.0's main.py (`pip download
# --no-deps uvicorn`), with a value to try: None where trioserve accepts it with the same
# meaning (or it is already trioserve's behaviour), else a part of the one-line refusal.
UVICORN_OPTIONS: list[tuple[list[str], str | None]] = [
    (["--host", "0.0.0.0"], None),
    (["--port", "9000"], None),
    (["--uds", "/tmp/app.sock"], None),
    (["--fd", "3"], None),
    (["--reload"], None),
    (["--reload-dir", "src"], None),
    (["--reload-include", "*.html"], None),
    (["--reload-exclude", "tests"], None),
    (["--reload-delay", "0.5"], None),
    (["--workers", "2"], None),
    (["--loop", "auto"], None),
    (["--loop", "asyncio"], "trioserve runs on trio"),
    (["--loop", "uvloop"], "--app-loop asyncio; for speed: --http httptools"),
    (["--loop", "none"], "trioserve runs on trio"),
    (["--http", "auto"], None),
    (["--http", "h11"], None),
    (["--http", "httptools"], None),
    (["--http", "zttp"], "use --http httptools"),
    (["--http2"], None),
    (["--ws", "auto"], None),
    (["--ws", "none"], None),
    (["--ws", "wsproto"], None),
    (["--ws", "websockets"], None),  # websockets' sans-IO protocol (protocol.ws_websockets)
    (["--ws", "websockets-sansio"], "use --ws websockets"),
    (["--ws-max-size", "1000"], None),
    (["--ws-max-queue", "8"], None),
    (["--ws-ping-interval", "10"], None),
    (["--ws-ping-timeout", "10"], None),
    (["--ws-per-message-deflate", "false"], None),
    (["--lifespan", "off"], None),
    (["--interface", "asgi3"], None),
    (["--env-file", ".env"], None),
    (["--log-config", "logging.json"], None),
    (["--log-level", "trace"], None),
    (["--access-log"], None),
    (["--no-access-log"], None),
    (["--use-colors"], None),
    (["--no-use-colors"], None),
    (["--proxy-headers"], None),
    (["--no-proxy-headers"], None),
    (["--server-header"], None),
    (["--no-server-header"], None),
    (["--date-header"], None),
    (["--no-date-header"], None),
    (["--forwarded-allow-ips", "10.0.0.0/8"], None),
    (["--root-path", "/api"], None),
    (["--limit-concurrency", "100"], None),
    (["--backlog", "100"], None),
    (["--limit-max-requests", "1000"], None),
    (["--limit-max-requests-jitter", "10"], None),
    (["--timeout-keep-alive", "5"], None),
    (["--timeout-graceful-shutdown", "10"], None),
    (["--timeout-worker-healthcheck", "5"], None),
    (["--ssl-keyfile", "key.pem"], None),
    (["--ssl-certfile", "cert.pem"], None),
    (["--ssl-keyfile-password", "secret"], None),
    (["--ssl-version", "17"], None),  # uvicorn's default, ssl.PROTOCOL_TLS_SERVER
    (["--ssl-version", "2"], "trioserve always uses ssl.PROTOCOL_TLS_SERVER"),
    (["--ssl-cert-reqs", "2"], None),
    (["--ssl-ca-certs", "ca.pem"], None),
    (["--ssl-ciphers", "ECDHE"], None),
    (["--header", "X-A:1"], None),
    (["--version"], None),
    (["--app-dir", "src"], None),
    (["--h11-max-incomplete-event-size", "32768"], None),
    (["--reset-contextvars"], None),  # each request already runs in its own context copy
    (["--factory"], None),
]
UVICORN_FLAGS = {
    "--host", "--port", "--uds", "--fd", "--reload", "--reload-dir", "--reload-include",
    "--reload-exclude", "--reload-delay", "--workers", "--loop", "--http", "--http2", "--ws",
    "--ws-max-size", "--ws-max-queue", "--ws-ping-interval", "--ws-ping-timeout",
    "--ws-per-message-deflate", "--lifespan", "--interface", "--env-file", "--log-config",
    "--log-level", "--access-log", "--no-access-log", "--use-colors", "--no-use-colors",
    "--proxy-headers", "--no-proxy-headers", "--server-header", "--no-server-header",
    "--date-header", "--no-date-header", "--forwarded-allow-ips", "--root-path",
    "--limit-concurrency", "--backlog", "--limit-max-requests", "--limit-max-requests-jitter",
    "--timeout-keep-alive", "--timeout-graceful-shutdown", "--timeout-worker-healthcheck",
    "--ssl-keyfile", "--ssl-certfile", "--ssl-keyfile-password", "--ssl-version",
    "--ssl-cert-reqs", "--ssl-ca-certs", "--ssl-ciphers", "--header", "--version", "--app-dir",
    "--h11-max-incomplete-event-size", "--reset-contextvars", "--factory",
}  # fmt: skip


def test_the_uvicorn_option_table_covers_every_uvicorn_option() -> None:
    assert {argv[0] for argv, _ in UVICORN_OPTIONS} == UVICORN_FLAGS


@pytest.mark.parametrize(
    ("argv", "refusal"), [pytest.param(argv, r, id=" ".join(argv)) for argv, r in UVICORN_OPTIONS]
)
def test_every_uvicorn_option_is_accepted_or_refused_in_one_line(
    runner: CliRunner, argv: list[str], refusal: str | None
) -> None:
    if refusal is None and argv != ["--version"]:
        main.make_context("trioserve", ["main:app", *argv])  # parses; runs nothing
        help_text = runner.invoke(main, ["--help"]).output
        assert re.search(rf"{re.escape(argv[0])}\b", help_text) or argv[0] in {
            "--loop",  # auto: a no-op, not advertised
            "--ssl-version",  # uvicorn's default value: a no-op
            "--reset-contextvars",  # trioserve's behaviour anyway
        }
        return
    result = runner.invoke(main, ["main:app", *argv])
    if refusal is None:  # --version
        assert result.exit_code == 0
        return
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1  # one line: no usage text, no traceback
    assert result.output.startswith(f"Error: {' '.join(argv)}: ")
    assert refusal in result.output


async def test_uvicorn_only_option_exits_2_with_one_line(app_dir: Path) -> None:
    code, stderr = await run_to_exit(app_args(app_dir, "--port", "0", "--loop", "uvloop"))
    assert code == 2
    assert stderr.strip() == (
        "Error: --loop uvloop: trioserve runs on trio, not on an asyncio event loop: drop "
        "--loop (apps that need asyncio-only libraries: --app-loop asyncio; for speed: "
        "--http httptools)"
    )


async def test_reset_contextvars_is_already_the_behaviour_lifespan_context_is_not_seen() -> None:
    from trioserve.testing import running

    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                LIFESPAN_VAR.set("set in lifespan")
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        seen.append(LIFESPAN_VAR.get())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with running(app) as server, server.client() as client:
        assert (await client.get("/")).status_code == 204
    assert seen == ["unset"]


LIFESPAN_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("lifespan", default="unset")


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({}, None, id="none"),
        pytest.param({"WEB_CONCURRENCY": "2", "UVICORN_LOOP": "uvloop"}, None, id="unknown"),
        pytest.param(
            {"UVICORN_PORT": "9000", "UVICORN_HEADERS": "X-A:1", "UVICORN_APP": "main:app"},
            "trioserve does not read UVICORN_* variables; ignoring UVICORN_APP (use "
            "TRIOSERVE_APP), UVICORN_PORT (use TRIOSERVE_PORT), UVICORN_HEADERS (use "
            "TRIOSERVE_HEADERS).",
            id="set",
        ),
        pytest.param(
            {"UVICORN_PORT": "9000", "TRIOSERVE_PORT": "9000"}, None, id="switched-already"
        ),
        pytest.param({"UVICORN_HEADERS": "X-A:1", "TRIOSERVE_HEADER": "X-A:1"}, None, id="alias"),
    ],
)
def test_uvicorn_variables_warning_names_the_trioserve_variable(
    environ: dict[str, str], expected: str | None
) -> None:
    assert uvicorn_variables_warning(environ) == expected


async def test_uvicorn_variables_are_not_applied_and_warned_about_once(app_dir: Path) -> None:
    env = clean_env(UVICORN_ROOT_PATH="/uv", UVICORN_ACCESS_LOG="false")
    async with started_process(app_args(app_dir, "--port", "0"), env=env) as server:
        _, body = await get(("127.0.0.1", server.port), "/scope")
        await server.wait_for('"GET /scope', which="stdout")  # access log still on
        assert await server.stop() == 0
    assert json.loads(body)["root_path"] == ""
    assert server.stderr.count("UVICORN_") == 3  # one line
    assert (
        "WARNING:  trioserve does not read UVICORN_* variables; ignoring UVICORN_ROOT_PATH "
        "(use TRIOSERVE_ROOT_PATH), UVICORN_ACCESS_LOG (use TRIOSERVE_ACCESS_LOG).\n"
    ) in server.stderr


async def test_run_accepts_a_log_config_dict(app_dir: Path) -> None:
    # A formatter given as a class object, as uvicorn's LOGGING_CONFIG-style dicts do; the
    # caller's dict is left as it was.
    script = (
        "import logging, sys; sys.path.insert(0, sys.argv[1]); import trioserve, cliapp\n"
        "config = {'version': 1, 'disable_existing_loggers': False,\n"
        " 'formatters': {'f': {'()': logging.Formatter, 'fmt': 'DICT %(name)s %(message)s'}},\n"
        " 'handlers': {'h': {'class': 'logging.StreamHandler', 'formatter': 'f',\n"
        "                    'stream': 'ext://sys.stderr'}},\n"
        " 'loggers': {'trioserve.error': {'handlers': ['h'], 'level': 'INFO',\n"
        "                                 'propagate': False}}}\n"
        "trioserve.run(cliapp.app, port=0, log_config=config)\n"
        "assert 'trioserve.error' in config['loggers'], config\n"
        "assert config['formatters']['f']['()'] is logging.Formatter, config\n"
    )
    async with started_process(["-c", script, str(app_dir)], python_args=True) as server:
        response, _ = await get(("127.0.0.1", server.port), "/x?q=1")
        assert await server.stop() == 0
    assert response.status_code == 200
    assert re.search(r"DICT trioserve\.\S+ trioserve running on", server.stderr)
    assert re.search(r'DICT trioserve\.access 127\.0\.0\.1:\d+ - "GET /x\?q=1 ', server.stderr)


def test_run_with_workers_refuses_a_log_config_dict_that_is_not_json(runner: CliRunner) -> None:
    import trioserve

    log_config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"f": {"()": logging.Formatter}},
    }
    with pytest.raises(ConfigError, match="a log_config dict must be JSON-serializable"):
        trioserve.run("main:app", workers=2, log_config=log_config)
