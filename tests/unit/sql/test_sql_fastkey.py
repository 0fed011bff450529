"""The literal-blind cache key: equal only for texts that differ in literal values alone."""

from __future__ import annotations

import pytest

from pgguard.policy import Context, PolicyEngine
from pgguard.sql.fastkey import literal_blind_key


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
        ),
        (
            b"SELECT * FROM t WHERE email = 'a@x.org' LIMIT 5",
            b"SELECT * FROM t WHERE email = 'it''s' LIMIT 10",
        ),
        (b"INSERT INTO t VALUES (1, 'x\"y')", b"INSERT INTO t VALUES (2, 'z')"),
    ],
)
def test_texts_differing_only_in_literals_share_a_key(a: bytes, b: bytes) -> None:
    assert literal_blind_key(a) is not None
    assert literal_blind_key(a) == literal_blind_key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b'SELECT * FROM "2023_payroll"', b'SELECT * FROM "2024_payroll"'),
        (b"SELECT * FROM t1", b"SELECT * FROM t2"),
        (b"SELECT a FROM t", b"SELECT b FROM t"),
        (b"SELECT 'a', pg_read_file('x')", b"SELECT 'a', 'b'"),
        (b"SELECT 'a'' || pg_read_file(1) || '''", b"SELECT 'a', pg_read_file(1), ''"),
    ],
)
def test_texts_differing_in_structure_do_not(a: bytes, b: bytes) -> None:
    assert literal_blind_key(a) != literal_blind_key(b)


@pytest.mark.parametrize(
    "text",
    [
        b"SELECT E'\\x41'",
        b"SELECT $1",
        b"SELECT $$x$$",
        b"SELECT 1 -- c",
        b"SELECT 1 /* c */",
        b"SELECT x'1F'",
        b"SELECT U&'d\\0061t'",
        b"SELECT N'x'",
        "SELECT 'é'".encode(),
        b"SELECT 1\x00",
        b"SELECT 'a\\'",
        b"SELECT U&\"!0061\" UESCAPE '!'",  # UESCAPE may follow a U& identifier
        b'SELECT U&"a"',
        b"SELECT 'unterminated",
        b'SELECT "unterminated',
        b"SELECT 'a', ' ",
    ],
)
def test_subtle_lexing_is_refused(text: bytes) -> None:
    assert literal_blind_key(text) is None


def test_engine_serves_literal_variants_without_reclassifying() -> None:
    engine = PolicyEngine.load()
    ctx = Context(agent="a", database="d")
    first = engine.classify(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1", ctx)
    assert first.action == "allow"
    second = engine.classify(b"SELECT abalance FROM pgbench_accounts WHERE aid = 99", ctx)
    assert second is first  # the cached decision object itself
    held = engine.classify(b"SELECT pg_read_file('/etc/passwd')", ctx)
    also_held = engine.classify(b"SELECT pg_read_file('/etc/shadow')", ctx)
    assert held.action == also_held.action == "hold"


@pytest.mark.parametrize(
    ("warm_up", "probe"),
    [
        (b"SELECT 'anything'::regproc", b"SELECT 'pg_read_file'::regproc"),
        (b"SELECT set_config('work_mem', '1MB', false)", b"SELECT set_config('role', 'x', false)"),
        (b"SELECT * FROM t WHERE a = 1", b"SELECT * FROM t WHERE a = 2"),
        (b"SELECT to_regproc('abs')", b"SELECT to_regproc('pg_terminate_backend')"),
        (b"SELECT 'x' FROM t", b"SELECT 'x' FROM \"t\""),
    ],
)
def test_warm_caches_never_change_a_decision(warm_up: bytes, probe: bytes) -> None:
    fresh = PolicyEngine.load()
    warmed = PolicyEngine.load()
    ctx = Context(agent="a", database="d")
    warmed.classify(warm_up, ctx)
    assert warmed.classify(probe, ctx).action == fresh.classify(probe, ctx).action
