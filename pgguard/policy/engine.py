"""The policy engine: SQL text + context → Decision, on every statement's path.

Owns: `PolicyEngine` (load, classify, new_session) and its caches; `on_read`, a hook told how
long each text took that the exact and literal-blind caches did not answer (timing is the
caller's business; the engine only says when it really read a text).

Invariants:
- `classify` never raises and never answers `allow` for text it could not fully read: undecodable
  text, a NUL byte, oversized text, parse failures and internal errors are `unparseable`
  statements; a session state that changes lexing holds the statement (built-in, not a rule).
- A statement that names pgguard's own state schema or notification channels
  (`pgguard.sql.statenames`; unreadable text that spells one of them counts) is denied by
  `builtin.state-schema`, whatever the rules say, in observe mode too (`Decision.observe` is
  False for it): pgguard protecting itself is not a policy choice.
- Caching never changes an answer. The exact cache is keyed by the raw text and everything in the
  context that matters (agent, database, lex state); decisions that read or change session state
  (PREPARE, EXECUTE, DEALLOCATE) are never cached. The shape cache is keyed by the text with its
  constants replaced (`normalized_key`) and only holds decisions proven independent of constant
  values (`StatementFacts.cacheable`), in the default lex state. The state-schema check reads
  string constants, so a text that may name a protected name (`ProtectedNames.may_name`, a sound
  screen) never takes its answer from the shape or literal-blind cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from pgguard.policy.cache import BoundedCache
from pgguard.policy.decision import ActionName, Context, Decision, Mode, StatementVerdict
from pgguard.policy.loader import LoadedPolicy, load_policy
from pgguard.policy.models import HoldMode
from pgguard.policy.rules import STATE_SCHEMA_RULE, Judgement, judge_statement, stricter
from pgguard.policy.session import SessionTracker, too_many_names
from pgguard.sql.classify import StatementFacts, classify_text, unparseable_facts
from pgguard.sql.fastkey import literal_blind_key
from pgguard.sql.kinds import UNPARSEABLE
from pgguard.sql.lexstate import (
    DEFAULT_MAX_SQL_BYTES,
    LexState,
    UnreadableSQL,
    decode_sql,
    lex_state_is_default,
    lexing_hazard,
)
from pgguard.sql.parse import ParseFailure, fingerprint, normalized_key
from pgguard.sql.statenames import ProtectedNames

log = logging.getLogger(__name__)

DEFAULT_HOLD_TIMEOUT_S = 300.0
LEX_HAZARD_RULE = "builtin.lex-hazard"
NO_COMMON_APPROVER_RULE = "builtin.no-common-approver"
MAX_CACHED_TEXT = 16 * 1024
OBSERVE_MODE_NOTICE = (
    "pgguard is in OBSERVE mode: no statement is held or denied (except those naming pgguard's "
    "own state); every statement's would-be action is computed and logged"
)
UNREADABLE_STATE_REASON = "text pgguard cannot read spells a name of pgguard's own state"

CacheKey = tuple[str | bytes, str, str, LexState]


class PolicyEngine:
    """Compiled rules plus caches; one instance serves every connection."""

    def __init__(
        self,
        policy: LoadedPolicy,
        *,
        mode: Mode = "enforce",
        max_sql_bytes: int = DEFAULT_MAX_SQL_BYTES,
        cache_size: int = 8192,
        protected: ProtectedNames | None = None,
    ) -> None:
        # None: pgguard's default state schema and channels (safe when a caller forgets them).
        self.protected = protected if protected is not None else ProtectedNames()
        catalog = replace(policy.catalog, protected=self.protected)
        self.policy = replace(policy, catalog=catalog)
        self.mode: Mode = mode
        self.max_sql_bytes = max_sql_bytes
        self._exact: BoundedCache[CacheKey, Decision] = BoundedCache(cache_size)
        self._shape: BoundedCache[CacheKey, Decision] = BoundedCache(cache_size)
        # Keyed by pgguard.sql.fastkey's literal-blind text; holds exactly what _shape holds.
        self._blind: BoundedCache[CacheKey, Decision] = BoundedCache(cache_size)
        # Told the seconds of each text the exact and literal-blind caches did not answer
        # (`_read`); the proxy's policy gate sets it for pgguard_classify_seconds. A hit is not
        # timed: two clock reads and an observe (~0.19 µs) would add 60% to an exact hit
        # (~0.3 µs) and 9% to a literal-blind one (~2 µs), on every statement.
        self.on_read: Callable[[float], None] | None = None

    @classmethod
    def load(
        cls,
        rules_dir: Path | None = None,
        *,
        mode: Mode = "enforce",
        max_sql_bytes: int = DEFAULT_MAX_SQL_BYTES,
        cache_size: int = 8192,
        protected: ProtectedNames | None = None,
    ) -> PolicyEngine:
        """Load and validate rules (None: the shipped rules); raises RulesError naming file:line.

        `protected`: pgguard's state schema and channels (None: the defaults, `pgguard` and
        `pgguard_approvals`); statements naming them are always denied."""
        if mode not in ("enforce", "observe"):
            raise ValueError(f"unknown policy mode {mode!r} (expected 'enforce' or 'observe')")
        engine = cls(
            load_policy(rules_dir),
            mode=mode,
            max_sql_bytes=max_sql_bytes,
            cache_size=cache_size,
            protected=protected,
        )
        if mode == "observe":
            log.warning("%s", OBSERVE_MODE_NOTICE.upper())
        return engine

    def new_session(self) -> SessionTracker:
        """Fresh per-connection state (prepared statement names)."""
        return SessionTracker()

    def classify(self, sql: str | bytes, ctx: Context) -> Decision:
        """Decide what to do with one SQL string. Pure apart from caches and ctx.session."""
        return self.classify_keyed(sql, ctx)[0]

    def classify_keyed(self, sql: str | bytes, ctx: Context) -> tuple[Decision, bytes | None]:
        """`classify`, and the text's literal-blind key (`pgguard.sql.fastkey`) when it was
        computed on the way (None otherwise): the ledger renders the masked text from it, so
        the hot path scans the text once."""
        blind: bytes | None = None
        try:
            decision, blind = self._classify(sql, ctx)
        except Exception:  # never raise into the proxy; fail closed instead
            log.exception("classifier failed; treating the statement as unparseable")
            text = sql if isinstance(sql, str) else bytes(sql)
            facts = (self._unparseable("internal error while classifying", text),)
            decision = self._decide(facts, ctx, "", None)
        if decision.observe and decision.action != "allow":
            log.info(
                "observe mode: would %s statement %s (%s)",
                decision.action,
                decision.fingerprint or "<unparseable>",
                ", ".join(decision.rule_ids),
            )
        return decision, blind

    def _classify(self, sql: str | bytes, ctx: Context) -> tuple[Decision, bytes | None]:
        if not isinstance(sql, str | bytes):
            sql = bytes(sql)  # type: ignore[unreachable]  # bytearray/memoryview off the wire
        small = len(sql) <= MAX_CACHED_TEXT
        key: CacheKey = (sql, ctx.agent, ctx.database, ctx.lex)
        blind: bytes | None = None
        blind_key: CacheKey | None = None
        if small:
            hit = self._exact.get(key)
            if hit is not None:
                return hit, None
            if type(sql) is bytes and lex_state_is_default(ctx.lex):
                blind = literal_blind_key(sql)
                if blind is not None:
                    blind_key = (blind, ctx.agent, ctx.database, ctx.lex)
                    hit = None if self.protected.may_name(sql) else self._blind.get(blind_key)
                    if hit is not None:
                        return hit, blind
        on_read = self.on_read
        if on_read is None:
            return self._read(sql, ctx, key, small, blind, blind_key)
        started = time.perf_counter()
        try:
            return self._read(sql, ctx, key, small, blind, blind_key)
        finally:
            on_read(time.perf_counter() - started)

    def _read(
        self,
        sql: str | bytes,
        ctx: Context,
        key: CacheKey,
        small: bool,
        blind: bytes | None,
        blind_key: CacheKey | None,
    ) -> tuple[Decision, bytes | None]:
        """A text neither the exact nor the literal-blind cache answered: decoded, normalized
        (the shape cache) and, when that misses too, parsed and judged."""
        try:
            text = decode_sql(sql, ctx.lex, self.max_sql_bytes)
        except UnreadableSQL as exc:
            unread = (self._unparseable(str(exc), sql),)
            decision = self._decide(unread, ctx, "", None)
            if small:
                self._exact.put(key, decision)
            return decision, blind
        hazard = lexing_hazard(text, ctx.lex)
        shape_key: CacheKey | None = None
        shareable = not self.protected.may_name(text)
        if small and hazard is None and shareable and lex_state_is_default(ctx.lex):
            normalized = normalized_key(text)
            if normalized is not None:
                shape_key = (normalized, ctx.agent, ctx.database, ctx.lex)
                hit = self._shape.get(shape_key)
                if hit is not None:
                    # Same literal-independent decision: texts sharing this one's blind key
                    # differ from it only in literal values, so they normalize alike too.
                    if blind_key is not None:
                        self._blind.put(blind_key, hit)
                    return hit, blind
        try:
            facts = classify_text(text, self.policy.catalog)
        except ParseFailure as exc:
            facts = (self._unparseable(f"PostgreSQL's parser rejects it: {exc}", text),)
        parsed = not any(f.kind == UNPARSEABLE for f in facts)
        decision = self._decide(facts, ctx, fingerprint(text) if parsed else "", hazard)
        if small and not any(f.touches_session for f in facts):
            self._exact.put(key, decision)
            if shape_key is not None and facts and all(f.cacheable for f in facts):
                self._shape.put(shape_key, decision)
                if blind_key is not None:
                    self._blind.put(blind_key, decision)
        return decision, blind

    def decide_facts(self, facts: tuple[StatementFacts, ...], ctx: Context) -> Decision:
        """Judge facts gathered elsewhere (routine bodies read from the catalog) by the rules,
        as `classify` judges a statement's own; never cached."""
        return self._decide(facts, ctx, "", None)

    def _unparseable(self, reason: str, text: str | bytes) -> StatementFacts:
        facts = unparseable_facts(reason)
        if self.protected.mentions(text):
            facts = replace(facts, state_refs=(UNREADABLE_STATE_REASON,))
        return facts

    def _decide(
        self,
        facts: tuple[StatementFacts, ...],
        ctx: Context,
        fp: str,
        hazard: str | None,
    ) -> Decision:
        session = ctx.session if ctx.session is not None else SessionTracker()
        verdicts: list[StatementVerdict] = []
        judgements: list[Judgement] = []
        resolved_all: list[StatementFacts] = []
        for item in facts:
            resolved = session.resolve(item)
            if item.prepares is not None and not session.remember(item.prepares, item):
                resolved = too_many_names(resolved)  # a new name the tracker cannot keep
            judgement = judge_statement(self.policy.rules, resolved, ctx.agent, ctx.database)
            resolved_all.append(resolved)
            judgements.append(judgement)
            verdicts.append(_verdict(resolved, judgement))
        return self._combine(tuple(verdicts), judgements, tuple(resolved_all), fp, hazard)

    def _combine(
        self,
        verdicts: tuple[StatementVerdict, ...],
        judgements: list[Judgement],
        facts: tuple[StatementFacts, ...],
        fp: str,
        hazard: str | None,
    ) -> Decision:
        action: ActionName = "allow"
        for judgement in judgements:
            action = stricter(action, judgement.action)
        categories = _union(v.categories for v in verdicts)
        reasons = list(_union(v.reasons for v in verdicts))
        rule_ids = [j.deciding_rule for j in judgements if j.action == action and j.deciding_rule]
        held = [j for j in judgements if j.action == "hold"]
        timeout = min(
            (j.hold_timeout_s or DEFAULT_HOLD_TIMEOUT_S for j in held),
            default=DEFAULT_HOLD_TIMEOUT_S,
        )
        approvers, conflict = _common_approvers(held)
        min_approvals = max((j.min_approvals for j in held), default=1)
        remembers = [j.remember_s for j in held if j.remember_s is not None]
        remember_s = min(remembers) if held and len(remembers) == len(held) else None
        modes = {j.hold_mode for j in held}
        hold_mode: HoldMode | None = None
        if "wait" in modes:
            hold_mode = "wait"
        elif modes == {"return"}:
            hold_mode = "return"
        if hazard is not None:
            action = stricter(action, "hold")
            rule_ids.append(LEX_HAZARD_RULE)
            reasons.append(hazard)
        if conflict and action == "hold":
            action = "deny"
            rule_ids = [NO_COMMON_APPROVER_RULE]
            reasons.append("no approver group may approve every held statement; send them apart")
        protects_state = any(f.state_refs for f in facts)
        if protects_state:  # judge_statement denied these; keep the built-in rule in front
            rule_ids = [STATE_SCHEMA_RULE, *(r for r in rule_ids if r != STATE_SCHEMA_RULE)]
        return Decision(
            action=action,
            privileged=bool(categories) or hazard is not None or protects_state,
            categories=categories,
            rule_ids=tuple(dict.fromkeys(rule_ids)),
            reasons=tuple(dict.fromkeys(reasons)),
            statements=verdicts,
            fingerprint=fp,
            hold_timeout_s=timeout,
            approver_groups=approvers,
            min_approvals=min_approvals,
            remember_s=remember_s,
            hold_mode=hold_mode,
            observe=self.mode == "observe" and not protects_state,
            changes_lexing=any(f.changes_lexing for f in facts),
            # Without text: a shape-cache hit must not carry another statement's literals.
            facts=tuple(replace(f, text="") for f in facts),
        )


def _verdict(facts: StatementFacts, judgement: Judgement) -> StatementVerdict:
    return StatementVerdict(
        kind=facts.kind,
        categories=facts.categories,
        rules=judgement.matched,
        action=judgement.action,
        rule=judgement.deciding_rule,
        reasons=(*facts.reasons, *facts.state_refs),
        functions=facts.flagged_functions,
        relations=facts.relations,
    )


def _union(parts: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for part in parts:
        out.update(dict.fromkeys(part))
    return tuple(out)


def _common_approvers(held: list[Judgement]) -> tuple[tuple[str, ...], bool]:
    """Groups allowed to approve every held statement; (groups, True) if no group can."""
    restricted = [set(j.approvers) for j in held if j.approvers]
    if not restricted:
        return (), False
    common = set.intersection(*restricted)
    return tuple(sorted(common)), not common
