"""Prepared-statement tracking, and caches that never change an answer."""

from __future__ import annotations

import pytest

from pgguard.policy import Context, LexState, PolicyEngine


@pytest.fixture
def fresh() -> PolicyEngine:
    return PolicyEngine.load()


def session_ctx(engine: PolicyEngine) -> Context:
    return Context("a", "d", session=engine.new_session())


def test_execute_is_judged_by_the_prepared_body(fresh: PolicyEngine) -> None:
    ctx = session_ctx(fresh)
    assert fresh.classify("PREPARE ok AS SELECT * FROM t WHERE id = $1", ctx).action == "allow"
    assert fresh.classify("EXECUTE ok(1)", ctx).action == "allow"
    assert fresh.classify("PREPARE bad AS SELECT pg_read_file($1)", ctx).action == "hold"
    decision = fresh.classify("EXECUTE bad('/etc/passwd')", ctx)
    assert decision.action == "hold"
    assert decision.categories == ("execute",)
    assert fresh.classify("EXPLAIN ANALYZE EXECUTE bad('x')", ctx).action == "hold"
    assert fresh.classify("CREATE TABLE x AS EXECUTE bad('x')", ctx).categories == (
        "ddl",
        "execute",
    )


def test_unknown_prepared_name_is_opaque(fresh: PolicyEngine) -> None:
    decision = fresh.classify("EXECUTE never_seen", session_ctx(fresh))
    assert decision.action == "hold"
    assert decision.categories == ("execute",)
    assert fresh.classify("EXECUTE never_seen", Context("a", "d")).action == "hold"


def test_prepare_and_execute_in_one_string(fresh: PolicyEngine) -> None:
    ctx = session_ctx(fresh)
    sql = "PREPARE p AS SELECT pg_terminate_backend($1); EXECUTE p(1)"
    decision = fresh.classify(sql, ctx)
    assert [v.categories for v in decision.statements] == [("admin",), ("admin",)]


def test_a_name_never_downgrades(fresh: PolicyEngine) -> None:
    ctx = session_ctx(fresh)
    fresh.classify("PREPARE p AS SELECT pg_read_file($1)", ctx)
    fresh.classify("DEALLOCATE p", ctx)
    fresh.classify("PREPARE p AS SELECT 1", ctx)
    assert fresh.classify("EXECUTE p", ctx).action == "hold"
    fresh.classify("DEALLOCATE ALL", ctx)
    fresh.classify("DISCARD ALL", ctx)
    assert fresh.classify("EXECUTE p", ctx).action == "hold"


def test_protocol_level_parse_can_be_remembered(fresh: PolicyEngine) -> None:
    ctx = session_ctx(fresh)
    parsed = fresh.classify("SELECT lo_export($1, $2)", ctx)
    assert ctx.session is not None
    ctx.session.remember_all("stmt1", parsed.facts)
    assert fresh.classify("EXECUTE stmt1(1, '/tmp/x')", ctx).categories == ("export",)


def test_sessions_are_separate(fresh: PolicyEngine) -> None:
    a, b = session_ctx(fresh), session_ctx(fresh)
    fresh.classify("PREPARE p AS SELECT 1", a)
    assert fresh.classify("EXECUTE p", a).action == "allow"
    assert fresh.classify("EXECUTE p", b).action == "hold"


@pytest.mark.parametrize(
    ("harmless", "privileged"),
    [
        ("SELECT set_config('work_mem', '1MB', false)", "SELECT set_config('role', 'x', false)"),
        ("SELECT set_config('work_mem', '1MB', false)", "SELECT set_config('ROLE', 'x', false)"),
        ("SELECT 'lower'::regproc", "SELECT 'pg_read_file'::regproc"),
        ("SELECT to_regproc('lower')", "SELECT to_regproc('pg_ls_dir')"),
        ("SET client_encoding = 'UTF8'", "SET client_encoding = 'SJIS'"),
        ("SET standard_conforming_strings = on", "SET standard_conforming_strings = off"),
        ("SELECT set_config('a.b', '1', false)", "SELECT set_config('a b', '1', false)"),
    ],
)
def test_literal_dependent_verdicts_never_share_a_cache_entry(
    fresh: PolicyEngine, harmless: str, privileged: str
) -> None:
    ctx = Context("a", "d")
    for _ in range(3):
        assert fresh.classify(harmless, ctx).action == "allow"
        assert fresh.classify(privileged, ctx).action == "hold"


def test_shape_cache_serves_pgbench_style_literals(fresh: PolicyEngine) -> None:
    ctx = Context("a", "d")
    first = fresh.classify(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1", ctx)
    second = fresh.classify(b"SELECT abalance FROM pgbench_accounts WHERE aid = 2", ctx)
    assert second is first  # the shape cache answered
    other_agent = fresh.classify(
        b"SELECT abalance FROM pgbench_accounts WHERE aid = 3", Context("b", "d")
    )
    assert other_agent is not first


def test_cache_key_includes_context(tmp_path: object) -> None:
    engine = PolicyEngine.load()
    sql = "SELECT 'x\\'"
    assert engine.classify(sql, Context("a", "d")).action == "allow"
    off = Context("a", "d", lex=LexState(standard_conforming_strings=False))
    assert engine.classify(sql, off).action == "hold"
    assert engine.classify(sql, Context("a", "d")).action == "allow"


def test_session_statements_are_never_cached(fresh: PolicyEngine) -> None:
    a = session_ctx(fresh)
    fresh.classify("PREPARE p AS SELECT 1", a)
    assert fresh.classify("EXECUTE p", a).action == "allow"
    b = session_ctx(fresh)
    assert fresh.classify("EXECUTE p", b).action == "hold"
    fresh.classify("PREPARE p AS SELECT 1", b)
    assert fresh.classify("EXECUTE p", b).action == "allow"


def test_bytes_and_text_agree(fresh: PolicyEngine) -> None:
    ctx = Context("a", "d")
    for sql in ("SELECT 1", "DROP TABLE t", "SELECT 'é'", "SELEC"):
        assert fresh.classify(sql, ctx).action == fresh.classify(sql.encode(), ctx).action


def test_wire_buffers_are_accepted(fresh: PolicyEngine) -> None:
    ctx = Context("a", "d")
    data = bytearray(b"DROP TABLE t")
    assert fresh.classify(data, ctx).action == "hold"  # type: ignore[arg-type]
    assert fresh.classify(memoryview(b"SELECT 1"), ctx).action == "allow"  # type: ignore[arg-type]


def test_on_read_times_only_texts_no_cache_answered(fresh: PolicyEngine) -> None:
    """pgguard_classify_seconds observes through `on_read`: a miss is timed, a hit is not."""
    seen: list[float] = []
    fresh.on_read = seen.append
    ctx = Context("a", "d")
    first = fresh.classify(b"SELECT abalance FROM accounts WHERE aid = 1", ctx)
    assert len(seen) == 1  # read with the parser: timed
    assert seen[0] > 0
    assert fresh.classify(b"SELECT abalance FROM accounts WHERE aid = 1", ctx) is first
    assert fresh.classify(b"SELECT abalance FROM accounts WHERE aid = 2", ctx) is first
    assert len(seen) == 1  # the exact text, then the literal-blind key: cache hits, not timed
    assert fresh.classify(b"DROP TABLE accounts", ctx).action == "hold"
    assert fresh.classify(b"SELEKT 1", ctx).action == "deny"
    assert len(seen) == 3  # every text the caches did not answer, unparseable ones too
    fresh.on_read = None
    fresh.classify(b"DROP TABLE other", ctx)
    assert len(seen) == 3
