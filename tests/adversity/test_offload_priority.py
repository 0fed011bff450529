"""The workers that classify long statements only ever use CPU time nobody else wants.

Real worker processes (the fork server, the rules loaded), as `pgguard serve` starts them.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from pgguard.policy import SHIPPED_RULES_DIR
from pgguard.proxy import offload_worker
from pgguard.proxy.offload import ParseOffload
from pgguard.sql.statenames import ProtectedNames

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux scheduling")


async def worker_pids(offload: ParseOffload) -> list[int]:
    await offload.start()
    pool = offload._pool
    futures = [pool.submit(offload_worker.ready) for _ in range(2)]
    return sorted({await asyncio.wrap_future(f) for f in futures})


def one_worker() -> ParseOffload:
    return ParseOffload(
        rules_dir=SHIPPED_RULES_DIR,
        mode="enforce",
        protected=ProtectedNames(schema="pgguard", channels=()),
        workers=1,
        threshold=4096,
        budget=30.0,
    )


def test_workers_are_sched_idle_and_nice_19() -> None:
    async def scenario() -> list[tuple[int, int]]:
        offload = one_worker()
        try:
            pids = await worker_pids(offload)
            return [
                (os.sched_getscheduler(pid), os.getpriority(os.PRIO_PROCESS, pid)) for pid in pids
            ]
        finally:
            await offload.close()

    policies = asyncio.run(scenario())
    assert policies == [(os.SCHED_IDLE, 19)]
    # The proxy's own process keeps the ordinary policy.
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_the_fork_server_workers_start_from_is_sched_idle_and_nice_19_too() -> None:
    """A forked worker re-imports the proxy's main module (multiprocessing's __mp_main__)
    before its initializer lowers it: the fork server it inherits its priority from must already
    be at the lowest."""

    async def scenario() -> tuple[int, int]:
        offload = one_worker()
        try:
            (pid,) = await worker_pids(offload)
            # Field 4 is the parent's pid; the command name (field 2) may hold spaces, so
            # count from its closing parenthesis (proc(5)).
            stat = Path(f"/proc/{pid}/stat").read_text()  # noqa: ASYNC240 - a tiny proc file
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            return os.sched_getscheduler(parent), os.getpriority(os.PRIO_PROCESS, parent)
        finally:
            await offload.close()

    assert asyncio.run(scenario()) == (os.SCHED_IDLE, 19)
