"""Writes to system relations and other equivalents of privileged actions (issue 16)."""

from __future__ import annotations

import pytest

from pgguard.policy import Context, PolicyEngine
from pgguard.sql.classify import classify_routine_body

ENGINE = PolicyEngine.load()
CTX = Context(agent="a", database="d")


@pytest.mark.parametrize(
    ("write", "setting"),
    [
        (
            "UPDATE pg_settings SET setting = 'replica' WHERE name = 'session_replication_role'",
            "SET session_replication_role = replica",
        ),
        (
            "UPDATE pg_catalog.pg_settings SET setting = 'off' WHERE name = 'row_security'",
            "SET row_security = off",
        ),
        (
            "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'",
            "SET standard_conforming_strings = off",
        ),
        (
            "UPDATE pg_settings SET setting = 'on' WHERE name = 'backslash_quote'",
            "SET backslash_quote = on",
        ),
    ],
)
def test_a_pg_settings_write_has_the_sets_categories(write: str, setting: str) -> None:
    as_write, as_set = ENGINE.classify(write, CTX), ENGINE.classify(setting, CTX)
    assert as_set.action == "hold"
    assert (as_write.action, as_write.categories) == (as_set.action, as_set.categories)
    assert as_write.changes_lexing == as_set.changes_lexing


@pytest.mark.parametrize(
    "text",
    [
        "UPDATE pg_settings SET setting = 'on' WHERE name = 'standard_conforming_strings'",
        "UPDATE pg_settings SET setting = 'UTF8' WHERE name = 'client_encoding'",
        "SET backslash_quote = safe_encoding",
        "UPDATE pg_settings SET setting = 'x' WHERE name = current_setting('my.name')",
        "SELECT set_config(current_setting('my.name'), 'off', false)",
    ],
)
def test_every_way_to_change_lexing_is_a_lexing_change(text: str) -> None:
    assert ENGINE.classify(text, CTX).changes_lexing


@pytest.mark.parametrize(
    "text",
    [
        "UPDATE pg_group SET groname = 'x'",
        "DELETE FROM pg_catalog.pg_authid WHERE rolname = 'x'",
        "INSERT INTO pg_settings (name, setting) VALUES ('role', 'x')",
        "UPDATE information_schema.sql_features SET comments = ''",
    ],
)
def test_writes_to_system_relations_are_held(text: str) -> None:
    assert ENGINE.classify(text, CTX).action == "hold"


@pytest.mark.parametrize(
    "text",
    [
        "UPDATE notes SET id = 1",
        "UPDATE public.pg_like SET id = 1",
        "SELECT * FROM pg_settings WHERE name = 'work_mem'",
        "UPDATE pg_settings SET setting = '8MB' WHERE name = 'work_mem'",
    ],
)
def test_ordinary_writes_and_reads_pass(text: str) -> None:
    assert ENGINE.classify(text, CTX).action == "allow"


def test_pg_file_write_is_an_export_and_an_execute() -> None:
    decision = ENGINE.classify("SELECT pg_file_write('/tmp/x', 'data', false)", CTX)
    assert {"export", "execute"} <= set(decision.categories)


@pytest.mark.parametrize(
    ("text", "undoes"),
    [
        ("ROLLBACK", True),
        ("ROLLBACK TO SAVEPOINT s", True),
        ("COMMIT", True),
        ("PREPARE TRANSACTION 'x'", True),
        ("BEGIN", False),
        ("SAVEPOINT s", False),
    ],
)
def test_transaction_ends_say_they_undo_settings(text: str, undoes: bool) -> None:
    facts = ENGINE.classify(text, CTX).facts
    assert any(f.undoes_settings for f in facts) is undoes


@pytest.mark.parametrize(
    ("language", "body", "categories"),
    [
        ("sql", "SELECT 1", ()),
        ("sql", "SELECT pg_read_file('/etc/passwd')", ("execute",)),
        ("sql", "DELETE FROM t; DROP TABLE t", ("ddl",)),
        ("sql", "", ("execute",)),  # BEGIN ATOMIC: prosrc is empty
        ("c", "my_c_function", ("execute",)),
        ("plpython3u", "return 1", ("execute",)),
    ],
)
def test_routine_bodies_are_classified(language: str, body: str, categories: tuple[str]) -> None:
    facts = classify_routine_body(language, None, body, [], ENGINE.policy.catalog)
    assert facts.categories == categories


def test_a_plpgsql_routine_is_read_from_its_definition() -> None:
    definition = (
        "CREATE OR REPLACE FUNCTION public.f()\n RETURNS integer\n LANGUAGE plpgsql\n"
        "AS $function$ BEGIN EXECUTE 'DROP TABLE t'; RETURN 1; END $function$\n"
    )
    facts = classify_routine_body("plpgsql", definition, "", [], ENGINE.policy.catalog)
    assert "execute" in facts.categories


def test_a_routine_setting_is_judged_as_a_set() -> None:
    facts = classify_routine_body(
        "sql", None, "SELECT 1", ["session_replication_role=replica"], ENGINE.policy.catalog
    )
    assert facts.categories == ("admin",)
