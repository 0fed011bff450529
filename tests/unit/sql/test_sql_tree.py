"""The JSON tree loader and walker survive any nesting depth."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from pgguard.sql.tree import _load_json_iteratively, iter_nodes, load_json

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=30,
)


@given(json_values)
def test_iterative_loader_agrees_with_json_module(value: object) -> None:
    text = json.dumps(value)
    assert _load_json_iteratively(text) == json.loads(text)


def test_nesting_deeper_than_the_recursion_limit_loads() -> None:
    depth = 50_000
    text = '{"A_Expr":{"lexpr":' * depth + "1" + "}}" * depth
    tree = load_json(text)
    assert isinstance(tree, dict)


def test_walker_visits_every_level_of_a_deep_tree() -> None:
    depth = 20_000
    node: dict[str, object] = {"A_Const": {"ival": {"ival": 1}}}
    for _ in range(depth):
        node = {"A_Expr": {"lexpr": node}}
    root_type, root = next(iter(node.items()))
    assert isinstance(root, dict)
    seen = sum(1 for t, _ in iter_nodes(root_type, root) if t == "A_Expr")
    assert seen == depth


def test_unwrapped_fields_get_their_node_type() -> None:
    root = {"funccall": {"funcname": []}, "relation": {"relname": "t"}}
    types = [t for t, _ in iter_nodes("CallStmt", root)]
    assert "FuncCall" in types
    assert "RangeVar" in types
