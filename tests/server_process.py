"""Run ``python -m trioserve`` as a real process (tree) and read its output, all bounded.

Used by the CLI, shutdown, lifespan, logging, nginx, ``--workers`` and ``--reload`` tests.
Both pipes are read continuously into :attr:`ServerProcess.stdout` / ``stderr``;
:meth:`~ServerProcess.wait_for` waits for a line. The context managers SIGKILL the process
and every worker it started (its ``Started worker process [pid]`` lines) if the test left
them running, and reap it, so a failing test leaves no orphan behind. Process-table checks
read ``/proc`` (no psutil).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import trio
from wire import Client

PYTHON = sys.executable
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "trioserve")
STARTUP_RE = re.compile(
    r"trioserve running on (?P<url>(?:https?://(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d+))|unix:\S+)"
    r" \(Press CTRL\+C to quit\)"
)
WORKER_STARTED_RE = re.compile(r"Started worker process \[(?P<pid>\d+)\]")
WORKER_READY_RE = re.compile(r"Worker process \[(?P<pid>\d+)\] is ready")
START_TIMEOUT = 15.0
# After the process exited (or was killed), how long its pipes may take to reach EOF.
DRAIN_TIMEOUT = 2.0

Pipe = Literal["stdout", "stderr"]

# A small app for process tests: routes for the options under test, lifespan reported on
# stderr so tests can see that shutdown ran.
CLI_APP = """
import json
import os
import sys

import trio


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                sys.stderr.write("app: startup\\n")
                await trio.sleep(float(os.environ.get("STARTUP_DELAY", "0")))
                await send({"type": "lifespan.startup.complete"})
            else:
                sys.stderr.write("app: shutdown\\n")
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path.startswith(scope["root_path"]):  # ASGI: path includes root_path
        path = path[len(scope["root_path"]):]
    if path == "/slow":
        seconds = float(scope["query_string"].decode() or "1")
        sys.stderr.write("app: slow request started\\n")
        await trio.sleep(seconds)
        body = b"slow done"
    elif path == "/endless":  # streams until cancelled (a client that never reads)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        sys.stderr.write("app: endless started\\n")
        while True:
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
    elif path == "/scope":
        info = {
            "root_path": scope["root_path"],
            "path": scope["path"],
            "client": scope["client"],
            "server": scope["server"],
            "env": os.environ.get("FROM_ENV_FILE"),
        }
        body = json.dumps(info).encode()
    elif path == "/gc":  # objects the collector no longer walks (freeze_startup_objects)
        import gc
        body = str(gc.get_freeze_count()).encode()
    else:
        body = b"hello"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def make_app():
    return app
"""


# The app every worker test runs: its pid as the body, plus routes for slow requests and for
# blocking the event loop. Lifespan startup fails when WORKER_APP_FAIL is set.
WORKER_APP = """
import os
import sys
import time

import trio


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if os.environ.get("WORKER_APP_FAIL"):
                    await send({"type": "lifespan.startup.failed",
                                "message": "database unreachable"})
                    return
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    seconds = float(scope["query_string"].decode() or "0")
    if scope["path"] == "/slow":
        sys.stderr.write("app: slow request started\\n")
        await trio.sleep(seconds)
    elif scope["path"] == "/block":
        sys.stderr.write("app: blocking the loop\\n")
        time.sleep(seconds)  # the mistake --timeout-worker-healthcheck exists for
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""


def write_worker_app(directory: Path) -> Path:
    """Write :data:`WORKER_APP` as ``workerapp.py`` into ``directory``; return it (the
    ``--app-dir`` of :func:`worker_args`)."""
    (directory / "workerapp.py").write_text(WORKER_APP)
    return directory


def worker_args(app_dir: Path, *extra: str, workers: int = 2) -> list[str]:
    """The command line of a ``--workers`` server running :data:`WORKER_APP` from
    ``app_dir`` on a free port, without access lines, plus ``extra``."""
    return [
        "workerapp:app",
        "--app-dir",
        str(app_dir),
        "--port",
        "0",
        "--workers",
        str(workers),
        "--no-access-log",
        *extra,
    ]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without TRIOSERVE_* / WEB_CONCURRENCY, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TRIOSERVE_") and key != "WEB_CONCURRENCY"
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, or None if there is no such
    process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()


