"""STYLE.md §1.3, enforced: every trioserve module's imports (``ast``) against the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trioserve"

# One integer layer per unit: a sub-package, or a module at the top of trioserve/. A unit
# imports only units of a lower layer (top-level modules of one layer may import each
# other: config <- access_format); inside a sub-package anything, but never in a circle.
# fmt: off
LAYERS: dict[str, int] = {
    "errors": 0, "asgi_types": 0,                          # vocabulary, stdlib only
    "compiled": 0,                                          # what mypyc compiles (setup.py)
    "access_format": 1, "message_trace": 1, "config": 1,  # configuration, no trio
    "config_file": 1, "config_checks": 1,
    "tls": 1, "logs": 1, "metrics": 1,
    "protocol": 2,                                          # sans-IO: never trio
    "app": 3, "wsgi": 3,                                    # calling the user's app
    "connection": 4,                                        # one accepted connection
    "server": 5, "admin": 5,                                # serve(): the task tree
    "testing": 6, "workers": 6,                             # test helpers; processes
    "runner": 7, "cli": 8, "__main__": 9, "__init__": 9,
}
# fmt: on
TESTING_MAY_IMPORT = {"config", "server", "testing"}
ONLY_IMPORTED_BY = {"click": {"cli"}, "signal": {"workers.serving", "workers.supervisor"}}
NO_TRIO_BELOW = 3  # layers 0-2 are sans-IO: never trio (nor anyio, sniffio)
MAX_LINES = 600


def modules() -> dict[str, Path]:
    """``"connection.http1"`` -> path; a package's ``__init__`` is ``"testing.__init__"``."""
    return {
        ".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
        for p in sorted(PACKAGE.rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def imports(name: str, path: Path, *, typing_too: bool = False) -> set[str]:
    """What a module imports: ours as ``"connection.stream"`` (or a package, ``"protocol"``),
    others as their top-level name. TYPE_CHECKING imports only when ``typing_too``."""
    tree = ast.parse(path.read_text())
    skip = set()
    if not typing_too:
        skip = {
            id(node)
            for branch in ast.walk(tree)
            if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
            for node in ast.walk(branch)
        }
    package = name.split(".")[:-1]  # (an __init__'s package is its own: drop "__init__")
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found.add(".".join(parts[1:]) if parts[0] == "trioserve" else parts[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "trioserve":
                    found.add(parts[0])
                    continue
                base = parts[1:]
            else:
                base = package[: len(package) - node.level + 1] + (
                    node.module.split(".") if node.module else []
                )
            for alias in node.names:  # `from . import module` names the module itself
                sub = ".".join([*base, alias.name])
                found.add(sub if sub in MODULES or sub + ".__init__" in MODULES else ".".join(base))
    found.discard("")  # `from . import __version__`: the package itself
    return found


MODULES = modules()


def unit(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports_follow_the_layers(name: str) -> None:
    own = unit(name)
    assert own in LAYERS, f"trioserve/{own} has no layer: add it to LAYERS (and ARCHITECTURE.md)"
    names = imports(name, MODULES[name])
    ours = {n for n in names if unit(n) in LAYERS or n in MODULES}
    for target in ours - {name}:
        other = unit(target)
        if other == own:
            continue  # inside one package: free, but see test_no_import_circles
        inside_package = (PACKAGE / own).is_dir() or (PACKAGE / other).is_dir()
        ok = LAYERS[other] < LAYERS[own] or (not inside_package and LAYERS[other] == LAYERS[own])
        assert ok, f"{name} (layer {LAYERS[own]}) imports {target} (layer {LAYERS[other]})"
    if own == "testing":
        assert {unit(n) for n in ours} <= TESTING_MAY_IMPORT, f"{name} imports {ours}"
    for lib, allowed in ONLY_IMPORTED_BY.items():
        assert lib not in names or name in allowed, f"only {sorted(allowed)} import {lib}"
    if LAYERS[own] < NO_TRIO_BELOW:
        assert not names & {"trio", "anyio", "sniffio"}, f"layer {LAYERS[own]} imports trio"


def test_no_import_circles() -> None:
    """Not even through TYPE_CHECKING or a function-level import."""
    graph = {
        name: {t if t in MODULES else t + ".__init__" for t in imports(name, p, typing_too=True)}
        & set(MODULES)
        for name, p in MODULES.items()
    }
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                circle = [*path[path.index(target) :], target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_short(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines; split it by responsibility"


def test_only_the_top_init_reexports() -> None:
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        reexports = [
            a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for a in node.names
            if a.asname == a.name
        ]
        assert name == "__init__" or not reexports, f"{name} re-exports {reexports}"


# Writes to the fields of another module's objects that stay, by module and expression:
FOREIGN_WRITES_ALLOWED = {
    ("connection.http2", "frame.error_code"),  # h2's GoAwayFrame (third party)
    ("protocol.ws_websockets", "protocol.state"),  # websockets' Protocol (third party)
    ("testing.transport", "response.stream"),  # an httpx.Response (third party)
}


def own_attributes(tree: ast.Module) -> set[str]:
    """The attribute names a module's own classes define: ``self.x = ...``, class-level
    names and methods, ``__slots__``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                    targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                    names.update(t.id for t in targets if isinstance(t, ast.Name))
                    if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in targets):
                        assert item.value is not None
                        names.update(
                            c.value
                            for c in ast.walk(item.value)
                            if isinstance(c, ast.Constant) and isinstance(c.value, str)
                        )
    return names


def foreign_accesses() -> list[str]:
    """``obj.attr = ...`` (or ``+=``) and ``obj._private`` reads, ``obj`` not ``self``, where
    ``attr`` is defined by another trioserve module's classes and not by this one's.

    By name only (no types): a write through a name this module defines too goes unseen.
    ServerMetrics' counters are exempt (``....metrics.x += 1``: bumped inline on the hot
    path, without a call; see ``trioserve.metrics``).
    """
    trees = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
    owners: dict[str, set[str]] = {}
    for name, tree in trees.items():
        for attr in own_attributes(tree):
            owners.setdefault(attr, set()).add(name)
    found = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or (
                isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            ):
                continue
            others = owners.get(node.attr, set()) - {name}
            if not others or name in owners.get(node.attr, set()):
                continue
            expression = ast.unparse(node)
            if isinstance(node.ctx, ast.Store):
                if ast.unparse(node.value).endswith("metrics"):
                    continue
                if (name, expression) not in FOREIGN_WRITES_ALLOWED:
                    found.append(f"{name}:{node.lineno} writes {expression} ({sorted(others)})")
            elif node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{name}:{node.lineno} reads {expression} ({sorted(others)})")
    return found


def test_no_module_writes_another_modules_fields_or_reads_its_privates() -> None:
    """An object's fields are written by its own module's code (methods say what happened
    or what to do: ``WorkerProcess.retire``, ``ServerState.begin_drain``); another module
    reads them, public ones only."""
    assert foreign_accesses() == []
