"""The benchmark harness's pure parts: wrk output parsing, round aggregation, tables.

No timing is asserted here (or anywhere in the tests): these only check that
``bench/bench.py`` reads its tools' output and renders what it measured correctly.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trioserve_bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

WRK_OUTPUT = """Running 3s test @ http://127.0.0.1:8000/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.45ms  512.00us  20.10ms   90.00%
    Req/Sec    14.50k   300.00    15.00k    80.00%
  Latency Distribution
     50%  812.00us
     75%    3.60ms
     90%    4.00ms
     99%    1.20s
  43500 requests in 3.00s, 5.90MB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:  14500.25
Transfer/sec:      1.97MB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    sample = bench.parse_wrk(WRK_OUTPUT)
    assert sample.rate == pytest.approx(14500.25)
    assert sample.p50_ms == pytest.approx(0.812)
    assert sample.p99_ms == pytest.approx(1200.0)
    assert sample.errors == 1 + 2 + 3 + 4 + 5


def test_parse_wrk_without_errors_counts_zero() -> None:
    clean = "\n".join(
        line for line in WRK_OUTPUT.splitlines() if "errors" not in line and "Non-2xx" not in line
    )
    assert bench.parse_wrk(clean).errors == 0


def test_parse_wrk_rejects_output_without_a_rate() -> None:
    with pytest.raises(ValueError, match="Requests/sec"):
        bench.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_aggregate_takes_medians_and_pairs_ratios_per_round() -> None:
    sample = bench.Sample
    samples = {
        "trioserve": [
            sample(rate=100.0, p99_ms=2.0),
            sample(rate=300.0, p99_ms=4.0),
            sample(rate=200.0, p99_ms=3.0, errors=1),
        ],
        "hypercorn-trio": [sample(rate=50.0), sample(rate=100.0), sample(rate=100.0)],
        "uvicorn-h11": [sample(rate=100.0), sample(rate=100.0), sample(rate=400.0)],
    }
    rows = {row.server: row for row in bench.aggregate(samples)}
    mine = rows["trioserve"]
    assert mine.rate == 200.0
    assert mine.p99_ms == 3.0
    assert mine.errors == 1
    # Per-round ratios to hypercorn: 2.0, 3.0, 2.0 -> median 2.0 (not 200 / 100).
    assert mine.ratios["hypercorn-trio"] == 2.0
    # Per-round ratios to uvicorn: 1.0, 3.0, 0.5 -> median 1.0.
    assert mine.ratios["uvicorn-h11"] == 1.0
    assert rows["uvicorn-h11"].ratios["uvicorn-h11"] == 1.0


def test_aggregate_skips_rounds_without_a_value() -> None:
    sample = bench.Sample
    samples = {
        "trioserve": [sample(rate=None, note="n/a (refused)")],
        "uvicorn-h11": [sample(rate=10.0)],
    }
    rows = {row.server: row for row in bench.aggregate(samples)}
    assert rows["trioserve"].rate is None
    assert rows["trioserve"].ratios["uvicorn-h11"] is None
    assert rows["trioserve"].note == "n/a (refused)"


def test_render_tables_show_values_ratios_and_missing_cells() -> None:
    sample = bench.Sample
    samples = {
        "trioserve": [
            sample(
                rate=12345.6,
                p50_ms=1.5,
                p99_ms=4.25,
                cpu_percent=99.0,
                cpu_us=80.4,
                rss_mib=30.0,
                rss_total_mib=30.0,
            )
        ],
        "uvicorn-h11": [sample(rate=10000.0, p50_ms=2.0, p99_ms=5.0)],
        "trio-h11-min": [sample(rate=None, note="-")],
    }
    rows = bench.aggregate(samples)
    table = bench.render_scenario(bench.SCENARIOS["hello"], rows)
    lines = table.splitlines()
    assert lines[0].startswith("### hello")
    assert "| trioserve | 12,346 | 1.50 | 4.25 | 0 | 99 | 80 | 30.0 (30.0) | 1.23 |" in lines
    assert "| trio-h11-min | - | - | - | - | - | - | - | - |" in lines
    overview = bench.render_overview([bench.SCENARIOS["hello"]], {"hello": rows})
    assert "| trioserve | 12,346 |" in overview
    assert "#### Ratio to uvicorn-h11" in overview
    assert "| trioserve | 1.23 |" in overview


def test_render_idle_table_reports_memory_per_connection() -> None:
    rows = bench.aggregate(
        {
            "trioserve": [
                bench.Sample(rate=6.5, fresh_rss_mib=27.0, rss_mib=33.5, rss_total_mib=33.5)
            ],
            "uvicorn-h11": [
                bench.Sample(rate=6.5, fresh_rss_mib=28.0, rss_mib=34.5, rss_total_mib=34.5)
            ],
        }
    )
    table = bench.render_scenario(bench.SCENARIOS["idle"], rows)
    assert "| trioserve | 6.5 | 27.0 | 33.5 (33.5) | 1.00 |" in table
    assert "lower is better" in table


