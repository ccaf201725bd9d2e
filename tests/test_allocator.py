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

# What serving a 64 KiB echo allocates and frees per request, 500 times; prints the minor
# page faults per round.
PATTERN = """
import resource, sys
if sys.argv[1] == "tuned":
    from trioserve.runner import tune_allocator
    tune_allocator()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
for _ in range(500):
    body = b"x" * 65536 + b"y"
    framed = body + b"z"
    buffer = bytearray(body)
    buffer += framed
    del body, framed, buffer
print((faults() - before) / 500)
"""


def faults_per_round(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True
    ).stdout
    return float(out)


def test_tuned_allocator_does_not_fault_freed_bodies_back_in() -> None:
    assert faults_per_round("default") > 10  # glibc's 128 KiB trim threshold
    assert faults_per_round("tuned") < 1
