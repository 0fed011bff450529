"""The auditor's side of a big ledger: fill it with N entries, then time show, export, verify and
the README's example queries (issue 19).

Fill: an embedded PostgreSQL (or ``--dsn``) gets the ledger schema (pgguard's own migrations),
then N entries sealed by pgguard's own code (`Chain`, packed and full entries, signed
checkpoints every 10,000 entries and a final one per chain) - not through the proxy: the rows
are sealed in this process and sent with binary COPY, the packs then expanded by the state
database itself (``ledger_expand``), as the expander does. The mix: 50 agents, 30 days, two
pgguard instances a day (one chain each); ~94 % ordinary statements (some failing), ~2 % held
statements (approved, with their outcome, or denied), ~1 % refused by policy, sessions opening
and closing, authentication failures.

Then, each timed: ``pgguard ledger show --limit 50`` (the library call behind it, newest first,
median of 3) unfiltered and with each filter; ``pgguard ledger export`` (the CLI, a subprocess:
entries/s and its peak RSS, for a 10 % export and the whole ledger - the same RSS means
constant memory); ``pgguard ledger verify`` (the CLI, with the public key); each example query
of README.md's ledger section. Prints a table and writes it to ``bench/results/``.

Usage: ``python bench/ledger_read.py [--entries 5000000] [--keep] [--dsn DSN]``. 5 million
entries take about 3 GB of disk and several minutes; ``--entries 20000`` is a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from pgguard.embedded import EmbeddedPostgres
from pgguard.ledger.chain import Chain, SealedEntry
from pgguard.ledger.checkpoint import CheckpointSigner
from pgguard.ledger.expander import expand_all
from pgguard.ledger.model import LedgerEntry
from pgguard.ledger.packed import PackedEntry, epoch_us, pack_body, session_record, text_record
from pgguard.ledger.reader import LedgerFilters, query
from pgguard.ledger.store import (
    CHECKPOINT_COLUMNS,
    COLUMNS,
    checkpoint_values,
    migrate,
    row_values,
)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "pgguard"
AGENTS = [f"agent-{i:02d}" for i in range(50)]
APPROVERS = [("alice", "Alice Martin"), ("bob", "Bob Chen"), ("carol", "Carol Diaz")]
DAYS = 30
CHAINS_PER_DAY = 2
PACK = 500
CHECKPOINT_EVERY = 10_000
END = datetime(2026, 11, 30, tzinfo=UTC)
START = END - timedelta(days=DAYS)

ORDINARY = (
    [
        (f"SELECT * FROM orders WHERE customer_id = ? AND region = '{r}'", ["read"])
        for r in ("eu", "us", "apac")
    ]
    + [(f"SELECT id, total FROM t{i} WHERE id = ?", ["read"]) for i in range(300)]
    + [(f"UPDATE t{i} SET status = ? WHERE id = ?", ["write"]) for i in range(100)]
    + [(f"INSERT INTO events_{i} (kind, at) VALUES (?, ?)", ["write"]) for i in range(100)]
)
PRIVILEGED = [
    ("COPY customers TO STDOUT", ["export"]),
    ("COPY (SELECT * FROM orders) TO STDOUT", ["export"]),
    ("ALTER TABLE orders ADD COLUMN note text", ["ddl"]),
    ("DROP TABLE staging_old", ["ddl"]),
    ("GRANT SELECT ON customers TO reporting", ["privilege"]),
]


@dataclass
class Filled:
    entries: int = 0
    full: int = 0
    packs: int = 0
    checkpoints: int = 0
    request_id: str = ""
    seconds: float = 0.0
    expand_seconds: float = 0.0


@dataclass
class ChainBuilder:
    """Seals one chain's entries in order and collects rows for COPY."""

    chain: Chain
    signer: CheckpointSigner
    instance_id: str
    rows: list[tuple[object, ...]] = field(default_factory=list)
    packs: list[tuple[object, ...]] = field(default_factory=list)
    checkpoints: list[tuple[object, ...]] = field(default_factory=list)
    pending: list[
        tuple[object, object, tuple[int, int, str | None, int | None, str | None, str | None]]
    ] = field(default_factory=list)
    sealed: list[PackedEntry] = field(default_factory=list)
    signed_upto: int = 0
    last_at: datetime = START

    def packed(
        self,
        session: object,
        text: object,
        outcome: tuple[int, int, str | None, int | None, str | None, str | None],
    ) -> None:
        self.pending.append((session, text, outcome))
        if len(self.pending) >= PACK:
            self._seal_pending()

    def full(self, entry: LedgerEntry) -> SealedEntry:
        self._seal_pending()
        sealed = self.chain.seal(entry)
        content = orjson.loads(sealed.canonical)["entry"]
        self.rows.append(row_values(sealed, content))
        self.last_at = entry.received_at
        self._maybe_sign(sealed.seq, sealed.hash, sealed.entry.entry_id)
        return sealed

    def close(self) -> None:
        self._seal_pending()
        self._flush_pack()
        seq = self.chain.next_seq - 1
        self._sign(seq, final=True)

    def _seal_pending(self) -> None:
        if not self.pending:
            return
        sealed = self.chain.seal_packed_many(self.pending)  # type: ignore[arg-type]
        self.pending = []
        self.sealed += sealed
        last = sealed[-1]
        self.last_at = datetime.fromtimestamp(last.received_us / 1e6, UTC)
        if len(self.sealed) >= PACK:
            self._flush_pack()
        for e in sealed:
            if e.seq % CHECKPOINT_EVERY == 0:
                self._sign_at(e.seq, e.hash, e.entry_id)

    def _flush_pack(self) -> None:
        if not self.sealed:
            return
        s = self.sealed
        self.packs.append(
            (
                self.chain.chain_id,
                s[0].seq,
                s[-1].seq,
                len(s),
                datetime.fromtimestamp(s[0].received_us / 1e6, UTC),
                datetime.fromtimestamp(s[-1].received_us / 1e6, UTC),
                pack_body(s),
            )
        )
        self.sealed = []

    def _maybe_sign(self, seq: int, hash: str, entry_id: str) -> None:
        if seq % CHECKPOINT_EVERY == 0:
            self._sign_at(seq, hash, entry_id)

    def _sign(self, seq: int, *, final: bool) -> None:
        self._sign_at(seq, self.chain.last_hash, self.chain.last_entry_id, final=final)

    def _sign_at(self, seq: int, hash: str, entry_id: str, *, final: bool = False) -> None:
        signed = self.signer.sign(
            self.chain.chain_id, seq, hash, entry_id, final=final, now=self.last_at
        )
        self.checkpoints.append(checkpoint_values(signed))


