"""The parent process of ``--workers N`` and ``--reload`` (layer 4).

The parent binds the listening socket once and runs worker processes
(``python -m trioserve.workers.worker``, fresh interpreters) that inherit it by file descriptor. It
never imports the app. Sockets passed by socket activation (several at once) are inherited
the same way; with ``--reuse-port`` the parent binds nothing and each worker binds its own.
Its task tree::

    run_supervisor() ── trio.run(Supervisor.run)
    └── nursery "workers"
        ├── signal handler       SIGINT/SIGTERM: drain all; SIGHUP: rolling restart;
        │                        SIGTTIN/SIGTTOU: one worker more/less
        ├── file watcher         --reload only (``reload.watch_changes``)
        ├── the manager loop     (the nursery body) keeps the wanted number of workers
        └── one task per worker process (``_run_worker`` → ``process.run_worker_process``)
            ├── run_process([python, -m, trioserve.workers.worker], pass_fds=…, new session)
            ├── kill-when-late   sleeps in a cancel scope whose deadline is set on SIGTERM
            └── (body) reads the worker's status lines: ready, draining, failed, heartbeats

Policies, all decided in one place (:meth:`Supervisor._reconcile`, run after every event):

* A worker that exits without being asked is logged with its exit status and replaced; a
  run of early exits backs off exponentially (0.1 s … 10 s).
* Boot: if every worker fails before any became ready (import error, lifespan startup
  failure), the parent stops and raises the app's error, shown once.
* SIGHUP: start one new worker, wait until it is ready, drain one old worker; repeat. A new
  worker that fails to start aborts the restart and the old workers keep serving.
* ``--limit-max-requests``: the worker reports ``draining`` and the replacement starts at
  once, while it finishes its requests. The listening socket stays open in the parent, so
  connections arriving meanwhile wait in the kernel's backlog instead of being refused.
* ``--timeout-worker-healthcheck``: a worker that sends no heartbeat for that long has a
  blocked event loop; its stack (written by ``faulthandler`` in the worker) is logged, and it
  is killed and replaced.
* Stop: one SIGTERM per worker (each drains as a single process would), then SIGKILL after
  ``--timeout-graceful-shutdown`` + :data:`SHUTDOWN_MARGIN`; a second SIGINT/SIGTERM sends
  another SIGTERM (the workers' "stop now") and kills after :data:`HARD_STOP_TIMEOUT`.
* ``--admin-bind``/``--admin-uds``: the parent serves ``/livez``, ``/readyz`` and
  ``/metrics`` for the whole instance (:mod:`trioserve.workers.health`); workers send their
  counters with their heartbeats. On SIGTERM readiness goes off at once and, with
  ``--shutdown-delay``, the workers keep serving that long before they are told to drain.
* Workers run in their own session, so a terminal's Ctrl-C reaches only the parent; they
  watch their link to the parent and drain on their own if it dies, even by SIGKILL.
* ``--reload`` (one worker): on a change the worker is stopped first, then a new one is
  started; if it fails to start, the error is logged and nothing happens until the next
  change.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
from collections.abc import AsyncIterator
from typing import Final

import trio

from ..admin import serve_admin
from ..config import Config
from ..connection.listeners import BoundSocket, bind_parent_sockets, close_sockets
from ..errors import AppLoadError, BindError, LifespanError
from .health import ParentHealth
from .messages import WorkerEvent
from .process import WorkerProcess, run_worker_process
from .reload import Reloader, choose_reloader, watch_changes

logger = logging.getLogger(__name__)

SHUTDOWN_MARGIN: Final = 5.0  # beyond --timeout-graceful-shutdown: lifespan shutdown, exit
HARD_STOP_TIMEOUT: Final = 7.0  # after a second signal (a worker bounds lifespan shutdown at 5 s)
RELOAD_STOP_TIMEOUT: Final = 5.0  # --reload restart without --timeout-graceful-shutdown
BACKOFF_INITIAL: Final = 0.1
BACKOFF_MAX: Final = 10.0
STABLE_UPTIME: Final = 10.0  # a crash this long after the previous one restarts at once
HANDLED_SIGNALS: Final = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


def run_supervisor(app: str, config: Config) -> None:
    """Bind, then run and supervise worker processes until SIGINT/SIGTERM.

    Args:
        app: the import string each worker loads (``"main:app"``).
        config: ``workers`` > 1 or ``reload``.

    Raises:
        OSError: the socket could not be bound.
        AppLoadError, LifespanError, OSError: every worker failed to start (not with
            ``--reload``, which waits for the next change instead).
    """
    bound = bind_parent_sockets(config)
    try:
        trio.run(Supervisor(app, config, bound).run)
    finally:
        close_sockets(bound, config)


def describe_exit(returncode: int | None) -> str:
    """``exit code 1`` / ``killed by SIGKILL`` for logs."""
    if returncode is None:
        return "not started"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Supervisor:
    """Keeps ``config.workers`` worker processes serving ``app`` on inherited sockets
    (or, with ``--reuse-port`` and no ``bound`` socket, on sockets of their own)."""

    def __init__(self, app: str, config: Config, bound: list[BoundSocket]) -> None:
        self.app = app
        self.config = config
        self.bound = bound
        self.fds = tuple(b.sock.fileno() for b in bound)
        # Socket-activated sockets are passed on by the same protocol (at the same fds).
        self.activated = [b.activation_name for b in bound if b.activation_name is not None]
        # The parent serves the admin endpoints and waits out --shutdown-delay; workers
        # only count (metrics) and report their counters with their heartbeats.
        worker_config = dataclasses.replace(
            config,
            workers=1,
            reload=False,
            admin_bind=None,
            admin_uds=None,
            metrics=config.collects_metrics,
            shutdown_delay=0.0,
        )
        if bound and not self.activated:
            worker_config = dataclasses.replace(
                worker_config, fd=self.fds[0], uds=None, reuse_port=False
            )
        self.worker_options = worker_config.to_dict()
        self.reload = config.reload
        self.reloader: Reloader = "WatchFiles"  # --reload: the mechanism, chosen in run()
        self.desired = config.workers
        self.workers: set[WorkerProcess] = set()
        self.generation = 0
        self.stopping = False
        self.stop_deadline = math.inf
        self.ever_ready = False
        self.boot_failures: list[tuple[WorkerProcess, WorkerEvent | None]] = []
        self.fatal: Exception | None = None
        self.paused = False  # --reload: the last start failed; wait for a change
        self.backoff = 0.0
        self.last_crash_at = -math.inf
        self.next_spawn_at = -math.inf
        self._wake = trio.Event()
        self.health = ParentHealth(self.workers, config.workers)
        self._delay_over = trio.Event()  # a second SIGTERM cuts --shutdown-delay short

    # -- the task tree ------------------------------------------------------------------

    async def run(self) -> None:
        """Supervise until SIGINT/SIGTERM (or a failed boot); returns once every worker
        process has exited.

        Raises:
            AppLoadError, LifespanError, OSError: every worker failed to start.
        """
        if self.reload:
            self.reloader = choose_reloader(self.config)
            logger.info("Started reloader process [%d] using %s", os.getpid(), self.reloader)
        else:
            logger.info("Started parent process [%d]", os.getpid())
        urls = [b.url for b in self.bound]
        if not self.bound:  # --reuse-port: each worker binds host:port
            host = self.config.bind_host
            urls = [f"http://{f'[{host}]' if ':' in host else host}:{self.config.port}"]
        for url in urls:
            if self.config.is_ssl:
                url = url.replace("http://", "https://", 1)
            logger.info("trioserve running on %s (Press CTRL+C to quit)", url)
        with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._handle_signals, signals)
                if self.config.has_admin:
                    await nursery.start(serve_admin, self.config, self.health)
                if self.reload:
                    nursery.start_soon(
                        functools.partial(
                            watch_changes, self.config, self._files_changed, self.reloader
                        )
                    )
                await self._maintain(nursery)
                if self.config.shutdown_delay and self.fatal is None:
                    await self._delay_stop()
                await self._stop_all()
                nursery.cancel_scope.cancel()
        if self.fatal is not None:
            raise self.fatal
        logger.info("Finished parent process [%d]", os.getpid())

    def wake(self) -> None:
        """Ask the manager loop to look at the state again."""
        self._wake.set()

    async def _maintain(self, nursery: trio.Nursery) -> None:
        while not self.stopping and self.fatal is None:
            self._wake = trio.Event()
            delay = self._reconcile(nursery)
            with trio.move_on_after(delay):
                await self._wake.wait()

    async def _delay_stop(self) -> None:
        """``--shutdown-delay``: readiness is off already (``health.stop()``); the workers
        keep serving normally until the delay is over, then drain."""
        delay = self.config.shutdown_delay
        logger.info("Not ready any more; serving %.1fs more before stopping the workers", delay)
        with trio.move_on_after(delay):
            await self._delay_over.wait()

    async def _stop_all(self) -> None:
        """One SIGTERM per worker, then wait (the kill-when-late tasks bound the wait).

        The parent's copy of the listening socket is closed first: once the workers have
        closed theirs too, new connections are refused instead of waiting in a backlog
        that nobody will serve.
        """
        for b in self.bound:
            b.sock.close()
        for worker in list(self.workers):
            self._retire(worker)
        while self.workers:
            self._wake = trio.Event()
            await self._wake.wait()

    async def _handle_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self._on_signal(signal.Signals(signum))

    def _on_signal(self, sig: signal.Signals) -> None:
        name = sig.name
        if sig in (signal.SIGINT, signal.SIGTERM):
            if not self.stopping:
                logger.info("Received %s, stopping the workers gracefully", name)
                self.stopping = True
                self.health.stop()
            else:
                logger.warning("Received %s again, stopping the workers now", name)
                self._delay_over.set()
                self.stop_deadline = trio.current_time() + HARD_STOP_TIMEOUT
                for worker in self.workers:
                    worker.hurry(self.stop_deadline)
        elif self.stopping:
            logger.info("Received %s while stopping; ignored", name)
        elif sig == signal.SIGHUP:
            if self.reload:
                self._files_changed([])
            else:
                logger.info("Received SIGHUP, restarting the workers one by one")
                self.generation += 1
        elif self.reload:
            logger.info("Received %s; ignored with --reload (one worker)", name)
        elif sig == signal.SIGTTIN:
            self.desired += 1
            logger.info("Received SIGTTIN, increasing the number of workers to %d", self.desired)
        elif sig == signal.SIGTTOU:
            if self.desired > 1:
                self.desired -= 1
            logger.info("Received SIGTTOU, decreasing the number of workers to %d", self.desired)
        self.wake()

    def _files_changed(self, paths: list[str]) -> None:
        if self.stopping:
            return
        if paths:
            shown = ", ".join(repr(p) for p in paths[:5]) + (" ..." if len(paths) > 5 else "")
            logger.warning("%s detected changes in %s. Reloading...", self.reloader, shown)
        else:
            logger.info("Received SIGHUP. Reloading...")
        self.paused = False
        for worker in list(self.workers):
            if not worker.retiring:
                self._retire(worker)
        self.wake()

    # -- policy -------------------------------------------------------------------------

    def _reconcile(self, nursery: trio.Nursery) -> float:
        """Start or retire workers to reach the wanted state; return when to look again."""
        active = [w for w in self.workers if not w.retiring]
        if self.reload and (self.paused or len(active) < len(self.workers)):
            # --reload: the old process exits before the new one starts (the app may hold
            # something exclusive); after a failed start, wait for the next change.
            return math.inf
        if not self.ever_ready and self.boot_failures:
            return math.inf  # boot: wait until one worker is up, or all have failed

        outdated = sorted(
            (w for w in active if w.generation < self.generation), key=lambda w: w.started_at
        )
        starting = [w for w in active if w.generation == self.generation and w.ready_at is None]
        # During a rolling restart one extra worker may exist while it starts.
        allowed = self.desired + (1 if outdated and starting else 0)
        if len(active) > allowed:
            newest_first = sorted(
                (w for w in active if w not in outdated), key=lambda w: -w.started_at
            )
            for worker in (outdated + newest_first)[: len(active) - allowed]:
                self._retire(worker)
                active.remove(worker)
                if worker in outdated:
                    outdated.remove(worker)

        missing = self.desired - len(active)
        if outdated and not starting and missing <= 0:
            missing = 1  # the next step of a rolling restart
        if missing <= 0:
            return math.inf
        now = trio.current_time()
        if now < self.next_spawn_at:
            return self.next_spawn_at - now
        for _ in range(missing):
            self._spawn(nursery)
        return math.inf

    def _spawn(self, nursery: trio.Nursery) -> None:
        worker = WorkerProcess(self.generation)
        self.workers.add(worker)
        self.health.worker_spawned()
        nursery.start_soon(self._run_worker, worker)

    def _retire(self, worker: WorkerProcess) -> None:
        """Stop counting ``worker`` and ask it to drain (SIGTERM), with a kill deadline."""
        grace = self.config.timeout_graceful_shutdown
        if grace is None:
            timeout = RELOAD_STOP_TIMEOUT if self.reload and not self.stopping else math.inf
        else:
            timeout = grace + SHUTDOWN_MARGIN
        worker.retire(min(trio.current_time() + timeout, self.stop_deadline))
        self.wake()

    def _record_crash(self) -> None:
        """Back off when workers keep dying: 0.1 s doubling to 10 s, reset after a calm."""
        now = trio.current_time()
        if now - self.last_crash_at > STABLE_UPTIME:
            self.backoff = 0.0
        else:
            self.backoff = min(max(self.backoff * 2, BACKOFF_INITIAL), BACKOFF_MAX)
        self.last_crash_at = now
        self.next_spawn_at = now + self.backoff

    def _on_event(self, worker: WorkerProcess, event: WorkerEvent) -> None:
        if event.stats is not None:
            worker.update_stats(event.stats)
        if event.event == "beat":
            return
        if event.event == "ready":
            worker.mark_ready()
            self.health.worker_ready()
            logger.info("Worker process [%d] is ready", worker.pid)
            if not self.ever_ready:
                self.ever_ready = True
                for failed, failure in self.boot_failures:
                    logger.error(
                        "Worker process [%d] failed to start:\n%s",
                        failed.pid,
                        _failure_text(failed, failure),
                    )
                if self.boot_failures:
                    self._record_crash()
                self.boot_failures.clear()
        elif event.event == "draining":
            if not worker.retiring:
                logger.info("Worker process [%d] is draining; starting its replacement", worker.pid)
                worker.retire()
        elif event.event == "failed":
            worker.mark_failed(event)
        self.wake()

    def _on_exit(self, worker: WorkerProcess) -> None:
        self.workers.discard(worker)
        self.health.worker_exited(worker)
        self.wake()
        returncode = worker.process.returncode if worker.process is not None else None
        status = describe_exit(returncode)
        if worker.retiring:
            if not worker.killed:
                logger.info("Worker process [%d] stopped (%s)", worker.pid, status)
            return
        if worker.ready_at is not None:
            logger.warning(
                "Worker process [%d] died unexpectedly (%s); starting a new one", worker.pid, status
            )
            self._record_crash()
            return
        # It exited before it was ready: the app could not be loaded or started.
        text = _failure_text(worker, worker.failure)
        if self.reload:
            logger.error(
                "Worker process [%d] failed to start:\n%s\n"
                "Waiting for a file change before starting again.",
                worker.pid,
                text,
            )
            self.paused = True
        elif not self.ever_ready:
            self.boot_failures.append((worker, worker.failure))
            if not any(not w.retiring for w in self.workers):
                self.fatal = self._boot_error(worker.failure, text)
        else:
            logger.error("Worker process [%d] failed to start:\n%s", worker.pid, text)
            self._record_crash()
            outdated = [
                w for w in self.workers if not w.retiring and w.generation < self.generation
            ]
            if outdated and worker.generation == self.generation:
                logger.error("Rolling restart aborted; the old workers keep serving")
                for old in outdated:
                    old.renew(self.generation)

    def _boot_error(self, failure: WorkerEvent | None, text: str) -> Exception:
        logger.error("Every worker process failed to start.")
        if failure is not None and failure.kind == "load":
            return AppLoadError("\n" + text if "\n" in text else text)
        if failure is not None and failure.kind == "os":
            return BindError(text)  # the CLI reports it in one line (exit 1)
        logger.error("%s", text)  # the CLI prints only "Application startup failed."
        return LifespanError(f"Application startup failed: {text}")

    # -- one worker process -------------------------------------------------------------

    async def _run_worker(self, worker: WorkerProcess) -> None:
        """Run one worker process and follow its status until it exits."""
        try:
            await run_worker_process(
                worker,
                app=self.app,
                worker_options=self.worker_options,
                listener_fds=self.fds,
                activated=self.activated,
                healthcheck=self.config.timeout_worker_healthcheck,
                on_event=self._on_event,
                on_blocked=self._on_blocked,
            )
        finally:
            self._on_exit(worker)

    def _on_blocked(self, worker: WorkerProcess) -> None:
        """A blocked worker was reported and killed (``run_worker_process``)."""
        self.health.worker_blocked()
        self._record_crash()  # a worker that blocks at every start must not spin
        self.wake()


def _failure_text(worker: WorkerProcess, failure: WorkerEvent | None) -> str:
    if failure is not None and failure.error:
        return failure.error
    returncode = worker.process.returncode if worker.process is not None else None
    return f"The worker process exited ({describe_exit(returncode)}) before it was ready."
