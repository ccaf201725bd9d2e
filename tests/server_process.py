"""Run ``python -m trioserve`` as a real subprocess and read its output, all bounded.

Used by the CLI and shutdown tests. Output is read on demand (``wait_for``) and drained by
``finish``; the context manager kills and reaps the process whatever happens, so no test
leaves an orphan behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

PYTHON = sys.executable
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "trioserve")
STARTUP_RE = re.compile(
    r"trioserve running on (?P<url>(?:http://(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d+))|unix:\S+)"
    r" \(Press CTRL\+C to quit\)"
)
START_TIMEOUT = 15.0

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
    elif path == "/scope":
        info = {
            "root_path": scope["root_path"],
            "path": scope["path"],
            "client": scope["client"],
            "server": scope["server"],
            "env": os.environ.get("FROM_ENV_FILE"),
        }
        body = json.dumps(info).encode()
    else:
        body = b"hello"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def make_app():
    return app
"""


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


class ServerProcess:
    """A running trioserve process with its stdout/stderr read so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stdout = ""
        self.stderr = ""
        self.url = ""
        self.port = 0

    async def _read(self, which: str) -> bool:
        stream = self.process.stdout if which == "stdout" else self.process.stderr
        assert stream is not None
        data = await stream.receive_some(65536)
        if data:
            setattr(self, which, getattr(self, which) + data.decode(errors="replace"))
        return bool(data)

    async def wait_for(
        self, pattern: str | re.Pattern[str], which: str = "stderr", timeout: float = 10.0
    ) -> re.Match[str]:
        """Read ``which`` until ``pattern`` matches; fail on timeout or EOF."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        with trio.fail_after(timeout):
            while True:
                match = regex.search(getattr(self, which))
                if match:
                    return match
                if not await self._read(which):
                    raise AssertionError(
                        f"{which} closed before {regex.pattern!r}:\n"
                        f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
                    )

    async def wait_started(self) -> None:
        match = await self.wait_for(STARTUP_RE, timeout=START_TIMEOUT)
        self.url = match["url"]
        if match["port"]:
            self.port = int(match["port"])

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def finish(self, timeout: float = 10.0) -> int:
        """Read both pipes to EOF and wait for the exit code (bounded)."""
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                for which in ("stdout", "stderr"):
                    nursery.start_soon(self._drain, which)
            return await self.process.wait()

    async def _drain(self, which: str) -> None:
        while await self._read(which):
            pass


@asynccontextmanager
async def running_process(
    args: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    console_script: bool = False,
    python_args: bool = False,
) -> AsyncIterator[ServerProcess]:
    """Start trioserve with ``args``; on exit kill it if still running and reap it.

    ``console_script``: run the ``trioserve`` script instead of ``python -m trioserve``;
    ``python_args``: ``args`` are the Python interpreter's own (``-c ...``).
    """
    command = [CONSOLE_SCRIPT] if console_script else [PYTHON, "-m", "trioserve"]
    if python_args:
        command = [PYTHON]
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
        yield server
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGKILL)
        with trio.move_on_after(5, shield=True):
            await process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                await trio.aclose_forcefully(pipe)


@asynccontextmanager
async def started_process(args: Sequence[str], **kwargs: object) -> AsyncIterator[ServerProcess]:
    """:func:`running_process`, returning once the startup line has been printed."""
    async with running_process(args, **kwargs) as server:  # type: ignore[arg-type]
        await server.wait_started()
        yield server
