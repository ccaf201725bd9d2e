"""The server process keeps freed heap memory instead of faulting it back in per request."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not os.confstr("CS_GNU_LIBC_VERSION"),
    reason="glibc only (tune_allocator is a no-op elsewhere)",
)

# Bodies of a few dozen KiB allocated and freed over and over (what serving 64 KiB echoes
# does), 2 MiB of them at a time so that the freed memory sits at the top of the heap
# whatever the process's layout; prints the minor page faults per round.
PATTERN = """
import resource, sys
if sys.argv[1] == "tuned":
    from trioserve.workers.serving import tune_allocator
    tune_allocator()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
for _ in range(100):
    bodies = [b"x" * (64 * 1024) for _ in range(32)]  # (written: every page touched)
    del bodies
print((faults() - before) / 100)
"""


def faults_per_round(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True
    ).stdout
    return float(out)


def test_tuned_allocator_does_not_fault_freed_bodies_back_in() -> None:
    # With glibc's 128 KiB trim threshold part or all of the 2 MiB (512 pages) is given
    # back and faulted in again every round, depending on the process's heap layout.
    default = faults_per_round("default")
    tuned = faults_per_round("tuned")
    assert tuned < 10
    assert default > 5 * tuned, (default, tuned)
