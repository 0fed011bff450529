"""Decoding wire bytes and spotting session states that change how text is lexed."""

from __future__ import annotations

import pytest

from pgguard.sql.lexstate import (
    LexState,
    UnreadableSQL,
    decode_sql,
    encoding_is_ascii_unsafe,
    lex_state_is_default,
    lexing_hazard,
)

UTF8 = LexState()


def test_utf8_bytes_decode() -> None:
    assert decode_sql("SELECT 'é'".encode(), UTF8) == "SELECT 'é'"


@pytest.mark.parametrize(
    "data",
    [b"SELECT 1\x00; DROP TABLE t", b"\x00", "SELECT 1\x00", b"SELECT '\x00'"],
)
def test_nul_byte_is_unreadable(data: str | bytes) -> None:
    with pytest.raises(UnreadableSQL, match="NUL"):
        decode_sql(data, UTF8)


@pytest.mark.parametrize("data", [b"SELECT '\xff'", b"SELECT '\xc3'", b"\xed\xa0\x80"])
def test_invalid_utf8_is_unreadable(data: bytes) -> None:
    with pytest.raises(UnreadableSQL):
        decode_sql(data, UTF8)


def test_lone_surrogate_in_text_is_unreadable() -> None:
    with pytest.raises(UnreadableSQL):
        decode_sql("SELECT '\ud800'", UTF8)


def test_oversized_text_is_unreadable() -> None:
    with pytest.raises(UnreadableSQL, match="larger"):
        decode_sql(b"SELECT 1" + b" " * 100, UTF8, max_bytes=50)


def test_reason_never_quotes_the_text() -> None:
    with pytest.raises(UnreadableSQL) as info:
        decode_sql(b"SELECT 'secret\xff'", UTF8)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("encoding", "data", "text"),
    [
        ("LATIN1", b"SELECT '\xe9'", "SELECT 'é'"),
        ("latin-1", b"SELECT '\xe9'", "SELECT 'é'"),
        ("WIN1252", b"SELECT '\x80'", "SELECT '€'"),
        ("EUC_JP", "SELECT 'あ'".encode("euc_jp"), "SELECT 'あ'"),
        ("SQL_ASCII", b"SELECT '\xff'", "SELECT '\xff'"),
        ("MULE_INTERNAL", b"SELECT '\xff'", "SELECT '\xff'"),
    ],
)
def test_server_safe_encodings_decode(encoding: str, data: bytes, text: str) -> None:
    assert decode_sql(data, LexState(client_encoding=encoding)) == text


def test_unknown_encoding_with_high_bytes_is_read_but_a_hazard() -> None:
    lex = LexState(client_encoding="KLINGON")
    assert decode_sql(b"SELECT '\xff'", lex) == "SELECT '\xff'"
    assert lexing_hazard(b"SELECT '\xff'", lex) is not None


def test_ascii_text_decodes_in_any_encoding() -> None:
    assert decode_sql(b"SELECT 1", LexState(client_encoding="KLINGON")) == "SELECT 1"


@pytest.mark.parametrize("encoding", ["SJIS", "sjis", "BIG5", "GBK", "UHC", "GB18030", "JOHAB"])
def test_multibyte_client_encodings_that_can_hide_quotes_are_unsafe(encoding: str) -> None:
    assert encoding_is_ascii_unsafe(encoding)
    lex = LexState(client_encoding=encoding)
    assert not lex_state_is_default(lex)
    # 0x95 0x5C is one SJIS character whose second byte is a backslash.
    assert lexing_hazard(b"SELECT '\x95\\'; DROP TABLE t; --'", lex) is not None
    assert lexing_hazard(b"SELECT 1", lex) is None


@pytest.mark.parametrize("encoding", ["UTF8", "LATIN1", "WIN1251", "EUC_KR", "SQL_ASCII"])
def test_ascii_safe_encodings_have_no_hazard(encoding: str) -> None:
    lex = LexState(client_encoding=encoding)
    assert not encoding_is_ascii_unsafe(encoding)
    assert lexing_hazard("SELECT 'é\\'", lex) is None


def test_standard_conforming_strings_off_is_a_hazard_with_backslashes() -> None:
    lex = LexState(standard_conforming_strings=False)
    assert lexing_hazard("SELECT 'a\\'; DROP TABLE t; --'", lex) is not None
    assert lexing_hazard(b"SELECT 'a\\'", lex) is not None
    assert lexing_hazard("SELECT 'plain'", lex) is None
    assert not lex_state_is_default(lex)
    assert lex_state_is_default(UTF8)
