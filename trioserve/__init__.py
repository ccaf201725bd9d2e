"""trioserve: an ASGI server on trio, h11 and wsproto.

Public API (everything else is internal and may change):

* :class:`Config` — every option, validated once;
* :func:`serve` — ``await nursery.start(trioserve.serve, app, config)``;
* :class:`Server` — the handle ``serve`` gives to ``task_status.started``;
* :func:`run` — ``trioserve.run("main:app", port=8000)``, what the CLI calls;
* :class:`ClientDisconnected`, :class:`LifespanError` (alias ``StartupFailed``);
* :mod:`trioserve.testing` — run an app on a real socket inside a test.
* :class:`trioserve.wsgi.WSGIMiddleware` — a WSGI app as an ASGI app (worker threads).

General layout (each layer imports only from layers below it)::

    0 vocabulary      asgi_types, errors
    1 configuration   access_format ← config ← app_loading, tls
    2 sans-IO core    http_messages, proxy_headers, proxy_protocol ← ws_messages
    3 trio I/O        asyncio_bridge, listeners, transport, wsgi ← server_state ← app_call
                      ← lifespan, ws_connection ← http_connection ← server
    4 process level   logs, reload, worker_protocol ← worker_process ← supervisor
                      ← runner ← worker ← cli
    testing           testing_transport, testing_ws_client ← testing (+ config, server)

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
