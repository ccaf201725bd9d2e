"""trioserve: an ASGI server on trio, h11 and wsproto.

Public API (everything else is internal and may change):

* :class:`Config` — every option, validated once;
* :func:`serve` — ``await nursery.start(trioserve.serve, app, config)``;
* :class:`Server` — the handle ``serve`` gives to ``task_status.started``;
* :func:`run` — ``trioserve.run("main:app", port=8000)``, what the CLI calls;
* :class:`ClientDisconnected`, :class:`LifespanError` (alias ``StartupFailed``);
* :mod:`trioserve.testing` — run an app on a real socket inside a test.
* :class:`trioserve.wsgi.WSGIMiddleware` — a WSGI app as an ASGI app (worker threads).

General layout (each unit imports only from lower layers; ARCHITECTURE.md has one line per
module, the task tree and a request's path)::

    0 vocabulary      errors, asgi_types
    1 configuration   config, access_format, logs, tls, message_trace, metrics (no trio)
    2 protocol/       parsers, ASGI translation, scope building, proxy headers (sans-IO)
    3 app/, wsgi      calling the user's app: loading, one call, lifespan, asyncio bridge
    4 connection/     one accepted connection: listeners, edge, stream, HTTP/1.1, WebSocket
    5 server, admin   serve(): lifespan, listen, accept, drain
    6 testing/        run an app inside a test (imports only config and server)
    6 workers/        processes: signals, supervisor, worker processes, reload
    7 runner  ←  8 cli  ←  9 __main__, __init__

(tests/test_architecture.py checks this table against every module's imports.)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import Config as Config
from .errors import ClientDisconnected as ClientDisconnected
from .errors import ConfigError as ConfigError
from .errors import LifespanError as LifespanError
from .errors import StartupFailed as StartupFailed
from .runner import run as run
from .server import Server as Server
from .server import serve as serve
