"""Run ``python -m trioserve --workers N`` / ``--reload`` as a real process tree, bounded.

The parent's stderr (shared with its workers) is read continuously into ``output``;
``wait_for`` waits for a log line. The context manager SIGKILLs the parent and every worker
it started if the test left them running, so a failing test leaves no orphan behind.
Process-table checks read ``/proc`` (no psutil).
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

import trio
from wire import Client

STARTUP_RE = re.compile(r"trioserve running on http://127\.0\.0\.1:(?P<port>\d+)")
WORKER_STARTED_RE = re.compile(r"Started worker process \[(?P<pid>\d+)\]")
WORKER_READY_RE = re.compile(r"Worker process \[(?P<pid>\d+)\] is ready")

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


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TRIOSERVE_") and key != "WEB_CONCURRENCY"
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def process_state(pid: int) -> str | None:
    """The state letter from /proc/<pid>/stat, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a zombie has exited already)."""
    return process_state(pid) not in (None, "Z", "X")


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


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


class Supervised:
    """A running ``trioserve --workers``/``--reload`` parent with its log so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.output = ""
        self.port = 0
        self._changed = trio.Event()
        self.eof = False

    @property
    def pid(self) -> int:
        return self.process.pid

    async def _pump(self) -> None:
        assert self.process.stderr is not None
        while True:
            data = await self.process.stderr.receive_some(65536)
            if not data:
                self.eof = True
                self._changed.set()
                return
            self.output += data.decode(errors="replace")
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(
        self, pattern: str | re.Pattern[str], *, count: int = 1, timeout: float = 10.0
    ) -> list[re.Match[str]]:
        """Wait until ``pattern`` has matched ``count`` times in the output."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        with trio.move_on_after(timeout):
            while True:
                matches = list(regex.finditer(self.output))
                if len(matches) >= count:
                    return matches
                if self.eof:
                    break
                await self._changed.wait()
        raise AssertionError(
            f"{regex.pattern!r} did not appear {count} time(s) within {timeout}s:\n{self.output}"
        )

    def started_pids(self) -> list[int]:
        return [int(m["pid"]) for m in WORKER_STARTED_RE.finditer(self.output)]

    def ready_pids(self) -> list[int]:
        return [int(m["pid"]) for m in WORKER_READY_RE.finditer(self.output)]

    async def wait_ready(self, count: int, timeout: float = 15.0) -> list[int]:
        """Wait until ``count`` workers reported ready in total; return their pids."""
        matches = await self.wait_for(WORKER_READY_RE, count=count, timeout=timeout)
        return [int(m["pid"]) for m in matches]

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def supervised(
    args: Sequence[str], *, env: dict[str, str] | None = None, wait_started: bool = True
) -> AsyncIterator[Supervised]:
    """Start ``python -m trioserve *args`` and kill whatever is left of it on exit."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioserve", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(**(env or {})),
    )
    server = Supervised(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._pump)
            try:
                if wait_started:
                    match = (await server.wait_for(STARTUP_RE, timeout=15.0))[0]
                    server.port = int(match["port"])
                yield server
            finally:
                for pid in [server.pid, *server.started_pids()]:
                    if is_alive(pid):
                        os.kill(pid, signal.SIGKILL)
                with trio.move_on_after(5, shield=True):
                    await process.wait()
                nursery.cancel_scope.cancel()
    finally:
        if process.stderr is not None:
            await trio.aclose_forcefully(process.stderr)


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
