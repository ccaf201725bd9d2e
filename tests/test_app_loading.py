"""app_loading: import strings, --app-dir, --factory, ASGI 2 detection, clear errors."""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trioserve import Config
from trioserve.app.loading import is_asgi2, load_app
from trioserve.errors import AppLoadError

APP_SOURCE = """
async def app(scope, receive, send):
    scope["seen"] = "asgi3"

class Holder:
    class Inner:
        async def app(scope, receive, send):
            scope["seen"] = "nested"

holder = Holder()

def create_app():
    async def made(scope, receive, send):
        scope["seen"] = "factory"
    return made

def needs_args(settings):
    return app

def broken_factory():
    raise RuntimeError("factory exploded")

class ASGI2Class:
    def __init__(self, scope):
        self.scope = scope
    async def __call__(self, receive, send):
        self.scope["seen"] = "asgi2-class"

def asgi2_function(scope):
    async def instance(receive, send):
        scope["seen"] = "asgi2-function"
    return instance

class ASGI3Instance:
    async def __call__(self, scope, receive, send):
        scope["seen"] = "asgi3-instance"

asgi3_instance = ASGI3Instance()
not_callable = 42
"""


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory holding module ``loadme`` and package ``loadpkg``; imports undone after."""
    (tmp_path / "loadme.py").write_text(APP_SOURCE)
    package = tmp_path / "loadpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sub.py").write_text(APP_SOURCE)
    (tmp_path / "needs_dep.py").write_text("import a_dependency_that_is_missing\napp = 1\n")
    (tmp_path / "bad_name.py").write_text("from os import no_such_name\napp = 1\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


async def call(app: Any) -> str:
    scope: dict[str, Any] = {"type": "http"}

    async def receive() -> dict[str, Any]:
        raise AssertionError("not used")

    async def send(message: Any) -> None:
        raise AssertionError("not used")

    await app(scope, receive, send)
    return str(scope["seen"])


@pytest.mark.parametrize(
    ("target", "options", "seen"),
    [
        pytest.param("loadme:app", {}, "asgi3", id="module-attr"),
        pytest.param("loadpkg.sub:app", {}, "asgi3", id="package-module"),
        pytest.param("loadme:Holder.Inner.app", {}, "nested", id="dotted-attr"),
        pytest.param("loadme:create_app", {"factory": True}, "factory", id="factory"),
        pytest.param("loadme:ASGI2Class", {}, "asgi2-class", id="asgi2-class"),
        pytest.param("loadme:asgi2_function", {}, "asgi2-function", id="asgi2-double-callable"),
        pytest.param("loadme:asgi3_instance", {}, "asgi3-instance", id="asgi3-instance"),
    ],
)
async def test_import_string_loads_an_asgi3_callable(
    app_dir: Path, target: str, options: dict[str, Any], seen: str
) -> None:
    app = load_app(target, Config(app_dir=str(app_dir), **options))
    assert await call(app) == seen


@pytest.mark.parametrize(
    ("target", "options", "message"),
    [
        pytest.param(
            "loadme",
            {},
            'Import string "loadme" must be in format "<module>:<attribute>".',
            id="no-colon",
        ),
        pytest.param("loadme:", {}, "must be in format", id="empty-attr"),
        pytest.param(":app", {}, "must be in format", id="empty-module"),
        pytest.param(
            "nosuchmodule:app", {}, 'Could not import module "nosuchmodule".', id="missing-module"
        ),
        pytest.param(
            "nosuchpkg.mod:app",
            {},
            'Could not import module "nosuchpkg.mod" (no module named "nosuchpkg").',
            id="missing-package",
        ),
        pytest.param(
            "loadpkg.nosub:app",
            {},
            'Could not import module "loadpkg.nosub".',
            id="missing-submodule",
        ),
        pytest.param(
            "loadme:nope", {}, 'Attribute "nope" not found in module "loadme".', id="missing-attr"
        ),
        pytest.param(
            "loadme:Holder.Missing.app",
            {},
            'Attribute "Missing" not found in "loadme:Holder" '
            '(looking up "loadme:Holder.Missing.app").',
            id="missing-nested-attr",
        ),
        pytest.param("loadme:not_callable", {}, "is not callable (got int)", id="not-callable"),
        pytest.param(
            "loadme:not_callable",
            {"factory": True},
            "Factory 'loadme:not_callable' is not callable.",
            id="factory-not-callable",
        ),
        pytest.param(
            "loadme:needs_args",
            {"factory": True},
            "cannot be called without arguments",
            id="factory-needs-args",
        ),
    ],
)
def test_bad_import_string_raises_app_load_error_naming_the_part(
    app_dir: Path, target: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(AppLoadError) as info:
        load_app(target, Config(app_dir=str(app_dir), **options))
    assert message in str(info.value)


def test_users_own_missing_dependency_is_not_masked(app_dir: Path) -> None:
    with pytest.raises(ModuleNotFoundError) as info:
        load_app("needs_dep:app", Config(app_dir=str(app_dir)))
    assert not isinstance(info.value, AppLoadError)
    assert info.value.name == "a_dependency_that_is_missing"


def test_users_own_import_error_is_not_masked(app_dir: Path) -> None:
    with pytest.raises(ImportError, match="no_such_name"):
        load_app("bad_name:app", Config(app_dir=str(app_dir)))


def test_factory_errors_keep_their_traceback(app_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="factory exploded"):
        load_app("loadme:broken_factory", Config(app_dir=str(app_dir), factory=True))


def test_app_dir_is_needed_to_find_the_module(
    app_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    with pytest.raises(AppLoadError, match='Could not import module "loadme"'):
        load_app("loadme:app", Config(app_dir="."))
    monkeypatch.chdir(app_dir)
    assert load_app("loadme:app", Config(app_dir=".")) is not None


async def test_app_object_is_used_as_is(app_dir: Path) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["seen"] = "object"

    assert load_app(app, Config()) is app


async def test_application_factory_object(app_dir: Path) -> None:
    def factory() -> Any:
        return load_app("loadme:app", Config(app_dir=str(app_dir)))

    assert await call(load_app(factory, Config(factory=True))) == "asgi3"


async def _asgi3(scope: Any, receive: Any, send: Any) -> None:
    pass


def _sync_wrapper(scope: Any, receive: Any, send: Any) -> Any:
    return _asgi3(scope, receive, send)


def _asgi2(scope: Any) -> Any:
    return _asgi3


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        pytest.param(_asgi3, False, id="coroutine-function"),
        pytest.param(functools.partial(_asgi3), False, id="partial-of-coroutine-function"),
        pytest.param(_sync_wrapper, False, id="sync-three-params-returning-coroutine"),
        pytest.param(_asgi2, True, id="one-param-function"),
    ],
)
def test_asgi2_detection(app: Any, expected: bool) -> None:
    assert is_asgi2(app) is expected
