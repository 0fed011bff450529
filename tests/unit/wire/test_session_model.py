"""The server-driven statement and portal model (pgguard.wire.session), sans-IO.

Groups are numbered as the connection numbers them: the ordinal of the ReadyForQuery that ends
them. Each test states what PostgreSQL does with the sequence (postgres.c) and checks that the
model's candidates contain exactly the texts the server may hold.
"""

from __future__ import annotations

import pytest

from pgguard.wire.session import (
    MAX_POSSIBILITIES,
    Bound,
    SessionModel,
    TooManyPossibilities,
    sql_prepared_text,
)

DROP, SELECT, CREATE = b"DROP TABLE t", b"SELECT 1", b"CREATE TABLE u (x int)"


def confirmed(model: SessionModel, *, error: bool = False, status: bytes = b"I") -> None:
    if error:
        model.error()
    model.ready(status)


def test_a_parse_is_certain_once_its_group_succeeded() -> None:
    model = SessionModel()
    model.parse(1, "s", DROP)
    assert model.statement_texts("s", 2) == (DROP,)  # unanswered: it may have run
    confirmed(model)
    assert model.statement_texts("s", 2) == (DROP,)
    assert model.pending == 0


def test_a_reparse_of_a_name_in_use_fails_and_the_old_text_stays() -> None:
    model = SessionModel()
    model.parse(1, "s", DROP)
    confirmed(model)
    model.parse(2, "s", CREATE)
    model.error(0)  # the server says the Parse failed (42P05): the name keeps its text
    model.ready(b"I")
    assert model.statement_texts("s", 3) == (DROP,)


def test_a_reparse_of_a_name_taken_for_in_use_may_succeed() -> None:
    """The server may have dropped the name unseen (an Execute of DEALLOCATE): a later message
    of the Parse's own group runs only if it succeeded, so it meets the new text; a later group
    meets either until the server answers."""
    model = SessionModel()
    model.parse(1, "s", DROP)
    confirmed(model)
    model.parse(2, "s", CREATE)
    assert model.statement_texts("s", 2) == (CREATE,)  # later in its own group
    assert set(model.statement_texts("s", 3)) == {DROP, CREATE}  # a later group
    confirmed(model, error=True)  # an error, not saying which message failed
    assert set(model.statement_texts("s", 3)) == {DROP, CREATE}
    model.parse(3, "t", DROP)
    model.parse(3, "t", SELECT)  # ParseComplete for both: the first was dropped unseen
    confirmed(model)
    assert model.statement_texts("t", 4) == (SELECT,)


def test_messages_skipped_after_an_error_change_nothing_for_sure() -> None:
    model = SessionModel()
    model.parse(1, "s", DROP)
    confirmed(model)
    model.parse(2, "x", b"SELEC")
    model.close(2, b"S", "s")
    model.parse(2, "s", SELECT)
    confirmed(model, error=True)
    assert set(model.statement_texts("s", 3)) == {DROP, SELECT}


def test_close_then_parse_in_one_group_is_the_new_text() -> None:
    model = SessionModel()
    model.parse(1, "s", DROP)
    confirmed(model)
    model.close(2, b"S", "s")
    model.parse(2, "s", SELECT)
    assert model.statement_texts("s", 2) == (SELECT,)
    model.bind(2, "", "s", b"bind")
    assert [b.sql for b in model.portal("", 2)] == [SELECT]
    assert set(model.statement_texts("s", 3)) == {DROP, SELECT}  # unanswered: any prefix
    confirmed(model)
    assert model.statement_texts("s", 3) == (SELECT,)


def test_the_unnamed_statement_is_replaced_only_by_a_parse_that_ran() -> None:
    model = SessionModel()
    model.parse(1, "", DROP)
    confirmed(model)
    model.parse(2, "x", b"SELEC")
    model.parse(2, "", SELECT)
    confirmed(model, error=True)
    assert set(model.statement_texts("", 3)) == {DROP, SELECT}
    model.parse(3, "", SELECT)
    confirmed(model)
    assert model.statement_texts("", 4) == (SELECT,)


def test_a_simple_query_drops_the_unnamed_statement_and_may_deallocate() -> None:
    model = SessionModel()
    model.parse(1, "", DROP)
    model.parse(1, "s", DROP)
    confirmed(model)
    model.query(2)
    confirmed(model)
    assert model.statement_texts("", 3) == ()
    # DEALLOCATE s may have run: a Parse of s may now succeed, or fail on the old text.
    model.parse(3, "s", SELECT)
    confirmed(model, error=True)
    assert set(model.statement_texts("s", 4)) == {DROP, SELECT}


def test_portals_end_with_their_transaction() -> None:
    model = SessionModel()
    model.parse(1, "s", DROP)
    model.bind(1, "p", "s", b"")
    assert [b.sql for b in model.portal("p", 1)] == [DROP]
    confirmed(model, status=b"T")
    assert [b.sql for b in model.portal("p", 2)] == [DROP]
    confirmed(model, status=b"I")  # e.g. the COMMIT's ReadyForQuery
    assert model.portal("p", 3) == ()


def test_a_named_portal_in_use_cannot_be_bound_again() -> None:
    model = SessionModel()
    model.parse(1, "a", DROP)
    model.parse(1, "b", SELECT)
    model.bind(1, "p", "a", b"")
    confirmed(model, status=b"T")
    model.bind(2, "p", "b", b"")
    model.error(0)  # the server says the Bind failed (42P03): the portal keeps its binding
    model.ready(b"E")
    assert [b.sql for b in model.portal("p", 3)] == [DROP]


