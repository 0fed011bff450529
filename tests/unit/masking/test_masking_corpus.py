"""No sensitive value of the corpus survives masking; masked text still parses as PostgreSQL."""

from __future__ import annotations

import re

import pytest
from pglast import parser as pg

from pgguard.masking import MaskingRules, mask_sql
from tests.unit.masking.corpus import CARD, CARD2, CORPUS

RULES = MaskingRules.load()
CARDS = [re.sub(r"\D", "", CARD), re.sub(r"\D", "", CARD2)]


def _parses(sql: str) -> bool:
    try:
        pg.parse_sql_json(sql)
    except pg.ParseError:
        return False
    return True


def _identifiers(sql: str) -> list[str]:
    return [sql[t.start : t.end + 1] for t in pg.scan(sql) if t.name == "IDENT"]


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 40


@pytest.mark.parametrize(("sql", "secrets"), CORPUS)
def test_no_secret_survives(sql: str, secrets: list[str]) -> None:
    masked = mask_sql(sql, RULES)
    captured = (masked.text + "\n" + repr(masked)).encode("utf-8")
    for secret in secrets:
        assert secret.encode("utf-8") not in captured, secret
        assert secret.lower().encode("utf-8") not in captured.lower(), secret
    runs = re.findall(r"\d+", captured.decode())
    for card in CARDS:
        for start in range(len(card) - 4):
            window = card[start : start + 5]
            assert not any(window in run for run in runs), "more than 4 card digits shown"


@pytest.mark.parametrize(("sql", "secrets"), CORPUS)
def test_masked_text_parses_and_keeps_identifiers(sql: str, secrets: list[str]) -> None:
    assert _parses(sql), "corpus statements must be valid PostgreSQL"
    masked = mask_sql(sql, RULES)
    assert _parses(masked.text), masked.text
    assert masked.text != sql
    assert _identifiers(masked.text) == _identifiers(sql)


def test_placeholders_say_what_a_value_was() -> None:
    text = mask_sql(
        "SELECT * FROM users WHERE email = 'a.b@example.com' AND card = '4111111111111111' "
        "AND note = 'hello world!' AND n = 42 AND x = 1.5",
        RULES,
    ).text
    assert text == (
        "SELECT * FROM users WHERE email = '<email>' AND card = '<card:...1111>' "
        "AND note = '<text:12 chars>' AND n = 0 /*<int>*/ AND x = 0.0 /*<numeric>*/"
    )


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("CREATE ROLE r PASSWORD 'pw'", "CREATE ROLE r PASSWORD '<password>'"),
        ("COPY t TO PROGRAM 'gzip > /x'", "COPY t TO PROGRAM 'gzip > /x'"),
        ("SELECT dblink('host=h', 'q')", "SELECT dblink('host=h', 'q' /*not parsed*/)"),
        (
            "CREATE SERVER s FOREIGN DATA WRAPPER w OPTIONS (host 'h')",
            "CREATE SERVER s FOREIGN DATA WRAPPER w OPTIONS (host '<connection string>')",
        ),
        ("SELECT $1, $2", "SELECT $1, $2"),
        ("SELECT 1 -- note\n", "SELECT 0 /*<int>*/ /*<comment>*/\n"),
        ("SELECT U&'x' UESCAPE '!'", "SELECT '<text:1 chars>'"),
        ("INSERT INTO t (ssn) VALUES ('x')", "INSERT INTO t (ssn) VALUES ('<ssn>')"),
        ("SELECT '{\"a\": 1}'::jsonb", "SELECT '<json:8 chars>'::jsonb"),
        ("SELECT B'10', X'ff'", "SELECT B'' /*<bits>*/, X'' /*<bytes>*/"),
    ],
)
def test_placeholder_forms(sql: str, expected: str) -> None:
    assert mask_sql(sql, RULES).text == expected


def test_code_bodies() -> None:
    masked = mask_sql("DO $$BEGIN RAISE NOTICE 'hi %', 3; END$$", RULES)
    assert masked.text == "DO $$BEGIN RAISE NOTICE '<text:4 chars>', 0 /*<int>*/; END$$"
    assert masked.complete
    opaque = mask_sql("CREATE FUNCTION f() RETURNS int LANGUAGE plperl AS $$ 1 $$", RULES)
    assert opaque.text.endswith("AS $$<plperl body: 3 bytes>$$")
    assert not opaque.complete


@pytest.mark.parametrize("sql", ["SELEC 'secret'", "SELECT 'unterminated", "\x00'x'", ""])
def test_unreadable_text_is_redacted_whole(sql: str) -> None:
    masked = mask_sql(sql, RULES)
    if sql:
        assert masked.text.startswith("<unparseable statement: ")
        assert "secret" not in masked.text
        assert not masked.complete
    else:
        assert masked.text == ""


def test_non_ascii_text_keeps_column_context() -> None:
    masked = mask_sql("SELECT 'é' AS note, 'x' AS email, '4111111111111111' AS ccnum", RULES)
    assert masked.text == (
        "SELECT '<text:1 chars>' AS note, '<email>' AS email, '<card:...1111>' AS ccnum"
    )


def test_short_values_never_show_a_tail() -> None:
    # An SSN-column value too short to hide most of it shows nothing at all.
    assert mask_sql("SELECT 1 FROM t WHERE card = '1234'", RULES).text.endswith("'<card>'")


def test_lex_hazard_hides_everything() -> None:
    # With standard_conforming_strings = off the server reads one string where the scanner
    # here sees an identifier between two strings.
    sql = "SELECT 'a\\' || secretword || '\\'"
    assert "secretword" in mask_sql(sql, RULES).text  # why the hazard flag exists
    masked = mask_sql(sql, RULES, lex_hazard=True)
    assert "secretword" not in masked.text
    assert not masked.complete


def test_nested_dollar_quotes_in_code_bodies() -> None:
    sql = "DO $body$ DECLARE k text := $q$s3cr3t$q$; BEGIN RETURN; END $body$"
    masked = mask_sql(sql, RULES)
    assert masked.text == "DO $body$ DECLARE k text := '<text:6 chars>'; BEGIN RETURN; END $body$"
