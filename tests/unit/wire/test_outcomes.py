"""Attributing the server's replies to the statements that caused them."""

from __future__ import annotations

from pgguard.wire.outcomes import OutcomeTracker, tag_rows


def test_simple_query_with_several_statements() -> None:
    t = OutcomeTracker()
    t.query("q1", 1)
    t.command_complete("BEGIN")
    t.command_complete("INSERT 0 3")
    t.command_complete("COMMIT")
    (outcome,) = t.ready()
    assert outcome.token == "q1"
    assert outcome.tags == ["BEGIN", "INSERT 0 3", "COMMIT"]
    assert outcome.sqlstate is None
    assert t.pending == 0


def test_rows_come_from_the_last_counting_tag() -> None:
    t = OutcomeTracker()
    t.query("q", 1)
    t.command_complete("SELECT 42")
    (outcome,) = t.ready()
    assert outcome.rows == 42
    t.query("q", 2)
    t.command_complete("CREATE TABLE")
    (outcome,) = t.ready()
    assert outcome.rows is None


def test_pipeline_error_skips_the_rest_of_its_group_only() -> None:
    t = OutcomeTracker()
    t.execute("e1", 1)
    t.execute("e2", 1)
    t.execute("e3", 1)  # then Sync: group 1 ends
    t.execute("e4", 2)  # then Sync: group 2 ends
    t.command_complete("SELECT 1")
    t.error("22012", "division by zero")
    first = t.ready()
    assert [o.token for o in first] == ["e1", "e2", "e3"]
    assert first[0].tags == ["SELECT 1"]
    assert first[1].sqlstate == "22012"
    assert first[2].skipped
    t.command_complete("UPDATE 2")
    (outcome,) = t.ready()
    assert outcome.token == "e4"
    assert outcome.rows == 2


def test_an_error_in_a_group_without_statements_stays_there() -> None:
    # Parse(bad) Sync, then Bind Execute Sync: the Parse error belongs to group 1, which has no
    # statement; the Execute of group 2 must not take it.
    t = OutcomeTracker()
    t.execute("e", 2)
    t.error("42601", "syntax error")
    assert t.ready() == []
    t.command_complete("SELECT 1")
    (outcome,) = t.ready()
    assert (outcome.token, outcome.sqlstate, outcome.tags) == ("e", None, ["SELECT 1"])


def test_uncounted_substitute_consumes_its_error() -> None:
    t = OutcomeTracker()
    t.execute(None, 1)  # a refused statement's substitute Parse: its error is pgguard's
    t.execute("later", 1)
    t.error("42501", "refused")
    (outcome,) = t.ready()
    assert outcome.token == "later"
    assert outcome.skipped


def test_flush_without_sync_and_portal_suspended() -> None:
    t = OutcomeTracker()
    t.execute("cursorish", 1)
    t.portal_suspended()  # replies arrive after a Flush, before any Sync
    (outcome,) = t.ready()
    assert outcome.token == "cursorish"
    assert outcome.suspended


def test_query_after_unsynced_extended_messages_ends_both() -> None:
    t = OutcomeTracker()
    t.execute("e", 1)
    t.query("q", 1)
    t.command_complete("INSERT 0 1")
    t.command_complete("SELECT 1")
    finished = t.ready()
    assert [(o.token, o.tags) for o in finished] == [("e", ["INSERT 0 1"]), ("q", ["SELECT 1"])]


def test_replies_without_statements_are_ignored() -> None:
    t = OutcomeTracker()
    t.error("57P01", "terminating connection")
    t.command_complete("SELECT 1")
    assert t.ready() == []


def test_row_counts_are_read_from_ascii_digits_only() -> None:
    assert tag_rows("INSERT 0 12") == 12
    assert tag_rows("SELECT 0") == 0
    assert tag_rows("CREATE TABLE") is None
    assert tag_rows("SELECT") is None
    assert tag_rows("SELECT \u00b2") is None  # str.isdigit() is true for it, int() refuses it
