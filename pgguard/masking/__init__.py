"""Redaction of SQL text and Bind parameters for everything a reviewer sees.

Owns the public API: `MaskingRules`, `mask_sql` → `MaskedStatement` (masked text, `Touches`,
count of masked values, completeness), `mask_parameters`, `mask_text` and `mask_server_message`
(free text an agent controls) and `shorten_middle`.

Invariants: pure (no I/O but reading the rule file); never logs or returns a raw value; every
literal that is data is masked whatever the rules say (rules only choose how much of a value's
shape shows); literals that are code or name a target are shown (rules/masking/README.md).
"""

from __future__ import annotations

from pgguard.masking.freetext import mask_server_message, mask_text
from pgguard.masking.rules import SHIPPED_MASKING_RULES, MaskingRules, describe_value
from pgguard.masking.shorten import shorten_middle
from pgguard.masking.statement import MaskedStatement, mask_parameters, mask_sql
from pgguard.masking.tree import ExportKind, Touches

__all__ = [
    "SHIPPED_MASKING_RULES",
    "ExportKind",
    "MaskedStatement",
    "MaskingRules",
    "Touches",
    "describe_value",
    "mask_parameters",
    "mask_server_message",
    "mask_sql",
    "mask_text",
    "shorten_middle",
]
