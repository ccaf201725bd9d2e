"""``--workers N``: real worker processes supervised by the parent, real signals.

Every test runs ``python -m trioserve workerapp:app --workers 2`` and talks to it over TCP;
the process table is read from /proc.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
from conftest import connection_tasks, hello_app, run_server
from server_process import (
    LoadResult,
    clean_env,
    get,
    is_alive,
    live_children,
    parent_pid,
    started_process,
    steady_load,
    wait_all_gone,
    worker_args,
    write_worker_app,
)
from wire import Client, connect, read_until_eof

import trioserve
from trioserve.errors import ConfigError
from trioserve.workers.messages import WorkerEvent, WorkerSpec
from trioserve.workers.supervisor import describe_exit
from trioserve.workers.worker import heartbeat_interval


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return write_worker_app(tmp_path)


# -- pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        WorkerEvent("beat"),
        WorkerEvent("ready"),
        WorkerEvent("draining"),
        WorkerEvent("failed", kind="lifespan", error="Application startup failed: x\nline 2"),
        WorkerEvent("failed", kind="load", error='Could not import module "nope".'),
    ],
)
def test_worker_event_round_trips_as_one_line(event: WorkerEvent) -> None:
    line = event.encode()
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert WorkerEvent.decode(line[:-1]) == event


def test_worker_spec_carries_every_config_field_through_json() -> None:
    config = trioserve.Config(
        port=0, headers=(("x-a", "1"),), reload_dirs=("src",), timeout_graceful_shutdown=2.5
    )
    spec = WorkerSpec(app="main:app", config=config.to_dict(), link_fd=5, stack_fd=6)
    decoded = WorkerSpec.from_json(spec.to_json())
    assert decoded.app == "main:app"
    assert (decoded.link_fd, decoded.stack_fd) == (5, 6)
    assert trioserve.Config(**decoded.config) == config


@pytest.mark.parametrize("line", [b"[]", b'{"event": "reboot"}', b"not json", b'"ready"'])
def test_worker_event_rejects_foreign_lines(line: bytes) -> None:
    with pytest.raises(ValueError):
        WorkerEvent.decode(line)


@pytest.mark.parametrize(
    ("returncode", "text"),
    [(0, "exit code 0"), (3, "exit code 3"), (-9, "killed by SIGKILL"), (None, "not started")],
)
def test_describe_exit_names_the_signal(returncode: int | None, text: str) -> None:
    assert describe_exit(returncode) == text


def test_heartbeat_is_a_tenth_of_the_healthcheck_at_most_one_second() -> None:
    assert heartbeat_interval(trioserve.Config(timeout_worker_healthcheck=30)) == 1.0
    assert heartbeat_interval(trioserve.Config(timeout_worker_healthcheck=2)) == 0.2


def test_run_with_an_app_object_and_workers_is_a_config_error() -> None:
    async def app(scope: object, receive: object, send: object) -> None: ...

    with pytest.raises(ConfigError, match="import string"):
        trioserve.run(app, workers=2)
    with pytest.raises(ConfigError, match="import string"):
        trioserve.run(app, reload=True)


@pytest.mark.parametrize(
    ("extra", "env"),
    [
        pytest.param(["--workers", "3"], {}, id="workers-flag"),
        pytest.param([], {"WEB_CONCURRENCY": "3"}, id="web-concurrency"),
    ],
)
async def test_reload_with_workers_warns_and_runs_one_reloading_process(
    app_dir: Path, extra: list[str], env: dict[str, str]
) -> None:
    # uvicorn's behaviour: many Docker images set WEB_CONCURRENCY; --reload wins.
    argv = ["workerapp:app", "--app-dir", str(app_dir), "--port", "0", "--no-access-log"]
    argv += ["--reload", "--reload-dir", str(app_dir), *extra]
    with trio.fail_after(20):
        async with started_process(argv, env=clean_env(**env)) as server:
            await server.wait_ready(1)
            status, _ = await get(server.port)
            assert status == 200
            assert await server.stop() == 0
    warning = (
        "WARNING:  workers=3 (--workers or WEB_CONCURRENCY) is ignored with --reload; "
        "running one reloading process."
    )
    assert server.stderr.count(warning) == 1
    assert "using WatchFiles" in server.stderr
    assert len(server.started_pids()) == 1


async def test_connection_accepted_before_a_drain_gets_its_first_request_answered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # What makes recycling lossless: the request of a client whose connection was accepted
    # just before the worker began to drain is still on its way, and must be answered.
    async with run_server(hello_app) as server, await connect(server.addresses[0]) as fresh:
        with trio.fail_after(5):  # until the server's accept() has taken it
            while not connection_tasks():
                await trio.sleep(0.01)
        server.shutdown_nowait()
        await trio.testing.wait_all_tasks_blocked()
        client = Client(fresh)
        response, body = await client.request()
        assert (response.status_code, body) == (200, b"Hello, world!")
        assert (b"connection", b"close") in response.headers
        assert await read_until_eof(fresh) == b""


# -- real processes -------------------------------------------------------------------------


async def test_two_workers_answer_requests_from_two_distinct_pids(app_dir: Path) -> None:
    with trio.fail_after(30):
        async with started_process(worker_args(app_dir)) as server:
            workers = set(await server.wait_ready(2))
            assert len(workers) == 2
            assert all(parent_pid(pid) == server.pid for pid in workers)
            seen: set[int] = set()
            # Concurrent slow-ish requests so that both workers have to take some.
            for _ in range(20):
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(_record_pid, server.port, seen)
                if len(seen) == 2:
                    break
            assert seen == workers
            server.signal(signal.SIGTERM)
            assert await server.wait_exit() == 0


async def _record_pid(port: int, seen: set[int]) -> None:
    status, body = await get(port, "/slow?0.05")
    assert status == 200
    seen.add(int(body))


async def test_killed_worker_is_replaced_and_service_continues(app_dir: Path) -> None:
    with trio.fail_after(30):
        async with started_process(worker_args(app_dir)) as server:
            first = await server.wait_ready(2)
            victim = first[0]
            os.kill(victim, signal.SIGKILL)
            await server.wait_for(
                rf"Worker process \[{victim}\] died unexpectedly \(killed by SIGKILL\)"
            )
            ready = await server.wait_ready(3)
            replacement = ready[2]
            assert replacement not in first
            assert is_alive(replacement)
            assert not is_alive(victim)
            assert set(live_children(server.pid)) == {first[1], replacement}
            for _ in range(10):
                status, body = await get(server.port)
                assert status == 200
                assert int(body) in {first[1], replacement}
            server.signal(signal.SIGTERM)
            assert await server.wait_exit() == 0


async def test_sigterm_during_a_slow_request_completes_it_and_leaves_no_orphans(
    app_dir: Path,
) -> None:
    with trio.fail_after(30):
        async with started_process(worker_args(app_dir)) as server:
            workers = await server.wait_ready(2)
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                client = Client(stream)
                data = client.conn.send(
                    h11.Request(method="GET", target="/slow?1.5", headers=[("host", "x")])
                )
                await client.send_raw(data + client.conn.send(h11.EndOfMessage()))
                await server.wait_for("app: slow request started")
                server.signal(signal.SIGTERM)
                await server.wait_for("stopping the workers gracefully")
                response, body = await client.read_response()
                assert response.status_code == 200
                assert int(body) in workers
            assert await server.wait_exit() == 0
            await wait_all_gone(workers, timeout=2)
            assert server.stderr.count("Received SIGTERM, shutting down gracefully") == 2


async def test_sighup_rolls_the_workers_under_load_without_a_failed_request(
    app_dir: Path,
) -> None:
    with trio.fail_after(40):
        async with started_process(worker_args(app_dir)) as server:
            old = set(await server.wait_ready(2))
            stop = trio.Event()
            result = LoadResult()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(steady_load, server.port, stop, result)
                await trio.sleep(0.3)
                server.signal(signal.SIGHUP)
                new = set(await server.wait_ready(4, timeout=20)) - old
                await wait_all_gone(list(old), timeout=10)
                await trio.sleep(0.3)
                stop.set()
            assert result.errors == []
            assert len(new) == 2
            assert result.pids & old
            assert result.pids & new
            assert set(live_children(server.pid)) == new
            server.signal(signal.SIGTERM)
            assert await server.wait_exit() == 0


async def test_max_requests_recycles_workers_under_load_without_a_failed_request(
    app_dir: Path,
) -> None:
    with trio.fail_after(40):
        async with started_process(
            worker_args(app_dir, "--limit-max-requests", "40", "--limit-max-requests-jitter", "5")
        ) as server:
            await server.wait_ready(2)
            stop = trio.Event()
            result = LoadResult()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(steady_load, server.port, stop, result)
                # Each worker serves at most 45 requests: 6 pids need at least 4 recycles.
                with trio.fail_after(25):
                    while len(result.pids) < 6:
                        await trio.sleep(0.05)
                stop.set()
            assert result.errors == []
            assert "is draining; starting its replacement" in server.stderr
            assert "died unexpectedly" not in server.stderr
            server.signal(signal.SIGTERM)
            assert await server.wait_exit() == 0


async def test_blocked_event_loop_is_reported_with_its_stack_and_replaced(
    app_dir: Path,
) -> None:
    with trio.fail_after(30):
        async with started_process(
            worker_args(app_dir, "--timeout-worker-healthcheck", "2")
        ) as server:
            workers = await server.wait_ready(2)
            stream = await connect(("127.0.0.1", server.port))
            async with stream:
                await stream.send_all(b"GET /block?20 HTTP/1.1\r\nhost: x\r\n\r\n")
                await server.wait_for("app: blocking the loop")
                match = await server.wait_for(
                    r"Worker process \[(?P<pid>\d+)\] sent no heartbeat for 2\.0s"
                )
            blocked = int(match["pid"])
            assert blocked in workers
            # The stack shows where the loop is stuck: the app's time.sleep line (waited
            # for: the report's lines reach stderr one by one).
            await server.wait_for(r"workerapp\.py\", line \d+ in app")
            report = server.stderr[match.start() :]
            assert 'workerapp.py", line' in report
            assert "in app" in report
            await wait_all_gone([blocked], timeout=5)
            ready = await server.wait_ready(3)
            assert ready[2] not in workers
            status, _body = await get(server.port)
            assert status == 200
            server.signal(signal.SIGTERM)
            assert await server.wait_exit() == 0


async def test_workers_exit_on_their_own_when_the_parent_is_killed(app_dir: Path) -> None:
    with trio.fail_after(30):
        async with started_process(worker_args(app_dir)) as server:
            workers = await server.wait_ready(2)
            server.signal(signal.SIGKILL)
            await server.wait_exit()
            await wait_all_gone(workers, timeout=10)
            await server.wait_for("Parent process is gone; shutting down", count=2)


async def test_sigttin_adds_and_sigttou_removes_a_worker(app_dir: Path) -> None:
    with trio.fail_after(30):
        async with started_process(worker_args(app_dir)) as server:
            await server.wait_ready(2)
            server.signal(signal.SIGTTIN)
            third = (await server.wait_ready(3))[2]
            assert len(live_children(server.pid)) == 3
            server.signal(signal.SIGTTOU)
            await server.wait_for(r"Worker process \[\d+\] stopped \(exit code 0\)")
            assert len(live_children(server.pid)) == 2
            assert is_alive(third) is False  # the newest one goes first
            server.signal(signal.SIGTERM)
            assert await server.wait_exit() == 0


async def test_every_worker_failing_startup_exits_3_with_the_error_shown_once(
    app_dir: Path,
) -> None:
    with trio.fail_after(30):
        env = clean_env(WORKER_APP_FAIL="1")
        async with started_process(worker_args(app_dir, workers=3), env=env) as server:
            assert await server.wait_exit() == 3
            await server.wait_for("Application startup failed. Exiting.")
            assert server.stderr.count("database unreachable") == 1
            await wait_all_gone(server.started_pids(), timeout=2)


async def test_import_error_in_every_worker_exits_1_with_the_error_shown_once(
    tmp_path: Path,
) -> None:
    (tmp_path / "brokenapp.py").write_text("def app(:\n")
    with trio.fail_after(30):
        async with started_process(
            ["brokenapp:app", "--app-dir", str(tmp_path), "--port", "0", "--workers", "2"]
        ) as server:
            assert await server.wait_exit() == 1
            await server.wait_for("Error loading ASGI app.")
            assert server.stderr.count("SyntaxError") == 1
            assert "brokenapp.py" in server.stderr