def test_a_named_portal_taken_for_in_use_may_be_bound_again() -> None:
    """The server may have dropped it unseen (COMMIT; BEGIN, ROLLBACK TO SAVEPOINT, SQL
    CLOSE): a later message of the Bind's group meets the new binding, a later group either."""
    model = SessionModel()
    model.parse(1, "a", SELECT)
    model.parse(1, "b", DROP)
    model.bind(1, "p", "a", b"")
    confirmed(model, status=b"T")
    model.bind(2, "p", "b", b"")
    assert [b.sql for b in model.portal("p", 2)] == [DROP]
    assert sorted(b.sql for b in model.portal("p", 3)) == sorted([DROP, SELECT])
    confirmed(model, status=b"T")  # BindComplete: it was free
    assert [b.sql for b in model.portal("p", 3)] == [DROP]


def test_a_skipped_bind_keeps_every_binding_possible() -> None:
    model = SessionModel()
    model.parse(1, "a", DROP)
    model.parse(1, "b", SELECT)
    confirmed(model)
    model.bind(2, "", "a", b"")
    confirmed(model, status=b"T")
    model.parse(3, "x", b"SELEC")
    model.bind(3, "", "b", b"")
    assert [b.sql for b in model.portal("", 4)] in ([DROP, SELECT], [SELECT, DROP])


def test_closed_names_are_forgotten() -> None:
    model = SessionModel()
    for i in range(100):
        model.parse(i + 1, f"s{i}", SELECT)
        model.close(i + 1, b"S", f"s{i}")
        confirmed(model)
    assert model._statements == {}  # the state stays bounded


def test_a_name_reparsed_in_a_loop_is_cut_off() -> None:
    model = SessionModel()
    model.parse(1, "s", DROP)
    confirmed(model)
    for i in range(MAX_POSSIBILITIES - 2):
        model.parse(i + 2, "x", b"SELEC")
        model.close(i + 2, b"S", "s")
        model.parse(i + 2, "s", b"SELECT %d" % i)
        confirmed(model, error=True)
    assert len(model.statement_texts("s", MAX_POSSIBILITIES + 1)) == MAX_POSSIBILITIES - 1
    with pytest.raises(TooManyPossibilities):
        model.parse(MAX_POSSIBILITIES + 1, "s", b"SELECT 'one more'")


def test_the_answers_before_an_error_say_exactly_what_ran() -> None:
    """[Parse s = DROP] then [Parse x (fails); Close s; Parse s = SELECT]: no message of the
    second group was answered before its error, so the Close and the Parse never ran."""
    model = SessionModel()
    model.parse(1, "s", DROP, ack=0)
    confirmed(model)
    model.parse(2, "x", b"SELEC", ack=0)
    model.close(2, b"S", "s", ack=1)
    model.parse(2, "s", SELECT, ack=2)
    model.error(0)
    model.ready(b"I")
    assert model.statement_texts("s", 3) == (DROP,)


def test_a_failed_reparse_after_answered_messages() -> None:
    """[Close s; Parse s = SELECT; Parse s = CREATE (fails: in use)]: 2 answers, then the error."""
    model = SessionModel()
    model.parse(1, "s", DROP, ack=0)
    confirmed(model)
    model.close(2, b"S", "s", ack=0)
    model.parse(2, "s", SELECT, ack=1)
    model.parse(2, "s", CREATE, ack=2)
    model.error(2)
    model.ready(b"I")
    assert model.statement_texts("s", 3) == (SELECT,)


def test_a_failed_unnamed_parse_drops_the_old_unnamed_statement() -> None:
    model = SessionModel()
    model.parse(1, "", DROP, ack=0)
    confirmed(model)
    model.parse(2, "", b"SELECT * FROM missing", ack=0)
    model.error(0)
    model.ready(b"I")
    assert model.statement_texts("", 3) == ()


def test_an_execute_that_failed_leaves_the_messages_before_it_done() -> None:
    model = SessionModel()
    model.parse(1, "s", SELECT, ack=0)
    model.bind(1, "", "s", b"", ack=1)
    # the Execute is message 2; Close s would have been message 3
    model.close(1, b"S", "s", ack=3)
    model.error(2)
    model.ready(b"I")
    assert model.statement_texts("s", 2) == (SELECT,)


def test_a_bind_of_a_statement_no_parse_made_binds_what_a_sql_prepare_made() -> None:
    """SQL PREPARE and Parse share one namespace: Bind "" or "p" of a name the model never saw
    parsed runs the SQL-prepared body, so the portal holds ``EXECUTE "name"`` - in its own group,
    after the answer, and in a transaction where the unnamed portal held a harmless binding
    (which must not be what the Execute is judged by)."""
    model = SessionModel()
    quoted = 'we"ird'
    assert sql_prepared_text(quoted) == b'EXECUTE "we""ird"'
    model.bind(1, "", "imp", b"b1")
    model.bind(1, "p", quoted, b"b2")
    expected = (Bound("imp", b'EXECUTE "imp"', b"b1"),)
    assert model.portal("", 1) == expected
    assert model.portal("p", 1) == (Bound(quoted, sql_prepared_text(quoted), b"b2"),)
    confirmed(model, status=b"T")
    assert model.portal("", 2) == expected
    model.parse(2, "", SELECT)
    model.bind(2, "", "", b"")
    confirmed(model, status=b"T")
    assert model.portal("", 3) == (Bound("", SELECT, b""),)
    model.bind(3, "", "imp", b"b1")
    assert model.portal("", 3) == expected
    # The unnamed statement only a Parse makes: a Bind of it when none is held fails.
    model.close(3, b"S", "")
    model.bind(3, "q", "", b"")
    assert model.portal("q", 3) == ()
