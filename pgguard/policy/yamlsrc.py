"""Reading YAML while remembering where every value came from.

Owns: `load_yaml_with_lines` (safe YAML → plain Python values plus a map from each value's path
to its 1-based line) and `RulesError`, the one error type for bad rule files.

Invariants: only the safe YAML subset is accepted (no Python tags); duplicate mapping keys are
errors (YAML would silently keep the last one, hiding a typo); every error names file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

PathKey = tuple[str | int, ...]
YamlValue = object


class RulesError(ValueError):
    """A rule file is invalid. The message names each problem as `file:line: what`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True, slots=True)
class SourceMap:
    """Where each value of one YAML document came from."""

    path: Path
    lines: dict[PathKey, int]

    def line_of(self, loc: PathKey) -> int:
        """The line of the deepest known value on `loc` (the document start if none)."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return 1

    def where(self, loc: PathKey) -> str:
        return f"{self.path}:{self.line_of(loc)}"


def load_yaml_with_lines(path: Path) -> tuple[YamlValue, SourceMap]:
    """Parse one YAML file into plain values and a SourceMap; raises RulesError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError([f"{path}:1: cannot read rule file ({exc.__class__.__name__})"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RulesError([f"{path}:{line}: {problem}"]) from None
    lines: dict[PathKey, int] = {}
    if node is None:
        return {}, SourceMap(path, lines)
    problems: list[str] = []
    value = _construct(node, (), lines, problems, path)
    if problems:
        raise RulesError(problems)
    return value, SourceMap(path, lines)


def _construct(
    node: yaml.Node, loc: PathKey, lines: dict[PathKey, int], problems: list[str], path: Path
) -> YamlValue:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[object, YamlValue] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node, path, problems)
            if not isinstance(key, str | int):
                problems.append(f"{path}:{key_node.start_mark.line + 1}: keys must be strings")
                continue
            if key in out:
                problems.append(f"{path}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
                continue
            lines[(*loc, key)] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, (*loc, key), lines, problems, path)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(item, (*loc, index), lines, problems, path)
            for index, item in enumerate(node.value)
        ]
    return _scalar(node, path, problems)


def _scalar(node: yaml.Node, path: Path, problems: list[str]) -> YamlValue:
    if not isinstance(node, yaml.ScalarNode):
        problems.append(f"{path}:{node.start_mark.line + 1}: expected a plain value")
        return None
    try:
        return yaml.SafeLoader("").construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "invalid value"
        problems.append(f"{path}:{node.start_mark.line + 1}: {problem}")
        return None
