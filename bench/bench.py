"""trioserve against its peers: throughput, latency, CPU and memory (bench-only).

Usage::

    make bench                      # installs the bench extra and wrk, then runs this
    python bench/bench.py           # 3 interleaved rounds of 3 s per scenario
    python bench/bench.py --quick   # 1 round of 2 s (smoke)
    python bench/bench.py --servers trioserve,uvicorn-h11 --scenarios hello,json
    python bench/bench.py --workers-scaling  # also 2-worker lines (hello and json only)
    python bench/bench.py --reuse-port-scaling  # trioserve 2 and 4 workers, shared vs SO_REUSEPORT
    python bench/bench.py --fifo-check       # also trioserve on FIFO-ordered trio batches
    python bench/bench.py --instructions     # instructions per request under valgrind

How it measures:

* Each (scenario, round, server) starts a fresh server process pinned to CPU 0
  (``taskset -c 0``), waits until it accepts connections, warms it up, then runs the load
  pinned to CPU 1: ``wrk`` for HTTP scenarios, ``bench/ws_load.py`` for WebSocket echo, and
  1,000 idle keep-alive connections for the memory scenario.
* The HTTP/2 scenarios (``h2-*``) load with ``h2load`` over h2c (prior knowledge),
  ``H2LOAD_ARGS``, warm-up and measurement in one run; only servers that speak h2c take
  part, and ``trioserve-h1`` is trioserve loaded over HTTP/1.1 with as many requests in
  flight. Latency percentiles come from h2load's per-request log.
* ``--workers-scaling`` adds 2-worker lines for hello and json (trioserve, uvicorn-h11 as
  shipped, and uvicorn-h11 with TCP_NODELAY restored): their server processes may use
  both CPUs, so they share CPU 1 with the load generator.
* ``--reuse-port-scaling`` adds trioserve with 2 and 4 workers, each once on the socket the
  parent shares with its workers and once with ``--reuse-port`` (a socket per worker, the
  kernel spreading connections), for hello and json, on both CPUs as above.
* Servers are interleaved round by round (A B C A B C ...), so ratios to hypercorn-trio and
  uvicorn-h11 are taken per round, side by side, and their median is reported: the machine
  may be shared, absolute numbers drift, ratios much less.
* Server CPU is the process tree's user+system time during the load divided by its wall
  time; RSS is the tree's largest process (and the total) right after the load.

The pure parts (parsing wrk's output, aggregating rounds, rendering the tables) are
unit-tested in ``tests/test_bench_smoke.py``; no timing threshold is asserted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "RESULTS.md"
INSTRUCTIONS_PATH = BENCH_DIR / "RESULTS-instructions.md"
SERVER_CPU = "0"
LOAD_CPU = "1"
CONNECTIONS = 50
IDLE_CONNECTIONS = 1000
KEEP_ALIVE = "60"  # long enough for the idle-connection scenario
RAW_APP = "apps.asgi_app:app"
FASTAPI_APP = "apps.fastapi_app:app"
REFERENCES = ("hypercorn-trio", "uvicorn-h11", "uvicorn-httptools")
NOTES_MARKER = "<!-- notes: kept when bench.py rewrites this file -->"

ECHO_LUA = """wrk.method = "POST"
wrk.body = string.rep("x", 65536)
wrk.headers["Content-Type"] = "application/octet-stream"
"""


# -- scenarios and servers ------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "wrk", "ws", "idle" or "h2load"
    title: str
    path: str = "/"
    app: str = RAW_APP
    wrk_args: tuple[str, ...] = ()
    lua: str | None = None
    unit: str = "req/s"


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("hello", "wrk", "raw ASGI hello world, keep-alive"),
        Scenario(
            "close",
            "wrk",
            "hello world with Connection: close",
            wrk_args=("-H", "Connection: close"),
        ),
        Scenario("json", "wrk", "FastAPI JSON endpoint", path="/json", app=FASTAPI_APP),
        Scenario("echo64k", "wrk", "64 KiB POST echoed back", path="/echo", lua=ECHO_LUA),
        Scenario("stream1m", "wrk", "1 MiB response streamed in 16 KiB chunks", path="/stream"),
        Scenario(
            "file1m",
            "wrk",
            "FastAPI FileResponse, a 1 MiB file, keep-alive",
            path="/file1m",
            app=FASTAPI_APP,
        ),
        Scenario(
            "static",
            "wrk",
            "FastAPI StaticFiles, a 16 KiB file",
            path="/static/f16k.bin",
            app=FASTAPI_APP,
        ),
        Scenario("ws", "ws", "WebSocket echo round trips (50 connections)", unit="msg/s"),
        # HTTP/2 (issue 18): h2load over h2c with prior knowledge, H2LOAD_ARGS.
        Scenario("h2-hello", "h2load", "HTTP/2 (h2c): raw ASGI hello world"),
        Scenario("h2-json", "h2load", "HTTP/2 (h2c): FastAPI JSON", path="/json", app=FASTAPI_APP),
        Scenario("h2-stream1m", "h2load", "HTTP/2 (h2c): 1 MiB streamed response", path="/stream"),
        Scenario(
            "idle",
            "idle",
            f"{IDLE_CONNECTIONS} idle keep-alive connections (memory)",
            unit="KiB/conn",
        ),
        Scenario(
            "h2-idle",
            "idle",
            f"{IDLE_CONNECTIONS} idle HTTP/2 (h2c) connections, one request each (memory)",
            unit="KiB/conn",
        ),
    )
}


@dataclass(frozen=True)
class ServerSpec:
    name: str
    description: str
    scenarios: frozenset[str] | None = None  # None: all
    workers: int = 1
    cpus: str = SERVER_CPU  # taskset list for the server's processes
    pythonpath: tuple[str, ...] = ()  # extra PYTHONPATH entries (before the bench dir)
    extra_args: tuple[str, ...] = ()  # appended to the server's command line
    base: str = ""  # --baseline twins: the server whose command this one runs
    cwd: str | None = None  # the server's working directory (None: this process's)

    def command(self, app: str, port: int) -> list[str]:
        argv = self._command(app, port)
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        return [*argv, *self.extra_args]

    def _command(self, app: str, port: int) -> list[str]:
        if self.base:  # (a --baseline twin: the same command, run in the baseline's tree)
            return ALL_SERVERS[self.base]._command(app, port)
        py = sys.executable
        bindir = Path(py).parent
        p = str(port)
        if self.name in COMPILED_SERVERS:
            # -P: not the checkout's trioserve/ from the current directory (the pure one).
            return [
                str(COMPILED_PYTHON),
                "-P",
                *ALL_SERVERS[self.name.removesuffix("-compiled")]._command(app, port)[1:],
            ]
        if self.name == "uvicorn-h11-2w-nodelay":
            app = {
                RAW_APP: "apps.uvicorn_nodelay:raw",
                FASTAPI_APP: "apps.uvicorn_nodelay:fastapi",
            }[app]
        if self.name in (
            "trioserve",
            "trioserve-accesslog",
            "trioserve-asyncio",
            "trioserve-2w",
            *REUSE_PORT_SERVERS,
            "trioserve-fifo",
            "trioserve-httptools",
            "trioserve-httptools-wsproto",
            METRICS_SERVER.name,
            "trioserve-h1",
        ):
            log = (
                ["--access-log", "--log-level", "info"]
                if self.name.endswith("accesslog")
                else ["--no-access-log", "--log-level", "warning"]
            )
            if self.name.endswith("asyncio"):
                log += ["--app-loop", "asyncio"]
            if "-httptools" in self.name:
                log += ["--http", "httptools"]
            return [
                py,
                "-m",
                "trioserve",
                app,
                "--app-dir",
                str(BENCH_DIR),
                "--port",
                p,
                "--timeout-keep-alive",
                KEEP_ALIVE,
                *log,
            ]
        if self.name in ("hypercorn-trio", "hypercorn-asyncio"):
            return [
                str(bindir / "hypercorn"),
                "-k",
                self.name.removeprefix("hypercorn-"),
                "--bind",
                f"127.0.0.1:{p}",
                "--keep-alive",
                KEEP_ALIVE,
                "--log-level",
                "warning",
                app,
            ]
        if self.name in ("uvicorn-h11", "uvicorn-h11-2w", "uvicorn-h11-2w-nodelay"):
            return [
                str(bindir / "uvicorn"),
                app,
                "--port",
                p,
                "--http",
                "h11",
                "--loop",
                "asyncio",
                "--ws",
                "wsproto",
                "--no-access-log",
                "--log-level",
                "warning",
                "--timeout-keep-alive",
                KEEP_ALIVE,
            ]
        if self.name == "uvicorn-httptools":
            return [
                str(bindir / "uvicorn"),
                app,
                "--port",
                p,
                "--http",
                "httptools",
                "--loop",
                "uvloop",
                "--no-access-log",
                "--log-level",
                "warning",
                "--timeout-keep-alive",
                KEEP_ALIVE,
            ]
        if self.name == "trio-h11-min":
            return [py, str(BENCH_DIR / "apps" / "trio_h11_min.py"), p]
        if self.name == "trio-httptools-min":
            return [py, str(BENCH_DIR / "apps" / "trio_httptools_min.py"), p]
        raise ValueError(self.name)


H2_SCENARIOS = frozenset({"h2-hello", "h2-json", "h2-stream1m"})
# Who speaks h2c with prior knowledge (the HTTP/2 rows): the others would only fail.
H2C_SERVERS = frozenset(
    {
        "trioserve",
        "trioserve-httptools",
        "trioserve-compiled",
        "trioserve-httptools-compiled",
        "hypercorn-trio",
        "hypercorn-asyncio",
    }
)
# h2load's load for the HTTP/2 rows: 10 connections of 10 concurrent streams; the HTTP/1.1
# row keeps the same 100 requests in flight on 100 connections (no pipelining).
H2LOAD_ARGS = ("-c", "10", "-m", "10")
H2LOAD_H1_ARGS = ("--h1", "-c", "100", "-m", "1")
# Memory per idle HTTP/2 connection, against the "idle" row's HTTP/1.1 one (the target:
# at most 2x): the h2c servers only.
H2_IDLE = "h2-idle"
SERVERS: dict[str, ServerSpec] = {
    s.name: s
    for s in (
        ServerSpec("trioserve", "trioserve, access log off"),
        ServerSpec("trioserve-httptools", "trioserve --http httptools, access log off"),
        ServerSpec(
            "trioserve-httptools-wsproto",
            "trioserve --http httptools --ws wsproto (`--ws auto` picks websockets)",
            frozenset({"ws"}),
            extra_args=("--ws", "wsproto"),
        ),
        ServerSpec("hypercorn-trio", "hypercorn -k trio"),
        ServerSpec("uvicorn-h11", "uvicorn --http h11 --loop asyncio --ws wsproto"),
        ServerSpec("uvicorn-httptools", "uvicorn --http httptools --loop uvloop (context)"),
        ServerSpec("trioserve-accesslog", "trioserve, access log on (to a file)"),
        ServerSpec(
            "trioserve-asyncio",
            "trioserve --app-loop asyncio (the app on a trio-asyncio loop)",
            frozenset({"hello", "json", "ws"}),
        ),
        ServerSpec(
            "trio-h11-min",
            "bare trio + h11 loop, no ASGI (bench/apps/trio_h11_min.py)",
            frozenset({"hello", "close", "idle"}),
        ),
        ServerSpec(
            "trio-httptools-min",
            "bare trio + httptools loop, no ASGI (bench/apps/trio_httptools_min.py)",
            frozenset({"hello", "close", "idle"}),
        ),
        ServerSpec(
            "hypercorn-asyncio", "hypercorn -k asyncio (HTTP/2 rows)", H2_SCENARIOS | {H2_IDLE}
        ),
        ServerSpec(
            "trioserve-h1",
            "trioserve loaded over HTTP/1.1 by h2load --h1, as many requests in flight "
            "(HTTP/2 rows)",
            H2_SCENARIOS,
        ),
    )
}
SCALING_SCENARIOS = frozenset({"hello", "json"})
BOTH_CPUS = f"{SERVER_CPU},{LOAD_CPU}"
# Not in the default server list: --workers-scaling (or --servers) adds them.
WORKER_SERVERS: dict[str, ServerSpec] = {
    s.name: s
    for s in (
        ServerSpec("trioserve-2w", "trioserve --workers 2", SCALING_SCENARIOS, 2, BOTH_CPUS),
        ServerSpec(
            "uvicorn-h11-2w", "uvicorn-h11 --workers 2 as shipped", SCALING_SCENARIOS, 2, BOTH_CPUS
        ),
        ServerSpec(
            "uvicorn-h11-2w-nodelay",
            "uvicorn-h11 --workers 2, TCP_NODELAY restored (bench/apps/uvicorn_nodelay.py)",
            SCALING_SCENARIOS,
            2,
            BOTH_CPUS,
        ),
    )
}
# --reuse-port-scaling: a shared listening socket vs one SO_REUSEPORT socket per worker.
REUSE_PORT_SERVERS: dict[str, ServerSpec] = {
    s.name: s
    for workers in (2, 4)
    for s in (
        ServerSpec(
            f"trioserve-{workers}w-shared",
            f"trioserve --workers {workers} (one socket, shared)",
            SCALING_SCENARIOS,
            workers,
            BOTH_CPUS,
        ),
        ServerSpec(
            f"trioserve-{workers}w-reuseport",
            f"trioserve --workers {workers} --reuse-port (a socket per worker)",
            SCALING_SCENARIOS,
            workers,
            BOTH_CPUS,
            extra_args=("--reuse-port",),
        ),
    )
}
# Not in the default server list either: --fifo-check adds it (see the module it loads).
FIFO_SERVER = ServerSpec(
    "trioserve-fifo",
    "trioserve on trio with FIFO batch order (bench-only diagnostic, bench/fifo_scheduling)",
    frozenset({"hello", "close", "json"}),
    pythonpath=(str(BENCH_DIR / "fifo_scheduling"),),
)
# Not in the default server list: the cost of counting for /metrics (issue 20), measured
# with --instructions against trioserve-httptools.
METRICS_SERVER = ServerSpec(
    "trioserve-httptools-metrics",
    "trioserve --http httptools --metrics (counting for /metrics), access log off",
    extra_args=("--metrics",),
)
# The mypyc-compiled build (issue 21; `make .venv-compiled/.built` builds it), not in the
# default server list: trioserve and trioserve-httptools run by .venv-compiled's Python,
# or BENCH_COMPILED_PYTHON's.
COMPILED_PYTHON = Path(
    os.environ.get("BENCH_COMPILED_PYTHON", BENCH_DIR.parent / ".venv-compiled" / "bin" / "python")
)
COMPILED_SERVERS: dict[str, ServerSpec] = {
    s.name: s
    for s in (
        ServerSpec("trioserve-compiled", "trioserve, mypyc-compiled build, access log off"),
        ServerSpec(
            "trioserve-httptools-compiled",
            "trioserve --http httptools, mypyc-compiled build, access log off",
        ),
    )
}
ALL_SERVERS = {
    **SERVERS,
    **COMPILED_SERVERS,
    **WORKER_SERVERS,
    **REUSE_PORT_SERVERS,
    FIFO_SERVER.name: FIFO_SERVER,
    METRICS_SERVER.name: METRICS_SERVER,
}


# -- one measurement ------------------------------------------------------------------------


@dataclass
class Sample:
    """One (scenario, round, server) measurement."""

    rate: float | None  # req/s, msg/s, or KiB per idle connection; None: not available
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    cpu_percent: float | None = None
    cpu_us: float | None = None  # server CPU time per request (message): robust under contention
    rss_mib: float | None = None  # largest process of the tree
    rss_total_mib: float | None = None
    fresh_rss_mib: float | None = None  # idle scenario: before any connection
    note: str = ""


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> Sample:
    """Parse ``wrk --latency`` output into a :class:`Sample` (rate, p50, p99, errors).

    Errors are socket errors (connect, read, write, timeout) plus non-2xx/3xx responses.
    """
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if rate is None:
        raise ValueError("no 'Requests/sec' line in wrk output")
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    errors = 0
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock:
        errors += sum(int(n) for n in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    return Sample(
        rate=float(rate.group(1)),
        p50_ms=_duration_ms(p50.group(1)) if p50 else None,
        p99_ms=_duration_ms(p99.group(1)) if p99 else None,
        errors=errors,
    )


def serves_h2c(spec: ServerSpec) -> bool:
    """Whether ``spec`` takes the HTTP/2 rows (a --baseline twin as its original does)."""
    return (spec.base or spec.name) in H2C_SERVERS


def baseline_twin(spec: ServerSpec, tree: str) -> ServerSpec:
    """``spec`` run from another trioserve tree (``--baseline``): the same command, started
    in ``tree`` so that ``python -m trioserve`` imports that tree's package."""
    return dataclasses.replace(
        spec,
        name=f"{spec.name}@base",
        description=f"{spec.description}, at the baseline",
        base=spec.name,
        cwd=tree,
        pythonpath=(tree, *spec.pythonpath),
    )


