"""``--reload``: the file filter (a table) and a real reloader process editing a temp app."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import trio
from server_process import clean_env, get, is_alive, started_process, wait_all_gone

from trioserve import Config
from trioserve.workers.reload import ReloadFilter, scan_files, watch_changes, watched_dirs

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


def reload_args(app_dir: Path) -> list[str]:
    """``reloadapp:app`` from ``app_dir`` with ``--reload`` watching ``app_dir`` (a short
    ``--reload-delay``), on a free port, without lifespan or access lines."""
    return [
        "reloadapp:app",
        "--app-dir",
        str(app_dir),
        "--reload",
        "--reload-dir",
        str(app_dir),
        "--port",
        "0",
        "--no-access-log",
        "--lifespan",
        "off",
        "--reload-delay",
        "0.05",
    ]


async def test_reload_follows_edits_and_waits_out_a_syntax_error(tmp_path: Path) -> None:
    app_file = tmp_path / "reloadapp.py"
    app_file.write_text(APP_TEMPLATE.format(version="v1"))
    (tmp_path / "notes.txt").write_text("not watched")
    argv = reload_args(tmp_path)
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


# -- StatReload: the fallback when watchfiles cannot be imported ------------------------


def test_scan_files_honours_includes_excludes_and_skips_excluded_directories(
    tmp_path: Path,
) -> None:
    for relative in (
        "main.py",
        "pkg/models.py",
        "templates/index.html",
        "README.md",
        "build/generated.py",
        ".venv/lib/site.py",
        "pkg/__pycache__/models.py",
    ):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(relative)
    watch_filter = ReloadFilter([tmp_path], ("*.html",), ("build",))
    found = scan_files([tmp_path, tmp_path / "pkg"], watch_filter)  # overlapping dirs
    assert sorted(p.relative_to(tmp_path).as_posix() for p in found) == [
        "main.py",
        "pkg/models.py",
        "templates/index.html",
    ]
    assert watch_filter.enters(tmp_path / "pkg")
    assert not watch_filter.enters(tmp_path / "build")
    assert not watch_filter.enters(tmp_path / ".git")


async def test_stat_reload_reports_added_changed_and_removed_files(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("a = 1")
    (tmp_path / "gone.py").write_text("")
    batches: list[list[str]] = []
    config = Config(reload_dirs=(str(tmp_path),), reload_delay=0.05)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_changes, config, batches.append, "StatReload")
            (tmp_path / "a.py").write_text("a = 22")  # same mtime tick possible: size differs
            (tmp_path / "new.py").write_text("")
            (tmp_path / "gone.py").unlink()
            (tmp_path / "notes.txt").write_text("not watched")
            while not batches:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert batches[0] == ["a.py", "gone.py", "new.py"]


# A directory put first on PYTHONPATH: `import watchfiles` fails as it does on an install
# without watchfiles' wheel.
NO_WATCHFILES = "raise ImportError('watchfiles is not available here')\n"


async def test_reload_without_watchfiles_polls_and_still_reloads(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "watchfiles.py").write_text(NO_WATCHFILES)
    project = tmp_path / "project"
    project.mkdir()
    app_file = project / "reloadapp.py"
    app_file.write_text(APP_TEMPLATE.format(version="v1"))
    argv = reload_args(project)
    env = clean_env(PYTHONPATH=str(blocker))
    with trio.fail_after(40):
        async with started_process(argv, env=env) as server:
            await server.wait_for("Will watch for changes in these directories")
            first = (await server.wait_ready(1))[0]
            assert await get(server.port) == (200, b"v1")

            (project / "notes.txt").write_text("not watched")
            app_file.write_text(APP_TEMPLATE.format(version="v22"))
            await server.wait_for("StatReload detected changes in 'reloadapp.py'. Reloading")
            await server.wait_ready(2)
            assert not is_alive(first)
            assert await get(server.port) == (200, b"v22")

            server.signal(signal.SIGINT)
            assert await server.wait_exit() == 0
            await wait_all_gone(server.started_pids(), timeout=2)
    assert re.search(r"Started reloader process \[\d+\] using StatReload", server.stderr)
    fallback = "watchfiles could not be imported (watchfiles is not available here); polling"
    assert server.stderr.count(fallback) == 1
    assert "WatchFiles" not in server.stderr
    assert "notes.txt" not in server.stderr
    assert "Traceback" not in server.stderr


async def test_reload_with_watchfiles_names_it_in_the_startup_line(tmp_path: Path) -> None:
    (tmp_path / "reloadapp.py").write_text(APP_TEMPLATE.format(version="v1"))
    argv = ["reloadapp:app", "--app-dir", str(tmp_path), "--reload", "--reload-dir"]
    with trio.fail_after(20):
        async with started_process([*argv, str(tmp_path), "--port", "0"]) as server:
            await server.wait_ready(1)
            assert await server.stop() == 0
    assert re.search(r"Started reloader process \[\d+\] using WatchFiles", server.stderr)
    assert "could not be imported" not in server.stderr
