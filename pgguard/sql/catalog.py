"""The function and setting catalog the classifier consults: plain data, loaded from rules/.

Owns: `Catalog` (function name → categories, setting name → categories, each with the reason a
reviewer reads; and the names pgguard protects, `statenames.ProtectedNames`, which the policy
engine sets from settings and no rule file can change) and helpers to look names up.

Invariants: names are stored exactly as PostgreSQL resolves them: function names case-sensitive
(the parser has already folded unquoted names to lower case, so "PG_READ_FILE" is a different
function), setting names lower-cased (PostgreSQL compares them case-insensitively, even quoted).
The catalog only ever adds categories; an empty catalog still classifies every statement kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pgguard.sql.statenames import NO_PROTECTED_NAMES, ProtectedNames

Entry = tuple[tuple[str, ...], str]
"""(categories, why) for one function or setting."""

_EMPTY: Mapping[str, Entry] = MappingProxyType({})

# Settings that change how later statements are lexed: not privileged in themselves, but a value
# other than the safe one makes the proxy's reading of later text unreliable.
LEXING_SETTINGS = frozenset({"standard_conforming_strings", "client_encoding", "backslash_quote"})

# Functions whose *arguments* name a setting or a function: classify.py inspects their literals.
SET_CONFIG_FUNCTIONS = frozenset({"set_config"})
FUNCTION_NAME_FUNCTIONS = frozenset({"to_regproc", "to_regprocedure"})
FUNCTION_NAME_TYPES = frozenset({"regproc", "regprocedure"})


@dataclass(frozen=True, slots=True)
class Catalog:
    """What calling a function or changing a setting means, by name."""

    functions: Mapping[str, Entry] = field(default_factory=lambda: _EMPTY)
    settings: Mapping[str, Entry] = field(default_factory=lambda: _EMPTY)
    protected: ProtectedNames = NO_PROTECTED_NAMES

    def function(self, name: str) -> Entry | None:
        """(categories, why) for a function name as the parser produced it, or None."""
        return self.functions.get(name)

    def setting(self, name: str) -> Entry | None:
        """(categories, why) for a setting name, compared case-insensitively."""
        return self.settings.get(name.lower())

    def merged(self, other: Catalog) -> Catalog:
        """A catalog with both sets of entries; categories of a shared name are united."""
        return Catalog(
            functions=MappingProxyType(_merge(self.functions, other.functions)),
            settings=MappingProxyType(_merge(self.settings, other.settings)),
            protected=self.protected or other.protected,
        )


def _merge(left: Mapping[str, Entry], right: Mapping[str, Entry]) -> dict[str, Entry]:
    out = dict(left)
    for name, (cats, why) in right.items():
        if name in out:
            old_cats, old_why = out[name]
            united = tuple(dict.fromkeys((*old_cats, *cats)))
            out[name] = (united, old_why if old_why == why else f"{old_why}; {why}")
        else:
            out[name] = (cats, why)
    return out


EMPTY_CATALOG = Catalog()
