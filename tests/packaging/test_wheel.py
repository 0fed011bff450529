"""The wheel as a user installs it: ``pip wheel .`` into a fresh virtualenv, then every CLI verb.

Nothing is cached in the repository: the wheel and the venv live in pytest's tmp_path. Runs in CI
with the rest of the suite (about a minute: the venv installs pgguard's dependencies).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer.main

from pgguard.cli import app

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


def verbs() -> list[list[str]]:
    """Every command path of the CLI (``["ledger", "verify"]``, ...), from the Typer app."""

    def walk(command: object, path: list[str]) -> Iterator[list[str]]:
        children = getattr(command, "commands", None)
        if not children:
            yield path
            return
        for name, child in children.items():
            yield from walk(child, [*path, name])

    return list(walk(typer.main.get_command(app), []))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a fresh venv with only the built wheel (and its dependencies)."""
    work = tmp_path_factory.mktemp("wheel")
    wheels = work / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("pgguard-*.whl")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    subprocess.run(
        [str(bin_dir / "pip"), "install", "-q", str(wheel)],
        check=True,
        timeout=600,
        cwd=work,  # not the source tree: nothing may be found there by accident
    )
    return bin_dir


def run(bin_dir: Path, args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGGUARD_")}
    return subprocess.run(
        [str(bin_dir / "pgguard"), *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
        cwd=bin_dir.parent,
        env=env,
    )


def test_every_verb_has_help_with_an_example(installed: Path) -> None:
    paths = verbs()
    assert ["serve"] in paths
    assert ["ledger", "verify"] in paths
    for path in paths:
        proc = run(installed, [*path, "--help"])
        assert proc.returncode == 0, (path, proc.stderr)
        assert b"Example:" in proc.stdout, path


def test_version(installed: Path) -> None:
    proc = run(installed, ["--version"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith("pgguard ")


def test_classify_uses_the_packaged_rules(installed: Path) -> None:
    proc = run(installed, ["classify", "--json"], b"COPY customers TO STDOUT")
    assert proc.returncode == 0, proc.stderr
    assert b'"action":"hold"' in proc.stdout.replace(b" ", b"")


def test_rules_check_runs_the_packaged_examples(installed: Path) -> None:
    proc = run(installed, ["rules", "check"])
    assert proc.returncode == 0, proc.stderr
    site = next((installed.parent / "lib").glob("python3*/site-packages"))
    assert (site / "pgguard" / "rules" / "default.yaml").is_file()
    assert (site / "pgguard" / "rules" / "masking" / "masking.yaml").is_file()
    assert not (site / "pgserver").exists()  # the demo extra is not installed by default
