"""Compiled rules and how one statement is judged against them.

Owns: `CompiledRule` (a validated `Rule` with its patterns compiled), `judge_statement` and the
built-in fallback actions.

Matching semantics (documented in rules/README.md):
- Rules are evaluated in order (files by name, rules in file order); the last rule that matches a
  statement decides its action, so later rules narrow or widen earlier ones.
- An `allow` rule matches only what it fully covers: all of the statement's categories are listed,
  all statement kinds in it are listed, every privileged function it calls is listed, every
  relation it touches is certainly covered. A `hold` or `deny` rule matches whatever it touches:
  any listed category, kind, function, or any relation that might be a listed one (an unqualified
  name could live in any schema).
- `unparseable` statements are matched only by rules that name `unparseable` explicitly.
- A rule that raises while matching makes the statement at least `hold`; it never allows.
- A statement that names pgguard's own state (`StatementFacts.state_refs`) is denied by
  `builtin.state-schema` whatever matched; no rule can change that.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from pgguard.policy.models import Action, HoldMode, Rule
from pgguard.sql.classify import StatementFacts
from pgguard.sql.kinds import UNPARSEABLE

log = logging.getLogger(__name__)

SEVERITY: dict[str, int] = {"allow": 0, "hold": 1, "deny": 2}
FALLBACK_HOLD = "builtin.privileged-hold"
FALLBACK_DENY = "builtin.unparseable-deny"
RULE_ERROR = "builtin.rule-error"
STATE_SCHEMA_RULE = "builtin.state-schema"


def stricter(left: Action, right: Action) -> Action:
    return left if SEVERITY[left] >= SEVERITY[right] else right


class Patterns:
    """Exact names and `~regex` patterns (full match)."""

    __slots__ = ("exact", "regexes")

    def __init__(self, patterns: list[str]) -> None:
        self.exact = frozenset(p for p in patterns if not p.startswith("~"))
        self.regexes = tuple(re.compile(p[1:]) for p in patterns if p.startswith("~"))

    def matches(self, value: str) -> bool:
        return value in self.exact or any(r.fullmatch(value) for r in self.regexes)

    def bare_names(self) -> frozenset[str]:
        """The name part of every exact pattern ('s.t' → 't')."""
        return frozenset(p.rsplit(".", 1)[-1] for p in self.exact)


def _optional(patterns: list[str] | None) -> Patterns | None:
    return Patterns(patterns) if patterns else None


@dataclass(frozen=True, slots=True)
class CompiledRule:
    rule: Rule
    where: str
    categories: frozenset[str] | None
    kinds: frozenset[str] | None
    functions: Patterns | None
    tables: Patterns | None
    schemas: Patterns | None
    agents: Patterns | None
    databases: Patterns | None

    @classmethod
    def compile(cls, rule: Rule, where: str) -> CompiledRule:
        m = rule.match
        return cls(
            rule=rule,
            where=where,
            categories=frozenset(m.categories) if m.categories else None,
            kinds=frozenset(m.kinds) if m.kinds else None,
            functions=_optional(m.functions),
            tables=_optional(m.tables),
            schemas=_optional(m.schemas),
            agents=_optional(m.agents),
            databases=_optional(m.databases),
        )

    @property
    def id(self) -> str:
        return self.rule.id

    def matches(self, facts: StatementFacts, agent: str, database: str) -> bool:
        """Does this rule apply to the statement in this context? May raise (caller holds)."""
        if self.agents is not None and not self.agents.matches(agent):
            return False
        if self.databases is not None and not self.databases.matches(database):
            return False
        if facts.kind == UNPARSEABLE and not self._names_unparseable():
            return False
        wanted = self.rule.match.privileged
        if wanted is not None and bool(facts.categories) != wanted:
            return False
        covering = self.rule.action == "allow"
        return (
            self._categories_ok(facts, covering)
            and self._kinds_ok(facts, covering)
            and self._functions_ok(facts, covering)
            and self._relations_ok(facts, covering)
        )

    def _names_unparseable(self) -> bool:
        return bool(
            (self.categories and UNPARSEABLE in self.categories)
            or (self.kinds and UNPARSEABLE in self.kinds)
        )

    def _categories_ok(self, facts: StatementFacts, covering: bool) -> bool:
        if self.categories is None:
            return True
        if covering:
            return all(c in self.categories for c in facts.categories)
        return any(c in self.categories for c in facts.categories)

    def _kinds_ok(self, facts: StatementFacts, covering: bool) -> bool:
        if self.kinds is None:
            return True
        if covering:
            return all(k in self.kinds for k in facts.kinds)
        return any(k in self.kinds for k in facts.kinds)

    def _functions_ok(self, facts: StatementFacts, covering: bool) -> bool:
        if self.functions is None:
            return True
        if covering:
            flagged = facts.flagged_functions
            return bool(flagged) and all(self.functions.matches(f) for f in flagged)
        return any(self.functions.matches(f) for f in facts.functions)

    def _relations_ok(self, facts: StatementFacts, covering: bool) -> bool:
        if self.tables is None and self.schemas is None:
            return True
        if covering:
            return bool(facts.relations) and all(self._certainly(r) for r in facts.relations)
        return any(self._possibly(r) for r in facts.relations)

    def _certainly(self, relation: str) -> bool:
        schema, _, name = relation.rpartition(".")
        if self.tables is not None:
            ok = self.tables.matches(relation) or name in self.tables.exact
            if not ok:
                return False
        if self.schemas is not None:
            return bool(schema) and self.schemas.matches(schema)
        return True

    def _possibly(self, relation: str) -> bool:
        schema, _, name = relation.rpartition(".")
        if self.tables is not None:
            ok = (
                self.tables.matches(relation)
                or name in self.tables.exact
                or (not schema and (name in self.tables.bare_names() or self.tables.matches(name)))
            )
            if not ok:
                return False
        if self.schemas is not None:
            return not schema or self.schemas.matches(schema)
        return True


@dataclass(frozen=True, slots=True)
class Judgement:
    """The outcome for one statement."""

    action: Action
    deciding_rule: str
    matched: tuple[str, ...]
    hold_timeout_s: float | None
    approvers: tuple[str, ...]
    min_approvals: int = 1
    remember_s: float | None = None
    hold_mode: HoldMode | None = None


def judge_statement(
    rules: tuple[CompiledRule, ...], facts: StatementFacts, agent: str, database: str
) -> Judgement:
    """Apply every rule in order; the last match decides, errors and fallbacks fail closed."""
    matched: list[CompiledRule] = []
    errored: list[str] = []
    for rule in rules:
        try:
            if rule.matches(facts, agent, database):
                matched.append(rule)
        except Exception:  # a broken rule must never turn into "allow"
            log.exception("rule %s raised while matching; holding the statement", rule.id)
            errored.append(rule.id)
    matched_ids = tuple(r.id for r in matched)
    if matched:
        decider = matched[-1]
        action: Action = decider.rule.action
        judgement = Judgement(
            action=action,
            deciding_rule=decider.id,
            matched=matched_ids,
            hold_timeout_s=decider.rule.hold_timeout_s if action == "hold" else None,
            approvers=tuple(decider.rule.approvers),
            min_approvals=decider.rule.min_approvals,
            remember_s=decider.rule.remember_s if action == "hold" else None,
            hold_mode=decider.rule.hold_mode if action == "hold" else None,
        )
    else:
        judgement = _fallback(facts, matched_ids)
    if facts.state_refs:
        return Judgement("deny", STATE_SCHEMA_RULE, (*matched_ids, STATE_SCHEMA_RULE), None, ())
    if errored and SEVERITY[judgement.action] < SEVERITY["hold"]:
        return Judgement("hold", RULE_ERROR, (*matched_ids, RULE_ERROR), None, ())
    return judgement


def _fallback(facts: StatementFacts, matched: tuple[str, ...]) -> Judgement:
    if facts.kind == UNPARSEABLE:
        return Judgement("deny", FALLBACK_DENY, matched, None, ())
    if facts.categories:
        return Judgement("hold", FALLBACK_HOLD, matched, None, ())
    return Judgement("allow", "", matched, None, ())