def _session(agent: str, instance: str, number: int) -> tuple[str, object]:
    session_id = f"{instance}-s{number}"
    fields = {
        "instance_id": instance,
        "session_id": session_id,
        "agent": agent,
        "owner": f"{agent}-owner@example.com",
        "client_address": f"10.0.{number % 250}.{number % 200}:5{number % 1000:03d}",
        "application_name": "etl" if number % 3 else "notebook",
        "database": "sales",
        "upstream_role": "pgguard_scram",
    }
    return session_id, session_record(fields)


def _texts() -> tuple[list[object], list[object]]:
    ordinary = [
        text_record(sql, f"fp{i:04d}", cats, [f"{cats[0]}.default"], "allow")
        for i, (sql, cats) in enumerate(ORDINARY)
    ]
    return ordinary, PRIVILEGED  # type: ignore[return-value]


async def fill(conn: asyncpg.Connection, total: int, key: Ed25519PrivateKey) -> Filled:
    """Seal ``total`` entries into DAYS * CHAINS_PER_DAY chains and COPY them in."""
    began = time.perf_counter()
    rnd = random.Random(19)
    ordinary, privileged = _texts()
    done = Filled()
    chains = DAYS * CHAINS_PER_DAY
    per_chain = total // chains
    span = timedelta(days=1) / CHAINS_PER_DAY
    for c in range(chains):
        instance = f"inst-{c % CHAINS_PER_DAY}"
        chain_start = START + c * span
        chain = Chain(f"{instance}-{chain_start:%Y%m%dT%H%M}-{secrets.token_hex(4)}")
        builder = ChainBuilder(chain, CheckpointSigner(key, instance, SCHEMA), instance)
        sessions = [_session(a, instance, c * 100 + i) for i, a in enumerate(AGENTS)]
        step = span / max(per_chain, 1)
        at = chain_start
        for i, agent in enumerate(AGENTS):
            builder.full(_entry("session_start", sessions[i][0], agent, instance, at))
        count = len(AGENTS)
        while count < per_chain - len(AGENTS):
            at += step
            i = rnd.randrange(len(AGENTS))
            session_id, session = sessions[i]
            roll = rnd.random()
            if roll < 0.94:
                received = epoch_us(at.timestamp())
                failed = rnd.random() < 0.01
                builder.packed(
                    session,
                    ordinary[rnd.randrange(len(ordinary))],
                    (
                        received,
                        received + rnd.randrange(200, 20_000),
                        None if failed else "SELECT 1",
                        None if failed else 1,
                        "42P01" if failed else None,
                        'relation "t9" does not exist' if failed else None,
                    ),
                )
                count += 1
            elif roll < 0.98:
                sql, cats = privileged[rnd.randrange(len(privileged))]  # type: ignore[misc]
                request = secrets.token_hex(8)
                done.request_id = done.request_id or request
                approver = APPROVERS[rnd.randrange(len(APPROVERS))]
                approved = rnd.random() < 0.8
                decided = at + timedelta(seconds=rnd.randrange(5, 600))
                stmt = builder.full(
                    _entry(
                        "statement",
                        session_id,
                        AGENTS[i],
                        instance,
                        at,
                        statement=sql,
                        fingerprint=f"fp-{cats[0]}",
                        categories=tuple(cats),
                        rule_ids=(f"{cats[0]}.hold",),
                        action="hold" if approved else "deny",
                        request_id=request,
                        decided_at=decided,
                        reason="monthly report",
                        approvers=(
                            {
                                "id": approver[0],
                                "name": approver[1],
                                "channel": "web" if approved else "teams",
                                "comment": "ok" if approved else "not now",
                            },
                        ),
                    )
                )
                count += 1
                if approved:
                    builder.full(
                        _entry(
                            "outcome",
                            session_id,
                            AGENTS[i],
                            instance,
                            decided,
                            statement_entry_id=stmt.entry.entry_id,
                            request_id=request,
                            completed_at=decided + timedelta(milliseconds=40),
                            command_tag="COPY 1200" if cats[0] == "export" else "ALTER TABLE",
                            rows=1200 if cats[0] == "export" else None,
                            duration_ms=40.0,
                        )
                    )
                    count += 1
            elif roll < 0.99:
                builder.full(
                    _entry(
                        "statement",
                        session_id,
                        AGENTS[i],
                        instance,
                        at,
                        statement="DELETE FROM customers",
                        fingerprint="fp-delete-all",
                        categories=("destructive",),
                        rule_ids=("deny.unbounded_delete",),
                        action="deny",
                    )
                )
                count += 1
            elif roll < 0.995:
                builder.full(
                    _entry(
                        "auth_failure",
                        f"{instance}-x{count}",
                        AGENTS[i],
                        instance,
                        at,
                        detail={"reason": "password authentication failed"},
                    )
                )
                count += 1
            else:  # a session ends and its agent opens a new one
                builder.full(_entry("session_end", session_id, AGENTS[i], instance, at))
                sessions[i] = _session(AGENTS[i], instance, c * 100 + 50 + count)
                builder.full(_entry("session_start", sessions[i][0], AGENTS[i], instance, at))
                count += 2
        for i, agent in enumerate(AGENTS):
            builder.full(_entry("session_end", sessions[i][0], agent, instance, at))
        builder.close()
        await _copy(conn, builder)
        done.entries += builder.chain.next_seq - 1
        done.full += len(builder.rows)
        done.packs += len(builder.packs)
        done.checkpoints += len(builder.checkpoints)
        print(f"  chain {c + 1}/{chains}: {done.entries:,} entries", end="\r", flush=True)
    print()
    done.seconds = time.perf_counter() - began
    began = time.perf_counter()
    await expand_all(conn, SCHEMA, max_packs=20)
    done.expand_seconds = time.perf_counter() - began
    await conn.execute("VACUUM ANALYZE")
    return done


