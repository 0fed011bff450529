"""Policy: rule files (rules/*.yaml) → validated models → compiled engine → Decision.

Public API: `PolicyEngine.load(...)`, `engine.classify(sql, Context(...)) -> Decision`,
`engine.new_session() -> SessionTracker`, and `RulesError` for invalid rule files.
"""

from __future__ import annotations

from pgguard.policy.decision import Context, Decision, Mode, StatementVerdict
from pgguard.policy.engine import OBSERVE_MODE_NOTICE, PolicyEngine
from pgguard.policy.loader import SHIPPED_RULES_DIR
from pgguard.policy.session import SessionTracker
from pgguard.policy.yamlsrc import RulesError
from pgguard.sql.lexstate import PENDING_LEX_STATE, LexState

__all__ = [
    "OBSERVE_MODE_NOTICE",
    "PENDING_LEX_STATE",
    "SHIPPED_RULES_DIR",
    "Context",
    "Decision",
    "LexState",
    "Mode",
    "PolicyEngine",
    "RulesError",
    "SessionTracker",
    "StatementVerdict",
]
