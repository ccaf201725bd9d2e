"""What the parent of ``--workers N`` answers on the admin endpoints (layer 6).

With worker processes, the instance's health is the parent's to tell: it alone sees every
worker. :class:`ParentHealth` is the :class:`trioserve.admin.Health` the parent's admin
listener asks; :class:`~trioserve.workers.supervisor.Supervisor` tells it what happens to
its workers (spawned, ready, blocked, exited) and that it is stopping (SIGTERM).

* ready: not stopping, and at least one worker is ready and not retiring. A worker being
  replaced by a rolling restart (SIGHUP) or ``--limit-max-requests`` retires only once its
  replacement is ready, so the instance stays ready throughout.
* live: no worker is blocked past ``--timeout-worker-healthcheck``, nor has been since
  without a worker becoming ready again.
* metrics: the sum of each worker's counters as of its last heartbeat
  (``WorkerEvent.stats``), plus the final counters of every worker that exited (so the
  counters are monotonic across worker restarts), plus the parent's own worker counters.
"""

from __future__ import annotations

from ..metrics import Sample, add_sample
from .process import WorkerProcess


class ParentHealth:
    """The admin endpoints' view of a supervised instance."""

    def __init__(self, workers: set[WorkerProcess], initial_workers: int) -> None:
        self.workers = workers  # the supervisor's own set (updated in place)
        self.initial_workers = initial_workers
        self.stopping = False
        self.recovering = False  # a blocked worker's replacement is not ready yet
        self.retired: Sample = {}  # the counters of workers that exited
        self.starts = 0
        self.exits: dict[str, int] = {}
        self.healthcheck_failures = 0

    # -- what the supervisor reports ----------------------------------------------------

    def stop(self) -> None:
        """SIGINT/SIGTERM: not ready any more (the workers drain, maybe after
        ``--shutdown-delay``)."""
        self.stopping = True

    def worker_spawned(self) -> None:
        self.starts += 1

    def worker_ready(self) -> None:
        self.recovering = False

    def worker_blocked(self) -> None:
        self.healthcheck_failures += 1
        self.recovering = True

    def worker_exited(self, worker: WorkerProcess) -> None:
        """Keep ``worker``'s counters (its last report) and count its exit by cause."""
        if worker.stats is not None:
            add_sample(self.retired, worker.stats, counters_only=True)
        if worker.blocked:
            cause = "blocked"
        elif worker.killed:
            cause = "killed"
        elif worker.retiring:
            cause = "stopped"
        elif worker.ready_at is not None:
            cause = "crashed"
        else:
            cause = "failed_to_start"
        self.exits[cause] = self.exits.get(cause, 0) + 1

    # -- admin.Health -------------------------------------------------------------------

    def live(self) -> bool:
        return not self.recovering and not any(w.blocked for w in self.workers)

    def ready(self) -> bool:
        return not self.stopping and any(
            w.ready_at is not None and not w.retiring and not w.blocked for w in self.workers
        )

    def metrics_sample(self) -> Sample:
        total = dict(self.retired)
        for worker in self.workers:
            if worker.stats is not None:
                add_sample(total, worker.stats)
        total["draining"] = int(self.stopping)
        total["worker_starts"] = self.starts
        total["worker_restarts"] = max(0, self.starts - self.initial_workers)
        total["worker_healthcheck_failures"] = self.healthcheck_failures
        total["workers"] = sum(1 for w in self.workers if w.process is not None)
        for cause, count in self.exits.items():
            total[f"worker_exits|{cause}"] = count
        return total