def _entry(
    kind: str, session_id: str, agent: str, instance: str, at: datetime, **fields: object
) -> LedgerEntry:
    return LedgerEntry(
        kind=kind,  # type: ignore[arg-type]
        instance_id=instance,
        session_id=session_id,
        received_at=at,
        agent=agent,
        owner=f"{agent}-owner@example.com",
        client_address="10.0.0.1:5000",
        application_name="etl",
        database="sales",
        upstream_role="pgguard_scram",
        **fields,  # type: ignore[arg-type]
    )


async def _copy(conn: asyncpg.Connection, b: ChainBuilder) -> None:
    s = SCHEMA
    if b.rows:
        await conn.copy_records_to_table(
            "ledger_entries", schema_name=s, records=b.rows, columns=list(COLUMNS)
        )
    if b.packs:
        await conn.copy_records_to_table(
            "ledger_packs",
            schema_name=s,
            records=b.packs,
            columns=[
                "chain_id",
                "first_seq",
                "last_seq",
                "entries",
                "first_received",
                "last_received",
                "body",
            ],
        )
    if b.checkpoints:
        await conn.copy_records_to_table(
            "ledger_checkpoints",
            schema_name=s,
            records=b.checkpoints,
            columns=list(CHECKPOINT_COLUMNS),
        )


