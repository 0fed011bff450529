"""Turning libpg_query's JSON parse tree into Python values without recursion limits.

Owns: `load_json` (C json fast path; an iterative decoder for trees nested deeper than Python's
recursion limit) and `iter_nodes` (depth-first walk yielding every node with its type).

Invariants: nothing here recurses on the shape of the input, so a statement nested thousands of
levels deep costs time proportional to its size and never a RecursionError or a C stack overflow.
libpg_query's JSON wraps most nodes as `{"TypeName": {fields}}`; fields whose C type is a specific
node pointer are emitted unwrapped, and `iter_nodes` names those from the field they sit in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import TypeAlias

JsonValue: TypeAlias = "dict[str, JsonValue] | list[JsonValue] | str | int | float | bool | None"
Fields: TypeAlias = "dict[str, JsonValue]"

_TOKEN = re.compile(
    r'\s*(?:(?P<punct>[{}\[\],:])|(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)'
    r"|(?P<word>true|false|null))",
    re.DOTALL,
)
_WORDS: dict[str, JsonValue] = {"true": True, "false": False, "null": None}

# Node-typed fields that libpg_query emits without the {"Type": ...} wrapper.
UNWRAPPED_FIELD_TYPES: dict[str, str] = {
    "funccall": "FuncCall",
    "setstmt": "VariableSetStmt",
    "larg": "SelectStmt",
    "rarg": "SelectStmt",
    "intoClause": "IntoClause",
    "into": "IntoClause",
    "action": "GrantStmt",
    "newowner": "RoleSpec",
    "typeName": "TypeName",
    "func": "ObjectWithArgs",
    "opername": "ObjectWithArgs",
    "fromsql": "ObjectWithArgs",
    "tosql": "ObjectWithArgs",
    "withClause": "WithClause",
    "returningClause": "ReturningClause",
    "onConflictClause": "OnConflictClause",
}


class TreeError(ValueError):
    """libpg_query produced JSON this module cannot read (never expected; fail closed)."""


def load_json(text: str) -> JsonValue:
    """Decode JSON, falling back to an iterative decoder when nesting defeats the C decoder."""
    try:
        value: JsonValue = json.loads(text)
    except RecursionError:
        return _load_json_iteratively(text)
    except ValueError as exc:
        raise TreeError("parse tree is not valid JSON") from exc
    return value


def _load_json_iteratively(text: str) -> JsonValue:
    stack: list[dict[str, JsonValue] | list[JsonValue]] = []
    keys: list[str | None] = []
    pending_key: str | None = None
    result: JsonValue = None
    done = False
    pos = 0
    end = len(text.rstrip())
    while pos < end:
        match = _TOKEN.match(text, pos)
        if match is None:
            raise TreeError("parse tree is not valid JSON")
        pos = match.end()
        punct = match.group("punct")
        if punct in {",", ":"}:
            continue
        if punct in {"}", "]"}:
            if not stack:
                raise TreeError("parse tree is not valid JSON")
            value: JsonValue = stack.pop()
            pending_key = keys.pop()
        elif punct == "{":
            stack.append({})
            keys.append(pending_key)
            pending_key = None
            continue
        elif punct == "[":
            stack.append([])
            keys.append(pending_key)
            pending_key = None
            continue
        elif match.group("str") is not None:
            decoded = json.loads(match.group("str"))
            top = stack[-1] if stack else None
            if isinstance(top, dict) and pending_key is None:
                pending_key = decoded
                continue
            value = decoded
        elif match.group("num") is not None:
            raw = match.group("num")
            value = float(raw) if any(c in raw for c in ".eE") else int(raw)
        else:
            value = _WORDS[match.group("word")]
        if not stack:
            result, done = value, True
            continue
        container = stack[-1]
        if isinstance(container, dict):
            if pending_key is None:
                raise TreeError("parse tree is not valid JSON")
            container[pending_key] = value
            pending_key = None
        else:
            container.append(value)
    if stack or not done:
        raise TreeError("parse tree is not valid JSON")
    return result


def unwrap(value: JsonValue) -> tuple[str, Fields] | None:
    """(type, fields) when `value` is a wrapped node `{"Type": {...}}`, else None."""
    if type(value) is dict and len(value) == 1:
        key, inner = next(iter(value.items()))
        if key[:1].isupper() and type(inner) is dict:
            return key, inner
    return None


def iter_nodes(root_type: str, root: Fields) -> Iterator[tuple[str, Fields]]:
    """Yield (type, fields) for `root` and every node below it, iteratively.

    Unwrapped node-typed fields are named from UNWRAPPED_FIELD_TYPES, and any other unwrapped
    dict that carries `relname` is a RangeVar; remaining dicts are yielded with type "".
    """
    stack: list[tuple[str, Fields]] = [(root_type, root)]
    pop, push = stack.pop, stack.append
    while stack:
        node_type, fields = pop()
        yield node_type, fields
        for key, value in fields.items():
            if type(value) is dict:
                _push_child(push, key, value)
            elif type(value) is list:
                for item in value:
                    if type(item) is dict:
                        _push_child(push, key, item)
                    elif type(item) is list:
                        push(("List", {"items": item}))


def _push_child(
    push: Callable[[tuple[str, Fields]], None], key: str, value: dict[str, JsonValue]
) -> None:
    wrapped = unwrap(value)
    if wrapped is not None:
        push(wrapped)
        return
    node_type = UNWRAPPED_FIELD_TYPES.get(key)
    if node_type is None:
        node_type = "RangeVar" if "relname" in value else ""
    push((node_type, value))