def process_state(pid: int) -> str | None:
    """The state letter from /proc/<pid>/stat, or None if there is no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields is not None else None


def is_alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a zombie has exited already)."""
    return process_state(pid) not in (None, "Z", "X")


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def live_children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (a scan of the process table)."""
    found = []
    for entry in Path("/proc").iterdir():
        if (
            entry.name.isdigit()
            and parent_pid(int(entry.name)) == pid
            and is_alive(int(entry.name))
        ):
            found.append(int(entry.name))
    return found


async def wait_all_gone(pids: Sequence[int], timeout: float) -> None:
    """Wait until none of ``pids`` is alive (polling /proc: other processes, no events)."""
    with trio.fail_after(timeout):
        while any(is_alive(pid) for pid in pids):
            await trio.sleep(0.05)


class ServerProcess:
    """A running trioserve process (with the workers it started) and its output so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.url = ""
        self.port = 0
        self._output: dict[Pipe, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self._eof: dict[Pipe, bool] = {"stdout": False, "stderr": False}
        self._changed = trio.Event()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stdout(self) -> str:
        return self._output["stdout"].decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self._output["stderr"].decode(errors="replace")

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the startup line's ``http://host:port`` URL."""
        host, _, port = self.url.split("://", 1)[1].rpartition(":")
        return host.strip("[]"), int(port)

    async def _pump(self, which: Pipe) -> None:
        stream = self.process.stdout if which == "stdout" else self.process.stderr
        assert stream is not None
        while True:
            data = await stream.receive_some(65536)
            self._output[which] += data
            self._eof[which] = not data
            self._changed.set()
            self._changed = trio.Event()
            if not data:
                return

    def _matches(self, regex: re.Pattern[str], which: Pipe | Literal["any"]) -> list[re.Match[str]]:
        pipes: tuple[Pipe, ...] = ("stdout", "stderr") if which == "any" else (which,)
        return [m for pipe in pipes for m in regex.finditer(getattr(self, pipe))]

    async def _wait_matches(
        self,
        pattern: str | re.Pattern[str],
        which: Pipe | Literal["any"],
        count: int,
        timeout: float,
    ) -> list[re.Match[str]]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        pipes: tuple[Pipe, ...] = ("stdout", "stderr") if which == "any" else (which,)
        with trio.move_on_after(timeout):
            while True:
                matches = self._matches(regex, which)
                if len(matches) >= count:
                    return matches
                if all(self._eof[pipe] for pipe in pipes):
                    break
                await self._changed.wait()
        raise AssertionError(
            f"{regex.pattern!r} did not appear {count} time(s) on {which} within {timeout}s:\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )

    async def wait_for(
        self,
        pattern: str | re.Pattern[str],
        which: Pipe | Literal["any"] = "stderr",
        *,
        count: int = 1,
        timeout: float = 10.0,
    ) -> re.Match[str]:
        """Wait until ``pattern`` has matched ``count`` times on ``which``; return the
        ``count``-th match. Fails on timeout or when the pipe(s) closed first."""
        return (await self._wait_matches(pattern, which, count, timeout))[count - 1]

    async def wait_started(self, ready_file: Path | None = None) -> None:
        """Wait for the startup line (on stderr, or in ``ready_file`` when a log config
        sends it there) and note the URL and port."""
        with trio.fail_after(START_TIMEOUT):
            while True:
                match = STARTUP_RE.search(self.stderr)
                if match is None and ready_file is not None and ready_file.exists():
                    match = STARTUP_RE.search(ready_file.read_text(errors="replace"))
                if match is not None:
                    break
                if self._eof["stderr"]:
                    raise AssertionError(
                        f"stderr closed before the startup line:\n"
                        f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
                    )
                if ready_file is None:
                    await self._changed.wait()
                else:
                    with trio.move_on_after(0.05):  # a file gives no event: look again soon
                        await self._changed.wait()
        self.url = match["url"]
        if match["port"]:
            self.port = int(match["port"])

    def started_pids(self) -> list[int]:
        return [int(m["pid"]) for m in WORKER_STARTED_RE.finditer(self.stderr)]

    async def wait_ready(self, count: int, timeout: float = 15.0) -> list[int]:
        """Wait until ``count`` workers reported ready in total; return their pids."""
        matches = await self._wait_matches(WORKER_READY_RE, "stderr", count, timeout)
        return [int(m["pid"]) for m in matches]

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        """The exit code (bounded); workers may still be running and writing."""
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def finish(self, timeout: float = 10.0) -> int:
        """Read both pipes to EOF and wait for the exit code (bounded)."""
        with trio.fail_after(timeout):
            while not all(self._eof.values()):
                await self._changed.wait()
            return await self.process.wait()

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then :meth:`finish`."""
        if self.process.returncode is None:
            self.process.terminate()
        return await self.finish(timeout)


@asynccontextmanager
async def running_process(
    args: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    console_script: bool = False,
    python_args: bool = False,
    wrapper: Sequence[str] = (),
) -> AsyncIterator[ServerProcess]:
    """Start trioserve with ``args``; on exit kill what is left of it and reap it.

    ``env``: the whole environment (default :func:`clean_env`); ``console_script``: run the
    ``trioserve`` script instead of ``python -m trioserve``; ``python_args``: ``args`` are
    the Python interpreter's own (``-c ...``); ``wrapper``: a command that execs the rest
    (``systemd-socket-activate -l ...``).
    """
    command = [CONSOLE_SCRIPT] if console_script else [PYTHON, "-m", "trioserve"]
    if python_args:
        command = [PYTHON]
    command = [*wrapper, *command]
    process = await trio.lowlevel.open_process(
        [*command, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env if env is not None else clean_env(),
        pass_fds=tuple(pass_fds),
    )
    server = ServerProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._pump, "stdout")
            nursery.start_soon(server._pump, "stderr")
            try:
                yield server
            finally:
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)
                for pid in server.started_pids():
                    if is_alive(pid):
                        os.kill(pid, signal.SIGKILL)
                with trio.move_on_after(5, shield=True):
                    await process.wait()
                # Let the pumps read what the process wrote last, then stop them.
                with trio.move_on_after(DRAIN_TIMEOUT, shield=True):
                    while not all(server._eof.values()):
                        await server._changed.wait()
                nursery.cancel_scope.cancel()
    finally:
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                await trio.aclose_forcefully(pipe)


@asynccontextmanager
async def started_process(
    args: Sequence[str], *, ready_file: Path | None = None, **kwargs: object
) -> AsyncIterator[ServerProcess]:
    """:func:`running_process`, returning once the startup line has been printed."""
    async with running_process(args, **kwargs) as server:  # type: ignore[arg-type]
        await server.wait_started(ready_file)
        yield server


async def get(port: int, target: str = "/") -> tuple[int, bytes]:
    """One request on a fresh connection (``Connection: close``): (status, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = Client(stream)
        response, body = await client.request("GET", target, headers=[("connection", "close")])
    return response.status_code, body


@dataclass
class LoadResult:
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)


async def steady_load(port: int, stop: trio.Event, result: LoadResult, clients: int = 4) -> None:
    """``clients`` loops of back-to-back requests until ``stop`` is set; every failure is
    recorded (a request must succeed: no retries)."""

    async def one_client() -> None:
        while not stop.is_set():
            try:
                with trio.fail_after(10):
                    status, body = await get(port)
            except Exception as exc:  # every failure counts, whatever its kind
                result.errors.append(repr(exc))
                continue
            if status != 200:
                result.errors.append(f"status {status}")
            else:
                result.ok += 1
                result.pids.add(int(body))

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(one_client)