# --- measuring --------------------------------------------------------------------------------


async def timed(work: Callable[[], Awaitable[object]], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        await work()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def readme_queries(readme: Path) -> list[tuple[str, str]]:
    """(title, SQL) of each example query of README.md's ledger section (``Example: ...``
    followed by a ```sql block)."""
    text = readme.read_text(encoding="utf-8")
    return [
        (m.group(1).strip(), m.group(2).strip())
        for m in re.finditer(r"^Example: (.+?)\n+```sql\n(.*?)```", text, re.M | re.S)
    ]


def cli(args: list[str]) -> tuple[float, int, str]:
    """Run ``pgguard`` with ``args``; (seconds, peak RSS in MiB, stderr's last line)."""
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgguard.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    err = proc.stderr.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - began
    if proc.returncode not in (0,):
        raise SystemExit(f"pgguard {' '.join(args)} failed ({proc.returncode}): {err}")
    return elapsed, usage.ru_maxrss // 1024, err.strip().splitlines()[-1] if err.strip() else ""


async def measure(
    dsn: str, work: Path, filled: Filled, key: Ed25519PublicKey
) -> list[tuple[str, str, str]]:
    results: list[tuple[str, str, str]] = []
    conn = await asyncpg.connect(dsn)
    try:
        entries = filled.entries
        mid = START + timedelta(days=DAYS // 2)
        cases: list[tuple[str, LedgerFilters]] = [
            ("show --limit 50", LedgerFilters(limit=50)),
            ("show --agent", LedgerFilters(agent="agent-07", limit=50)),
            (
                "show --since/--until (1 day)",
                LedgerFilters(since=mid, until=mid + timedelta(days=1), limit=50),
            ),
            ("show --request", LedgerFilters(request_id=filled.request_id, limit=50)),
            ("show --approver", LedgerFilters(approver="Bob Chen", limit=50)),
            ("show --action hold", LedgerFilters(action="hold", limit=50)),
            ("show --category export", LedgerFilters(category="export", limit=50)),
            (
                "show --agent --category ddl --since",
                LedgerFilters(agent="agent-07", category="ddl", since=mid, limit=50),
            ),
        ]
        for name, filters in cases:

            async def show(f: LedgerFilters = filters) -> object:
                return [r async for r in query(conn, f, schema=SCHEMA)]

            seconds = await timed(show)
            results.append((name, f"{seconds * 1000:.0f} ms", "< 1 s" if seconds < 1 else "SLOW"))
        for title, sql in readme_queries(ROOT / "README.md"):
            seconds = await timed(lambda sql=sql: conn.fetch(sql))
            results.append(
                (f"README: {title}", f"{seconds * 1000:.0f} ms", "< 1 s" if seconds < 1 else "SLOW")
            )
    finally:
        await conn.close()
    config = work / "pgguard.toml"
    config.write_text(f'[state]\ndsn = "{dsn}"\nschema = "{SCHEMA}"\n', encoding="utf-8")
    public = work / "bench.pub.pem"
    public.write_bytes(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    seconds, _, _ = cli(["ledger", "show", "-c", str(config), "--limit", "50"])
    results.append(
        ("pgguard ledger show (CLI, wall incl. start-up)", f"{seconds * 1000:.0f} ms", "")
    )
    tenth = max(1, entries // 10)
    seconds, rss, _ = cli(
        ["ledger", "export", "-c", str(config), "--limit", str(tenth), "-o", os.devnull]
    )
    results.append(
        (
            f"export --limit {tenth:,} (jsonl)",
            f"{tenth / seconds:,.0f} entries/s",
            f"peak RSS {rss} MiB",
        )
    )
    for fmt in ("jsonl", "csv", "ocsf"):
        seconds, rss, _ = cli(
            ["ledger", "export", "-c", str(config), "--format", fmt, "-o", os.devnull]
        )
        rate = entries / seconds
        results.append(
            (
                f"export all ({fmt})",
                f"{rate:,.0f} entries/s",
                f"peak RSS {rss} MiB; {'>= 50k/s' if rate >= 50_000 else 'SLOW'}",
            )
        )
        if entries > 1_000_000:
            break  # one full export is enough at scale: jsonl
    seconds, rss, _ = cli(
        [
            "ledger",
            "verify",
            "-c",
            str(config),
            "--public-key",
            str(public),
            "--anchors",
            os.devnull,
        ]
    )
    rate = entries / seconds
    results.append(
        (
            "verify (signed checkpoints)",
            f"{rate:,.0f} entries/s",
            f"{seconds:.1f} s, peak RSS {rss} MiB; {'>= 100k/s' if rate >= 100_000 else 'SLOW'}",
        )
    )
    return results


async def _fill(
    dsn: str, entries: int, key: Ed25519PrivateKey
) -> tuple[Filled, list[tuple[str, str, str]]]:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, f'"{SCHEMA}"', 60)
        print(f"filling {entries:,} entries ...")
        filled = await fill(conn, entries, key)
        size = await conn.fetchval("SELECT pg_size_pretty(pg_database_size(current_database()))")
    finally:
        await conn.close()
    print(
        f"filled {filled.entries:,} entries ({filled.full:,} full, {filled.packs:,} packs, "
        f"{filled.checkpoints:,} checkpoints) in {filled.seconds:.0f} s; "
        f"expanded in {filled.expand_seconds:.0f} s; database {size}"
    )
    return filled, [
        (
            "fill (seal + COPY)",
            f"{filled.entries / filled.seconds:,.0f} entries/s",
            f"{filled.entries:,} entries, {filled.seconds:.0f} s",
        ),
        (
            "expansion (ledger_expand)",
            f"{(filled.entries - filled.full) / filled.expand_seconds:,.0f} entries/s",
            f"{filled.entries - filled.full:,} packed entries, "
            f"{filled.expand_seconds:.0f} s; database {size}",
        ),
    ]


async def _filled(dsn: str) -> Filled:
    conn = await asyncpg.connect(dsn)
    try:
        s = SCHEMA
        return Filled(
            entries=await conn.fetchval(
                f"SELECT (SELECT count(*) FROM {s}.ledger_entries) + (SELECT count(*) FROM "
                f"{s}.ledger_rows) + (SELECT coalesce(sum(entries), 0) FROM {s}.ledger_packs)"
            ),
            full=await conn.fetchval(f"SELECT count(*) FROM {s}.ledger_entries"),
            request_id=await conn.fetchval(
                f"SELECT request_id FROM {s}.ledger_entries WHERE request_id IS NOT NULL LIMIT 1"
            ),
        )
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=5_000_000)
    parser.add_argument("--dsn", help="an empty database to fill (default: an embedded one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--output", type=Path, help="Markdown report (default: bench/results/)")
    parser.add_argument(
        "--measure-only",
        type=Path,
        metavar="PUBLIC_KEY",
        help="with --dsn: measure a ledger filled by an earlier --keep run (its bench.pub.pem)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pgguard-ledger-bench-"))
    pg: EmbeddedPostgres | None = None
    try:
        if args.dsn:
            dsn = args.dsn
        else:
            pg = EmbeddedPostgres(work / "data").start()
            for setting in ("max_wal_size = '8GB'", "shared_buffers = '512MB'"):
                pg.psql(f"ALTER SYSTEM SET {setting}")
            pg.restart()
            dsn = pg.superuser_dsn()
        results: list[tuple[str, str, str]] = []
        if args.measure_only:
            # a ledger this script filled before (--keep): its public key is beside its config
            public = load_pem_public_key(args.measure_only.read_bytes())
            assert isinstance(public, Ed25519PublicKey)
            filled = await _filled(dsn)
        else:
            key = Ed25519PrivateKey.generate()
            public = key.public_key()
            filled, results = await _fill(dsn, args.entries, key)
        results += await measure(dsn, work, filled, public)
    finally:
        if pg is not None and not args.keep:
            pg.destroy()
    width = max(len(r[0]) for r in results)
    lines = [f"| what ({filled.entries:,} entries) | figure | note |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in results]
    for a, b, c in results:
        print(f"{a:<{width}}  {b:>22}  {c}")
    output = (
        args.output
        or ROOT / "bench" / "results" / f"ledger-read-{datetime.now(UTC):%Y%m%dT%H%M%S}.md"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    kept = f"; kept {work} (PostgreSQL still running: {dsn})" if args.keep else ""
    print(f"report: {output}{kept}")


if __name__ == "__main__":
    asyncio.run(main())
