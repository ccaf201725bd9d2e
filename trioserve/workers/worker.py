"""Worker-process entry point: ``python -m trioserve.workers.worker`` (layer 6).

A worker is a fresh interpreter started by :mod:`trioserve.workers.supervisor`. It reads its job
from the ``TRIOSERVE_WORKER`` environment variable (JSON: the import string, the
:class:`~trioserve.Config` fields and the numbers of the file descriptors it inherited),
imports the app, adopts the listening socket bound by the parent and serves with
:func:`trioserve.workers.serving.serve_until_signal` (SIGTERM: drain; a second one: stop now).

The *link* is one end of a socket pair whose other end only the parent holds. Over it the
worker reports, one JSON object per line (``workers.messages.WorkerEvent``, the protocol the
parent and its workers share):

* ``beat`` every :func:`heartbeat_interval` seconds, written by the trio loop itself, so a
  loop blocked by app code (``time.sleep`` in an ``async def``) goes quiet; each beat also
  re-arms :func:`faulthandler.dump_traceback_later`, which writes the stuck stack to the
  *stack file* the parent reads when it declares the worker blocked;
* ``ready`` once lifespan startup is complete and the socket is served;
* ``draining`` when the worker stops accepting on its own (``--limit-max-requests``), so
  the parent starts the replacement while this worker finishes its requests;
* ``failed`` (with ``kind`` and ``error``) when the app cannot be loaded or its lifespan
  startup fails. ERROR records of the lifespan module are held back during startup and sent
  here instead of printed, so the parent can show the app's error once, not once per worker.

EOF on the link means the parent died (even by SIGKILL): the worker drains and exits.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Final

import trio

from ..app.loading import load_app
from ..asgi_types import ASGIApp
from ..config import Config
from ..connection.listeners import activation_environ
from ..errors import AppLoadError, LifespanError
from ..logs import configure_logging
from ..metrics import ServerMetrics
from ..server import Server
from .messages import SPEC_ENV, WorkerEvent, WorkerSpec
from .serving import arm_exit_watchdog, serve_until_signal, tune_allocator

logger = logging.getLogger(__name__)

# Exit codes the parent understands without the link (it may have missed the message).
EXIT_OK: Final = 0
EXIT_LOAD_FAILED: Final = 1
EXIT_STARTUP_FAILED: Final = 3
# Beats per health-check period: a loop blocked for more than (1 - 1/BEATS) of the
# period may be reported, a shorter block never is.
BEATS_PER_HEALTHCHECK: Final = 10
MAX_HEARTBEAT_INTERVAL: Final = 1.0
# Without --timeout-graceful-shutdown, how long an orphaned worker (its parent was killed)
# lets requests in flight finish: nobody is left to stop it otherwise.
ORPHAN_GRACE: Final = 30.0


def heartbeat_interval(config: Config) -> float:
    """Seconds between two beats for ``--timeout-worker-healthcheck``."""
    return min(MAX_HEARTBEAT_INTERVAL, config.timeout_worker_healthcheck / BEATS_PER_HEALTHCHECK)


class _StartupLogCapture(logging.Filter):
    """Hold back the lifespan module's ERROR records until startup has succeeded or failed.

    A filter on the *originating* logger applies to every record logged through it, before
    any handler, wherever the logging configuration (``--log-config``) sends records.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger("trioserve.app.lifespan")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.records.append(record)
            return False
        return True

    def __enter__(self) -> _StartupLogCapture:
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """Stop capturing (idempotent)."""
        self.logger.removeFilter(self)

    def replay(self) -> None:
        """Startup succeeded after all: log what was held back."""
        self.release()
        for record in self.records:
            self.logger.handle(record)
        self.records.clear()

    def text(self) -> str:
        formatter = logging.Formatter("%(message)s")
        return "\n".join(formatter.format(record) for record in self.records)


