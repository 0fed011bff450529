"""The policy gate remembers the last text's decision; these are the cases where it must not.

A Parse and the Execute of its portal ask about the same text in the same context, so the gate
answers the second from the first. A change of the server's lexing parameters in between, or a
text whose meaning depends on the session's prepared statements, must be judged again.
"""

from __future__ import annotations

from pgguard.policy import PolicyEngine
from pgguard.proxy.connection import Session
from pgguard.proxy.gate import ALLOW, Deny, SqlEvent
from pgguard.proxy.policy_gate import PolicyGate
from pgguard.wire import messages as m
from pgguard.wire.backend import BackendTracker

# One string literal as libpg_query reads it; with standard_conforming_strings off the server
# reads a different literal and a comment: a lexing hazard in that state.
HAZARD_WHEN_OFF = b"SELECT 'a\\'', 1 --'"


def new_session() -> Session:
    params = {"standard_conforming_strings": "on", "client_encoding": "UTF8"}
    return Session("i-1", "agent", "owner", "postgres", "127.0.0.1:5", BackendTracker(params))


def parse_and_execute(text: bytes) -> tuple[SqlEvent, SqlEvent]:
    parse = SqlEvent("parse", text, statement="s1")
    execute = SqlEvent("execute", text, statement="s1", candidates=(text,))
    return parse, execute


def test_a_lexing_parameter_change_makes_the_gate_judge_the_text_again() -> None:
    gate = PolicyGate(PolicyEngine.load())
    session = new_session()
    parse, execute = parse_and_execute(HAZARD_WHEN_OFF)
    assert gate.check(session, parse) is ALLOW
    assert gate.check(session, execute) is ALLOW
    assert gate.check(session, execute) is ALLOW
    # The server reports the change (how it came about does not matter to the gate).
    session.tracker.feed(m.message(ord("S"), b"standard_conforming_strings\0off\0"))
    verdict = gate.check(session, execute)
    assert isinstance(verdict, Deny)
    assert verdict.error.sqlstate == "42501"


def test_an_unrelated_parameter_change_keeps_the_answer() -> None:
    gate = PolicyGate(PolicyEngine.load())
    session = new_session()
    parse, execute = parse_and_execute(b"SELECT 1")
    assert gate.check(session, parse) is ALLOW
    session.tracker.feed(m.message(ord("S"), b"application_name\0other\0"))
    assert gate.check(session, execute) is ALLOW


def test_a_text_naming_a_sql_prepared_statement_is_judged_each_time() -> None:
    gate = PolicyGate(PolicyEngine.load())
    session = new_session()
    parse, execute = parse_and_execute(b"EXECUTE flip")
    assert gate.check(session, SqlEvent("query", b"PREPARE flip AS SELECT 1")) is ALLOW
    assert gate.check(session, parse) is ALLOW
    assert gate.check(session, execute) is ALLOW
    assert gate.check(session, SqlEvent("query", b"DEALLOCATE flip")) is ALLOW
    # Preparing an export is itself refused, and the gate's session tracker keeps the name's
    # new meaning anyway (it cannot know whether the server prepared it): fail closed.
    prepare = SqlEvent("query", b"PREPARE flip AS SELECT lo_export(1, '/tmp/x')")
    assert isinstance(gate.check(session, prepare), Deny)
    verdict = gate.check(session, execute)
    assert isinstance(verdict, Deny)
    assert verdict.error.sqlstate == "42501"
