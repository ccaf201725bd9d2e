"""Several trioserve instances behind a real nginx, rolled under steady load (issue 20).

Three instances, each ``--workers 2`` with an admin listener and ``--shutdown-delay``, sit
behind one nginx upstream. Each instance slot has two ports, blue and green, both in the
upstream (``max_fails=0``: nginx passes a refused connection on to the next server and
never marks one down), so a rolled instance's replacement starts on the other port while
the old one still serves. A client sends requests through nginx at a fixed rate, counting
every response by the instance that answered (``x-instance``). Under that load each
instance is rolled in turn (SIGTERM, start the replacement, wait for its ``/readyz``) and
one instance's workers are rolled with SIGHUP. Then: no failed request, no 502, and the
request counters of ``/metrics`` add up to what the client counted, instance by instance.
"""

from __future__ import annotations

import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio
from server_process import ServerProcess, clean_env, running_process
from test_admin import probe, wait_status
from test_metrics import metrics_of, requests_total
from test_nginx import free_port, run_nginx
from wire import Client

FLEET_APP = """
import os

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    instance = os.environ["INSTANCE"].encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"x-instance", instance)]})
    await send({"type": "http.response.body", "body": b"from " + instance})
"""
RATE = 100.0  # requests per second, over all the client's connections
CONNECTIONS = 4
SHUTDOWN_DELAY = "2.0"  # (also how long a roll may take to see /readyz flip, under load)


@dataclass
class FleetLoad:
    sent: int = 0
    answered: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


async def fixed_rate_client(address: tuple[str, int], stop: trio.Event, load: FleetLoad) -> None:
    """One keep-alive connection to nginx sending at RATE / CONNECTIONS requests a second;
    every request must be answered 200 (a failure reconnects and is counted)."""
    interval = CONNECTIONS / RATE
    next_at = trio.current_time()
    stream: trio.SocketStream | None = None
    try:
        while not stop.is_set():
            next_at += interval
            await trio.sleep_until(next_at)
            load.sent += 1
            try:
                if stream is None:
                    stream = await trio.open_tcp_stream(*address)
                with trio.fail_after(10):
                    response, body = await Client(stream).request("GET", "/")
            except Exception as exc:  # every failure counts, whatever its kind
                load.failures.append(repr(exc))
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                stream = None
                continue
            if response.status_code != 200:
                load.failures.append(f"status {response.status_code}: {body[:100]!r}")
                continue
            headers = dict(response.headers)
            load.answered[headers[b"x-instance"].decode()] += 1
    finally:
        if stream is not None:
            await trio.aclose_forcefully(stream)


@dataclass
class Instance:
    name: str
    port: int
    admin: int
    process: ServerProcess | None = None
    scraped: float = 0.0  # its request count, as last scraped


async def start_instance(
    nursery: trio.Nursery, tmp_path: Path, instance: Instance, *, task_status: trio.TaskStatus[None]
) -> None:
    """Run ``instance`` (in ``nursery``) until the test ends; started once /readyz says 200."""
    args = [
        "fleet_app:app",
        "--app-dir",
        str(tmp_path),
        "--port",
        str(instance.port),
        "--workers",
        "2",
        "--admin-bind",
        f"127.0.0.1:{instance.admin}",
        "--shutdown-delay",
        SHUTDOWN_DELAY,
        "--timeout-graceful-shutdown",
        "10",
        "--no-access-log",
    ]
    async with running_process(args, env=clean_env(INSTANCE=instance.name)) as process:
        instance.process = process
        await wait_status(instance.admin, "/readyz", 200, timeout=15)
        task_status.started()
        await process.finish(timeout=60)


async def test_rolling_three_instances_behind_nginx_loses_no_request(tmp_path: Path) -> None:
    (tmp_path / "fleet_app.py").write_text(FLEET_APP)
    slots = [(free_port(), free_port()) for _ in range(3)]  # blue and green port per slot
    upstream = "; server ".join(f"127.0.0.1:{port} max_fails=0" for pair in slots for port in pair)
    load = FleetLoad()
    stop = trio.Event()
    instances: list[Instance] = []
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            for slot, (blue, _) in enumerate(slots):
                instance = Instance(f"{slot}-blue", blue, free_port())
                instances.append(instance)
                await nursery.start(start_instance, nursery, tmp_path, instance)
            async with (
                run_nginx(tmp_path / "nginx", upstream) as nginx,
                trio.open_nursery() as clients,
            ):
                for _ in range(CONNECTIONS):
                    clients.start_soon(fixed_rate_client, nginx.address, stop, load)
                await trio.sleep(1.0)
                for slot, (_, green) in enumerate(slots):
                    old = instances[slot]
                    old.scraped = requests_total(await metrics_of(old.admin))
                    assert old.process is not None
                    old.process.signal(signal.SIGTERM)
                    await wait_status(old.admin, "/readyz", 503, timeout=float(SHUTDOWN_DELAY))
                    new = Instance(f"{slot}-green", green, free_port())
                    instances.append(new)
                    await nursery.start(start_instance, nursery, tmp_path, new)
                    assert await old.process.finish(timeout=20) == 0
                    await trio.sleep(0.5)
                rolled = instances[3]  # SIGHUP: its two workers replaced one by one
                assert rolled.process is not None
                rolled.process.signal(signal.SIGHUP)
                await rolled.process.wait_ready(4, timeout=15)
                await rolled.process.wait_for(r"Worker process \[\d+\] stopped", count=2)
                await trio.sleep(1.0)
                stop.set()
            # Let every worker's next heartbeat carry its last counts, then scrape.
            await trio.sleep(1.2)
            for instance in instances[3:]:
                instance.scraped = requests_total(await metrics_of(instance.admin))
                assert await probe(instance.admin, "/livez") == 200
                assert instance.process is not None
                instance.process.signal(signal.SIGTERM)

    assert load.failures == []
    assert sum(load.answered.values()) == load.sent > 200
    for instance in instances:
        assert load.answered[instance.name] > 0, (instance.name, load.answered)
    for instance in instances[:3]:  # scraped before SIGTERM; it served on through the delay
        assert instance.scraped <= load.answered[instance.name]
    for instance in instances[3:]:  # every request it answered is in its counters
        assert instance.scraped == load.answered[instance.name], (instance.name, load.answered)
    error_log = (tmp_path / "nginx" / "error.log").read_text()
    assert " 502 " not in error_log and "no live upstreams" not in error_log
