"""What a StartupMessage's parameters set, as (setting, value) pairs (sans-IO).

Besides ``user``, ``database``, ``replication`` and protocol options (``_pq_.*``), every
start-up parameter is a run-time setting (53.7 StartupMessage), and ``options`` carries more as
command-line switches: ``-c name=value`` or ``--name=value``, separated by spaces unless escaped
with a backslash (libpq docs, "options"). Those settings take effect before the first statement,
so a policy must see them. Other postgres switches (``-F``, ``-B``, ...) are not interpreted
here: they are refused (fail closed) rather than guessed at.
"""

from __future__ import annotations

_NOT_SETTINGS = frozenset({"user", "database", "replication", "options"})


class StartupOptionError(ValueError):
    """A start-up ``options`` string pgguard cannot read with certainty."""


def settings_from_startup(parameters: list[tuple[str, str]]) -> list[tuple[str, str]]:
    settings: list[tuple[str, str]] = []
    for key, value in parameters:
        if key == "options":
            settings.extend(parse_options(value))
        elif key not in _NOT_SETTINGS and not key.startswith("_pq_."):
            settings.append((key, value))
    return settings


def parse_options(options: str) -> list[tuple[str, str]]:
    """Parse a libpq ``options`` string into settings; StartupOptionError on anything else."""
    tokens = _split(options)
    settings: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "-c":
            if i + 1 >= len(tokens):
                raise StartupOptionError("-c without a setting in options")
            settings.append(_assignment(tokens[i + 1]))
            i += 2
            continue
        if token.startswith("-c") or token.startswith("--"):
            settings.append(_assignment(token[2:]))
        else:
            raise StartupOptionError(f"unsupported switch {token[:20]!r} in options")
        i += 1
    return settings


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise StartupOptionError(f"expected name=value in options, got {text[:40]!r}")
    # PostgreSQL turns '-' into '_' in setting names given as switches (ParseLongOption).
    return name.replace("-", "_"), value


def _split(options: str) -> list[str]:
    tokens: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(ch)
    if escaped:
        raise StartupOptionError("options ends with a lone backslash")
    if current:
        tokens.append("".join(current))
    return tokens
