"""The admin listener: ``/livez``, ``/readyz`` and ``/metrics`` on a socket of their own
(layer 5).

``--admin-bind HOST:PORT`` / ``--admin-uds PATH`` start it; it is off by default and never
shares the app's socket, so probes and scrapes neither wait behind app requests nor show up
in the app's counters, access log or ``--limit-concurrency``. It is served by trioserve's own
machinery: a tiny ASGI app (:func:`admin_app`) under a second :func:`~trioserve.serve` in
the same process, with its own :class:`~trioserve.Config` (lifespan, access log and metrics
off).

Who answers depends on who knows: a single process asks its :class:`~trioserve.Server`
(:class:`ServerHealth`); with ``--workers N`` the parent answers for the whole instance from
what its workers report over their links (``workers.supervisor``). Either way the answers
come from a :class:`Health`:

* ``GET /livez``: 200 while the process serves; 503 while a worker is blocked past
  ``--timeout-worker-healthcheck`` (until its replacement is ready).
* ``GET /readyz``: 200 once lifespan startup is complete and the server accepts; 503 from
  the first moment of a drain (SIGTERM; during ``--shutdown-delay`` the app is still served).
* ``GET /metrics``: the Prometheus text format (``trioserve.metrics``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio

from .asgi_types import ASGIApp
from .config import Config
from .metrics import Sample, render
from .server import Server, serve

logger = logging.getLogger(__name__)


class Health(Protocol):
    """What the admin endpoints report."""

    def live(self) -> bool: ...

    def ready(self) -> bool: ...

    def metrics_sample(self) -> Sample: ...


class ServerHealth:
    """The :class:`Health` of a single-process server (one :class:`~trioserve.Server`)."""

    def __init__(self) -> None:
        self.server: Server | None = None  # set once serving (after lifespan startup)

    def serving(self, server: Server) -> None:
        """``server`` has started (lifespan startup is done): ready until it drains."""
        self.server = server

    def live(self) -> bool:
        # Answering at all proves the event loop runs; the server's tasks run until stopped.
        return True

    def ready(self) -> bool:
        return self.server is not None and not self.server.draining

    def metrics_sample(self) -> Sample:
        server = self.server
        if server is None or server.metrics is None:
            return {}
        sample = server.metrics.sample()
        sample["draining"] = int(server.draining)
        return sample


def admin_config(config: Config) -> Config:
    """The admin listener's own configuration: where ``config`` says, and nothing else of
    the app's (no TLS, proxy handling, limits, lifespan, access log or metrics)."""
    if config.admin_uds is not None:
        where: dict[str, Any] = {"uds": config.admin_uds}
    else:
        host, port = config.admin_address
        where = {"host": host, "port": port}
    return Config(
        **where,
        lifespan="off",
        access_log=False,
        ws="none",
        http2=False,
        server_header=False,
        timeout_graceful_shutdown=0.0,
    )


def admin_app(health: Health) -> ASGIApp:
    """The ASGI app of the admin endpoints, answering from ``health``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        content_type = "text/plain; charset=utf-8"
        if scope["method"] not in ("GET", "HEAD"):
            status, body = 405, b"method not allowed\n"
        elif path == "/livez":
            status, body = (200, b"ok\n") if health.live() else (503, b"not live\n")
        elif path == "/readyz":
            status, body = (200, b"ready\n") if health.ready() else (503, b"not ready\n")
        elif path == "/metrics":
            status = 200
            body, content_type = render(health.metrics_sample())
        else:
            status, body = 404, b"not found: try /livez, /readyz or /metrics\n"
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if status == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    return app


async def serve_admin(
    config: Config,
    health: Health,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoints of ``config`` (``admin_bind``/``admin_uds``) until cancelled.

    The caller cancels it once the app's server (or the last worker) has stopped: probes
    keep their answers (``/readyz`` 503) during the whole drain.

    Raises:
        OSError: the admin socket could not be bound.
    """

    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, admin_app(health), admin_config(config))
        for url in server.urls:
            logger.info("Admin endpoints (/livez, /readyz, /metrics) on %s", url)
        task_status.started(server)
