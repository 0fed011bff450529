"""The allocator tuning `pgguard serve` applies: freed blocks stay in the process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from pgguard.allocator import retain_freed_memory
from pgguard.settings import Settings

# A ledger round in miniature: a megabyte of blocks malloc'd (each above pymalloc's 512 bytes),
# touched and freed again, 50 times. With glibc's defaults the freed top of the heap is trimmed
# (returned to the kernel) and the next round faults its pages in afresh.
CHURN = textwrap.dedent(
    """
    import resource, sys
    from pgguard.allocator import retain_freed_memory
    tuned = retain_freed_memory(int(sys.argv[1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        blocks = [bytearray(4000) for _ in range(256)]  # zero-filled: every page is touched
        del blocks
    print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def churn_faults(retain_mib: int) -> tuple[bool, int]:
    # Without the variables that change how Python allocates: under PYTHONTRACEMALLOC the
    # untuned child faulted 251 times instead of about 10,000.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "PYTHONTRACEMALLOC")}
    out = subprocess.run(
        [sys.executable, "-c", CHURN, str(retain_mib)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is for glibc")
def test_retained_memory_spares_the_page_faults_of_large_blocks() -> None:
    untuned, faults_default = churn_faults(0)
    tuned, faults_tuned = churn_faults(64)
    assert (untuned, tuned) == (False, True)
    assert faults_default >= 49 * 200  # every round faults in (most of) its 250 pages again
    assert faults_tuned < 2 * 256  # the first round's pages are reused by the others


def test_zero_leaves_the_allocator_alone() -> None:
    assert retain_freed_memory(0) is False


def test_the_setting_is_validated() -> None:
    assert Settings.model_validate({}).limits.allocator_retain_mib == 64
    with pytest.raises(ValueError, match="allocator_retain_mib"):
        Settings.model_validate({"limits": {"allocator_retain_mib": -1}})
