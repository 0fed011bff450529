"""Imported only by the parse workers' fork server (`pgguard.proxy.offload`'s preload list),
never by the proxy: importing it lowers the importing process to the lowest priority.

Why at import: multiprocessing's fork server imports its preload list once, at its start, and
every worker is forked from it. A forked worker then re-imports the proxy's main module (for
``pgguard serve`` that is ``pgguard.cli`` with Typer, rich and the rest: ~0.4 s of CPU) as
``__mp_main__`` *before* the pool's initializer runs (multiprocessing.spawn.prepare). Lowered
here, the fork server's children inherit SCHED_IDLE and nice 19 from the fork on, so a worker
restarted after an over-budget statement never competes with the proxy's loop, not even while
it starts.

Invariant: the proxy's own process never imports this module (it would lower itself).
"""

from __future__ import annotations

from pgguard.proxy.offload_worker import lowest_priority

lowest_priority()
