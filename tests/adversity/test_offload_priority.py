"""The workers that classify long statements only ever use CPU time nobody else wants.

Real worker processes (the fork server, the rules loaded), as `pgguard serve` starts them.
"""

from __future__ import annotations

import asyncio
import os
import sys

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


def test_workers_are_sched_idle_and_nice_19() -> None:
    async def scenario() -> list[tuple[int, int]]:
        offload = ParseOffload(
            rules_dir=SHIPPED_RULES_DIR,
            mode="enforce",
            protected=ProtectedNames(schema="pgguard", channels=()),
            workers=1,
            threshold=4096,
            budget=30.0,
        )
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
