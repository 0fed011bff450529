"""Rules that can never decide: for `pgguard rules check`.

Owns `shadowed_rules`. The last matching rule decides a statement, so a rule is dead when a later
rule matches every statement it matches. The test is sufficient, not complete: it only reports
a rule when the later rule's criteria are provably at least as wide (each criterion absent, or the
same patterns read the same way), so every warning is true; some dead rules are not found.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgguard.policy.rules import CompiledRule, Patterns
from pgguard.sql.kinds import UNPARSEABLE


@dataclass(frozen=True, slots=True)
class Shadow:
    rule_id: str
    where: str
    by_id: str
    by_where: str

    def message(self) -> str:
        return (
            f"{self.where}: rule {self.rule_id} can never decide: rule {self.by_id} "
            f"({self.by_where}) comes later and matches every statement it matches"
        )


def shadowed_rules(rules: tuple[CompiledRule, ...]) -> list[Shadow]:
    """Every rule that a later rule always overrides (the first such later rule named)."""
    out: list[Shadow] = []
    for index, rule in enumerate(rules):
        for later in rules[index + 1 :]:
            if _covers(later, rule):
                out.append(Shadow(rule.id, rule.where, later.id, later.where))
                break
    return out


def _covers(wide: CompiledRule, narrow: CompiledRule) -> bool:
    """True only when `wide` certainly matches whatever `narrow` matches."""
    if _names_unparseable(narrow) and not _names_unparseable(wide):
        return False
    wanted = wide.rule.match.privileged
    if wanted is not None and narrow.rule.match.privileged != wanted:
        return False
    if not (_patterns_cover(wide.agents, narrow.agents)):
        return False
    if not _patterns_cover(wide.databases, narrow.databases):
        return False
    # Statement criteria are read differently by allow ("certainly covered") and by hold/deny
    # ("possibly touched"): only equal criteria read the same way are known to be as wide.
    same_reading = (wide.rule.action == "allow") == (narrow.rule.action == "allow")
    pairs = (
        (wide.categories, narrow.categories),
        (wide.kinds, narrow.kinds),
        (_key(wide.functions), _key(narrow.functions)),
        (_key(wide.tables), _key(narrow.tables)),
        (_key(wide.schemas), _key(narrow.schemas)),
    )
    return all(w is None or (same_reading and w == n) for w, n in pairs)


def _names_unparseable(rule: CompiledRule) -> bool:
    return bool(
        (rule.categories and UNPARSEABLE in rule.categories)
        or (rule.kinds and UNPARSEABLE in rule.kinds)
    )


def _patterns_cover(wide: Patterns | None, narrow: Patterns | None) -> bool:
    """Agents and databases are plain names: exact names of `narrow` matched by `wide`."""
    if wide is None:
        return True
    if narrow is None or narrow.regexes:
        return False
    return all(wide.matches(name) for name in narrow.exact)


def _key(patterns: Patterns | None) -> frozenset[str] | None:
    if patterns is None:
        return None
    return patterns.exact | frozenset("~" + r.pattern for r in patterns.regexes)
