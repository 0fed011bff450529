"""A driver's own test suite (psycopg 3's or asyncpg's), run directly and through pgguard, compared.

Issue 15 asks for evidence that real clients work unchanged through pgguard. The drivers' own
suites exercise far more of the protocol than pgguard's tests do (pipelines, COPY, cancel, LISTEN,
two-phase commit, every type's binary format), and each suite is its own oracle: a test that
passes against PostgreSQL directly and fails through pgguard is a difference pgguard made. One run:

1. starts two embedded PostgreSQL clusters (``pgguard.embedded``), one per run, configured alike
   (``max_prepared_transactions`` for the two-phase tests, ``jit = off`` as asyncpg's own harness
   sets it, a password for ``postgres`` so both runs log in over TCP with SCRAM);
2. starts ``pgguard serve`` in front of the second one: **observe mode** (the suites create and
   drop tables, types, functions and databases all the time; in enforce mode every DDL statement
   would be held, which is pgguard doing its job, not a difference worth reporting), the ledger on
   with its state in a third cluster of its own (as ``pgbench_compare.py`` does), one agent named
   ``postgres`` like the upstream superuser so ``current_user`` reads the same both ways;
3. runs the suite with pytest and its junit XML, once against the direct cluster and once through
   pgguard, over TCP on 127.0.0.1 both times (``--parallel`` runs the two at once, each against
   its own cluster: half the wall time, more timing noise);
4. prints the counts per run and every test that passes directly but not through pgguard, with its
   error, and writes the same as Markdown to ``bench/results/``.

The suites' sources are not shipped with pgguard (nor with the drivers' wheels): ``--source``
points at a checkout of the driver's repository, ideally at the installed version's tag. The
installed driver is what runs, never the checkout's copy: asyncpg's ``tests/`` is copied out of
the checkout so its uncompiled package cannot shadow the installed one; psycopg's checkout has
no package at its top level. psycopg's ``psycopg_pool`` is taken from the checkout (pure Python)
when it is not installed, so the pool tests run too.

Exit code: 0 when no test passes directly and fails through pgguard, 1 when one does, 2 when a run
could not be made. A run that hits ``--time-limit`` is interrupted (pytest still writes its XML);
tests it did not reach are counted as not run, in both runs alike only if both were cut.

    python bench/driver_suites.py --suite psycopg --source /tmp/psycopg
    python bench/driver_suites.py --suite asyncpg --source /tmp/asyncpg -k test_copy
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pgbench_compare import (  # type: ignore[import-not-found]
    BenchError,
    Target,
    start_observing_pgguard,
)

from pgguard.embedded import SUPERUSER, EmbeddedPostgres, pgserver_bin_dir

BENCH_DIR = Path(__file__).resolve().parent
PASSWORD = "driver-suites-password"  # the superuser's, directly, and the agent's, through pgguard
DATABASE = "postgres"
SUITES = ("psycopg", "asyncpg")
OUTCOMES = ("passed", "failed", "error", "skipped", "not run")


@dataclass(frozen=True, slots=True)
class Result:
    """One test's outcome in one run, and the first lines of its error when it did not pass."""

    outcome: str
    message: str = ""


@dataclass
class Run:
    name: str
    results: dict[str, Result]
    seconds: float
    returncode: int
    interrupted: bool
    log: Path

    def counts(self) -> Counter[str]:
        return Counter(result.outcome for result in self.results.values())


# --- the clusters and pgguard -------------------------------------------------------------------


def start_cluster(stack: contextlib.ExitStack, workdir: Path, name: str) -> EmbeddedPostgres:
    pg = EmbeddedPostgres(workdir / name)
    stack.callback(pg.destroy)
    print(f"starting PostgreSQL {name} on port {pg.port} ...", flush=True)
    pg.start()
    # One statement per call: ALTER SYSTEM refuses to run in psql -c's implicit transaction.
    for sql in (
        f"ALTER ROLE {SUPERUSER} PASSWORD '{PASSWORD}'",
        "ALTER SYSTEM SET max_prepared_transactions = 10",
        "ALTER SYSTEM SET jit = off",
    ):
        pg.psql(sql)
    pg.restart()  # max_prepared_transactions needs a restart
    return pg


def start_pgguard(stack: contextlib.ExitStack, workdir: Path, pg: EmbeddedPostgres) -> Target:
    return start_observing_pgguard(stack, workdir, pg, PASSWORD, "drivers@example.com")


# --- the suites ---------------------------------------------------------------------------------


