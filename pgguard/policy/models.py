"""The schema of rule files (rules/*.yaml), validated with pydantic at load time.

Owns: `PolicyFile` (rules plus optional catalog entries), `Rule`, `Match`, `Examples`, and the
vocabulary checks: categories, statement kinds, id syntax, regex patterns, durations.

Invariants: unknown keys are errors (`extra="forbid"`); an invalid regex, an unknown category or
statement kind is an error at load time, never a rule that silently matches nothing. Rule ids
starting with `builtin.` are reserved for pgguard's built-in decisions.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pgguard.sql.kinds import STATEMENT_KINDS, UNPARSEABLE

Action = Literal["allow", "hold", "deny"]
# How a held statement waits: "wait" keeps the session waiting for the decision; "return"
# refuses it at once (55000) and runs it once when the agent re-sends it after the approval.
HoldMode = Literal["wait", "return"]
Category = Literal["export", "ddl", "privilege", "execute", "admin", "unparseable"]
PrivilegedCategory = Literal["export", "ddl", "privilege", "execute", "admin"]
DEFAULT_HOLD_TIMEOUT_S = 300.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h)?")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
KNOWN_KINDS = frozenset({*STATEMENT_KINDS, UNPARSEABLE})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _check_patterns(values: list[str] | None) -> list[str] | None:
    """Patterns are exact names, or regular expressions (full match) when they start with '~'."""
    for value in values or []:
        if not value:
            raise ValueError("empty pattern")
        if value.startswith("~"):
            try:
                re.compile(value[1:])
            except re.error as exc:
                raise ValueError(f"bad regular expression {value!r}: {exc}") from None
    return values


class Match(_Strict):
    """What a rule applies to; every given criterion must hold (omitted = anything)."""

    categories: list[Category] | None = Field(default=None, min_length=1)
    privileged: bool | None = None
    kinds: list[str] | None = Field(default=None, min_length=1)
    functions: list[str] | None = Field(default=None, min_length=1)
    tables: list[str] | None = Field(default=None, min_length=1)
    schemas: list[str] | None = Field(default=None, min_length=1)
    agents: list[str] | None = Field(default=None, min_length=1)
    databases: list[str] | None = Field(default=None, min_length=1)

    @field_validator("functions", "tables", "schemas", "agents", "databases")
    @classmethod
    def _patterns_compile(cls, values: list[str] | None) -> list[str] | None:
        return _check_patterns(values)

    @field_validator("kinds")
    @classmethod
    def _kinds_known(cls, values: list[str] | None) -> list[str] | None:
        for value in values or []:
            if value not in KNOWN_KINDS:
                raise ValueError(
                    f"unknown statement kind {value!r} (use pglast node names such as "
                    "'SelectStmt', 'CopyStmt', or 'unparseable')"
                )
        return values


class ExampleCase(_Strict):
    """An example with its own context (agent, database)."""

    sql: str
    agent: str = "example-agent"
    database: str = "example-db"


class Examples(_Strict):
    """SQL the rule must match, and look-alikes it must not."""

    match: list[str | ExampleCase] = Field(default_factory=list)
    no_match: list[str | ExampleCase] = Field(default_factory=list)


class Rule(_Strict):
    """One policy rule. Later rules override earlier ones for the statements they match."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", max_length=100)]
    description: Annotated[str, Field(min_length=1)]
    match: Match = Field(default_factory=Match)
    action: Action
    approvers: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    hold_timeout: float | str | None = None
    min_approvals: Annotated[int, Field(ge=1, le=10)] = 1
    remember: float | str | None = None
    hold_mode: HoldMode | None = None  # unset: the agent's default ([[agents]] hold_mode)
    examples: Examples = Field(default_factory=Examples)

    @model_validator(mode="after")
    def _hold_mode_only_for_holds(self) -> Rule:
        if self.hold_mode is not None and self.action != "hold":
            raise ValueError("hold_mode applies only to rules whose action is hold")
        return self

    @field_validator("id")
    @classmethod
    def _not_builtin(cls, value: str) -> str:
        # Built-in decisions (builtin.state-schema, ...) must be recognisable in logs and the
        # ledger as pgguard's own, never as a rule file's.
        if value.lower().startswith("builtin."):
            raise ValueError("rule ids starting with 'builtin.' are reserved for pgguard")
        return value

    @field_validator("hold_timeout", "remember")
    @classmethod
    def _duration(cls, value: float | str | None) -> float | None:
        if value is None:
            return None
        if isinstance(value, int | float):
            seconds = float(value)
        else:
            parsed = _DURATION.fullmatch(value.strip())
            if parsed is None:
                raise ValueError("must be seconds or a duration like '90s', '5m', '2h'")
            seconds = float(parsed.group(1)) * _UNITS[parsed.group(2)]
        if not 0 < seconds <= 7 * 24 * 3600:
            raise ValueError("must be between 0 and 7 days")
        return seconds

    @property
    def remember_s(self) -> float | None:
        value = self.remember
        return float(value) if isinstance(value, int | float) else None

    @property
    def hold_timeout_s(self) -> float:
        value = self.hold_timeout
        return float(value) if isinstance(value, int | float) else DEFAULT_HOLD_TIMEOUT_S


class PolicyFile(_Strict):
    """A rule file: rules, and/or catalog entries (functions and settings by category)."""

    version: Literal[1] = 1
    rules: list[Rule] = Field(default_factory=list)
    functions: dict[PrivilegedCategory, dict[str, str]] = Field(default_factory=dict)
    settings: dict[PrivilegedCategory, dict[str, str]] = Field(default_factory=dict)
