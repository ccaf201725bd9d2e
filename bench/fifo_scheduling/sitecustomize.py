"""Bench-only diagnostic: trio with first-in-first-out batches (the ``trioserve-fifo`` row).

trio runs each batch of runnable tasks in the order they became runnable or in the reverse
order, by a coin flip per batch (``trio/_core/_run.py``: "50% chance of reversing the
batch"; trio issue #32 discusses other scheduling models). Under a closed-loop load where
every connection is served once per batch, a task served early in one batch is served late
in the next half of the time, so a request can wait up to two batch lengths: p99 latency
about twice p50, where asyncio's FIFO ready queue keeps it near p50.

This file is put on ``PYTHONPATH`` only for the ``trioserve-fifo`` server process; Python
imports it at start-up. It replaces trio's private random source so that the coin always
says "reverse", which (since batches are popped from the end) is FIFO order. trioserve's
code is unchanged; the row only shows how much of the latency tail is the scheduler's.
Never use this outside the benchmark: it relies on a private name of trio.
"""

from __future__ import annotations

import random

import trio._core._run as _trio_run


class _AlwaysReverse(random.Random):
    def random(self) -> float:
        return 0.0


_trio_run._r = _AlwaysReverse()  # type: ignore[attr-defined]