def suite_command(
    name: str,
    suite: str,
    source: Path,
    workdir: Path,
    port: int,
    keyword: str | None,
    test_timeout: int,
) -> tuple[list[str], Path, dict[str, str]]:
    """The pytest command line, its working directory and its environment for one run."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PG", "PSYCOPG_", "PYTEST_", "PGGUARD_"))
    }
    # pgguard's test extras bring pytest-asyncio; neither suite uses it (psycopg's runs on anyio,
    # asyncpg's on unittest) and its deprecation warning is an error under psycopg's settings.
    # Each run its own pytest cache (psycopg's conftest keeps a segfault flag in it), outside the
    # checkout, so --parallel runs do not share one.
    args = [
        "-p",
        "no:asyncio",
        "-o",
        f"cache_dir={workdir / ('cache-' + name)}",
        f"--timeout={test_timeout}",
        "-q",
        "-rN",
    ]
    if keyword:
        args += ["-k", keyword]
    if suite == "psycopg":
        cwd = source
        env["PSYCOPG_TEST_DSN"] = (
            f"host=127.0.0.1 port={port} user={SUPERUSER} password={PASSWORD} dbname={DATABASE}"
            " sslmode=disable gssencmode=disable"
        )
        paths = [str(source)]
        try:
            import psycopg_pool  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            paths.append(str(source / "psycopg_pool"))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        tests = ["tests"]
    else:
        # The checkout's asyncpg/ is the package without its compiled modules; only tests/ is
        # taken, so the installed asyncpg (and its _testbase) is what runs.
        cwd = asyncpg_tests(source, workdir)
        env.update(
            PGHOST="127.0.0.1",  # asyncpg._testbase: PGHOST set means "use this running server"
            PGPORT=str(port),
            PGUSER=SUPERUSER,
            PGPASSWORD=PASSWORD,
            PGDATABASE=DATABASE,
            PGSSLMODE="disable",
            # Tests that start clusters of their own find the binaries here (they run as this
            # script's user; as root initdb refuses, in both runs alike).
            PGINSTALLATION=str(pgserver_bin_dir()),
        )
        tests = ["tests"]
    return [sys.executable, "-m", "pytest", *args, *tests], cwd, env


def asyncpg_tests(source: Path, workdir: Path) -> Path:
    """The checkout's tests/ (and pytest settings) copied out, once, before any run starts."""
    cwd = workdir / "asyncpg-tests"
    if not cwd.exists():
        shutil.copytree(source / "tests", cwd / "tests")
        shutil.copy(source / "pyproject.toml", cwd / "pyproject.toml")
    return cwd


def run_suite(
    name: str,
    suite: str,
    source: Path,
    workdir: Path,
    port: int,
    keyword: str | None,
    time_limit: float,
    test_timeout: int,
) -> Run:
    argv, cwd, env = suite_command(name, suite, source, workdir, port, keyword, test_timeout)
    junit, log = workdir / f"{name}.xml", workdir / f"{name}.log"
    argv.append(f"--junitxml={junit}")
    print(f"{name}: {suite}'s suite against 127.0.0.1:{port} ...", flush=True)
    started = time.monotonic()
    interrupted = False
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = proc.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            # SIGINT: pytest stops after the current test and still writes its junit XML.
            interrupted = True
            print(f"{name}: time limit of {time_limit:.0f} s reached, interrupting", flush=True)
            os.killpg(proc.pid, signal.SIGINT)
            try:
                returncode = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                returncode = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    seconds = time.monotonic() - started
    if not junit.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise BenchError(f"{name}: pytest wrote no junit XML (exit {returncode}):\n{tail}")
    results = read_junit(junit)
    print(f"{name}: {len(results)} tests in {seconds:.0f} s (pytest exit {returncode})", flush=True)
    return Run(name, results, seconds, returncode, interrupted, log)


def read_junit(path: Path) -> dict[str, Result]:
    """Test id -> outcome; a test with a failure and a teardown error counts as failed."""
    results: dict[str, Result] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = element.get("message") or (element.text or "")
                break
        results[test] = Result(outcome, " ".join(message.split())[:400])
    return results


# --- comparison ---------------------------------------------------------------------------------


def compare(direct: Run, guarded: Run) -> tuple[list[str], list[str]]:
    """(tests passing directly but not through pgguard, and the other way round)."""
    tests = sorted(set(direct.results) | set(guarded.results))
    missing = Result("not run")

    def outcome(run: Run, test: str) -> str:
        return run.results.get(test, missing).outcome

    worse = [t for t in tests if outcome(direct, t) == "passed" and outcome(guarded, t) != "passed"]
    better = [
        t for t in tests if outcome(direct, t) != "passed" and outcome(guarded, t) == "passed"
    ]
    return worse, better


