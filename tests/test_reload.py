"""``--reload``: the file filter (a table) and a real reloader process editing a temp app."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio
from server_process import get, is_alive, started_process, wait_all_gone

from trioserve import Config
from trioserve.reload import ReloadFilter, watched_dirs

ROOT = Path("/srv/project")


@pytest.mark.parametrize(
    ("path", "includes", "excludes", "reloads"),
    [
        pytest.param("main.py", (), (), True, id="py-file"),
        pytest.param("pkg/sub/models.py", (), (), True, id="nested-py-file"),
        pytest.param("README.md", (), (), False, id="not-included"),
        pytest.param("main.pyc", (), (), False, id="pyc"),
        pytest.param(".venv/lib/site.py", (), (), False, id="venv"),
        pytest.param(".git/hooks/x.py", (), (), False, id="git"),
        pytest.param("pkg/__pycache__/m.py", (), (), False, id="pycache"),
        pytest.param("templates/index.html", ("*.html",), (), True, id="include-by-name"),
        pytest.param("templates/index.html", ("templates/*",), (), True, id="include-by-path"),
        pytest.param("static/site.html", ("templates/*",), (), False, id="include-other-path"),
        pytest.param("tests/test_x.py", (), ("tests",), False, id="exclude-directory"),
        pytest.param("app/settings_local.py", (), ("*_local.py",), False, id="exclude-glob"),
        pytest.param("app/settings.py", (), ("*_local.py",), True, id="exclude-other"),
        pytest.param("main.py", (), ("*.py",), False, id="exclude-wins"),
    ],
)
def test_reload_filter_table(
    path: str, includes: tuple[str, ...], excludes: tuple[str, ...], reloads: bool
) -> None:
    watch_filter = ReloadFilter([ROOT], includes, excludes)
    assert watch_filter.accepts(ROOT / path) is reloads


def test_reload_dirs_default_to_the_current_directory(tmp_path: Path) -> None:
    assert watched_dirs(Config()) == [Path.cwd()]
    config = Config(reload_dirs=(str(tmp_path), str(tmp_path / "missing")))
    assert watched_dirs(config) == [tmp_path.resolve()]


APP_TEMPLATE = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({{"type": "http.response.start", "status": 200, "headers": []}})
    await send({{"type": "http.response.body", "body": b"{version}"}})
"""


async def test_reload_follows_edits_and_waits_out_a_syntax_error(tmp_path: Path) -> None:
    app_file = tmp_path / "reloadapp.py"
    app_file.write_text(APP_TEMPLATE.format(version="v1"))
    (tmp_path / "notes.txt").write_text("not watched")
    argv = [
        "reloadapp:app",
        "--app-dir",
        str(tmp_path),
        "--reload",
        "--reload-dir",
        str(tmp_path),
        "--port",
        "0",
        "--no-access-log",
        "--lifespan",
        "off",
        "--reload-delay",
        "0.05",
    ]
    with trio.fail_after(40):
        async with started_process(argv) as server:
            await server.wait_for("Will watch for changes in these directories")
            first = (await server.wait_ready(1))[0]
            assert await get(server.port) == (200, b"v1")

            (tmp_path / "notes.txt").write_text("still not watched")  # filtered out
            app_file.write_text(APP_TEMPLATE.format(version="v22"))
            await server.wait_for("detected changes in 'reloadapp.py'. Reloading")
            second = (await server.wait_ready(2))[1]
            assert not is_alive(first)
            assert await get(server.port) == (200, b"v22")
            assert "notes.txt" not in server.stderr

            app_file.write_text("def app(:\n")
            await server.wait_for("Waiting for a file change before starting again")
            assert "SyntaxError" in server.stderr
            await wait_all_gone([second], timeout=5)
            assert server.process.returncode is None  # the reloader waits, it does not exit

            app_file.write_text(APP_TEMPLATE.format(version="v333"))
            await server.wait_ready(3)
            assert await get(server.port) == (200, b"v333")

            server.signal(signal.SIGINT)
            assert await server.wait_exit() == 0
            await wait_all_gone(server.started_pids(), timeout=2)
