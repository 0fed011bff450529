"""`export.json_lines`: one ``orjson.dumps`` per batch, cut into lines, must give exactly the
bytes of one ``orjson.dumps`` per record - whatever the records' strings hold."""

from __future__ import annotations

import json

import orjson
from hypothesis import given
from hypothesis import strategies as st

from pgguard.ledger.export import RECORD_KEYS, json_lines


def one_at_a_time(objects: list[dict[str, object]]) -> bytes:
    return b"".join(orjson.dumps(o, option=orjson.OPT_APPEND_NEWLINE) for o in objects)


def record(statement: str, **fields: object) -> dict[str, object]:
    found: dict[str, object] = dict.fromkeys(RECORD_KEYS)
    found.update(
        statement=statement,
        action="allow",
        categories=["read"],
        approvers=orjson.Fragment('[{"id": "bob", "name": "Bob"}]'),
        detail=orjson.Fragment("{}"),
    )
    found.update(fields)
    return found


def test_records_are_one_a_line_exactly_as_dumped_one_at_a_time() -> None:
    batch = [
        record("SELECT 1"),
        record('SELECT \'},{"action":"deny"}\' -- the cut inside a string'),
        record("SELECT 'two\nlines'"),
        # jsonb's own text of nested objects that have the first key: a space after each comma
        record("x", detail=orjson.Fragment('[{"action": "a"}, {"action": "b"}]')),
    ]
    lines = json_lines(batch, b"action")
    assert lines == one_at_a_time(batch)
    assert [json.loads(line)["statement"] for line in lines.splitlines()] == [
        r["statement"] for r in batch
    ]


def test_nested_objects_of_orjson_with_the_first_key_fall_back_to_one_at_a_time() -> None:
    # not what export makes (nested JSON comes as jsonb text), but never a wrong line
    batch = [record("a", detail=[{"action": "x"}, {"action": "y"}]), record("b")]
    assert b'},{"action":' in orjson.dumps(batch[0])  # the cut would split this record
    lines = json_lines(batch, b"action")
    assert lines == one_at_a_time(batch)
    assert len(lines.splitlines()) == 2


def test_an_empty_batch_is_no_bytes() -> None:
    assert json_lines([], b"action") == b""


@given(st.lists(st.text(st.characters(codec="utf-8")), min_size=1, max_size=5))
def test_any_statements(statements: list[str]) -> None:
    batch = [record(s) for s in statements]
    assert json_lines(batch, b"action") == one_at_a_time(batch)
