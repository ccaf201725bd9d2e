"""``/metrics``: what is counted, the Prometheus text format, and counters that stay
monotonic across worker restarts (real processes; parsed with prometheus_client)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families
from server_process import get, started_process
from test_admin import HEALTH_APP, free_port
from wire import Client

from trioserve.metrics import ServerMetrics, add_sample


def scrape(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a scrape, parsed by prometheus_client."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def requests_total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(v for (name, _), v in samples.items() if name == "trioserve_requests_total")


async def metrics_of(admin: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = await get(admin, "/metrics")
    assert status == 200
    return scrape(body)


def test_a_dead_workers_gauges_are_dropped_and_its_counters_kept() -> None:
    metrics = ServerMetrics(app_calls=lambda: 3)  # (no WebSocket: 3 requests in flight)
    metrics.count_new_labels(b"GET", "1.1", 200)
    metrics.count_new_labels(b"BREW", "1.0", None)  # unknown method, client left
    metrics.duration_buckets[7] += 1  # 0.3 s (the other one was fast: derived)
    total: dict[str, float] = {}
    add_sample(total, metrics.sample(), counters_only=True)
    add_sample(total, metrics.sample())
    assert total["requests|GET|2xx|1.1"] == 2
    assert total["requests|other|none|1.0"] == 2
    assert total["requests_in_flight"] == 3  # only the live one's
    assert total["request_duration_seconds|bucket|0.005"] == 2
    assert total["request_duration_seconds|bucket|+Inf"] == 4


def test_prometheus_client_is_found_but_not_imported_until_a_scrape() -> None:
    # (A worker never renders a scrape, nor does --metrics alone: it never loads it.)
    code = (
        "import sys; from trioserve import Config; Config(metrics=True); "
        "print('prometheus_client' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (done.returncode, done.stdout.strip()) == (0, "False"), done.stderr


def test_keepalive_reuses_are_derived_from_the_admitted_calls() -> None:
    # 7 app calls admitted and 2 refused: 3 were HTTP/1.1 connections' first requests
    # (one of them refused) and 2 HTTP/2 streams (one refused): 4 reuses.
    metrics = ServerMetrics(admitted=lambda: 7)
    metrics.concurrency_rejections = 2
    metrics.first_requests = 3
    metrics.h2_streams = 2
    assert metrics.sample()["keepalive_reuses"] == 4


def test_statuses_without_a_slot_count_as_none() -> None:
    metrics = ServerMetrics()
    for status in (None, 499, 600, 999):
        metrics.count_new_labels(b"GET", "1.1", status)
    metrics.count_new_labels(b"GET", "1.1", 204)
    sample = metrics.sample()
    assert sample["requests|GET|none|1.1"] == 4
    assert sample["requests|GET|2xx|1.1"] == 1
    assert sample["request_duration_seconds|bucket|+Inf"] == 5


async def test_metrics_count_requests_errors_and_bytes(tmp_path: Path) -> None:
    admin = free_port()
    (tmp_path / "health_app.py").write_text(HEALTH_APP)
    args = ["health_app:app", "--app-dir", str(tmp_path), "--port", "0"]
    async with started_process([*args, "--admin-bind", f"127.0.0.1:{admin}"]) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            client = Client(stream)
            for method in ("GET", "GET", "HEAD", "POST"):
                response, _ = await client.request(method, "/")
                assert response.status_code == 200
        bad = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with bad:
            await bad.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            assert (await bad.receive_some(1024)).startswith(b"HTTP/1.1 400 ")
        samples = await metrics_of(admin)
        assert await server.stop() == 0

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("trioserve_requests_total", method="GET", status="2xx", http_version="1.1") == 2
    assert value("trioserve_requests_total", method="HEAD", status="2xx", http_version="1.1") == 1
    assert value("trioserve_requests_total", method="POST", status="2xx", http_version="1.1") == 1
    assert value("trioserve_protocol_errors_total", status="400") == 1
    assert value("trioserve_keepalive_reuses_total") == 3
    assert value("trioserve_connections_total") == 2
    assert value("trioserve_request_duration_seconds_count") == 4
    assert value("trioserve_received_bytes_total") > 4 * len(b"GET / HTTP/1.1\r\n")
    assert value("trioserve_sent_bytes_total") > 0
    assert value("trioserve_requests_in_flight") == 0
    assert value("trioserve_draining") == 0
    # The admin listener's own requests (this scrape) are not counted.
    assert requests_total(samples) == 4


async def test_counters_stay_monotonic_across_a_worker_restart(tmp_path: Path) -> None:
    admin = free_port()
    (tmp_path / "health_app.py").write_text(HEALTH_APP)
    args = ["health_app:app", "--app-dir", str(tmp_path), "--port", "0", "--workers", "2"]
    async with started_process([*args, "--admin-bind", f"127.0.0.1:{admin}"]) as server:
        await server.wait_ready(2)
        for _ in range(20):
            assert (await get(server.port, "/"))[0] == 200
        # Workers report with every heartbeat (at most 0.5 s apart here).
        with trio.fail_after(5):
            while requests_total(await metrics_of(admin)) < 20:
                await trio.sleep(0.1)
        server.signal(signal.SIGHUP)  # both workers replaced, one after the other
        await server.wait_ready(4)
        await server.wait_for(r"Worker process \[\d+\] stopped", count=2)
        samples = await metrics_of(admin)
        assert requests_total(samples) == 20  # the exited workers' final counts are kept
        assert samples[("trioserve_worker_starts_total", ())] == 4
        assert samples[("trioserve_worker_restarts_total", ())] == 2
        assert samples[("trioserve_worker_exits_total", (("cause", "stopped"),))] == 2
        assert samples[("trioserve_workers", ())] == 2
        for _ in range(5):
            assert (await get(server.port, "/"))[0] == 200
        with trio.fail_after(5):
            while requests_total(await metrics_of(admin)) < 25:
                await trio.sleep(0.1)
        assert requests_total(await metrics_of(admin)) == 25
        assert await server.stop() == 0
