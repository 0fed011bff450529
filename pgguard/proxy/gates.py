"""Choosing the gate a proxy runs with, from Settings."""

from __future__ import annotations

from pgguard.errors import ConfigError
from pgguard.policy import PolicyEngine, RulesError
from pgguard.proxy.gate import Gate
from pgguard.proxy.policy_gate import PolicyGate
from pgguard.settings import Settings


def build_gate(settings: Settings) -> Gate:
    """The policy gate with the configured rules; ConfigError if a rule file is invalid."""
    try:
        engine = PolicyEngine.load(settings.policy.rules_dir, mode=settings.policy.mode)
    except RulesError as exc:
        raise ConfigError(f"policy.rules_dir: invalid rules: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"policy.rules_dir: cannot read rules: {exc}") from None
    return PolicyGate(engine)
