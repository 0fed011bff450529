"""Choosing the gate a proxy runs with, from Settings."""

from __future__ import annotations

from pgguard.proxy.gate import Gate
from pgguard.settings import Settings


def build_gate(settings: Settings) -> Gate:
    """The gate for ``settings``: the pass-through gate (SQL allowed, FunctionCall refused)."""
    return Gate()
