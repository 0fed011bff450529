"""CPU µs per query of pgguard's relay logic alone, for this tree and others, in one run.

pgbench through a proxy measures the logic plus the kernel's socket work, and on a shared
machine the second swamps the first. This drives a real `Connection` (the real gate, assembled by
`pgguard.proxy.assembly.start` against an embedded PostgreSQL, ledger off) with pgbench -S's own
messages - a simple Query, or Parse/Bind/Describe/Execute/Sync - and the server's answers, with
sinks in place of the two transports, and reports the best of several rounds of process CPU time
per query. Each tree runs in a child process of its own with ``PYTHONPATH`` pointing at it, so
the figures of two commits come from one run on one machine:

    git worktree add /tmp/before <commit>
    python bench/relay_logic.py --tree /tmp/before --tree . --repeats 5

``--repeats N`` runs the trees N times interleaved (A B A B ...), so load that comes and goes hits
both alike, and ends with each tree's lowest and median figure over the repeats: one child's
best-of-rounds still moves by about 0.3 µs between children on the shared VM.

Speed is reported, never judged.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

QUERIES = 20_000
ROUNDS = 9
SQL = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"


def _msg(kind: str, body: bytes) -> bytes:
    return kind.encode() + struct.pack("!i", len(body) + 4) + body


def extended_request(aid: int) -> bytes:
    value = str(aid).encode()
    bind = b"\0\0" + struct.pack("!hhi", 0, 1, len(value)) + value + struct.pack("!h", 0)
    return (
        _msg("P", b"\0" + SQL + b"\0" + struct.pack("!h", 0))
        + _msg("B", bind)
        + _msg("D", b"P\0")
        + _msg("E", b"\0" + struct.pack("!i", 0))
        + _msg("S", b"")
    )


def simple_request(aid: int) -> bytes:
    return _msg("Q", b"SELECT abalance FROM pgbench_accounts WHERE aid = %d;\0" % aid)


_COLUMN = b"abalance\0" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0)
ROWS = (
    _msg("T", struct.pack("!h", 1) + _COLUMN)
    + _msg("D", struct.pack("!hi", 1, 1) + b"0")
    + _msg("C", b"SELECT 1\0")
    + _msg("Z", b"I")
)
REPLIES = {"simple": ROWS, "extended": _msg("1", b"") + _msg("2", b"") + ROWS}
REQUESTS = {"simple": simple_request, "extended": extended_request}


class Sink:
    """A transport that takes every write and does nothing with it."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def set_protocol(self, protocol: object) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def measure(mode: str) -> float:
    """Best-of-ROUNDS CPU µs per query of ``mode`` through this interpreter's pgguard."""
    from pgguard.embedded import EmbeddedPostgres
    from pgguard.proxy import assembly
    from pgguard.proxy.connection import Connection
    from pgguard.proxy.link import Link
    from pgguard.settings import Settings

    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="pgguard-relay-logic-")) / "data")
    pg.start()
    try:
        extra = {"data_dir": tempfile.mkdtemp()} if "data_dir" in Settings.model_fields else {}
        settings = Settings.load(
            listen={"host": "127.0.0.1", "port": 0},
            upstream={"dsn": pg.unix_dsn()},
            agents=[{"name": "bench", "password": "bench-password", "owner": "o@example.com"}],
            ledger={"enabled": False},
            **extra,
        )
        running = await assembly.start(settings)
        client, upstream = Link("client"), Link("upstream")
        client.transport, upstream.transport = Sink(), Sink()  # type: ignore[assignment]
        conn = Connection(running.proxy.ctx, client, "127.0.0.1")
        login = types.SimpleNamespace(
            agent=types.SimpleNamespace(name="bench", owner="o@example.com"),
            database="postgres",
            sasl_final=b"",
            leftover=b"",
            parameters={},
            version=196608,
        )
        up = types.SimpleNamespace(
            parameters={"standard_conforming_strings": "on", "client_encoding": "UTF8"},
            txn_status=b"I",
            link=upstream,
            pid=1,
            key=b"key",
            welcome=_msg("Z", b"I"),
        )
        conn._start_relay(login, up)  # type: ignore[arg-type]
        requests = [REQUESTS[mode](i % 100_000 + 1) for i in range(QUERIES)]
        reply = REPLIES[mode]
        best = float("inf")
        for _ in range(ROUNDS):
            started = time.process_time()
            for request in requests:
                conn._from_client(request)
                conn._from_server(reply)
            best = min(best, (time.process_time() - started) / QUERIES * 1e6)
        if upstream.transport.writes < QUERIES or client.transport.writes < QUERIES:  # type: ignore[attr-defined]
            raise RuntimeError("the relay did not forward every query")
        return best
    finally:
        pg.destroy()


def run_tree(tree: Path, mode: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    result = subprocess.run(
        [sys.executable, __file__, "--child", mode],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    if result.returncode != 0:
        raise SystemExit(f"{tree} ({mode}) failed:\n{result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, action="append", help="a source tree (repeatable)")
    parser.add_argument("--modes", default="simple,extended")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of every tree")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        print(asyncio.run(measure(options.child)))
        return 0
    trees = options.tree or [Path(__file__).resolve().parent.parent]
    modes = options.modes.split(",")
    print(f"{'tree':<40} " + " ".join(f"{mode + ' µs/q':>14}" for mode in modes))
    runs: dict[Path, list[list[float]]] = {tree: [] for tree in trees}
    for _ in range(options.repeats):
        for tree in trees:
            figures = [run_tree(tree, mode) for mode in modes]
            runs[tree].append(figures)
            print(f"{tree!s:<40} " + " ".join(f"{f:>14.2f}" for f in figures), flush=True)
    if options.repeats > 1:
        print(f"\nover {options.repeats} repeats: lowest / median")
        for tree, rows in runs.items():
            cells = []
            for column in zip(*rows, strict=True):
                cells.append(f"{min(column):.2f} / {statistics.median(column):.2f}")
            print(f"{tree!s:<40} " + " ".join(f"{c:>14}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