def export_baseline(rev: str, into: Path) -> str:
    """The ``trioserve/`` package of git revision ``rev`` of this checkout, written under
    ``into``; returns the tree's directory (what :func:`baseline_twin` takes)."""
    tree = into / f"baseline-{re.sub(r'[^A-Za-z0-9._-]', '_', rev)}"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(BENCH_DIR.parent), "archive", rev, "trioserve"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return str(tree)


def with_baseline(servers: list[str], tree: str) -> list[str]:
    """``servers`` with a twin after each trioserve server (not the compiled ones) that runs
    ``tree``'s package, registered in :data:`ALL_SERVERS`."""
    result = []
    for name in servers:
        result.append(name)
        if name.startswith("trioserve") and name not in COMPILED_SERVERS and "@" not in name:
            twin = baseline_twin(ALL_SERVERS[name], tree)
            ALL_SERVERS[twin.name] = twin
            result.append(twin.name)
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _cpu_seconds(pids: Iterable[int]) -> float:
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _rss_mib(pids: Iterable[int]) -> tuple[float, float]:
    """(largest, total) VmRSS of ``pids`` in MiB."""
    sizes = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
    return (max(sizes), sum(sizes)) if sizes else (0.0, 0.0)


@contextlib.contextmanager
def running_server(
    spec: ServerSpec,
    app: str,
    log_path: Path,
    *,
    wrapper: Sequence[str] = (),
    start_timeout: float = 20,
    stop_signal: int = signal.SIGINT,
    stop_timeout: float = 5,
) -> Iterator[tuple[int, int]]:
    """Start ``spec`` on a free port pinned to the server CPU; yield (port, pid).

    ``wrapper`` goes before the server's command (``valgrind ...``).
    """
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*spec.pythonpath, str(BENCH_DIR)]))
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            ["taskset", "-c", spec.cpus, *wrapper, *spec.command(app, port)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            cwd=spec.cwd,
        )
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{spec.name} exited with {proc.returncode}; see {log_path}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{spec.name} did not listen; see {log_path}") from None
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, stop_signal)
        try:
            proc.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(0.2)  # let children of the group leave too


