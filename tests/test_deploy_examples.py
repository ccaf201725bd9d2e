"""examples/deploy/: each file parses, follows the deployment rules of the README, and its
trioserve command line is accepted by the CLI (``--print-config``: no server started)."""

from __future__ import annotations

import configparser
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner
from server_process import clean_env

from trioserve.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEPLOY = Path(__file__).resolve().parent.parent / "examples" / "deploy"


def resolved(argv: list[str]) -> dict[str, Any]:
    """The configuration the CLI resolves from ``argv`` (trioserve's arguments)."""
    result = CliRunner().invoke(main, [*argv, "--print-config"], env=clean_env())
    assert result.exit_code == 0, f"{argv}: {result.output}"
    return tomllib.loads(result.output)  # --print-config prints TOML


def unit_file(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string((DEPLOY / name).read_text())
    return parser


def test_dockerfile_runs_trioserve_as_non_root_in_exec_form() -> None:
    instructions = [
        line.split(maxsplit=1)
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    by_name = dict(instructions)
    assert by_name["STOPSIGNAL"] == "SIGTERM"
    assert by_name["USER"].split(":")[0] not in ("root", "0")
    argv = json.loads(by_name["CMD"])  # the exec form is a JSON array: no shell as PID 1
    assert argv[0] == "trioserve"
    config = resolved(argv[1:])
    assert config["host"] == "0.0.0.0"
    assert str(config["port"]) in by_name["EXPOSE"].split()


def test_kubernetes_probes_use_the_admin_port_and_the_grace_period_covers_the_drain() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    service = next(d for d in documents if d["kind"] == "Service")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["trioserve"]
    config = resolved(container["args"])

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config["port"]
    assert config["admin_bind"].rpartition(":")[2] == str(ports["admin"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
    assert "lifecycle" not in container  # no preStop sleep: --shutdown-delay does it
    assert config["shutdown_delay"] > 0
    drain = config["shutdown_delay"] + config["timeout_graceful_shutdown"]
    assert pod["terminationGracePeriodSeconds"] > drain
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_systemd_service_is_socket_activated_by_its_socket_unit() -> None:
    socket_unit = unit_file("trioserve.socket")
    service = unit_file("trioserve.service")
    assert socket_unit["Socket"]["ListenStream"]  # (several: configparser keeps the last)
    assert "trioserve.socket" in service["Unit"]["Requires"].split()
    argv = shlex.split(service["Service"]["ExecStart"])
    assert Path(argv[0]).name == "trioserve"
    config = resolved(argv[1:])
    # systemd passes the sockets: nothing to bind, and --reuse-port would be refused.
    assert config["reuse_port"] is False
    assert "uds" not in config and "fd" not in config
    assert service["Service"]["KillSignal"] == "SIGTERM"
    assert int(service["Service"]["TimeoutStopSec"]) > config["timeout_graceful_shutdown"]
