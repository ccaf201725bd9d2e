"""``--config FILE`` / ``[tool.trioserve]``, the precedence over it, and ``--print-config``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from server_process import CLI_APP, clean_env, running_process, started_process
from wire import Client

from trioserve.cli import main
from trioserve.config_file import check_table, read_config_file
from trioserve.errors import ConfigError


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def print_config(runner: CliRunner, args: list[str], **env: str) -> dict[str, tuple[str, str]]:
    """Run ``--print-config``; returns option → (value, source)."""
    result = runner.invoke(main, [*args, "--print-config"], env=clean_env(**env))
    assert result.exit_code == 0, result.output
    lines = {}
    for line in result.output.splitlines():
        match = re.fullmatch(r"(?:# )?(\w+)(?: = (.*?)| is not set)  # (.+)", line)
        assert match, line
        lines[match[1]] = (match[2], match[3])
    return lines


# -- reading and checking the table (pure) -----------------------------------------------


def test_snake_and_kebab_case_keys_are_config_fields() -> None:
    values = check_table(
        {
            "app": "main:app",
            "workers": 4,
            "timeout-keep-alive": 7,
            "proxy_headers": False,
            "headers": ["X-A: 1"],
            "reload-dirs": ["src"],
            "lifespan": "on",
            "log_config": {"version": 1},
        },
        "f.toml",
    )
    assert values == {
        "app": "main:app",
        "workers": 4,
        "timeout_keep_alive": 7.0,
        "proxy_headers": False,
        "headers": ["X-A: 1"],
        "reload_dirs": ["src"],
        "lifespan": "on",
        "log_config": {"version": 1},
    }
    assert isinstance(values["timeout_keep_alive"], float)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        pytest.param({"wrokers": 2}, "f.toml: unknown key 'wrokers'", id="unknown"),
        pytest.param({"workers": "2"}, "key 'workers' must be an integer, got '2'", id="int"),
        pytest.param({"workers": True}, "key 'workers' must be an integer", id="bool-as-int"),
        pytest.param(
            {"timeout-keep-alive": "5s"}, "key 'timeout-keep-alive' must be a number", id="float"
        ),
        pytest.param({"access_log": 1}, "key 'access_log' must be true or false", id="bool"),
        pytest.param(
            {"lifespan": "maybe"},
            'key \'lifespan\' must be one of "auto", "on", "off"',
            id="choice",
        ),
        pytest.param(
            {"headers": "X-A: 1"}, "key 'headers' must be a list (each a string)", id="list"
        ),
        pytest.param({"uds": 3}, "key 'uds' must be a string, got 3", id="optional-str"),
        pytest.param({"log_config": 1}, "key 'log_config' must be a string or a table", id="union"),
        pytest.param({"app": ["main:app"]}, "key 'app' must be a string", id="app"),
        pytest.param({"workers": 2, "WORKERS": 3}, "unknown key 'WORKERS'", id="case-matters"),
        pytest.param(
            {"reuse_port": True, "reuse-port": True}, "'reuse-port' is given twice", id="twice"
        ),
    ],
)
def test_a_bad_key_or_value_names_the_file_key_and_type(
    table: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        check_table(table, "f.toml")
    assert str(info.value).startswith("f.toml: ")
    assert message in str(info.value)


def test_pyproject_table_is_read_only_when_present(tmp_path: Path) -> None:
    assert read_config_file(None, str(tmp_path)) is None  # no pyproject.toml
    write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n')
    assert read_config_file(None, str(tmp_path)) is None  # no [tool.trioserve]
    write(tmp_path / "pyproject.toml", "[tool.trioserve]\nworkers = 2\n")
    found = read_config_file(None, str(tmp_path))
    assert found is not None
    assert found.values == {"workers": 2}
    assert found.path == str(tmp_path / "pyproject.toml")


def test_a_given_pyproject_needs_the_tool_table(tmp_path: Path) -> None:
    path = write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"pyproject.toml: no \[tool.trioserve\] table"):
        read_config_file(str(path))


def test_a_pyproject_table_error_names_the_table(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[tool.trioserve]\nport = 'eighty'\n")
    with pytest.raises(ConfigError, match=r"pyproject.toml \[tool.trioserve\]: key 'port'"):
        read_config_file(None, str(tmp_path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(None, "cannot read config file", id="missing"),
        pytest.param("workers = ", "is not valid TOML", id="invalid-toml"),
    ],
)
def test_an_unreadable_file_is_a_config_error(
    tmp_path: Path, text: str | None, message: str
) -> None:
    path = tmp_path / "trioserve.toml"
    if text is not None:
        write(path, text)
    with pytest.raises(ConfigError, match=message):
        read_config_file(str(path))


# -- precedence and --print-config (click CliRunner) ---------------------------------------


def test_command_line_beats_environment_beats_file_beats_default(
    runner: CliRunner, tmp_path: Path
) -> None:
    path = write(
        tmp_path / "serve.toml",
        'app = "file:app"\nhost = "0.0.0.0"\nport = 9001\nworkers = 3\nbacklog = 100\n',
    )
    lines = print_config(
        runner,
        ["--config", str(path), "--host", "127.0.0.2", "cli:app"],
        TRIOSERVE_PORT="9002",
        TRIOSERVE_BACKLOG="50",
    )
    assert lines["app"] == ('"cli:app"', "cli")
    assert lines["host"] == ('"127.0.0.2"', "cli")
    assert lines["port"] == ("9002", "env TRIOSERVE_PORT")
    assert lines["backlog"] == ("50", "env TRIOSERVE_BACKLOG")
    assert lines["workers"] == ("3", f"file {path}")
    assert lines["timeout_keep_alive"] == ("5.0", "default")
    assert lines["uds"] == (None, "default")
    # A conventional variable is named as the one that was read.
    assert print_config(runner, ["--config", str(path)], WEB_CONCURRENCY="5")["workers"] == (
        "5",
        "env WEB_CONCURRENCY",
    )
    assert print_config(runner, ["--config", str(path)])["app"] == ('"file:app"', f"file {path}")


def test_a_flag_given_on_the_command_line_beats_the_file(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path / "serve.toml", "access-log = false\nproxy-headers = false\n")
    lines = print_config(runner, ["--config", str(path), "--proxy-headers", "main:app"])
    assert lines["access_log"] == ("false", f"file {path}")
    assert lines["proxy_headers"] == ("true", "cli")


def test_pyproject_in_the_current_directory_is_used_without_config(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "pyproject.toml", '[tool.trioserve]\napp = "main:app"\nheaders = ["X-A: 1"]\n')
    monkeypatch.chdir(tmp_path)
    lines = print_config(runner, [])
    assert lines["app"] == ('"main:app"', "file ./pyproject.toml")
    assert lines["headers"] == ('["X-A: 1"]', "file ./pyproject.toml")


def test_printed_configuration_is_valid_toml_for_the_file(
    runner: CliRunner, tmp_path: Path
) -> None:
    result = runner.invoke(
        main, ["--header", 'X-Q: "quoted"', "--root-path", "/api", "main:app", "--print-config"]
    )
    assert result.exit_code == 0, result.output
    path = write(tmp_path / "printed.toml", result.output)
    printed = read_config_file(str(path))
    assert printed is not None
    assert printed.values["headers"] == ['X-Q: "quoted"']
    assert printed.values["root_path"] == "/api"
    assert printed.values["app"] == "main:app"


def test_missing_app_is_still_a_usage_error_with_a_file(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path / "serve.toml", "workers = 2\n")
    result = runner.invoke(main, ["--config", str(path)], env={"TRIOSERVE_APP": None})
    assert result.exit_code == 2
    assert "Missing argument 'APP'" in result.output


def test_a_file_value_out_of_range_is_refused_by_config(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path / "serve.toml", "port = 70000\n")
    result = runner.invoke(main, ["--config", str(path), "main:app", "--print-config"])
    assert result.exit_code == 2
    assert "port must be between 0 and 65535, got 70000" in result.output


# -- real processes ----------------------------------------------------------------------


async def test_bad_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "serve.toml", 'app = "cliapp:app"\nworkers = "many"\n')
    async with running_process(["--config", str(path)], cwd=tmp_path) as server:
        assert await server.wait_exit() == 2
    assert server.stderr.strip() == (f"Error: {path}: key 'workers' must be an integer, got 'many'")
    assert server.stdout == ""


async def test_print_config_exits_0_without_serving(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", '[tool.trioserve]\napp = "cliapp:app"\nport = 1\n')
    async with running_process(["--print-config"], cwd=tmp_path) as server:
        assert await server.wait_exit() == 0
    assert "port = 1  # file ./pyproject.toml" in server.stdout
    assert "running on" not in server.stderr


async def test_the_server_runs_with_the_file_options(tmp_path: Path) -> None:
    (tmp_path / "cliapp.py").write_text(CLI_APP)
    path = write(
        tmp_path / "serve.toml",
        'app = "cliapp:app"\nport = 0\nheaders = ["X-From: file"]\nserver-header = false\n',
    )
    async with started_process(["--config", str(path)], cwd=tmp_path) as server:
        host, port = server.address
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                response, body = await Client(stream).request("GET", "/")
        assert body == b"hello"
        assert (b"x-from", b"file") in response.headers
        assert not any(name == b"server" for name, _ in response.headers)
        assert await server.stop() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--uds", "/tmp/x.sock"], "cannot be used with --uds or --fd", id="uds"),
        pytest.param(["--fd", "3"], "cannot be used with --uds or --fd", id="fd"),
        pytest.param(["--port", "0", "--workers", "2"], "--reuse-port needs a --port", id="port-0"),
    ],
)
def test_reuse_port_is_refused_where_it_cannot_work(
    runner: CliRunner, args: list[str], message: str
) -> None:
    result = runner.invoke(main, ["--reuse-port", *args, "main:app", "--print-config"])
    assert result.exit_code == 2
    assert message in result.output
