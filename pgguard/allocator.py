"""How the C allocator under the Python process keeps memory it has freed.

Owns: `retain_freed_memory`.

Why: every shipping round the ledger builds a pack of ordinary statements (a few hundred
kilobytes of JSON, joined and copied on its way to asyncpg) and frees it again. With glibc's
defaults, blocks that large are mmap'd and munmap'd each time, or the top of the heap is trimmed
and grown again, so every round pays the kernel for fresh zeroed pages: measured with
``bench/pgbench_compare.py`` at one client, about 0.6 minor page faults per recorded statement,
several µs of system CPU each on a virtual machine, and none without the ledger. Fixed
thresholds (``mallopt``) make glibc serve such blocks from the heap and keep up to a bounded
amount of freed memory for the next round instead.

glibc only: elsewhere (musl, macOS) the call is skipped, and the proxy runs as it would anyway.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MIB = 1024 * 1024
MMAP_THRESHOLD = 4 * MIB  # blocks below this come from the heap (glibc's dynamic maximum is 32)


def retain_freed_memory(retain_mib: int) -> bool:
    """Keep up to ``retain_mib`` MiB of freed memory in the process (0: leave glibc's defaults).

    Returns True when the allocator accepted the settings."""
    if retain_mib <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    retain = retain_mib * MIB
    settings = (
        (M_MMAP_THRESHOLD, min(MMAP_THRESHOLD, retain)),
        (M_TRIM_THRESHOLD, retain),
        (M_TOP_PAD, min(retain, 8 * MIB)),  # grow the heap in steps, not page by page
    )
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing.
    accepted = all(mallopt(param, value) == 1 for param, value in settings)
    if not accepted:
        log.debug("the C allocator did not accept mallopt(); its defaults stay")
    return accepted