ORDER_PROBE = """
import trio

order = []

async def worker(name):
    for _ in range(4):
        order.append(name)
        await trio.lowlevel.cancel_shielded_checkpoint()

async def main():
    async with trio.open_nursery() as nursery:
        for name in "abcde":
            nursery.start_soon(worker, name)

trio.run(main)
print("".join(order))
"""


def _batch_orders(extra_path: tuple[str, ...]) -> set[str]:
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(extra_path))
    return {
        subprocess.run(
            [sys.executable, "-c", ORDER_PROBE], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(6)
    }


def test_fifo_check_server_runs_trio_batches_first_in_first_out() -> None:
    # The trioserve-fifo row's whole point is this order; if trio renames its private random
    # source, the diagnostic silently measures stock trio, so check it in a real process.
    assert bench.FIFO_SERVER.pythonpath
    assert "trioserve" in " ".join(bench.FIFO_SERVER.command(bench.RAW_APP, 8000))
    fifo = _batch_orders(bench.FIFO_SERVER.pythonpath)
    assert fifo == {"abcde" * 4}
    # Stock trio flips a coin per batch: over 6 runs of 4 flips, not always FIFO.
    assert _batch_orders(()) != {"abcde" * 4}


CALLGRIND_OUTPUT = """# callgrind format
version: 1
creator: callgrind-3.19.0
cmd: python -m trioserve apps.asgi_app:app
events: Ir
fl=(1) ???
fn=(1) main
0 5
summary: 1242073488
totals: 1242073488
"""


def test_callgrind_total_reads_the_totals_line() -> None:
    assert bench.callgrind_total(CALLGRIND_OUTPUT) == 1242073488
    with pytest.raises(ValueError):
        bench.callgrind_total("events: Ir\nfn=main\n")


def test_callgrind_totals_wait_for_a_file_written_late(tmp_path: Path) -> None:
    """A helper process that outlives the server writes its counts a moment after the
    server stopped (hypercorn's resource tracker): they are waited for, within a bound."""
    done, late = tmp_path / "callgrind.1", tmp_path / "callgrind.2"
    done.write_text(CALLGRIND_OUTPUT)
    late.write_text("")  # (valgrind creates the file when the process starts)
    timer = threading.Timer(0.3, late.write_text, [CALLGRIND_OUTPUT])
    timer.start()
    try:
        assert bench.callgrind_totals([done, late], wait=30) == [1242073488] * 2
    finally:
        timer.cancel()
    late.write_text("")
    with pytest.raises(ValueError, match="totals"):
        bench.callgrind_totals([late], wait=0.2)


def test_per_request_subtracts_the_shorter_run() -> None:
    # 500 and 2,500 requests: start-up and shutdown cancel out.
    assert bench.per_request((1_000_000, 5_000_000), (500, 2500)) == 2000.0
    with pytest.raises(ValueError):
        bench.per_request((1, 2), (500, 500))


def test_render_instructions_shows_counts_and_ratios() -> None:
    results = {
        "hello": {"trioserve": 515_000.0, "uvicorn-h11": 626_000.0, "trio-h11-min": None},
        "json": {"trioserve": 846_000.0, "uvicorn-h11": 881_000.0, "trio-h11-min": None},
    }
    text = bench.render_instructions(results, ["trioserve", "uvicorn-h11", "trio-h11-min"])
    assert "| hello | 515 | 626 | - |" in text
    assert "| json | 846 | 881 | - |" in text
    assert "#### Ratio to uvicorn-h11 (instructions; lower is better)" in text
    assert "| hello | 0.82 | 1.00 | - |" in text
    assert "| json | 0.96 | 1.00 | - |" in text
    assert "hypercorn-trio" not in text  # not measured: no ratio table for it


def test_metrics_server_is_trioserve_httptools_counting() -> None:
    # The cost of --metrics is measured against trioserve-httptools: nothing else may differ.
    counting = bench.ALL_SERVERS["trioserve-httptools-metrics"].command(bench.RAW_APP, 8000)
    plain = bench.ALL_SERVERS["trioserve-httptools"].command(bench.RAW_APP, 8000)
    assert counting == [*plain, "--metrics"]


H2LOAD_OUTPUT = """\
finished in 3.00s, 4590.33 req/s, 200.14KB/s
requests: 13771 total, 13871 started, 13771 done, 13768 succeeded, 2 failed, 1 errored, 0 timeout
status codes: 13765 2xx, 0 3xx, 2 4xx, 1 5xx
"""


def test_parse_h2load_reads_rate_errors_and_percentiles_from_the_log() -> None:
    # 100 completed requests of 1..100 ms, and one cut off at the end (status 0).
    log = "".join(f"1700000000000000\t200\t{ms * 1000}\n" for ms in range(1, 101))
    log += "1700000000000000\t0\t999999999\n"
    sample = bench.parse_h2load(H2LOAD_OUTPUT, log)
    assert sample.rate == 4590.33
    assert sample.errors == 2 + 1 + 2 + 1  # failed, errored, 4xx, 5xx
    assert sample.p50_ms == pytest.approx(50.5)
    assert sample.p99_ms is not None and 99 <= sample.p99_ms <= 100


def test_parse_h2load_rejects_output_without_a_summary() -> None:
    with pytest.raises(ValueError, match="h2load"):
        bench.parse_h2load("No clients are connected\n", "")


def test_http2_rows_compare_h2c_servers_and_trioserve_over_http1() -> None:
    # The HTTP/1.1 row is the same trioserve command, loaded by h2load --h1.
    h1 = bench.ALL_SERVERS["trioserve-h1"]
    assert h1.command(bench.RAW_APP, 8000) == bench.ALL_SERVERS["trioserve"].command(
        bench.RAW_APP, 8000
    )
    assert h1.scenarios == bench.H2_SCENARIOS == {"h2-hello", "h2-json", "h2-stream1m"}
    asyncio_cmd = bench.ALL_SERVERS["hypercorn-asyncio"].command(bench.RAW_APP, 8000)
    assert asyncio_cmd[1:3] == ["-k", "asyncio"]
    assert all(bench.SCENARIOS[name].kind == "h2load" for name in bench.H2_SCENARIOS)


def test_idle_http2_memory_is_compared_with_http1_per_server() -> None:
    def rows(values: dict[str, float]) -> list[object]:
        return list(bench.aggregate({name: [bench.Sample(rate=v)] for name, v in values.items()}))

    results = {
        "idle": rows({"trioserve": 8.0, "hypercorn-trio": 20.0}),
        bench.H2_IDLE: rows({"trioserve": 12.0, "hypercorn-trio": 44.0}),
    }
    table = bench.render_idle_ratio(results)
    assert "| trioserve | 12.0 | 8.0 | 1.50 |" in table
    assert "| hypercorn-trio | 44.0 | 20.0 | 2.20 |" in table
    assert bench.render_idle_ratio({"idle": results["idle"]}) == ""
    # Only the servers that speak h2c open idle HTTP/2 connections.
    assert bench.SCENARIOS[bench.H2_IDLE].kind == "idle"
    assert bench.H2_IDLE in (bench.ALL_SERVERS["hypercorn-asyncio"].scenarios or ())
    assert bench.H2_IDLE not in (bench.ALL_SERVERS["trioserve-h1"].scenarios or ())


def test_instruction_counts_load_http2_rows_over_h2c(monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def run(cmd: list[str], **_: object) -> object:
        commands.append(cmd)
        return type("Done", (), {"stdout": "requests: 5 total, 5 done, 0 errored, 0 timeout"})()

    monkeypatch.setattr(bench.subprocess, "run", run)
    bench._h2load(bench.SCENARIOS["h2-hello"], 8000, 5, None)
    bench._h2load(bench.SCENARIOS["hello"], 8000, 5, None)
    assert commands[0][:7] == ["h2load", *bench.H2LOAD_ARGS, "-n", "5"]
    assert "--h1" in commands[1]
    assert {"h2-hello", "h2-json", "h2-stream1m"} <= set(bench.INSTRUCTION_REQUESTS)


def test_baseline_twins_run_the_same_command_from_the_baseline_tree(tmp_path: Path) -> None:
    tree = bench.export_baseline("HEAD", tmp_path)
    assert (Path(tree) / "trioserve" / "__init__.py").is_file()
    servers = bench.with_baseline(["trioserve", "uvicorn-h11", "trioserve-httptools"], tree)
    assert servers == [
        "trioserve",
        "trioserve@base",
        "uvicorn-h11",
        "trioserve-httptools",
        "trioserve-httptools@base",
    ]
    twin = bench.ALL_SERVERS["trioserve-httptools@base"]
    original = bench.ALL_SERVERS["trioserve-httptools"]
    assert twin.command(bench.RAW_APP, 8000) == original.command(bench.RAW_APP, 8000)
    # Started in the baseline tree, `python -m trioserve` imports that tree's package.
    assert (twin.cwd, twin.pythonpath[0]) == (tree, tree)
    assert original.cwd is None
    # A twin takes the HTTP/2 rows its original takes; the compiled builds take them too.
    assert bench.serves_h2c(twin)
    assert bench.serves_h2c(bench.ALL_SERVERS["trioserve-compiled"])
    assert not bench.serves_h2c(bench.ALL_SERVERS["uvicorn-h11"])


def test_trio_httptools_floor_serves_keep_alive_and_honours_close() -> None:
    # The bench's floor row (bench/apps/trio_httptools_min.py): real process, real socket.
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = Path(bench.BENCH_DIR) / "apps" / "trio_httptools_min.py"
    proc = subprocess.Popen([sys.executable, str(app), str(port)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "the floor server did not start"
                time.sleep(0.05)
        with sock:
            get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            sock.sendall(get + get + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
    finally:
        proc.kill()
        proc.wait()
    assert received.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert received.count(b"\r\n\r\nHello, world!") == 3
    assert received.endswith(b"connection: close\r\n\r\nHello, world!")