def _wrk(scenario: Scenario, port: int, seconds: float, lua_path: Path | None) -> str:
    cmd = [
        "taskset",
        "-c",
        LOAD_CPU,
        "wrk",
        "-t1",
        f"-c{CONNECTIONS}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        *scenario.wrk_args,
    ]
    if lua_path is not None:
        cmd += ["-s", str(lua_path)]
    cmd.append(f"http://127.0.0.1:{port}{scenario.path}")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr.strip()}")
    return done.stdout


def parse_h2load(output: str, log: str) -> Sample:
    """Parse h2load's summary and its ``--log-file`` into a :class:`Sample`.

    The rate is h2load's ``req/s``; p50/p99 come from the per-request log (h2load prints
    no percentiles), whose lines are ``start-us<TAB>status<TAB>duration-us``; a status of 0
    marks a request cut off when a period (warm-up, measurement) ended, left out. Errors
    are the summary's failed, errored and timed-out requests plus 4xx and 5xx responses.
    """
    rate = re.search(r"^finished in [\d.]+\w+, ([\d.]+) req/s", output, re.M)
    requests = re.search(r"^requests: (.*)$", output, re.M)
    if rate is None or requests is None:
        raise ValueError("no 'finished in' and 'requests:' lines in h2load output")
    counts = {name: int(n) for n, name in re.findall(r"(\d+) (\w+)", requests.group(1))}
    errors = sum(counts.get(name, 0) for name in ("failed", "errored", "timeout"))
    statuses = re.search(r"^status codes: .*?(\d+) 4xx, (\d+) 5xx", output, re.M)
    if statuses:
        errors += int(statuses.group(1)) + int(statuses.group(2))
    durations = [
        int(fields[2]) / 1000
        for fields in (line.split("\t") for line in log.splitlines())
        if len(fields) >= 3 and fields[1] != "0"
    ]
    quantiles = statistics.quantiles(durations, n=100) if len(durations) >= 2 else None
    return Sample(
        rate=float(rate.group(1)),
        p50_ms=quantiles[49] if quantiles else None,
        p99_ms=quantiles[98] if quantiles else None,
        errors=errors,
    )


