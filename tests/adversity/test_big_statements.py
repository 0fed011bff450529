"""Megabyte statements from one agent: judged off the loop within a budget, others unharmed.

pgguard runs whole (assembly.start, as ``pgguard serve``); the attacker and a well-behaved agent
use real drivers over real sockets at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest

from pgguard.policy import SHIPPED_RULES_DIR
from tests.integration.holds.helpers import hold_settings, wait_for_request
from tests.support import PgguardThread, agent_settings

MIB = 1024 * 1024


def dense_select(size: int) -> str:
    """``SELECT cardinality(ARRAY[1,1,...])``: cheap for the server, as expensive to parse as
    the issue's ``SELECT a,a,a,...`` (one node per two bytes), and the server can run it."""
    head = "SELECT cardinality(ARRAY[1"
    return head + ",1" * ((size - len(head) - 2) // 2) + "])"


def start(upstream_dsn: str, **limits: Any) -> PgguardThread:
    settings = agent_settings(
        upstream_dsn,
        ledger={"enabled": False},
        limits={"parse_workers": 1, **limits},
    )
    return PgguardThread(settings).start()


@pytest.fixture(scope="module")
def pgguard(upstream_dsn: str) -> Iterator[PgguardThread]:
    thread = start(upstream_dsn, parse_budget=30.0, max_statement_bytes=4 * MIB)
    try:
        yield thread
    finally:
        thread.stop()


def test_a_long_statement_is_judged_and_runs(pgguard: PgguardThread) -> None:
    with psycopg.connect(pgguard.dsn(), autocommit=True) as conn:
        text = dense_select(64 * 1024)
        assert conn.execute(text).fetchone() == (text.count("1"),)
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_a_long_privileged_statement_is_still_refused(pgguard: PgguardThread) -> None:
    # Without approvers a held statement is refused: the worker's judgement is applied.
    padding = " ".join(f"/* {i} */" for i in range(8000))
    with psycopg.connect(pgguard.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"DROP TABLE IF EXISTS no_such_t {padding}")
        assert conn.execute("SELECT 3").fetchone() == (3,)


def test_a_long_privileged_statement_through_extended_protocol(pgguard: PgguardThread) -> None:
    padding = " ".join(f"/* {i} */" for i in range(8000))
    with psycopg.connect(pgguard.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"DROP TABLE IF EXISTS no_such_t {padding}", prepare=True)
        text = dense_select(64 * 1024).replace("ARRAY[1", "ARRAY[%s::int")
        assert conn.execute(text, (7,)).fetchone() == (text.count(",1") + 1,)


def test_over_max_statement_bytes_is_54000_and_the_session_goes_on(
    pgguard: PgguardThread,
) -> None:
    with psycopg.connect(pgguard.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as caught:
            conn.execute(dense_select(5 * MIB))
        assert "max_statement_bytes" in str(caught.value)
        assert conn.execute("SELECT 4").fetchone() == (4,)


def test_over_budget_is_54000_and_the_session_goes_on(upstream_dsn: str) -> None:
    thread = start(upstream_dsn, parse_budget=0.2)
    try:
        with psycopg.connect(thread.dsn(), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.ProgramLimitExceeded) as caught:
                conn.execute(dense_select(MIB))
            assert "parse_budget" in str(caught.value)
            assert conn.execute("SELECT 5").fetchone() == (5,)
            # The pool came back: the next long statement is judged again.
            assert conn.execute(dense_select(8 * 1024)).fetchone() is not None
    finally:
        thread.stop()


def test_others_stay_fast_while_one_agent_sends_megabyte_statements(
    pgguard: PgguardThread,
) -> None:
    stop = threading.Event()
    attacks = 0

    def attacker() -> None:
        nonlocal attacks
        with psycopg.connect(pgguard.dsn(), autocommit=True) as conn:
            while not stop.is_set():
                attacks += 1  # counted when sent: one 1 MiB text keeps a worker busy ~3 s
                conn.execute(dense_select(MIB))

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    latencies = []
    try:
        with psycopg.connect(pgguard.dsn(), autocommit=True) as conn:
            time.sleep(0.5)
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                started = time.perf_counter()
                conn.execute("SELECT 1").fetchone()
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)
    finally:
        stop.set()
        thread.join(60)
    assert attacks >= 1
    # Generous for a shared machine: on the loop, each 1 MiB text stalls everyone ~3 s.
    assert max(latencies) < 1.0, (max(latencies), statistics.median(latencies))


async def test_a_long_statement_is_recorded_masked_by_the_worker(
    upstream_dsn: str, state_dsn: str
) -> None:
    schema = f"pgguard_big_{secrets.token_hex(4)}"
    settings = hold_settings(
        upstream_dsn,
        state_dsn,
        Path(SHIPPED_RULES_DIR),
        schema,
        limits={"parse_workers": 1, "max_statement_bytes": MIB, "parse_budget": 30.0},
    )
    thread = await asyncio.to_thread(lambda: PgguardThread(settings).start())
    try:
        text = dense_select(64 * 1024) + " WHERE 'big-secret-marker' <> ''"
        conn = await asyncpg.connect(thread.dsn())
        try:
            await conn.execute(text)
            with pytest.raises(asyncpg.ProgramLimitExceededError):
                await conn.execute(dense_select(MIB + 1024))
        finally:
            await conn.close()
        hooks = thread.running.gate.ledger
        assert hooks._premasked.get(text.encode()) is not None  # masked by the worker
        state = await asyncpg.connect(state_dsn)
        try:
            async with asyncio.timeout(15):
                while True:
                    rows = await state.fetch(
                        f"SELECT statement FROM {schema}.ledger"
                        " WHERE statement LIKE 'SELECT cardinality(ARRAY[%'"
                    )
                    if rows:
                        break
                    await asyncio.sleep(0.2)
            refused = await state.fetch(
                f"SELECT statement, sqlstate FROM {schema}.ledger WHERE sqlstate = '54000'"
            )
        finally:
            await state.close()
        [row] = rows
        assert "big-secret-marker" not in row["statement"]
        # The refused one is recorded too, as what it is, without being read.
        assert [(r["statement"], r["sqlstate"]) for r in refused] == [
            (f"<{len(dense_select(MIB + 1024))} bytes, not read>", "54000")
        ]
    finally:
        await asyncio.to_thread(thread.stop)


async def test_holding_a_long_statement_does_not_stall_others(
    upstream_dsn: str, state_dsn: str
) -> None:
    """The review text of a held long statement is masked by the worker too (on the loop a
    256 KiB dense text took ~2.6 s to mask, stalling every session)."""
    schema = f"pgguard_bighold_{secrets.token_hex(4)}"
    settings = hold_settings(
        upstream_dsn,
        state_dsn,
        Path(SHIPPED_RULES_DIR),
        schema,
        limits={"parse_workers": 1, "parse_budget": 60.0},
    )
    thread = await asyncio.to_thread(lambda: PgguardThread(settings).start())
    try:
        held = await asyncpg.connect(thread.dsn())
        probe = await asyncpg.connect(thread.dsn())
        text = "CREATE TABLE big_held AS " + dense_select(256 * 1024)
        statement = asyncio.create_task(held.execute(text))
        latencies = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            started = time.perf_counter()
            assert await probe.fetchval("SELECT 1") == 1
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=thread.http_url, timeout=10) as api:
            request = await wait_for_request(api, "CREATE TABLE big_held")
        assert request["statement"].startswith("CREATE TABLE big_held AS SELECT")
        assert not statement.done()  # it waits for a human
        held.terminate()
        await probe.close()
        with contextlib.suppress(Exception):
            await statement
        assert max(latencies) < 1.0, (max(latencies), statistics.median(latencies))
    finally:
        await asyncio.to_thread(thread.stop)


async def test_a_100_kb_literal_is_judged_within_the_default_budget(
    upstream_dsn: str, state_dsn: str
) -> None:
    schema = f"pgguard_literal_{secrets.token_hex(4)}"
    settings = hold_settings(
        upstream_dsn, state_dsn, Path(SHIPPED_RULES_DIR), schema, limits={"parse_workers": 1}
    )
    assert settings.limits.parse_budget == 2.0  # the default, what every deployment has
    thread = await asyncio.to_thread(lambda: PgguardThread(settings).start())
    try:
        conn = await asyncpg.connect(thread.dsn())
        try:
            value = "0" * 100 * 1024
            assert await conn.fetchval(f"SELECT '{value}'::text") == value
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(thread.stop)
