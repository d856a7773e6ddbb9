"""The malloc tuning of `sclatent.allocator`: freed large CPU buffers are reused instead of re-faulted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Four 20 MB malloc'ed buffers written and freed five times. With glibc's defaults the freed 80 MB at the top of the
# heap exceeds the (dynamic) trim threshold, goes back to the kernel, and the next round page-faults every
# page again; with the tuned thresholds the pages stay mapped.
_ROUNDS = """
import ctypes, ctypes.util, resource
from sclatent.allocator import tune_malloc
tuned = tune_malloc()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    bufs = [libc.malloc(20_000_000) for _ in range(4)]
    for b in bufs:
        ctypes.memset(b, 1, 20_000_000)
    for b in bufs:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(tuned), sum(faults[1:]))
"""


def _faults(tuning: str) -> tuple[bool, int]:
    env = {**os.environ, "SCLATENT_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", _ROUNDS], env=env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "1", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tuned_malloc_reuses_freed_buffers() -> None:
    tuned, faults_tuned = _faults("1")
    untuned, faults_default = _faults("0")
    if not tuned:
        pytest.skip("this libc does not accept mallopt (not glibc)")
    assert not untuned  # SCLATENT_MALLOC_TUNING=0 keeps the defaults
    pages = 4 * 20_000_000 // 4096  # pages touched per round
    assert faults_default > 3 * pages  # the defaults re-fault (most of) every page in rounds 2-5
    assert faults_tuned < faults_default / 10


def test_tune_malloc_is_idempotent() -> None:
    from sclatent.allocator import tune_malloc

    first = tune_malloc()
    assert tune_malloc() == first