def _h2load_timed(
    spec: ServerSpec, scenario: Scenario, port: int, seconds: float, warmup: float, workdir: Path
) -> Sample:
    """Load ``port`` with h2load for ``seconds`` after ``warmup`` (HTTP/1.1 for
    ``trioserve-h1``), in one run: hypercorn-trio's process dies (BusyResourceError) when
    a run ends with streams in flight, so a separate warm-up run would leave it dead."""
    log_path = workdir / f"h2load-{spec.name}-{scenario.name}.tsv"
    args = H2LOAD_H1_ARGS if spec.name == "trioserve-h1" else H2LOAD_ARGS
    cmd = ["taskset", "-c", LOAD_CPU, "h2load", *args, "-D", str(max(1, round(seconds)))]
    if warmup > 0:
        cmd.append(f"--warm-up-time={max(1, round(warmup))}")
    cmd += [f"--log-file={log_path}", f"http://127.0.0.1:{port}{scenario.path}"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + warmup + 30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed: {done.stderr.strip() or done.stdout.strip()}")
    try:
        sample = parse_h2load(done.stdout, log_path.read_text() if log_path.exists() else "")
    finally:
        log_path.unlink(missing_ok=True)
    if not sample.rate:
        raise RuntimeError("h2load: no request completed (the server stalled or died)")
    return sample


def _ws(port: int, seconds: float) -> dict[str, float]:
    cmd = [
        "taskset",
        "-c",
        LOAD_CPU,
        sys.executable,
        str(BENCH_DIR / "ws_load.py"),
        "--port",
        str(port),
        "--conns",
        str(CONNECTIONS),
        "--duration",
        str(seconds),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    result: dict[str, float] = json.loads(done.stdout)
    return result


def _idle_connections(port: int, count: int) -> list[socket.socket]:
    """Open ``count`` connections, each served one request and then left idle."""
    import h11  # the venv has it: trioserve depends on it

    request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
            sock.sendall(request)
            client = h11.Connection(h11.CLIENT)
            client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(sock.recv(65536))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("server closed an idle connection")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _idle_h2_connections(port: int, count: int) -> list[socket.socket]:
    """Open ``count`` h2c connections (prior knowledge), each served one request on
    stream 1 (and its SETTINGS acknowledged), then left idle."""
    import h2.config  # the venv has it: trioserve depends on it
    import h2.connection
    import h2.events

    request = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b":authority", f"127.0.0.1:{port}".encode()),
    ]
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
            client = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
            client.initiate_connection()
            client.send_headers(1, request, end_stream=True)
            sock.sendall(client.data_to_send())
            ended = False
            while not ended:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed an HTTP/2 connection")
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded) and event.stream_id == 1:
                        ended = True
                    elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        raise ConnectionError(f"HTTP/2 request failed: {event}")
                sock.sendall(client.data_to_send())  # (SETTINGS ack, WINDOW_UPDATE)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def measure(
    spec: ServerSpec, scenario: Scenario, seconds: float, warmup: float, workdir: Path
) -> Sample:
    """Start ``spec``, load it with ``scenario`` and return the sample."""
    if spec.scenarios is not None and scenario.name not in spec.scenarios:
        return Sample(rate=None, note="-")
    h2c = scenario.kind == "h2load" or scenario.name == H2_IDLE
    if h2c and not serves_h2c(spec) and spec.name != "trioserve-h1":
        return Sample(rate=None, note="-")
    lua_path = None
    if scenario.lua is not None:
        lua_path = workdir / f"{scenario.name}.lua"
        lua_path.write_text(scenario.lua)
    log_path = workdir / f"{spec.name}.log"
    with running_server(spec, scenario.app, log_path) as (port, pid):
        if scenario.kind == "idle":
            time.sleep(0.5)
            pids = _tree(pid)
            fresh, fresh_total = _rss_mib(pids)
            opener = _idle_h2_connections if scenario.name == H2_IDLE else _idle_connections
            socks = opener(port, IDLE_CONNECTIONS)
            try:
                time.sleep(0.5)
                largest, total = _rss_mib(_tree(pid))
            finally:
                for sock in socks:
                    sock.close()
            per_conn_kib = (total - fresh_total) * 1024 / IDLE_CONNECTIONS
            return Sample(
                rate=per_conn_kib, rss_mib=largest, rss_total_mib=total, fresh_rss_mib=fresh
            )
        if scenario.kind == "ws":
            try:
                _ws(port, min(warmup, 1.0))
            except (RuntimeError, ValueError) as exc:
                return Sample(rate=None, note=f"n/a ({exc})")
        elif scenario.kind == "h2load":
            pass  # (h2load warms up in the same run: hypercorn-trio dies when a run ends)
        elif warmup > 0:
            _wrk(scenario, port, warmup, lua_path)
        pids = _tree(pid)
        cpu0, t0 = _cpu_seconds(pids), time.monotonic()
        if scenario.kind == "ws":
            result = _ws(port, seconds)
            sample = Sample(
                rate=result["rate"],
                p50_ms=result["p50_ms"],
                p99_ms=result["p99_ms"],
                errors=int(result["errors"]),
            )
        elif scenario.kind == "h2load":
            sample = _h2load_timed(spec, scenario, port, seconds, warmup, workdir)
        else:
            sample = parse_wrk(_wrk(scenario, port, seconds, lua_path))
        pids = _tree(pid)
        busy, wall = _cpu_seconds(pids) - cpu0, time.monotonic() - t0
        sample.cpu_percent = 100 * busy / wall
        if sample.rate:
            sample.cpu_us = 1e6 * busy / (sample.rate * wall)
        sample.rss_mib, sample.rss_total_mib = _rss_mib(pids)
        return sample


