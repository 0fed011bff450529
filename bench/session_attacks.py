"""What hostile message sequences cost pgguard's shared event loop (invariant 5).

Runs an embedded PostgreSQL, pgguard (ledger on, state in a second cluster) on its own thread,
and for each attack sends one pipelined message sequence of N and then 4N units through a raw
client (sent from one thread, replies read from another, so nothing blocks), while a second,
well-behaved session runs ``SELECT 1`` in a loop. Prints, per attack and size: the CPU time of
pgguard's event-loop thread (``pthread_getcpuclockid``: only that thread, so the machine's other
load does not count), that CPU per unit, how the session ended (every ReadyForQuery, or cut off
with a SQLSTATE), and the second session's worst ``SELECT 1`` latency meanwhile. Linear cost
shows as a flat CPU per unit from N to 4N; quadratic as a 4x rise.

    python bench/session_attacks.py [--n 2000] [--only names-then-queries,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from pgguard.dsn import parse_dsn
from pgguard.embedded import EmbeddedPostgres
from pgguard.proxy import assembly
from pgguard.settings import Settings
from pgguard.statedb import setup
from pgguard.statedb.apply import apply
from pgguard.wire import messages as m
from pgguard.wire.scram import ScramClient

AGENT, PASSWORD = "bench", "bench-pw"
SYNC = m.message(ord("S"))
FLUSH = m.message(ord("H"))


def bind(portal: str, statement: str, value: bytes | None = None) -> bytes:
    params = struct.pack("!hh", 0, 0) if value is None else struct.pack("!hhi", 0, 1, len(value))
    body = portal.encode() + b"\0" + statement.encode() + b"\0" + params
    body += (value or b"") + struct.pack("!h", 0)
    return m.message(ord("B"), body)


def execute(portal: str = "") -> bytes:
    return m.message(ord("E"), portal.encode() + b"\0" + struct.pack("!i", 0))


def close(kind: str, name: str) -> bytes:
    return m.message(ord("C"), kind.encode() + name.encode() + b"\0")


def describe(kind: str, name: str) -> bytes:
    return m.message(ord("D"), kind.encode() + name.encode() + b"\0")


# --- the attacks: (setup sent and answered first, the measured payload, ReadyForQuery owed) ---

Attack = Callable[[int], tuple[bytes, bytes, int]]


def names_then_queries(n: int) -> tuple[bytes, bytes, int]:
    """n named statements held, then n simple Queries (each one's answer touched every name)."""
    setup_ = b"".join(m.parse(f"s{i}", "SELECT 1") for i in range(n)) + SYNC
    return setup_, m.query("SELECT 1") * n, n


def reparse_one_name(n: int) -> tuple[bytes, bytes, int]:
    """Parse s (a new relation each time); Close s; Sync - n times: the gate's tracker unions."""
    payload = b"".join(
        m.parse("s", f"SELECT * FROM pg_class r{i}") + close("S", "s") + SYNC for i in range(n)
    )
    return b"", payload, n


def sql_prepare_one_name(n: int) -> tuple[bytes, bytes, int]:
    """PREPARE s AS SELECT from a new relation; DEALLOCATE s - n simple Queries."""
    payload = b"".join(
        m.query(
            f"PREPARE s AS SELECT * FROM pg_class WHERE relname = 'r' UNION ALL "
            f"SELECT * FROM pg_class_r{i}; DEALLOCATE s"
        )
        for i in range(n)
    )
    return b"", payload, n


def reparse_named_same_group(n: int) -> tuple[bytes, bytes, int]:
    """Parse s (a new relation each time) n times before one Sync."""
    payload = b"".join(m.parse("s", f"SELECT * FROM pg_class_r{i}") for i in range(n))
    return b"", payload + SYNC, 1


def distinct_names(n: int) -> tuple[bytes, bytes, int]:
    """n distinct statement names, each with its own text, then Close of each, one Sync."""
    parses = b"".join(m.parse(f"n{i}", f"SELECT {i}") for i in range(n))
    closes = b"".join(close("S", f"n{i}") for i in range(n))
    return b"", parses + closes + SYNC, 1


def syncs(n: int) -> tuple[bytes, bytes, int]:
    """One Parse/Bind/Execute, then n Syncs, never read until the end."""
    return b"", m.parse("", "SELECT 1") + bind("", "") + execute() + SYNC * n, n


def queries_behind_sleep(n: int) -> tuple[bytes, bytes, int]:
    """A named statement held (so Queries are filed), pg_sleep(1), then n Queries pipelined."""
    payload = m.query("SELECT pg_sleep(1)") + m.query("SELECT 1") * n
    return m.parse("held", "SELECT 1") + SYNC, payload, n + 1


def rebind_named_portal_same_group(n: int) -> tuple[bytes, bytes, int]:
    """BEGIN; then in one group: Bind p; Execute p; Close p - n times."""
    unit = bind("p", "s") + execute("p") + close("P", "p")
    return m.query("BEGIN") + m.parse("s", "SELECT 1") + SYNC, unit * n + SYNC, 1


def rebind_named_portal_across_groups(n: int) -> tuple[bytes, bytes, int]:
    """BEGIN; then n groups of Bind p; Sync; Execute p; Sync (p bound in earlier groups)."""
    unit = bind("p", "s") + SYNC + execute("p") + SYNC
    return m.query("BEGIN") + m.parse("s", "SELECT 1") + SYNC, unit * n, 2 * n


def executes_across_groups(n: int) -> tuple[bytes, bytes, int]:
    """Bind "" s (varying parameter) then Execute in the next group, n times (unnamed portal)."""
    payload = b"".join(bind("", "s", str(i).encode()) + SYNC + execute("") + SYNC for i in range(n))
    return m.parse("s", "SELECT $1::int") + SYNC, payload, 2 * n


def unnamed_reparse_across_groups(n: int) -> tuple[bytes, bytes, int]:
    """Parse "" (the same text); Sync - n times, then one Bind/Execute."""
    payload = (m.parse("", "SELECT 1") + SYNC) * n + bind("", "") + execute() + SYNC
    return b"", payload, n + 1


def closes_then_one_execute(n: int) -> tuple[bytes, bytes, int]:
    """[Close s x 100; Bind p s; Sync] x n/100, then Execute p: n Closes, n/100 Binds."""
    unit = close("S", "s") * 100 + bind("p", "s") + SYNC
    setup_ = m.query("BEGIN") + m.parse("s", "SELECT 1") + SYNC
    return setup_, unit * (n // 100) + execute("p") + SYNC, n // 100 + 1


def closes_behind_sleep(n: int) -> tuple[bytes, bytes, int]:
    """The same behind pg_sleep(1), so none of it is answered while pgguard reads it."""
    setup_, payload, owed = closes_then_one_execute(n)
    return setup_, m.query("SELECT pg_sleep(1)") + payload, owed + 1


def rebind_behind_sleep(n: int) -> tuple[bytes, bytes, int]:
    """rebind-portal-across-groups behind pg_sleep(1)."""
    setup_, payload, owed = rebind_named_portal_across_groups(n)
    return setup_, m.query("SELECT pg_sleep(1)") + payload, owed + 1


def big_row_behind_refusal(n: int) -> tuple[bytes, bytes, int]:
    """A reply of one n-KiB row, then a refused statement pipelined behind it (its error is
    rewritten, so the row's bytes pass while a replacement is pending)."""
    big = m.query(f"SELECT repeat('x', {n * 1024})")
    return b"", big + m.query("DROP TABLE pg_attacks_victim"), 2


def big_row_alone(n: int) -> tuple[bytes, bytes, int]:
    """The same reply of one n-KiB row, nothing refused behind it (the baseline)."""
    big = m.query(f"SELECT repeat('x', {n * 1024})")
    return b"", big + m.query("SELECT 1"), 2


def refusals_between_errors(n: int) -> tuple[bytes, bytes, int]:
    """Behind pg_sleep(1): [refused Execute; Sync; Parse of a missing table; Sync] x n/2, so
    every server error meets every pending replacement."""
    payload = m.query("SELECT pg_sleep(1)") + b"".join(
        bind("", "d") + execute() + SYNC + m.parse(f"q{i}", "SELECT * FROM pg_nothing") + SYNC
        for i in range(n // 2)
    )
    return m.parse("d", "DROP TABLE pg_attacks_victim") + SYNC, payload, 2 * (n // 2) + 1


def describe_flood(n: int) -> tuple[bytes, bytes, int]:
    """n Describes of a statement and a portal before one Sync."""
    unit = describe("S", "s") + describe("P", "")
    return m.parse("s", "SELECT 1") + SYNC, bind("", "s") + unit * n + SYNC, 1


def close_flood(n: int) -> tuple[bytes, bytes, int]:
    """n Closes of names never used, before one Sync."""
    return b"", b"".join(close("S", f"c{i}") for i in range(n)) + SYNC, 1


def executes_one_group(n: int) -> tuple[bytes, bytes, int]:
    """psycopg's executemany shape: Bind "" s; Execute - n times before one Sync."""
    return m.parse("s", "SELECT 1") + SYNC, (bind("", "s") + execute()) * n + SYNC, 1


ATTACKS: dict[str, Attack] = {
    "names-then-queries": names_then_queries,
    "reparse-one-name": reparse_one_name,
    "sql-prepare-one-name": sql_prepare_one_name,
    "reparse-named-same-group": reparse_named_same_group,
    "distinct-names": distinct_names,
    "syncs": syncs,
    "queries-behind-sleep": queries_behind_sleep,
    "rebind-portal-same-group": rebind_named_portal_same_group,
    "rebind-portal-across-groups": rebind_named_portal_across_groups,
    "executes-across-groups": executes_across_groups,
    "unnamed-reparse-across-groups": unnamed_reparse_across_groups,
    "closes-then-one-execute": closes_then_one_execute,
    "closes-behind-sleep": closes_behind_sleep,
    "rebind-behind-sleep": rebind_behind_sleep,
    "big-row-behind-refusal": big_row_behind_refusal,
    "big-row-alone": big_row_alone,
    "refusals-between-errors": refusals_between_errors,
    "describe-flood": describe_flood,
    "close-flood": close_flood,
    "executes-one-group": executes_one_group,
}

# --- a raw client --------------------------------------------------------------------------------


class Raw:
    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> tuple[str, bytes]:
        while True:
            if len(self.buffer) >= 5:
                length = struct.unpack("!I", self.buffer[1:5])[0]
                if len(self.buffer) >= length + 1:
                    kind, body = chr(self.buffer[0]), self.buffer[5 : length + 1]
                    self.buffer = self.buffer[length + 1 :]
                    return kind, body
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk

    def login(self) -> None:
        self.send(m.startup_message(m.PROTOCOL_3_0, [("user", AGENT), ("database", "postgres")]))
        _, body = self.recv()
        scram = ScramClient(PASSWORD, m.decode_sasl_mechanisms(body), None)
        self.send(m.sasl_initial_response(scram.mechanism, scram.first()))
        _, body = self.recv()
        self.send(m.password_message(scram.final(body[4:])))
        while self.recv()[0] != "Z":
            pass

    def until_ready(self, count: int) -> str:
        """Read until ``count`` ReadyForQuery; 'ok', or the SQLSTATE of a FATAL/08P01 cut-off."""
        seen = 0
        last_error = ""
        try:
            while seen < count:
                kind, body = self.recv()
                if kind == "Z":
                    seen += 1
                elif kind == "E":
                    fields = m.decode_error_fields(body)
                    last_error = fields.sqlstate
        except ConnectionError:
            return f"cut off ({last_error}) after {seen} Z"
        return "ok"


# --- pgguard on its own thread --------------------------------------------------------------


class Pgguard:
    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: Any = self.call(assembly.start(settings))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def cpu(self) -> float:
        assert self.thread.ident is not None
        return time.clock_gettime(time.pthread_getcpuclockid(self.thread.ident))

    def stop(self) -> None:
        self.call(self.running.stop(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def probe(dsn: str, stop: threading.Event, out: list[float]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            started = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            out.append(time.perf_counter() - started)
            time.sleep(0.005)


def run_attack(guard: Pgguard, attack: Attack, n: int) -> tuple[float, float, str, float]:
    port = guard.running.proxy.port
    raw = Raw(port)
    raw.login()
    setup_, payload, owed = attack(n)
    if setup_:
        raw.send(setup_)
        raw.until_ready(setup_.count(SYNC) + setup_.count(b"Q\0"))  # rough: every setup ends Z
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(
        target=probe,
        args=(f"postgresql://{AGENT}:{PASSWORD}@127.0.0.1:{port}/postgres", stop, latencies),
    )
    prober.start()
    time.sleep(0.2)
    cpu0 = guard.cpu()
    sender = threading.Thread(target=lambda: _send_quietly(raw, payload))
    sender.start()
    outcome = raw.until_ready(owed)
    cpu = guard.cpu() - cpu0
    sender.join(60)
    time.sleep(0.1)
    stop.set()
    prober.join(30)
    raw.sock.close()
    return cpu, cpu / n, outcome, max(latencies, default=0.0)


def _send_quietly(raw: Raw, payload: bytes) -> None:
    with contextlib.suppress(OSError):  # cut off mid-send
        raw.send(payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--only", default=",".join(ATTACKS))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pgguard-attacks-"))
    pg = EmbeddedPostgres(workdir / "data").start()
    state_pg = EmbeddedPostgres(workdir / "statedata").start()
    plan = setup.StatePlan(password=setup.new_password())
    asyncio.run(apply(plan, state_pg.superuser_dsn()))
    settings = Settings.load(
        listen={"host": "127.0.0.1", "port": 0},
        upstream={"dsn": pg.unix_dsn()},
        state={"dsn": setup.state_dsn(plan, parse_dsn(state_pg.superuser_dsn()))},
        agents=[{"name": AGENT, "password": PASSWORD, "owner": "owner@example.com"}],
        http={"host": "127.0.0.1", "port": 0},
        ledger={"spool_dir": str(workdir / "spool")},
        data_dir=str(workdir / "pgguard"),
        log_level="WARNING",
    )
    guard = Pgguard(settings)
    try:
        print(
            f"{'attack':32s} {'units':>6s} {'loop CPU s':>10s} {'us/unit':>8s}  "
            f"{'2nd session max ms':>18s}  outcome"
        )
        for name in args.only.split(","):
            for n in (args.n, 4 * args.n):
                cpu, per, outcome, worst = run_attack(guard, ATTACKS[name], n)
                print(
                    f"{name:32s} {n:6d} {cpu:10.3f} {per * 1e6:8.1f}  "
                    f"{worst * 1e3:18.1f}  {outcome}",
                    flush=True,
                )
    finally:
        guard.stop()
        pg.destroy()
        state_pg.destroy()


if __name__ == "__main__":
    main()
