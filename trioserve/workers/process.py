"""One worker process as the parent sees it: spawn it, follow its status, kill it when late
(layer 4).

:class:`WorkerProcess` is the parent's record of one worker; :func:`run_worker_process` is
the task that owns the process: it starts ``python -m trioserve.workers.worker`` with the listening
socket, the link and the stack file passed by file descriptor, reads the worker's status
lines (:mod:`trioserve.workers.messages`) and kills the process once its stop deadline
(``WorkerProcess.stop_scope``) passes or its heartbeats stop. What to *do* about a worker
(replace it, back off, abort a restart) is :mod:`trioserve.workers.supervisor`'s policy: it gets
every status line and the "blocked" verdict through callbacks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import IO, Any, Final

import trio

from .messages import SPEC_ENV, WorkerEvent, WorkerSpec

# The parent's log lines keep the logger they had when this code lived in supervisor.py, so
# that a --log-config filtering "trioserve.workers.supervisor" still sees all of them.
logger = logging.getLogger("trioserve.workers.supervisor")

STACK_DUMP_WAIT: Final = 1.0
STACK_DUMP_MAX_CHARS: Final = 20_000


class WorkerProcess:
    """One worker process, as the parent sees it.

    Only this module writes its fields: the supervisor reads them, and tells it what happened
    (:meth:`mark_ready`, :meth:`mark_failed`, :meth:`update_stats`) or what to do
    (:meth:`retire`, :meth:`hurry`, :meth:`renew`).
    """

    def __init__(self, generation: int) -> None:
        self._generation = generation
        self.process: trio.Process | None = None
        self.started_at = trio.current_time()
        self._ready_at: float | None = None
        # No longer counted towards --workers: asked to stop, draining on its own, or killed.
        self._retiring = False
        self.term_sent = False
        self.killed = False
        self._failure: WorkerEvent | None = None
        # Found with its event loop blocked (no heartbeat for the health-check time).
        self.blocked = False
        # Its counters as of its last heartbeat, with metrics on (``WorkerEvent.stats``).
        self._stats: dict[str, float] | None = None
        # Deadline of the kill-when-late task; moved by retire() and hurry().
        self.stop_scope = trio.CancelScope()

    @property
    def generation(self) -> int:
        """The rolling restart (SIGHUP) it was started in, or was renewed to."""
        return self._generation

    @property
    def ready_at(self) -> float | None:
        """When it reported ready (``trio.current_time()``); ``None`` until then."""
        return self._ready_at

    @property
    def retiring(self) -> bool:
        """No longer counted towards ``--workers``: stopping, draining on its own, or killed."""
        return self._retiring

    @property
    def failure(self) -> WorkerEvent | None:
        """Its ``failed`` status line (why it could not start), if it sent one."""
        return self._failure

    @property
    def stats(self) -> dict[str, float] | None:
        """Its counters as of its last heartbeat, with metrics on (``WorkerEvent.stats``)."""
        return self._stats

    def mark_ready(self) -> None:
        """It reported ready: it serves."""
        self._ready_at = trio.current_time()

    def mark_failed(self, event: WorkerEvent) -> None:
        """It reported why it could not start; it exits next."""
        self._failure = event

    def update_stats(self, stats: dict[str, float]) -> None:
        """Its heartbeat carried its counters."""
        self._stats = stats

    def renew(self, generation: int) -> None:
        """Count it as a worker of ``generation``: a rolling restart was given up."""
        self._generation = generation

    def retire(self, deadline: float | None = None) -> None:
        """Stop counting it towards ``--workers``.

        Without ``deadline`` it is draining on its own (``--limit-max-requests``). With one,
        it is asked to drain (SIGTERM, the first time only) and killed if it still runs at
        ``deadline``; a stop asked for before keeps its deadline.
        """
        self._retiring = True
        if deadline is not None and not self.term_sent:
            self.terminate()
            self.stop_scope.deadline = min(self.stop_scope.deadline, deadline)

    def hurry(self, deadline: float) -> None:
        """A second stop: SIGTERM again (the worker's "stop now"), and kill it if it still
        runs at ``deadline`` (or at an earlier deadline set before)."""
        self.terminate(again=True)
        self.stop_scope.deadline = min(self.stop_scope.deadline, deadline)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def terminate(self, *, again: bool = False) -> None:
        """Send SIGTERM (drain), once unless ``again`` (a second SIGTERM: "stop now");
        the worker may not be spawned yet."""
        if self.term_sent and not again:
            return
        self.term_sent = True
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()

    def kill(self) -> None:
        self.killed = True
        self.term_sent = True
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


async def run_worker_process(
    worker: WorkerProcess,
    *,
    app: str,
    worker_options: dict[str, Any],
    listener_fds: tuple[int, ...],
    activated: list[str],
    healthcheck: float,
    on_event: Callable[[WorkerProcess, WorkerEvent], None],
    on_blocked: Callable[[WorkerProcess], None],
) -> None:
    """Run one worker process and follow its status; returns once it has exited.

    Args:
        worker: the parent's record; ``worker.process`` is set once spawned.
        app: the import string the worker loads.
        worker_options: the worker's :class:`~trioserve.Config` fields.
        listener_fds: the listening sockets the worker inherits (none with --reuse-port).
        activated: the names of socket-activated ones, at fds 3, 4, ... (see
            ``listeners.activation_environ``).
        healthcheck: ``--timeout-worker-healthcheck``: silence this long, after the first
            status line, means the worker's event loop is blocked.
        on_event: called with every status line.
        on_blocked: called after a blocked worker was reported (with its stack) and killed.

    Cancellation:
        Cancelling kills the process (SIGKILL): the graceful stop is
        :meth:`WorkerProcess.terminate` plus a deadline on ``worker.stop_scope``.
    """
    parent_end, child_end = socket.socketpair()
    with parent_end, child_end, tempfile.TemporaryFile() as stack_file:
        if worker.retiring:
            return  # stopped before it was spawned
        spec = WorkerSpec(
            app=app,
            config=worker_options,
            link_fd=child_end.fileno(),
            stack_fd=stack_file.fileno(),
            activated=activated,
        )
        async with trio.open_nursery() as nursery:
            try:
                process: trio.Process = await nursery.start(
                    functools.partial(
                        trio.run_process,
                        [sys.executable, "-m", "trioserve.workers.worker"],
                        check=False,
                        stdin=subprocess.DEVNULL,
                        pass_fds=(*listener_fds, child_end.fileno(), stack_file.fileno()),
                        start_new_session=True,
                        env={**os.environ, SPEC_ENV: spec.to_json()},
                        deliver_cancel=_kill,
                    )
                )
            except OSError as exc:
                logger.error("Could not start a worker process: %s", exc)
                return
            finally:
                child_end.close()  # the worker's end: only the worker may hold it
            worker.process = process
            logger.info("Started worker process [%d]", process.pid)
            if worker.term_sent:  # asked to stop while it was being spawned
                worker.terminate(again=True)
            nursery.start_soon(_kill_when_late, worker)
            link = trio.SocketStream(trio.socket.from_stdlib_socket(parent_end))
            await _follow(worker, link, stack_file, healthcheck, on_event, on_blocked)
            await process.wait()
            worker.stop_scope.cancel()  # ends _kill_when_late; run_process ends by itself


async def _kill_when_late(worker: WorkerProcess) -> None:
    with worker.stop_scope:
        await trio.sleep_forever()
    if worker.process is None or worker.process.returncode is not None:
        return  # it exited in time
    logger.warning("Worker process [%d] did not stop in time; killing it", worker.pid)
    worker.kill()


async def _follow(
    worker: WorkerProcess,
    link: trio.SocketStream,
    stack: IO[bytes],
    healthcheck: float,
    on_event: Callable[[WorkerProcess, WorkerEvent], None],
    on_blocked: Callable[[WorkerProcess], None],
) -> None:
    """Read status lines until the worker closes the link (it exited).

    After the first line, silence longer than ``healthcheck`` means the worker's event loop
    is blocked.
    """
    heard = False
    buffer = b""
    while True:
        timeout = healthcheck if heard and not worker.killed else math.inf
        with trio.move_on_after(timeout) as scope:
            try:
                data = await link.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
        if scope.cancelled_caught:
            await _blocked(worker, stack, healthcheck)
            on_blocked(worker)
            continue
        if not data:
            return
        heard = True
        *lines, buffer = (buffer + data).split(b"\n")
        for line in lines:
            try:
                event = WorkerEvent.decode(line)
            except ValueError:
                logger.debug("Worker process [%d] sent %r", worker.pid, line)
                continue
            on_event(worker, event)


async def _blocked(worker: WorkerProcess, stack: IO[bytes], healthcheck: float) -> None:
    """Report a worker whose loop is blocked, with its stack, then kill it."""
    worker.blocked = True
    dump = await _read_stack_dump(stack)
    logger.error(
        "Worker process [%d] sent no heartbeat for %.1fs: its event loop is blocked. "
        "Replacing it. Where it was stuck:\n%s",
        worker.pid,
        healthcheck,
        dump or "(no stack dump received)",
    )
    worker.retire()
    worker.kill()


async def _kill(process: trio.Process) -> None:
    """run_process's deliver_cancel: cancellation is the hard stop (graceful is SIGTERM)."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await trio.lowlevel.checkpoint()


async def _read_stack_dump(stack: IO[bytes]) -> str:
    """The worker's faulthandler output (it writes it just before we notice the silence)."""
    deadline = trio.current_time() + STACK_DUMP_WAIT
    while True:
        stack.seek(0)
        data = stack.read(STACK_DUMP_MAX_CHARS)
        if data or trio.current_time() >= deadline:
            return data.decode("utf-8", "replace").rstrip()
        await trio.sleep(0.05)