# pgguard's log at WARNING: observe mode logs every would-be hold or deny, and start-up says what
# it created; anything else (an internal error, a session ended by a protocol violation, an
# upstream failure) is worth reading next to the differences.
_ROUTINE_LOG = re.compile(
    r"observe mode: session .* would (?:hold|deny) |OBSERVE MODE|no approvers configured|"
    r"created the ledger signing key"
)


def noteworthy_log(log: Path) -> list[str]:
    if not log.exists():
        return []
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines if line.strip() and not _ROUTINE_LOG.search(line)]


def report(
    suite: str, source: Path, direct: Run, guarded: Run, pgguard_log: Path, output: Path
) -> int:
    worse, better = compare(direct, guarded)
    lines = [
        f"# {suite}'s own test suite, directly and through pgguard",
        "",
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, source {source} ({git_describe(source)}), "
        f"installed {suite} {installed_version(suite)}, load average {os.getloadavg()[0]:.1f}",
        "",
        "| run | " + " | ".join(OUTCOMES) + " | wall time | interrupted |",
        "|---|" + "---:|" * len(OUTCOMES) + "---:|---|",
    ]
    for run in (direct, guarded):
        counts = run.counts()
        cells = [str(counts.get(outcome, 0)) for outcome in OUTCOMES[:-1]]
        cells.append(str(len(set(direct.results) | set(guarded.results)) - len(run.results)))
        lines.append(
            f"| {run.name} | {' | '.join(cells)} | {run.seconds:.0f} s | "
            f"{'yes' if run.interrupted else 'no'} |"
        )
    lines += ["", f"## Passed directly, not through pgguard: {len(worse)}", ""]
    for test in worse:
        result = guarded.results.get(test, Result("not run"))
        lines.append(f"- `{test}`: **{result.outcome}** {result.message}")
    lines += ["", f"## Passed through pgguard, not directly: {len(better)}", ""]
    for test in better:
        result = direct.results.get(test, Result("not run"))
        lines.append(f"- `{test}`: directly **{result.outcome}** {result.message}")
    noteworthy = noteworthy_log(pgguard_log)
    lines += ["", f"## pgguard's log beyond observe mode's notes: {len(noteworthy)} lines", ""]
    lines += [f"    {line[:300]}" for line in noteworthy[:50]]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"report: {output}\nlogs: {direct.log}, {guarded.log}")
    return 1 if worse else 0


def git_describe(source: Path) -> str:
    result = subprocess.run(
        ["git", "-C", str(source), "describe", "--tags", "--always"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "not a git checkout"


def installed_version(suite: str) -> str:
    from importlib import metadata

    return metadata.version(suite)


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=SUITES, required=True)
    parser.add_argument(
        "--source", type=Path, required=True, help="a checkout of the driver's repository"
    )
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, passed to both runs")
    parser.add_argument(
        "--time-limit", type=float, default=2400, help="seconds per run before it is interrupted"
    )
    parser.add_argument(
        "--test-timeout", type=int, default=300, help="pytest-timeout seconds per test"
    )
    parser.add_argument("--parallel", action="store_true", help="run both at once")
    parser.add_argument("--output", type=Path, help="Markdown report (default: bench/results/)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    options = parser.parse_args(argv)
    source = options.source.resolve()
    if not (source / "tests").is_dir():
        print(f"{source} has no tests/ directory", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = options.output or BENCH_DIR / "results" / f"drivers-{options.suite}-{stamp}.md"
    workdir = Path(tempfile.mkdtemp(prefix=f"pgguard-drivers-{options.suite}-"))
    workdir.chmod(0o755)
    try:
        with contextlib.ExitStack() as stack:
            direct_pg = start_cluster(stack, workdir, "pg-direct")
            guarded_pg = start_cluster(stack, workdir, "pg-guarded")
            target = start_pgguard(stack, workdir, guarded_pg)
            if options.suite == "asyncpg":
                asyncpg_tests(source, workdir)
            plan = [("direct", direct_pg.port), ("through-pgguard", target.port)]
            runs: dict[str, Run] = {}
            errors: list[BaseException] = []

            def one(name: str, port: int) -> None:
                try:
                    runs[name] = run_suite(
                        name,
                        options.suite,
                        source,
                        workdir,
                        port,
                        options.keyword,
                        options.time_limit,
                        options.test_timeout,
                    )
                except BaseException as exc:  # re-raised below, in the main thread
                    errors.append(exc)

            if options.parallel:
                threads = [threading.Thread(target=one, args=step) for step in plan]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            else:
                for step in plan:
                    one(*step)
            if errors:
                raise errors[0]
            return report(
                options.suite,
                source,
                runs["direct"],
                runs["through-pgguard"],
                workdir / "pgguard.log",
                output,
            )
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if options.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
