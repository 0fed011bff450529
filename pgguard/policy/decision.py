"""The values that cross the policy boundary: what the proxy passes in and gets back.

Owns: `Context` (who is asking, where, in which session state), `StatementVerdict` and `Decision`
(with `to_json`, the exact shape of the `pgguard classify` contract).

Invariants: values are frozen. Reasons never contain literal values from the SQL. `privileged` is
True for anything that could not be fully read; in observe mode `action` is still the would-be
action and `observe` tells the proxy not to act on it - except for a statement that names
pgguard's own state (`builtin.state-schema`), whose deny has `observe` False in every mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pgguard.policy.session import SessionTracker
from pgguard.sql.classify import StatementFacts
from pgguard.sql.lexstate import DEFAULT_LEX_STATE, LexState

Mode = Literal["enforce", "observe"]
ActionName = Literal["allow", "hold", "deny"]


@dataclass(frozen=True, slots=True)
class Context:
    """Who sends the statement, to which database, in what session state."""

    agent: str
    database: str
    lex: LexState = DEFAULT_LEX_STATE
    session: SessionTracker | None = None


@dataclass(frozen=True, slots=True)
class StatementVerdict:
    """One statement's kind, categories, matching rules and action."""

    kind: str
    categories: tuple[str, ...]
    rules: tuple[str, ...]
    action: ActionName
    rule: str
    reasons: tuple[str, ...]
    functions: tuple[str, ...] = ()
    relations: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "categories": list(self.categories),
            "rules": list(self.rules),
            "action": self.action,
            "decided_by": self.rule,
            "reasons": list(self.reasons),
            "functions": list(self.functions),
            "relations": list(self.relations),
        }


_SETTING_KINDS = frozenset({"VariableSetStmt", "DiscardStmt"})


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy outcome for one SQL string (all of its statements)."""

    action: ActionName
    privileged: bool
    categories: tuple[str, ...]
    rule_ids: tuple[str, ...]
    reasons: tuple[str, ...]
    statements: tuple[StatementVerdict, ...]
    fingerprint: str
    hold_timeout_s: float
    approver_groups: tuple[str, ...]
    observe: bool  # True: log `action`, do not act on it (observe mode, not a built-in deny)
    changes_lexing: bool = False
    min_approvals: int = 1  # distinct approvers a hold needs (the largest any held rule asks)
    remember_s: float | None = None  # how long an approval covers repeats (all held rules agree)
    # "return" when every held statement's rule says so, "wait" when one says wait, None when
    # none says (the agent's default applies).
    hold_mode: Literal["wait", "return"] | None = None
    facts: tuple[StatementFacts, ...] = field(default=(), repr=False, compare=False)
    """Per-statement facts (categories, functions, relations; `text` blanked) for
    `SessionTracker.remember_all` when the proxy tracks protocol-level named statements."""
    # Derived once per decision (decisions are cached and met again on every repeat of a text),
    # so the proxy's hot path reads a field instead of walking statements and facts each time.
    fetches: bool = field(init=False, repr=False, compare=False)
    """A statement is a FETCH or MOVE (it runs the portal or cursor it names)."""
    called_functions: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """Every function name the statements call, sorted, without repeats."""
    moves_settings: bool = field(init=False, repr=False, compare=False)
    """A statement SETs, RESETs or DISCARDs settings, or ends a transaction (undoing SET LOCAL):
    the proxy follows the session's statement_timeout through these."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fetches", any(s.kind == "FetchStmt" for s in self.statements))
        moves = any(s.kind in _SETTING_KINDS for s in self.statements) or any(
            f.undoes_settings for f in self.facts
        )
        object.__setattr__(self, "moves_settings", moves)
        names = {name for facts in self.facts for name in facts.functions}
        object.__setattr__(self, "called_functions", tuple(sorted(names)))

    def to_json(self) -> dict[str, object]:
        """The `pgguard classify --json` object (contract keys first, extras after)."""
        return {
            "privileged": self.privileged,
            "categories": list(self.categories),
            "action": self.action,
            "statements": [s.to_json() for s in self.statements],
            "rule_ids": list(self.rule_ids),
            "reasons": list(self.reasons),
            "fingerprint": self.fingerprint,
            "hold_timeout_s": self.hold_timeout_s,
            "approver_groups": list(self.approver_groups),
            "observe": self.observe,
            "changes_lexing": self.changes_lexing,
            "min_approvals": self.min_approvals,
            "remember_s": self.remember_s,
            "hold_mode": self.hold_mode,
        }
