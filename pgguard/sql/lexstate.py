"""Session state that changes how PostgreSQL lexes statement text, and decoding under it.

Owns: `LexState` (what the server reported through ParameterStatus), `decode_sql` (wire bytes →
text exactly as the server's lexer will see it, or `UnreadableSQL`), and `lexing_hazard` (is this
text, in this state, lexed differently by the server than by libpg_query?).

Invariants:
- libpg_query always lexes as a UTF-8 server with `standard_conforming_strings = on`. Whenever the
  session could make the server split the same bytes into different tokens, `lexing_hazard` says so
  and the policy layer holds the statement.
- A NUL byte, undecodable bytes or oversized text never reach the parser: they raise
  `UnreadableSQL`, which the caller turns into an `unparseable` (fail closed) verdict.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

DEFAULT_MAX_SQL_BYTES = 1 << 20
"""Statements larger than this are not parsed (classification would block the event loop)."""

# Client-only encodings whose multibyte characters may contain ASCII bytes such as 0x5C (backslash)
# or 0x27 (quote) as trailing bytes: a byte-wise reading can disagree about where a string ends.
_ASCII_UNSAFE_ENCODINGS = frozenset(
    {"SJIS", "SHIFTJIS2004", "BIG5", "GBK", "UHC", "GB18030", "JOHAB"}
)

# Server-capable encodings: every byte of a multibyte character has the high bit set, so ASCII
# bytes always mean what they mean in ASCII and token boundaries do not depend on the mapping.
_PYTHON_CODECS: dict[str, str] = {
    "UTF8": "utf-8",
    "UNICODE": "utf-8",
    "LATIN1": "latin-1",
    "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3",
    "LATIN4": "iso8859-4",
    "LATIN5": "iso8859-9",
    "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13",
    "LATIN8": "iso8859-14",
    "LATIN9": "iso8859-15",
    "LATIN10": "iso8859-16",
    "ISO88595": "iso8859-5",
    "ISO88596": "iso8859-6",
    "ISO88597": "iso8859-7",
    "ISO88598": "iso8859-8",
    "WIN866": "cp866",
    "WIN874": "cp874",
    "WIN1250": "cp1250",
    "WIN1251": "cp1251",
    "WIN1252": "cp1252",
    "WIN1253": "cp1253",
    "WIN1254": "cp1254",
    "WIN1255": "cp1255",
    "WIN1256": "cp1256",
    "WIN1257": "cp1257",
    "WIN1258": "cp1258",
    "KOI8R": "koi8-r",
    "KOI8U": "koi8-u",
    "EUCJP": "euc_jp",
    "EUCJIS2004": "euc_jis_2004",
    "EUCCN": "gb2312",
    "EUCKR": "euc_kr",
    # Python codecs for the unsafe encodings: used for a best-effort reading only (always held).
    "SJIS": "cp932",
    "SHIFTJIS2004": "shift_jis_2004",
    "BIG5": "big5",
    "GBK": "gbk",
    "UHC": "cp949",
    "GB18030": "gb18030",
    "JOHAB": "johab",
}
# ASCII-safe encodings without an exact Python codec: latin-1 keeps every token boundary intact.
_LATIN1_STANDINS = frozenset({"SQLASCII", "EUCTW", "MULEINTERNAL"})
_NON_ALNUM = re.compile(r"[^A-Z0-9]")


class LexState(NamedTuple):
    """Lexing-relevant session parameters, as last reported by the server (ParameterStatus).

    A named tuple, not a frozen dataclass: it is part of the classifier's cache keys, hashed for
    every statement, and a tuple hashes in C where a dataclass calls a Python ``__hash__``."""

    standard_conforming_strings: bool = True
    client_encoding: str = "UTF8"


DEFAULT_LEX_STATE = LexState()
PENDING_LEX_STATE = LexState(standard_conforming_strings=False, client_encoding="PENDING")
"""For text sent after a statement that changes lexing, before the server has confirmed the new
state (pipelining): any backslash or non-ASCII byte makes such text a hazard, and it is held."""


class UnreadableSQL(ValueError):
    """The text cannot be read the way the server would read it; the reason never quotes it."""


@lru_cache(maxsize=256)
def canonical_encoding(name: str) -> str:
    """PostgreSQL matches encoding names ignoring case and punctuation ('utf-8' is UTF8)."""
    return _NON_ALNUM.sub("", name.upper())


@lru_cache(maxsize=256)
def encoding_is_ascii_unsafe(name: str) -> bool:
    """True for client encodings where an ASCII byte can be part of a multibyte character."""
    canon = canonical_encoding(name)
    return canon in _ASCII_UNSAFE_ENCODINGS or (
        canon not in _PYTHON_CODECS and canon not in _LATIN1_STANDINS
    )


def decode_sql(data: str | bytes, lex: LexState, max_bytes: int = DEFAULT_MAX_SQL_BYTES) -> str:
    """Return the statement text as the server's lexer will see it, or raise UnreadableSQL."""
    if isinstance(data, str):
        text = data
        if len(text) > max_bytes:
            raise UnreadableSQL(f"statement text is larger than {max_bytes} bytes")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UnreadableSQL("statement text contains unpaired surrogates") from None
    else:
        if len(data) > max_bytes:
            raise UnreadableSQL(f"statement text is larger than {max_bytes} bytes")
        text = _decode_bytes(bytes(data), lex.client_encoding)
    if "\x00" in text:
        # libpg_query stops at the first NUL; the server rejects such a message outright.
        raise UnreadableSQL("statement text contains a NUL byte")
    return text


def _decode_bytes(data: bytes, client_encoding: str) -> str:
    if data.isascii():
        return data.decode("ascii")
    canon = canonical_encoding(client_encoding)
    codec = _PYTHON_CODECS.get(canon)
    if codec is not None:
        try:
            return data.decode(codec)
        except UnicodeDecodeError:
            raise UnreadableSQL(f"statement text is not valid {canon}") from None
    if canon == "SQLASCII":
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")
    # ASCII-safe stand-ins, and unknown encodings (always a lexing hazard when non-ASCII, so the
    # statement is held): latin-1 keeps every byte, so categories are still computed.
    return data.decode("latin-1")


def lexing_hazard(text: str | bytes, lex: LexState) -> str | None:
    """Why the server may lex this text differently from libpg_query, or None when it cannot.

    With `standard_conforming_strings = off` only backslashes inside '...' change meaning, and
    with an ASCII-unsafe client encoding only non-ASCII bytes can swallow a quote or backslash;
    text without them is lexed identically, so it is not held for the session state alone.
    """
    if lex_state_is_default(lex):
        return None
    if not lex.standard_conforming_strings:
        has_backslash = (b"\\" in text) if isinstance(text, bytes) else ("\\" in text)
        if has_backslash:
            return "standard_conforming_strings is off and the text contains a backslash"
    if encoding_is_ascii_unsafe(lex.client_encoding):
        ascii_only = text.isascii()
        if not ascii_only:
            return "client_encoding is one whose multibyte characters can hide quotes"
    return None


@lru_cache(maxsize=256)
def lex_state_is_default(lex: LexState) -> bool:
    """True when libpg_query's reading is the server's reading for every possible text."""
    return lex.standard_conforming_strings and not encoding_is_ascii_unsafe(lex.client_encoding)