class ParentLink:
    """The worker's end of the link: status lines out, parent death in.

    One task writes (:meth:`run_writer`: beats and queued events), one reads
    (:meth:`watch_parent`), so the stream never has two writers.
    """

    def __init__(
        self, sock: socket.socket, stack_fd: int, interval: float, healthcheck: float
    ) -> None:
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self.stack_fd = stack_fd
        self.interval = interval
        self.healthcheck = healthcheck
        self._send, self._receive = trio.open_memory_channel[WorkerEvent](16)
        # The server's counters once it serves with metrics on: each beat carries them.
        self.metrics: ServerMetrics | None = None

    def beat(self) -> WorkerEvent:
        """A heartbeat, with the server's counters when it counts."""
        if self.metrics is None:
            return WorkerEvent("beat")
        return WorkerEvent("beat", stats=self.metrics.sample())

    def post(self, event: WorkerEvent) -> None:
        """Queue ``event`` for the writer (never blocks; events are rare)."""
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
            self._send.send_nowait(event)

    async def run_writer(self) -> None:
        """Send queued events, and a beat whenever nothing was sent for ``interval``.

        Returns only when cancelled or when the parent is gone.
        """
        event = self.beat()  # at once: the health check covers lifespan startup too
        try:
            while True:
                # Each write proves the loop is alive: push the stack dump back.
                faulthandler.dump_traceback_later(self.healthcheck, file=self.stack_fd)
                try:
                    await self.stream.send_all(event.encode())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # parent gone: watch_parent handles it
                event = self.beat()
                with trio.move_on_after(self.interval):
                    event = await self._receive.receive()
        finally:
            faulthandler.cancel_dump_traceback_later()

    async def watch_parent(self, on_gone: Callable[[], None]) -> None:
        """Call ``on_gone()`` when the parent's end closes (the parent exited or was killed)."""
        while True:
            try:
                data = await self.stream.receive_some(512)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                on_gone()
                return

    async def send_final(self, event: WorkerEvent) -> None:
        """Send ``event`` directly (the writer task has ended)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.move_on_after(1.0):
                await self.stream.send_all(event.encode())


class _Readiness:
    """A ``trio.TaskStatus`` for :func:`serve_until_signal`: reports ``ready`` to the parent.

    Used instead of ``nursery.start()`` because a worker stopped (SIGTERM) during lifespan
    startup legitimately never becomes ready.
    """

    def __init__(
        self, link: ParentLink, capture: _StartupLogCapture, nursery: trio.Nursery
    ) -> None:
        self.link = link
        self.capture = capture
        self.nursery = nursery
        self.server: Server | None = None

    def started(self, value: Server | None = None) -> None:
        assert value is not None
        self.server = value
        self.link.metrics = value.metrics
        self.capture.replay()
        self.link.post(WorkerEvent("ready"))
        self.nursery.start_soon(self._report_drain, value)

    async def _report_drain(self, server: Server) -> None:
        await server.wait_draining()
        self.link.post(WorkerEvent("draining"))


async def serve_worker(
    app: ASGIApp, config: Config, link: ParentLink, capture: _StartupLogCapture
) -> WorkerEvent | None:
    """Serve until SIGTERM or parent death; returns a ``failed`` event if startup failed.

    Returns only after the server has drained (or startup failed) and every helper task
    has stopped.
    """
    failure: WorkerEvent | None = None
    async with trio.open_nursery() as nursery:
        readiness = _Readiness(link, capture, nursery)

        def parent_gone() -> None:
            logger.warning("Parent process is gone; shutting down.")
            if readiness.server is not None:
                grace = config.timeout_graceful_shutdown
                readiness.server.shutdown_nowait(grace=ORPHAN_GRACE if grace is None else grace)
            else:
                nursery.cancel_scope.cancel()

        nursery.start_soon(link.run_writer)
        nursery.start_soon(link.watch_parent, parent_gone)
        try:
            await serve_until_signal(app, config, startup_line=False, task_status=readiness)
        except LifespanError as exc:
            failure = WorkerEvent("failed", kind="lifespan", error=capture.text() or str(exc))
        except OSError as exc:
            failure = WorkerEvent("failed", kind="os", error=str(exc))
        nursery.cancel_scope.cancel()
    if failure is not None:
        await link.send_final(failure)
    elif link.metrics is not None:
        await link.send_final(link.beat())  # the final counters: the parent keeps them
    return failure


def main() -> int:
    """Run one worker process; returns its exit code."""
    spec = WorkerSpec.from_json(os.environ.pop(SPEC_ENV))
    # pass_fds made these inheritable; the app's own child processes must not keep the
    # parent's link (or the listening socket) open.
    for fd in (spec.link_fd, spec.stack_fd, spec.config.get("fd")):
        if isinstance(fd, int):
            os.set_inheritable(fd, False)
    sock = socket.socket(fileno=spec.link_fd)
    config = Config(**spec.config)  # the parent's, with fd= the inherited socket
    configure_logging(config)
    interval = heartbeat_interval(config)
    try:
        app = load_app(spec.app, config)
    except Exception as exc:
        # The import string, the user's module or its factory failed: send the text to
        # the parent (which shows it once) instead of printing it here.
        text = str(exc) if isinstance(exc, AppLoadError) else _user_traceback(exc)
        with contextlib.suppress(OSError):
            sock.sendall(WorkerEvent("failed", kind="load", error=text).encode())
        sock.close()
        return EXIT_LOAD_FAILED
    # Socket-activated sockets: this process is activated as its parent was (bind_sockets
    # adopts them and removes the variables again).
    os.environ.update(activation_environ(spec.activated, os.getpid()))
    tune_allocator()
    with _StartupLogCapture() as capture:
        link = ParentLink(sock, spec.stack_fd, interval, config.timeout_worker_healthcheck)
        try:
            failure = trio.run(serve_worker, app, config, link, capture)
        finally:
            sock.close()  # the trio socket wraps this same object
    if failure is None:
        return EXIT_OK
    return EXIT_STARTUP_FAILED if failure.kind == "lifespan" else EXIT_LOAD_FAILED


def _user_traceback(exc: BaseException) -> str:
    """The traceback of an exception raised while importing the app, without the frames
    of trioserve and importlib that lead to the user's code."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    summary = traceback.TracebackException.from_exception(exc)
    summary.stack = traceback.StackSummary.from_list(
        [
            frame
            for frame in summary.stack
            if not frame.filename.startswith((package_dir, "<frozen importlib"))
            and "importlib" not in frame.filename
        ]
    )
    return "".join(summary.format()).rstrip()


if __name__ == "__main__":
    exit_code = main()
    arm_exit_watchdog(exit_code)  # a stuck app thread must not keep the worker alive
    sys.exit(exit_code)
