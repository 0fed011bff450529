"""Small readers for libpg_query JSON nodes: constants, qualified names, DefElem options.

Owns the few places that look at a constant's value, so that every such look is deliberate.
Invariant: readers never raise on unexpected shapes; they return None or an empty result and the
caller decides what "could not tell" means (always the cautious reading).
"""

from __future__ import annotations

from pgguard.sql.tree import Fields, JsonValue, unwrap

_CONST_KEYS = ("sval", "ival", "fval", "bsval")


def literal_text(node: JsonValue | None) -> str | None:
    """The value of a constant (looking through casts) as text, or None if not a constant."""
    for _ in range(64):
        wrapped = unwrap(node)
        if wrapped is None:
            return None
        node_type, fields = wrapped
        if node_type == "TypeCast":
            node = fields.get("arg")
            continue
        if node_type != "A_Const" or fields.get("isnull"):
            return None
        return _const_value(fields)
    return None


def _const_value(fields: Fields) -> str | None:
    for key in _CONST_KEYS:
        inner = fields.get(key)
        if isinstance(inner, dict):
            value = inner.get(key, 0 if key == "ival" else "")
            return str(value)
    boolval = fields.get("boolval")
    if isinstance(boolval, dict):
        return "true" if boolval.get("boolval") else "false"
    return None


def names_of(value: JsonValue | None) -> list[str]:
    """The `sval`s of a list of String nodes (a qualified name)."""
    out: list[str] = []
    if isinstance(value, list):
        for item in value:
            wrapped = unwrap(item)
            if wrapped is not None and wrapped[0] == "String":
                sval = wrapped[1].get("sval")
                if isinstance(sval, str):
                    out.append(sval)
    return out


def function_name_from_literal(text: str) -> str:
    """The function name regproc input resolves 'schema.Name(args)' to.

    Unquoted parts fold to lower case, quoted parts keep their case; surrounding blanks go.
    """
    head = text.split("(", 1)[0].strip()
    if head.endswith('"') and len(head) >= 2:
        start = head.rfind('"', 0, len(head) - 1)
        return head[start + 1 : -1].replace('""', '"')
    return head.rsplit(".", 1)[-1].strip().lower()


def def_elems(value: JsonValue | None) -> dict[str, JsonValue]:
    """DefElem options as {defname: arg}; the first occurrence of a name wins."""
    out: dict[str, JsonValue] = {}
    if isinstance(value, list):
        for item in value:
            wrapped = unwrap(item)
            if wrapped is not None and wrapped[0] == "DefElem":
                name = wrapped[1].get("defname")
                if isinstance(name, str) and name not in out:
                    out[name] = wrapped[1].get("arg")
    return out


def string_value(node: JsonValue | None) -> str | None:
    """The sval of a String node (or of the first String of a List node)."""
    wrapped = unwrap(node)
    if wrapped is None:
        return None
    node_type, fields = wrapped
    if node_type == "String":
        sval = fields.get("sval")
        return sval if isinstance(sval, str) else None
    if node_type == "List":
        items = fields.get("items")
        if isinstance(items, list) and items:
            return string_value(items[0])
    return None


def bool_value(node: JsonValue | None) -> bool | None:
    """The value of a Boolean node (DefElem arguments such as SECURITY DEFINER)."""
    wrapped = unwrap(node)
    if wrapped is None or wrapped[0] != "Boolean":
        return None
    return bool(wrapped[1].get("boolval"))
