"""Which of trioserve's modules mypyc compiles, and whether this installation runs them
compiled (layer 0: no trioserve imports, no trio; ``setup.py`` reads this file alone).

``pip install .`` compiles :data:`COMPILED_MODULES` when it can (``setup.py`` says when,
and how ``TRIOSERVE_COMPILE`` chooses); the package behaves the same either way. Each
compiled module is a C extension next to its ``.py`` source, which Python's import system
prefers, so whether a module runs compiled is a question of which file its import finds.
``trioserve --version`` and the server's debug start line report it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from collections.abc import Callable
from typing import Final, TypeVar

__all__ = ["COMPILED_MODULES", "build_description", "compiled_modules", "mypyc_attr"]

_T = TypeVar("_T")

try:  # mypyc's class options, for the compiled modules' classes
    from mypy_extensions import mypyc_attr
except ImportError:  # (it comes with mypy, which a pure install may lack: a no-op then)

    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[_T], _T]:
        return lambda cls: cls


# The request path, in the order a request meets it: the sans-IO protocol layer, then the
# connection code that runs for every request. Every other module stays pure Python.
#
# Not protocol.http1_parser: its H11Connection subclasses h11.Connection, and mypyc makes
# such a class an extension type whose instances keep their attributes in a plain
# ``__dict__``. h11's own (interpreted) code reads and writes dozens of attributes of that
# object per request, and CPython's specialized attribute access works only on ordinary
# instances: compiled, the h11 default cost more instructions per request than pure.
#
# HTTP/2's connection, stream and heads are compiled; protocol.h2_engine is not: its
# classes subclass h2's, hpack's and hyperframe's, whose own interpreted code uses them.
#
# The WebSocket path is compiled too, but for protocol.ws_deflate (its class subclasses
# wsproto's PerMessageDeflate, and it runs only with permessage-deflate). ws_websockets'
# subclass of websockets' ServerProtocol stays an ordinary class there (websockets' own code
# uses its attributes per frame), as does http2_websocket's WebSocketSession subclass.
COMPILED_MODULES: Final = (
    "trioserve.protocol.httptools_parser",
    "trioserve.protocol.http1_framing",
    "trioserve.protocol.http1_messages",
    "trioserve.protocol.response_heads",
    "trioserve.protocol.proxy_headers",
    "trioserve.protocol.scope",
    "trioserve.protocol.ws_messages",
    "trioserve.protocol.ws_engine",
    "trioserve.protocol.ws_websockets",
    "trioserve.connection.stream",
    "trioserve.connection.state",
    "trioserve.connection.http1_body",
    "trioserve.connection.request_cycle",
    "trioserve.connection.http1",
    "trioserve.connection.ws_outbox",
    "trioserve.connection.ws_reader",
    "trioserve.connection.websocket",
    "trioserve.protocol.http2",
    "trioserve.connection.http2_stream",
    "trioserve.connection.http2",
)


def compiled_modules() -> list[str]:
    """The modules of :data:`COMPILED_MODULES` that import as compiled extensions here
    (all of them in a compiled build, none in a pure one)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    compiled = []
    for name in COMPILED_MODULES:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is not None and origin.endswith(suffixes):
            compiled.append(name)
    return compiled


def build_description() -> str:
    """How this installation runs its hot path, for ``--version`` and the start line."""
    compiled = len(compiled_modules())
    if compiled == 0:
        return "pure Python"
    if compiled == len(COMPILED_MODULES):
        return "compiled (mypyc)"
    return f"partly compiled (mypyc, {compiled} of {len(COMPILED_MODULES)} modules)"
