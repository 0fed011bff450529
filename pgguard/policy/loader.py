"""Loading a rules directory: YAML files → validated models → compiled rules and catalog.

Owns: `load_policy`, `LoadedPolicy` and `SHIPPED_RULES_DIR`.

Invariants:
- Files are read in the documented order (`rule_files`): ``default.yaml`` first, then every other
  file in file-name order, so site files such as ``50-etl.yaml`` come after the defaults and,
  the last matching rule deciding, override them. Every problem in every file is reported at
  once, each as `file:line: what`, in one `RulesError`. A directory without rules is an error,
  not "allow all".
- The shipped catalog (function and setting categories) is always loaded, whatever directory is
  given: a custom directory can add catalog entries but cannot make the classifier forget one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from pydantic import ValidationError

from pgguard.policy.models import PolicyFile, Rule
from pgguard.policy.rules import CompiledRule
from pgguard.policy.yamlsrc import RulesError, SourceMap, load_yaml_with_lines
from pgguard.sql.catalog import EMPTY_CATALOG, Catalog, Entry

# pgguard/rules: package data in a wheel; in a source tree, a symlink to the top-level rules/.
SHIPPED_RULES_DIR = (Path(__file__).resolve().parents[1] / "rules").resolve()


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """Compiled rules in evaluation order, the merged catalog, and where they came from."""

    rules: tuple[CompiledRule, ...]
    catalog: Catalog
    files: tuple[Path, ...]


def load_policy(rules_dir: Path | None = None) -> LoadedPolicy:
    """Load `rules_dir` (None: the shipped rules) on top of the shipped catalog."""
    shipped = load_directory(SHIPPED_RULES_DIR)
    if rules_dir is None or _same_dir(rules_dir, SHIPPED_RULES_DIR):
        return shipped
    custom = load_directory(rules_dir)
    return LoadedPolicy(custom.rules, shipped.catalog.merged(custom.catalog), custom.files)


def _same_dir(left: Path, right: Path) -> bool:
    try:
        return left.resolve() == right.resolve()
    except OSError:
        return False


def load_directory(directory: Path) -> LoadedPolicy:
    """Load every *.yaml / *.yml file of one directory; raises RulesError."""
    if not directory.is_dir():
        raise RulesError([f"{directory}: not a directory"])
    files = rule_files(directory)
    problems: list[str] = []
    rules: list[CompiledRule] = []
    catalog = EMPTY_CATALOG
    seen: dict[str, str] = {}
    for path in files:
        try:
            parsed, source = load_file(path)
        except RulesError as exc:
            problems.extend(exc.problems)
            continue
        for index, rule in enumerate(parsed.rules):
            where = source.where(("rules", index))
            if rule.id in seen:
                problems.append(f"{where}: duplicate rule id {rule.id!r} (also at {seen[rule.id]})")
                continue
            seen[rule.id] = where
            rules.append(CompiledRule.compile(rule, where))
        catalog = catalog.merged(_catalog_of(parsed))
    if not problems and not rules:
        problems.append(f"{directory}: no rules found (a policy must say what to allow)")
    if problems:
        raise RulesError(problems)
    return LoadedPolicy(tuple(rules), catalog, tuple(files))


DEFAULT_FILES = ("default.yaml", "default.yml")


def rule_files(directory: Path) -> list[Path]:
    """The directory's rule files in load order: the defaults first, then the rest by name."""
    files = [p for p in directory.iterdir() if p.suffix in {".yaml", ".yml"} and p.is_file()]
    return sorted(files, key=lambda p: (p.name not in DEFAULT_FILES, p.name))


def load_file(path: Path) -> tuple[PolicyFile, SourceMap]:
    """Validate one rule file; raises RulesError naming file:line for each problem."""
    value, source = load_yaml_with_lines(path)
    if not isinstance(value, dict):
        raise RulesError([f"{path}:1: a rule file must be a mapping with a 'rules' key"])
    try:
        return PolicyFile.model_validate(value), source
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            dotted = ".".join(str(part) for part in loc) or "(file)"
            problems.append(f"{source.where(loc)}: {dotted}: {error['msg']}")
        raise RulesError(problems) from None


def _catalog_of(parsed: PolicyFile) -> Catalog:
    functions: dict[str, Entry] = {}
    settings: dict[str, Entry] = {}
    for target, section in ((functions, parsed.functions), (settings, parsed.settings)):
        for category, entries in section.items():
            for name, why in entries.items():
                key = name.lower() if target is settings else name
                cats, old_why = target.get(key, ((), ""))
                target[key] = ((*cats, category), old_why or why)
    return Catalog(MappingProxyType(functions), MappingProxyType(settings))


def rules_of(policy: LoadedPolicy) -> tuple[Rule, ...]:
    return tuple(compiled.rule for compiled in policy.rules)
