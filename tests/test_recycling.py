"""No request fails while workers recycle: keep-alive load through ``--limit-max-requests``,
a SIGHUP rolling restart and SIGTTOU (real processes, real signals, a real load client).

The load client keeps :data:`CONNECTIONS` keep-alive connections busy, one request at a time
on each (no pipelining: the next request leaves as soon as the last response has arrived,
which is when a draining worker that closed the connection would race it), and counts every
response. A client may reconnect after a response that carried ``Connection: close``: that
is how a draining worker says goodbye. Everything else is a failure: a refused connection,
a connection closed or reset with a request sent and no response to it, a malformed or
non-200 response, no response within ``wire.READ_TIMEOUT``. Nothing is retried.

Each scenario puts load on the server for a few seconds only (``pytest.mark.timeout`` and
``trio.fail_after`` bound it), so that the whole suite stays quick.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
import trio
from server_process import (
    ServerProcess,
    started_process,
    wait_all_gone,
    worker_args,
    write_worker_app,
)
from wire import Client

CONNECTIONS = 30
# Load before and after the event under test (recycles happen throughout with max-requests).
WARM_UP = 1.0
COOL_DOWN = 0.5
MAX_REQUESTS_LOAD = 5.0
# The client closes each connection after this many requests (the last one says
# Connection: close), so that new connections keep spreading over the workers.
REQUESTS_PER_CONNECTION = 50
RECONNECT_PAUSE = 0.05  # after a failed connect, so that a refusing server is not spun on


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return write_worker_app(tmp_path)


@dataclass
class KeepAliveLoad:
    """What the load client saw: every request is either ``ok`` or one of ``errors``."""

    ok: int = 0
    # Responses with Connection: close the client did not ask for (a draining worker's
    # goodbye on a kept-alive connection); the client then reconnects.
    closes: int = 0
    errors: list[str] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)


async def keep_alive_load(port: int, stop: trio.Event, load: KeepAliveLoad) -> None:
    """Run :data:`CONNECTIONS` keep-alive clients until ``stop`` is set."""
    async with trio.open_nursery() as nursery:
        for _ in range(CONNECTIONS):
            nursery.start_soon(_keep_alive_client, port, stop, load)


async def _keep_alive_client(port: int, stop: trio.Event, load: KeepAliveLoad) -> None:
    while not stop.is_set():
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError as exc:
            load.errors.append(f"connect: {exc!r}")
            await trio.sleep(RECONNECT_PAUSE)
            continue
        async with stream:
            client = Client(stream)
            for n in range(1, REQUESTS_PER_CONNECTION + 1):
                if stop.is_set():
                    break
                last = n == REQUESTS_PER_CONNECTION
                try:
                    response, body = await client.request(
                        headers=[("connection", "close")] if last else []
                    )
                except Exception as exc:  # every failure counts, whatever its kind
                    load.errors.append(f"request {n} on its connection: {exc!r}")
                    break
                if response.status_code != 200:
                    load.errors.append(f"status {response.status_code}")
                    break
                load.ok += 1
                load.pids.add(int(body))
                if client.conn.their_state is h11.MUST_CLOSE:  # Connection: close
                    if not last:
                        load.closes += 1
                    break


async def under_load(
    server: ServerProcess,
    event: Callable[[], Awaitable[None]],
    load: KeepAliveLoad | None = None,
) -> KeepAliveLoad:
    """Keep-alive load for ``WARM_UP`` seconds, then ``event()``, then ``COOL_DOWN`` more
    (counted in ``load``, when given, so that ``event`` can watch it)."""
    stop = trio.Event()
    load = KeepAliveLoad() if load is None else load
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_alive_load, server.port, stop, load)
        await trio.sleep(WARM_UP)
        await event()
        await trio.sleep(COOL_DOWN)
        stop.set()
    return load


def assert_no_failure(load: KeepAliveLoad, server: ServerProcess) -> None:
    shown = "\n".join(load.errors[:20])
    assert load.errors == [], f"{len(load.errors)} failed of {load.ok + len(load.errors)}:\n{shown}"
    assert load.ok > 500  # real load, not a trickle
    assert "died unexpectedly" not in server.stderr
    assert "Traceback" not in server.stderr


@pytest.mark.timeout(40)
async def test_max_requests_recycles_under_keep_alive_load_without_a_failed_request(
    app_dir: Path,
) -> None:
    options = worker_args(
        app_dir, "--limit-max-requests", "400", "--limit-max-requests-jitter", "100"
    )
    with trio.fail_after(30):
        async with started_process(options) as server:
            await server.wait_ready(2)

            async def recycles() -> None:
                await server.wait_for("is draining; starting its replacement", count=3)
                await trio.sleep(MAX_REQUESTS_LOAD - WARM_UP)

            load = await under_load(server, recycles)
            assert_no_failure(load, server)
            # Several workers drained with keep-alive connections busy; each said goodbye.
            assert len(load.pids) >= 4
            assert load.closes >= CONNECTIONS
            server.signal(signal.SIGTERM)
            assert await server.wait_exit() == 0


@pytest.mark.timeout(40)
async def test_sighup_rolls_the_workers_under_keep_alive_load_without_a_failed_request(
    app_dir: Path,
) -> None:
    with trio.fail_after(30):
        async with started_process(worker_args(app_dir)) as server:
            old = await server.wait_ready(2)

            async def rolling_restart() -> None:
                server.signal(signal.SIGHUP)
                await server.wait_ready(4)
                await wait_all_gone(old, timeout=10)

            load = await under_load(server, rolling_restart)
            assert_no_failure(load, server)
            assert load.pids & set(old)
            assert load.pids - set(old)
            assert load.closes > 0  # the old ones drained with kept-alive connections busy
            server.signal(signal.SIGTERM)
            assert await server.wait_exit() == 0


@pytest.mark.timeout(40)
async def test_sigttou_removes_workers_under_keep_alive_load_without_a_failed_request(
    app_dir: Path,
) -> None:
    with trio.fail_after(30):
        async with started_process(worker_args(app_dir, workers=3)) as server:
            workers = await server.wait_ready(3)

            load = KeepAliveLoad()

            async def remove_two() -> None:
                # (Every worker serves before two go: on a busy machine the warm-up alone
                # may not reach the third.)
                while load.pids != set(workers):
                    await trio.sleep(0.05)
                for count in (1, 2):
                    server.signal(signal.SIGTTOU)
                    await server.wait_for(r"Worker process \[\d+\] stopped", count=count)

            await under_load(server, remove_two, load)
            assert_no_failure(load, server)
            assert load.pids == set(workers)
            assert load.closes > 0  # the two drained with kept-alive connections busy
            server.signal(signal.SIGTERM)
            assert await server.wait_exit() == 0