# -- aggregation and tables (pure) ----------------------------------------------------------


@dataclass
class Row:
    server: str
    rate: float | None
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    cpu_percent: float | None
    cpu_us: float | None
    rss_mib: float | None
    rss_total_mib: float | None
    fresh_rss_mib: float | None
    ratios: dict[str, float | None] = field(default_factory=dict)
    note: str = ""


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def aggregate(
    samples: dict[str, list[Sample]],
    references: Sequence[str] = REFERENCES,
    *,
    higher_is_better: bool = True,
) -> list[Row]:
    """Medians over rounds; ratios to each reference paired round by round, then median.

    ``samples[server][i]`` is round ``i``. For lower-is-better metrics (memory per
    connection) the ratio is still ``server / reference``.
    """
    del higher_is_better  # the ratio's direction is explained in the table's caption
    rows = []
    for server, rounds in samples.items():
        ratios: dict[str, float | None] = {}
        for ref in references:
            ref_rounds = samples.get(ref)
            paired = []
            if ref_rounds is not None:
                for mine, theirs in zip(rounds, ref_rounds, strict=False):
                    if mine.rate is not None and theirs.rate:
                        paired.append(mine.rate / theirs.rate)
            ratios[ref] = statistics.median(paired) if paired else None
        notes = {s.note for s in rounds if s.note}
        rows.append(
            Row(
                server=server,
                rate=_median(s.rate for s in rounds),
                p50_ms=_median(s.p50_ms for s in rounds),
                p99_ms=_median(s.p99_ms for s in rounds),
                errors=sum(s.errors for s in rounds),
                cpu_percent=_median(s.cpu_percent for s in rounds),
                cpu_us=_median(s.cpu_us for s in rounds),
                rss_mib=_median(s.rss_mib for s in rounds),
                rss_total_mib=_median(s.rss_total_mib for s in rounds),
                fresh_rss_mib=_median(s.fresh_rss_mib for s in rounds),
                ratios=ratios,
                note="; ".join(sorted(notes)),
            )
        )
    return rows


