"""Run Autobahn|Testsuite's fuzzing client against trioserve and summarise (``make autobahn``).

Starts ``trioserve echo_app:app`` (the real CLI, in a subprocess, on a free port of
127.0.0.1), runs ``wstest -m fuzzingclient`` from the Python 2.7 environment that
``make autobahn`` creates, then reads the JSON report and prints one line per case group
and behaviour, the cases that were not OK, and a Markdown table for the README. Exits 1
if any case FAILED (its behaviour or its close behaviour), 2 if the run itself broke.

The HTML/JSON report is written to ``autobahn/reports/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*", "12.*", "13.*"]
GROUP_NAMES = {
    "1": "framing",
    "2": "ping/pong",
    "3": "reserved bits",
    "4": "opcodes",
    "5": "fragmentation",
    "6": "UTF-8",
    "7": "close handshake",
    "9": "limits/performance",
    "10": "misc",
    "12": "permessage-deflate (payloads)",
    "13": "permessage-deflate (parameters)",
}
BEHAVIOURS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
AGENT = "trioserve"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"trioserve exited with {server.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"trioserve did not listen on port {port} within {timeout}s")


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


def summarise(results: dict[str, dict[str, str]]) -> tuple[str, list[str], bool]:
    """Return (Markdown table, lines about non-OK cases, any FAILED)."""
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    notes: list[str] = []
    failed = False
    for case_id in sorted(results, key=case_key):
        result = results[case_id]
        behaviour = result["behavior"]
        close = result["behaviorClose"]
        if "FAILED" in (behaviour, close):
            failed = True
            behaviour = "FAILED"
        counts[case_id.split(".")[0]][behaviour] += 1
        if behaviour != "OK" or close not in ("OK", "INFORMATIONAL"):
            notes.append(f"  {case_id}: {result['behavior']} (close: {close})")
    columns = [b for b in BEHAVIOURS if any(c[b] for c in counts.values()) or b == "FAILED"]
    lines = [
        "| cases | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    total: collections.Counter[str] = collections.Counter()
    for group in sorted(counts, key=int):
        total.update(counts[group])
        name = f"{group} {GROUP_NAMES.get(group, '')}".strip()
        lines.append(f"| {name} | " + " | ".join(str(counts[group][b]) for b in columns) + " |")
    lines.append("| **all** | " + " | ".join(f"**{total[b]}**" for b in columns) + " |")
    return "\n".join(lines), notes, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wstest", required=True, help="path to Autobahn's wstest")
    parser.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help="comma-separated case patterns (default: %(default)s)",
    )
    parser.add_argument("--outdir", default=str(HERE / "reports"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="bound for wstest, s")
    parser.add_argument(
        "--server-option",
        action="append",
        default=[],
        help="extra trioserve CLI option (repeatable)",
    )
    args = parser.parse_args()

    outdir = Path(args.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    spec = {
        "outdir": str(outdir),
        "servers": [{"agent": AGENT, "url": f"ws://127.0.0.1:{port}"}],
        "cases": args.cases.split(","),
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    spec_path = outdir / "fuzzingclient.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    index = outdir / "index.json"
    if index.exists():
        index.unlink()

    server_cmd = [
        sys.executable,
        "-m",
        "trioserve",
        "echo_app:app",
        "--app-dir",
        str(HERE),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        *args.server_option,
    ]
    server_log = (outdir / "server.log").open("wb")
    server = subprocess.Popen(server_cmd, stdout=server_log, stderr=subprocess.STDOUT)
    try:
        wait_listening(port, server, 20.0)
        print(f"trioserve on port {port}; running wstest (cases {args.cases}) ...", flush=True)
        started = time.monotonic()
        with (outdir / "wstest.log").open("wb") as log:
            try:
                wstest = str(Path(args.wstest).resolve())  # it runs in outdir
                subprocess.run(
                    [wstest, "-m", "fuzzingclient", "-s", str(spec_path)],
                    cwd=outdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    check=True,
                    timeout=args.timeout,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                print(f"wstest did not complete: {exc} (see {outdir / 'wstest.log'})")
                return 2
        elapsed = time.monotonic() - started
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server_log.close()

    results = json.loads(index.read_text())[AGENT]
    table, notes, failed = summarise(results)
    print(f"\n{len(results)} cases in {elapsed:.0f}s (report: {outdir / 'index.html'})\n")
    print(table)
    if notes:
        print("\nnot OK:")
        print("\n".join(notes))
    print("\nFAILED cases present" if failed else "\nno FAILED case")
    return 1 if failed else 0


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM (make interrupted, timeout(1)) unwinds like Ctrl-C: subprocess.run kills
    # wstest and the finally block stops the server, so nothing is left running.
    raise KeyboardInterrupt


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
