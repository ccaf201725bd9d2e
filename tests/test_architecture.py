"""STYLE.md §1.3, enforced: walk every trioserve module's imports (``ast``) against the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trioserve"

# Rank = layer, with decimals for the order inside a layer (a module may import only modules
# of a strictly lower rank). Layer 3 follows §1.3: app_call ← ws_connection ← http_connection
# ← server, with lifespan and listeners independent.
# fmt: off
LAYERS: dict[str, float] = {
    "asgi_types": 0, "errors": 0,
    "access_format": 1.0, "message_trace": 1.0, "config": 1.1, "app_loading": 1.2, "tls": 1.2,
    "http_parser": 2.0, "httptools_parser": 2.01, "http_messages": 2.05,
    "proxy_headers": 2.0, "proxy_protocol": 2.0, "ws_messages": 2.1,
    "asyncio_bridge": 3.0, "listeners": 3.0, "transport": 3.0, "wsgi": 3.0,
    "server_state": 3.05,
    "app_call": 3.1, "lifespan": 3.2, "ws_connection": 3.2, "http_connection": 3.3,
    "server": 3.9,
    "logs": 4.0, "reload": 4.0, "worker_protocol": 4.0, "worker_process": 4.05,
    "supervisor": 4.1, "runner": 4.2, "worker": 4.3, "cli": 4.4,
    "__main__": 4.5,
    # testing imports only config, server and its two parts, which import nothing of ours
    # (testing_transport names Server in annotations only)
    "testing_transport": 5.0, "testing_ws_client": 5.0, "testing": 5.1,
}
# fmt: on
TESTING_MAY_IMPORT = {
    "testing": {"config", "server", "testing_transport", "testing_ws_client"},
    "testing_transport": set(),
    "testing_ws_client": set(),
}
ONLY_IMPORTED_BY = {"click": {"cli"}, "signal": {"runner", "supervisor"}}
NO_TRIO_BELOW = 3  # layers 0-2 are sans-IO: never trio (nor anyio, sniffio)
# Known deviations, each with its reason; the test fails once one is gone, to prune it.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def imports(path: Path) -> set[str]:
    """Top-level names imported by a module: ``.x`` as ``x`` (this package), else ``pkg``."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for node in ast.walk(branch)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {
                alias.name.replace("trioserve.", ".").split(".")[0] or alias.name
                for alias in node.names
            }
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module.startswith("trioserve"):
                module, node.level = module.removeprefix("trioserve").lstrip("."), 1
            if node.level == 0:
                found.add(module.split(".")[0])
            elif module:
                found.add("." + module.split(".")[0])
            else:  # from . import x: a module of ours, or the package itself
                found |= {"." + (a.name if a.name in LAYERS else "__init__") for a in node.names}
    return found


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_follow_the_layers(module: str) -> None:
    assert module in LAYERS, (
        f"trioserve/{module}.py is not in the layer table: place it in LAYERS in "
        "tests/test_architecture.py (and in STYLE.md's module map / __init__ docstring)"
    )
    rank = LAYERS[module]
    names = imports(PACKAGE / f"{module}.py")
    ours = {name[1:] for name in names if name.startswith(".")} - {"__init__"}
    if module.startswith("testing"):
        allowed = TESTING_MAY_IMPORT[module]
        assert ours <= allowed, f"{module} imports {ours - allowed}"
    for target in ours:
        if (module, target) in KNOWN_EXCEPTIONS:
            continue
        assert target in LAYERS, f"{module} imports unknown module {target}"
        assert LAYERS[target] < rank, (
            f"{module} (layer {rank}) imports {target} (layer {LAYERS[target]}): "
            "modules import only lower layers"
        )
    for name, allowed in ONLY_IMPORTED_BY.items():
        assert name not in names or module in allowed, f"only {sorted(allowed)} import {name}"
    if rank < NO_TRIO_BELOW:
        assert not names & {"trio", "anyio", "sniffio"}, f"layer {rank} must not import trio"


def test_init_reexports_and_is_the_only_one_to() -> None:
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        reexports = [
            a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for a in node.names
            if a.asname == a.name
        ]
        assert path.stem == "__init__" or not reexports, f"{path.name} re-exports {reexports}"


def test_known_exceptions_still_exist() -> None:
    for module, target in KNOWN_EXCEPTIONS:
        assert "." + target in imports(PACKAGE / f"{module}.py"), (
            f"{module} no longer imports {target}: remove it from KNOWN_EXCEPTIONS"
        )
