"""Run ``python -m trioserve`` as a real subprocess, bounded, with its output captured."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

STARTUP_TIMEOUT = 15.0
_URL = re.compile(rb"running on (https?://[^\s\"]+|unix:[^\s\"]+)")


class ServerProcess:
    """A running trioserve process; ``stdout``/``stderr`` grow as it writes."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.url = ""
        self._ready = trio.Event()
        self._output_changed = trio.Event()

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.url.split("://", 1)[1].rpartition(":")
        return host.strip("[]"), int(port)

    async def _pump(self, stream: Any, buffer: bytearray) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                buffer.extend(data)
                match = _URL.search(self.stderr)
                if match and not self._ready.is_set():
                    self.url = match.group(1).decode()
                    self._ready.set()
                self._output_changed.set()
                self._output_changed = trio.Event()

    async def wait_for_output(self, needle: bytes, *, timeout: float = 10.0) -> None:
        """Wait until ``needle`` appears on stdout or stderr."""
        with trio.fail_after(timeout):
            while needle not in self.stdout and needle not in self.stderr:
                await self._output_changed.wait()

    async def stop(self, *, timeout: float = 15.0) -> int:
        """SIGTERM, then wait (bounded) for the exit code."""
        if self.process.returncode is None:
            self.process.terminate()
        with trio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def trioserve_process(
    *args: str, cwd: str | None = None, ready_file: Path | None = None
) -> AsyncIterator[ServerProcess]:
    """Start ``python -m trioserve *args`` and yield once it logged its URL (to stderr, or
    to ``ready_file`` when a log config sends it there); killed on exit."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioserve", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
    )
    server = ServerProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._pump, process.stdout, server.stdout)
            nursery.start_soon(server._pump, process.stderr, server.stderr)
            try:
                with trio.fail_after(STARTUP_TIMEOUT):
                    while not server._ready.is_set():
                        if process.poll() is not None:
                            raise RuntimeError(f"trioserve exited: {bytes(server.stderr)!r}")
                        if ready_file is not None and ready_file.exists():
                            match = _URL.search(ready_file.read_bytes())
                            if match:
                                server.url = match.group(1).decode()
                                server._ready.set()
                        with trio.move_on_after(0.05):
                            await server._ready.wait()
                yield server
            finally:
                if process.returncode is None:
                    process.kill()
                with trio.move_on_after(5, shield=True):
                    await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