def _fmt(value: float | None, spec: str = ",.0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def render_scenario(scenario: Scenario, rows: Sequence[Row]) -> str:
    """One markdown table for one scenario."""
    refs = [r for r in REFERENCES if any(row.server == r for row in rows)]
    lines = [f"### {scenario.name}: {scenario.title}", ""]
    if scenario.kind == "idle":
        header = ["server", "KiB per idle conn", "fresh RSS MiB", "RSS with conns MiB (total)"]
        header += [f"x {r}" for r in refs]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            cells = [
                row.server,
                _fmt(row.rate, ".1f", row.note or "-"),
                _fmt(row.fresh_rss_mib, ".1f"),
                f"{_fmt(row.rss_mib, '.1f')} ({_fmt(row.rss_total_mib, '.1f')})",
            ]
            cells += [_fmt(row.ratios.get(r), ".2f") for r in refs]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "Ratios are memory per connection relative to the reference (lower is better).",
        ]
        return "\n".join(lines)
    header = [
        "server",
        f"{scenario.unit} (median)",
        "p50 ms",
        "p99 ms",
        "errors",
        "server CPU %",
        "CPU us/req",
        "RSS MiB (total)",
    ]
    header += [f"x {r}" for r in refs]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.server,
            _fmt(row.rate, ",.0f", row.note or "-"),
            _fmt(row.p50_ms, ".2f"),
            _fmt(row.p99_ms, ".2f"),
            str(row.errors) if row.rate is not None else "-",
            _fmt(row.cpu_percent, ".0f"),
            _fmt(row.cpu_us, ".0f"),
            f"{_fmt(row.rss_mib, '.1f')} ({_fmt(row.rss_total_mib, '.1f')})"
            if row.rss_mib is not None
            else "-",
        ]
        cells += [_fmt(row.ratios.get(r), ".2f") for r in refs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_overview(scenarios: Sequence[Scenario], results: dict[str, list[Row]]) -> str:
    """Overview: median rate per scenario, then ratios to each reference."""
    names = [s.name for s in scenarios if s.name in results]
    servers: list[str] = []
    for name in names:
        for row in results[name]:
            if row.server not in servers:
                servers.append(row.server)
    by = {(name, row.server): row for name in names for row in results[name]}

    def table(title: str, cell: Callable[[Row | None, Scenario], str]) -> list[str]:
        out = [
            f"#### {title}",
            "",
            "| server | " + " | ".join(names) + " |",
            "|" + "---|" * (len(names) + 1),
        ]
        for server in servers:
            cells = [cell(by.get((n, server)), SCENARIOS[n]) for n in names]
            out.append(f"| {server} | " + " | ".join(cells) + " |")
        return [*out, ""]

    def rate(row: Row | None, scenario: Scenario) -> str:
        if row is None or row.rate is None:
            return "n/a" if row is not None and row.note.startswith("n/a") else "-"
        return _fmt(row.rate, ".1f" if scenario.kind == "idle" else ",.0f")

    lines = table("Median (req/s; ws: msg/s; idle: KiB per connection, lower is better)", rate)
    for ref in REFERENCES:
        lines += table(
            f"Ratio to {ref} (paired per round, median)",
            lambda row, _s, ref=ref: "-" if row is None else _fmt(row.ratios.get(ref), ".2f"),
        )
    return "\n".join(lines)


def render_idle_ratio(results: dict[str, list[Row]]) -> str:
    """Memory per idle HTTP/2 connection over memory per idle HTTP/1.1 one, per server
    (the ``h2-idle`` row over the ``idle`` row; the target is at most 2); "" when either
    row is missing."""
    if "idle" not in results or H2_IDLE not in results:
        return ""
    h1 = {row.server: row.rate for row in results["idle"]}
    lines = [
        "### HTTP/2 over HTTP/1.1: memory per idle connection",
        "",
        "| server | KiB per idle h2c conn | KiB per idle HTTP/1.1 conn | ratio |",
        "|---|---|---|---|",
    ]
    for row in results[H2_IDLE]:
        base = h1.get(row.server)
        if row.rate is None or base is None:
            continue
        ratio = row.rate / base if base > 0 else None
        lines.append(f"| {row.server} | {row.rate:.1f} | {base:.1f} | {_fmt(ratio, '.2f')} |")
    return "\n".join(lines)


# -- environment ----------------------------------------------------------------------------


# -- instructions per request (--instructions) -----------------------------------------------
#
# Wall-clock ratios on a shared machine move by 10-30 % from round to round. For changes of a
# few percent the harness can instead count the instructions the server executes: each server
# runs under ``valgrind --tool=callgrind`` and answers a fixed number of requests from
# ``h2load``, twice (N1, then N2 requests, each in a fresh process); the difference of the
# totals divided by N2 - N1 is the user-space work per request, start-up and shutdown
# cancelled out. Repeatable to a fraction of a percent whatever else the machine does; blind
# to kernel time, cache misses and the scheduling order of the requests.

INSTRUCTION_REQUESTS: dict[str, tuple[int, int]] = {
    "hello": (300, 1300),
    "close": (300, 1300),
    "json": (300, 1300),
    "echo64k": (100, 600),
    "stream1m": (20, 120),
    # HTTP/2 over h2c, loaded as the wall-clock rows are (H2LOAD_ARGS); h2c servers only.
    "h2-hello": (300, 1300),
    "h2-json": (300, 1300),
    "h2-stream1m": (20, 120),
}
INSTRUCTION_CONNECTIONS = 20
INSTRUCTION_SERVERS = (
    "trioserve",
    "trioserve-httptools",
    "hypercorn-trio",
    "uvicorn-h11",
    "uvicorn-httptools",
    "trio-h11-min",
    "trio-httptools-min",
)


CALLGRIND_WRITE_WAIT = 60.0  # seconds for the last process's counts to be written


def callgrind_total(text: str) -> int:
    """The instruction total of one callgrind output file."""
    for line in text.splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise ValueError("no 'totals:' or 'summary:' line in the callgrind output")


def per_request(totals: tuple[int, int], requests: tuple[int, int]) -> float:
    """Instructions per request from the totals of two runs of different lengths."""
    (low_total, high_total), (low, high) = totals, requests
    if high <= low:
        raise ValueError("the second run must answer more requests than the first")
    return (high_total - low_total) / (high - low)


def _h2load(scenario: Scenario, port: int, requests: int, body: Path | None) -> None:
    if scenario.kind == "h2load":
        cmd = ["h2load", *H2LOAD_ARGS, "-n", str(requests)]
    else:
        cmd = ["h2load", "--h1", "-n", str(requests), "-c", str(INSTRUCTION_CONNECTIONS)]
    for i in range(0, len(scenario.wrk_args), 2):  # ("-H", "Connection: close")
        cmd += list(scenario.wrk_args[i : i + 2])
    if body is not None:
        cmd += ["-d", str(body)]
    cmd.append(f"http://127.0.0.1:{port}{scenario.path}")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    # Every request answered, none errored or timed out. (h2load counts a response whose
    # status line has an empty reason phrase, as hypercorn sends, as "failed": valid HTTP.)
    if f"{requests} done" not in done.stdout or "0 errored, 0 timeout" not in done.stdout:
        raise RuntimeError(f"h2load: {done.stdout.strip() or done.stderr.strip()}")


def count_instructions(spec: ServerSpec, scenario: Scenario, requests: int, workdir: Path) -> int:
    """Total instructions of ``spec``'s processes (all of them) answering ``requests``."""
    prefix = f"callgrind.{spec.name}.{scenario.name}.{requests}"
    for old in workdir.glob(prefix + ".*"):
        old.unlink()
    body = None
    if scenario.lua is not None:  # the echo scenario's 64 KiB POST body
        body = workdir / "body64k"
        body.write_bytes(b"x" * 65536)
    wrapper = [
        "valgrind",
        "--tool=callgrind",
        "--trace-children=yes",
        f"--callgrind-out-file={workdir / prefix}.%p",
    ]
    log_path = workdir / f"{spec.name}.valgrind.log"
    # SIGTERM: every server here stops on it (a bare trio loop under valgrind may not on
    # SIGINT), and valgrind writes the counts out even when the signal ends the process.
    with running_server(
        spec,
        scenario.app,
        log_path,
        wrapper=wrapper,
        start_timeout=300,
        stop_signal=signal.SIGTERM,
        stop_timeout=120,
    ) as (port, _pid):
        _h2load(scenario, port, requests, body)
    files = sorted(workdir.glob(prefix + ".*"))
    if not files:
        raise RuntimeError(f"no callgrind output; see {log_path}")
    return sum(callgrind_totals(files, CALLGRIND_WRITE_WAIT))


def callgrind_totals(files: Sequence[Path], wait: float) -> list[int]:
    """The instruction totals of ``files``, waiting up to ``wait`` seconds for any not
    written yet: a helper process may outlive the server's main process (multiprocessing's
    resource tracker, under hypercorn), and its file is written when it exits.

    Raises:
        ValueError: a file still has no totals after the wait.
    """
    deadline = time.monotonic() + wait
    totals: list[int] = []
    for path in files:
        while True:
            try:
                totals.append(callgrind_total(path.read_text()))
                break
            except ValueError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
    return totals


def render_instructions(results: dict[str, dict[str, float | None]], servers: Sequence[str]) -> str:
    """``results[scenario][server]``: instructions per request, as a table and ratios."""
    header = ["scenario", *servers]
    lines = [
        "#### Instructions per request (thousands; lower is better)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for scenario, by_server in results.items():
        cells = [_fmt(None if v is None else v / 1000, ",.0f") for v in by_server.values()]
        lines.append("| " + " | ".join([scenario, *cells]) + " |")
    for ref in REFERENCES:
        if ref not in servers:
            continue
        lines += [
            "",
            f"#### Ratio to {ref} (instructions; lower is better)",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for scenario, by_server in results.items():
            base = by_server.get(ref)
            cells = [
                _fmt(v / base if v is not None and base else None, ".2f")
                for v in by_server.values()
            ]
            lines.append("| " + " | ".join([scenario, *cells]) + " |")
    return "\n".join(lines)


def run_instructions(servers: Sequence[str], scenarios: Sequence[str]) -> str:
    workdir = Path(tempfile.gettempdir()) / "trioserve-bench-instructions"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    results: dict[str, dict[str, float | None]] = {}
    for scenario_name in scenarios:
        if scenario_name not in INSTRUCTION_REQUESTS:
            continue  # ws, idle: not counted per request
        scenario = SCENARIOS[scenario_name]
        requests = INSTRUCTION_REQUESTS[scenario_name]
        results[scenario_name] = {}
        for name in servers:
            spec = ALL_SERVERS[name]
            value: float | None = None
            h2c_only = scenario.kind == "h2load" and not serves_h2c(spec)
            if (spec.scenarios is None or scenario_name in spec.scenarios) and not h2c_only:
                try:
                    totals = (
                        count_instructions(spec, scenario, requests[0], workdir),
                        count_instructions(spec, scenario, requests[1], workdir),
                    )
                    value = per_request(totals, requests)
                except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
                    print(f"[{scenario_name}] {name}: failed: {exc}", file=sys.stderr)
            results[scenario_name][name] = value
            print(
                f"[{scenario_name}] {name}: {_fmt(value, ',.0f')} instructions/request",
                file=sys.stderr,
                flush=True,
            )
    return render_instructions(results, servers)


def machine_info() -> list[str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 1024 / 1024:.0f} GiB RAM"
    versions = []
    for dist in (
        "trioserve",
        "trio",
        "h11",
        "wsproto",
        "uvicorn",
        "hypercorn",
        "httptools",
        "uvloop",
        "fastapi",
        "starlette",
        "pydantic",
    ):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} (missing)")
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    wrk_line = (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "?"
    load = os.getloadavg()
    return [
        f"- Machine: {platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}){mem}.",
        f"- Python {platform.python_version()}; " + ", ".join(versions) + ".",
        f"- Load generator: {wrk_line.strip()}; WebSocket: bench/ws_load.py.",
        f"- Load average when the run ended: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.",
    ]


# -- main -----------------------------------------------------------------------------------


def run(
    servers: Sequence[str], scenarios: Sequence[str], rounds: int, seconds: float, warmup: float
) -> tuple[str, dict[str, list[Row]]]:
    results: dict[str, list[Row]] = {}
    sections = []
    workdir = Path(tempfile.gettempdir()) / "trioserve-bench"  # server logs stay for a look
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    for scenario_name in scenarios:
        scenario = SCENARIOS[scenario_name]
        samples: dict[str, list[Sample]] = {name: [] for name in servers}
        for round_no in range(rounds):
            for name in servers:
                try:
                    sample = measure(ALL_SERVERS[name], scenario, seconds, warmup, workdir)
                except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                    sample = Sample(rate=None, note=f"failed: {exc}")
                samples[name].append(sample)
                print(
                    f"[{scenario.name} round {round_no + 1}/{rounds}] {name}: "
                    f"{_fmt(sample.rate, ',.1f', sample.note or '-')}",
                    file=sys.stderr,
                    flush=True,
                )
        rows = aggregate(samples)
        results[scenario.name] = rows
        sections.append(render_scenario(scenario, rows))
    used = [SCENARIOS[s] for s in scenarios]
    idle_ratio = render_idle_ratio(results)
    if idle_ratio:
        sections.append(idle_ratio)
    report = "\n\n".join([render_overview(used, results), *sections])
    return report, results


def _check_compiled_build(parser: argparse.ArgumentParser) -> None:
    """Refuse to run the compiled servers on a build that is not (all) compiled."""
    probe = "from trioserve.compiled import build_description; print(build_description())"
    try:
        done = subprocess.run(
            [str(COMPILED_PYTHON), "-P", "-c", probe], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        parser.error(f"{COMPILED_PYTHON}: {exc} (make .venv-compiled/.built builds it)")
    if done.stdout.strip() != "compiled (mypyc)":
        parser.error(f"{COMPILED_PYTHON} runs trioserve {done.stdout.strip()}, not compiled")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark trioserve against its peers.")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s (smoke use)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--servers", default=None, help="default: all in SERVERS")
    parser.add_argument("--scenarios", default=None, help="default: all")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per request under valgrind instead of timing (servers "
        f"default to {','.join(INSTRUCTION_SERVERS)}; writes {INSTRUCTIONS_PATH.name}; "
        "about 20 minutes)",
    )
    parser.add_argument(
        "--workers-scaling",
        action="store_true",
        help="also run " + ", ".join(WORKER_SERVERS) + " (hello and json only)",
    )
    parser.add_argument(
        "--reuse-port-scaling",
        action="store_true",
        help="also run " + ", ".join(REUSE_PORT_SERVERS) + " (hello and json only)",
    )
    parser.add_argument(
        "--fifo-check",
        action="store_true",
        help=f"also run {FIFO_SERVER.name}: {FIFO_SERVER.description}",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="REV",
        help="also run each trioserve server as of git revision REV of this checkout "
        "(named SERVER@base), in the same interleaved run: a paired before/after",
    )
    parser.add_argument(
        "--output",
        default=None,
        help=f"markdown file (default: {RESULTS_PATH.name} unless --quick)",
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.duration or (2.0 if args.quick else 3.0)
    warmup = 1.0
    default_servers = INSTRUCTION_SERVERS if args.instructions else tuple(SERVERS)
    servers = [s for s in (args.servers or ",".join(default_servers)).split(",") if s]
    if args.workers_scaling:
        servers += [s for s in WORKER_SERVERS if s not in servers]
    if args.reuse_port_scaling:
        servers += [s for s in REUSE_PORT_SERVERS if s not in servers]
    if args.fifo_check and FIFO_SERVER.name not in servers:
        servers.append(FIFO_SERVER.name)
    default_scenarios = INSTRUCTION_REQUESTS if args.instructions else SCENARIOS
    scenarios = [s for s in (args.scenarios or ",".join(default_scenarios)).split(",") if s]
    unknown = [s for s in servers if s not in ALL_SERVERS] + [
        s for s in scenarios if s not in SCENARIOS
    ]
    if unknown:
        parser.error(f"unknown server or scenario: {', '.join(unknown)}")
    if any(s in COMPILED_SERVERS for s in servers):
        _check_compiled_build(parser)
    if args.baseline:
        trees = Path(tempfile.gettempdir()) / "trioserve-bench-baselines"
        servers = with_baseline(servers, export_baseline(args.baseline, trees))
    if args.instructions:
        # The two runs whose totals are subtracted must start alike: a random hash seed
        # changes every dict's probe cost (+-1-2 k instructions per request between runs),
        # and a first run that still compiles .pyc files counts the compiling.
        os.environ["PYTHONHASHSEED"] = "0"
        trees = {str(BENCH_DIR.parent)} | {ALL_SERVERS[s].cwd or "" for s in servers} - {""}
        for tree in sorted(trees):
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", str(Path(tree) / "trioserve")],
                check=False,
            )
        return _main_instructions(parser, servers, scenarios, args.output, argv)
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        parser.error("wrk and taskset are required (make bench installs wrk)")
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        parser.error("needs 2 CPUs: the server runs on CPU 0, the load on CPU 1")
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {int(LOAD_CPU)})  # this harness and its clients stay off CPU 0
    started = datetime.datetime.now(datetime.timezone.utc)
    report, _ = run(servers, scenarios, rounds, seconds, warmup)
    header = [
        "# trioserve benchmark results",
        "",
        f"Generated by `{' '.join(['python bench/bench.py', *(argv or sys.argv[1:])])}` "
        f"on {started:%Y-%m-%d %H:%M} UTC: {rounds} interleaved round(s) of {seconds:g} s per "
        f"server and scenario, {CONNECTIONS} connections, server pinned to CPU {SERVER_CPU}, "
        f"load to CPU {LOAD_CPU}. Ratios are paired per round, then the median is taken.",
        "",
        *machine_info(),
        "",
    ]
    text = "\n".join(header) + "\n" + report + "\n"
    print(text)
    output = args.output or (None if args.quick else str(RESULTS_PATH))
    if output:
        write_report(Path(output), text)
    return 0


def _main_instructions(
    parser: argparse.ArgumentParser,
    servers: Sequence[str],
    scenarios: Sequence[str],
    output: str | None,
    argv: Sequence[str] | None,
) -> int:
    missing = [tool for tool in ("valgrind", "h2load", "taskset") if shutil.which(tool) is None]
    if missing:
        parser.error(f"{', '.join(missing)} required (make bench-instructions installs them)")
    multi = [s for s in servers if ALL_SERVERS[s].workers > 1]
    if multi:
        parser.error(f"one process per server only: {', '.join(multi)}")
    started = datetime.datetime.now(datetime.timezone.utc)
    report = run_instructions(servers, scenarios)
    counts = ", ".join(
        f"{name} {low}/{high}"
        for name, (low, high) in INSTRUCTION_REQUESTS.items()
        if name in scenarios
    )
    header = [
        "# trioserve benchmark results: instructions per request",
        "",
        f"Generated by `{' '.join(['python bench/bench.py', *(argv or sys.argv[1:])])}` "
        f"on {started:%Y-%m-%d %H:%M} UTC. Each server ran under `valgrind --tool=callgrind "
        f"--trace-children=yes` twice per scenario, answering N1 and then N2 requests from "
        f"`h2load --h1 -c {INSTRUCTION_CONNECTIONS}` (the h2-* rows: `h2load "
        f"{' '.join(H2LOAD_ARGS)}` over h2c) ({counts}); the figure is the "
        "difference of the two totals (all of the server's processes, `PYTHONHASHSEED=0`, "
        ".pyc files compiled first) divided by N2 - N1: "
        "user-space instructions per request, repeatable on a noisy machine, blind to kernel "
        "time, cache misses and scheduling order.",
        "",
        *machine_info(),
        "",
    ]
    text = "\n".join(header) + "\n" + report + "\n"
    print(text)
    write_report(Path(output) if output else INSTRUCTIONS_PATH, text)
    return 0


def write_report(path: Path, text: str) -> None:
    """Write ``text`` to ``path``; hand-written notes below the marker survive a new run."""
    if path.exists():
        old = path.read_text()
        if NOTES_MARKER in old:
            text += "\n" + old[old.index(NOTES_MARKER) :]
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
