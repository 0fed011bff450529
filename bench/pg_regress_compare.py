"""PostgreSQL's own regression schedule, run directly and through pgguard (observe mode), compared.

Issue 15 asks that PostgreSQL's ``pg_regress`` schedule behave through pgguard as it does direct.
The regression suite's expected files describe a server built with its test modules
(``regress.so``) and the source tree's data files, which an installed server does not have, so
this script does not compare against them: PostgreSQL is its own oracle. One run:

1. makes an input directory from ``--sql-dir`` (the ``sql/`` files of a PostgreSQL source tree's
   ``src/test/regress``, or any copy of them - libpg_query carries one in
   ``test/sql/postgres_regress``), with deterministic stand-ins for the data files the suite
   ``COPY``s in (``onek``, ``tenk1``, ``person`` ...) so its queries return rows;
2. runs ``pg_regress`` (the binary ``pgserver`` ships in ``lib/postgresql/pgxs``) twice directly
   against fresh clusters - the second run's differences from the first are the suite's own
   nondeterminism (timings, random(), parallel groups racing), and those tests are left out;
3. runs it once more through ``pgguard serve`` (observe mode, ledger on, state in a cluster of its
   own) against a third fresh cluster, with the first direct run's results as the expected files;
4. prints, per test, whether the output through pgguard is byte-identical to the direct one,
   and writes the diffs of those that are not.

The agent pgguard knows is named like the upstream superuser, so ``current_user`` and owners in
``\\d`` output read the same both ways. Speed is printed (wall time of each run) but never judged.
Exit code: 0 when every stable test matches, 1 when one differs, 2 when a run could not be made.

    python bench/pg_regress_compare.py --sql-dir /path/to/postgresql/src/test/regress/sql
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pgbench_compare import (  # type: ignore[import-not-found]
    BenchError,
    Target,
    start_observing_pgguard,
)

from pgguard.embedded import SUPERUSER, EmbeddedPostgres, pgserver_bin_dir

BENCH_DIR = Path(__file__).resolve().parent
AGENT_PASSWORD = "regress-agent-password"
# pgguard's greeting to every session in observe mode (pgguard/policy/engine.py); psql shows
# it where it arrives, as the first line of each connection's output.
OBSERVE_NOTICE = re.compile(rb"^NOTICE:  pgguard is in OBSERVE mode: [^\n]*\n", re.MULTILINE)
_RESULT = re.compile(r"^(?:ok|not ok)\s+\d+\s+[-+]\s+(\S+)\s", re.MULTILINE)


@dataclass
class Run:
    """One pg_regress run: where its results are, its exit code and wall time."""

    name: str
    outdir: Path
    returncode: int
    seconds: float

    def result(self, test: str) -> bytes | None:
        """The test's output, with this run's own directory (COPY/lo_export paths) made neutral
        and the one line pgguard adds on purpose (observe mode's greeting NOTICE) taken out."""
        path = self.outdir / "results" / f"{test}.out"
        if not path.exists():
            return None
        text = path.read_bytes().replace(str(self.outdir).encode(), b"@outdir@")
        return OBSERVE_NOTICE.sub(b"", text)

    def greetings(self) -> int:
        return sum(
            len(OBSERVE_NOTICE.findall(path.read_bytes()))
            for path in (self.outdir / "results").glob("*.out")
        )


# --- inputs -------------------------------------------------------------------------------------


def parse_schedule(path: Path, available: set[str]) -> list[list[str]]:
    groups = []
    for line in path.read_text().splitlines():
        if line.startswith("test:"):
            group = [name for name in line[5:].split() if name in available]
            if group:
                groups.append(group)
    return groups


def write_schedule(groups: list[list[str]], path: Path) -> None:
    path.write_text("".join(f"test: {' '.join(group)}\n" for group in groups))


def make_inputdir(sql_dir: Path, workdir: Path) -> Path:
    """sql/ copied, expected/ empty files (the first direct run fills them), data/ generated."""
    inputdir = workdir / "input"
    (inputdir / "sql").mkdir(parents=True)
    (inputdir / "expected").mkdir()
    for source in sql_dir.glob("*.sql"):
        shutil.copy(source, inputdir / "sql" / source.name)
        # pg_regress bails out without an expected file; the direct runs compare against these
        # empty ones (and "fail"), the guarded run against the first direct run's results.
        (inputdir / "expected" / f"{source.stem}.out").write_bytes(b"")
    write_data_files(inputdir / "data")
    return inputdir


def _name_code(value: int) -> str:
    """The regression data's ``stringu`` encoding: base 26, 'A' first, padded, then 'xxx'."""
    letters = []
    while True:
        letters.append(chr(ord("A") + value % 26))
        value //= 26
        if value == 0:
            break
    return "".join(reversed(letters)).rjust(6, "A") + "xxx"


def _tenk_rows(count: int, seed: int) -> list[str]:
    order = list(range(count))
    random.Random(seed).shuffle(order)
    rows = []
    for unique2, unique1 in enumerate(order):
        hundred = unique1 % 100
        values = [
            unique1,
            unique2,
            unique1 % 2,
            unique1 % 4,
            unique1 % 10,
            unique1 % 20,
            hundred,
            unique1 % 1000,
            unique1 % 2000,
            unique1 % 5000,
            unique1 % 10000,
            hundred * 2 + 1,
            hundred * 2,
        ]
        strings = [
            _name_code(unique1),
            _name_code(unique2),
            ("AAAA", "HHHH", "OOOO", "VVVV")[unique2 % 4] + "xx",
        ]
        rows.append("\t".join([*map(str, values), *strings]))
    return rows


def write_data_files(data: Path) -> None:
    """Deterministic stand-ins for src/test/regress/data: same columns, same value shapes."""
    data.mkdir()
    (data / "onek.data").write_text("\n".join(_tenk_rows(1000, 1)) + "\n")
    (data / "tenk.data").write_text("\n".join(_tenk_rows(10000, 10)) + "\n")
    people = [f"person{i}\t{20 + i % 50}\t({i % 13},{i % 7})" for i in range(50)]
    (data / "person.data").write_text("\n".join(people) + "\n")
    (data / "emp.data").write_text(
        "\n".join(f"emp{i}\t{25 + i}\t({i},{i})\t{1000 * i}\tperson{i}" for i in range(10)) + "\n"
    )
    (data / "student.data").write_text(
        "\n".join(f"student{i}\t{18 + i}\t({i},{-i})\t{2.0 + i / 10}" for i in range(10)) + "\n"
    )
    (data / "stud_emp.data").write_text(
        "\n".join(f"se{i}\t{22 + i}\t({i},1)\t{500 * i}\temp{i}\t3.{i}\t{10 * i}" for i in range(5))
        + "\n"
    )
    (data / "streets.data").write_text(
        "\n".join(f"Street {i}\t[({i},0),({i},{i + 1}),({i + 1},{i + 2})]" for i in range(200))
        + "\n"
    )
    # COPY ... FROM a file runs in the server, which runs as the embedded cluster's user.
    for path in [data, *data.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)


# --- runs ---------------------------------------------------------------------------------------


def pg_regress_binary() -> Path:
    path = pgserver_bin_dir().parent / "lib/postgresql/pgxs/src/test/regress/pg_regress"
    if not path.exists():
        raise BenchError(f"pg_regress not found at {path} (it ships with pgserver's server)")
    return path


def start_cluster(stack: contextlib.ExitStack, workdir: Path, name: str) -> EmbeddedPostgres:
    pg = EmbeddedPostgres(workdir / name)
    stack.callback(pg.destroy)
    pg.start()
    return pg


def run_pg_regress(
    name: str, inputdir: Path, schedule: Path, workdir: Path, host: str, port: int, password: str
) -> Run:
    outdir = workdir / name
    # The suite's COPY TO / lo_export write into results/ from the server, which runs as the
    # embedded cluster's own user.
    (outdir / "results").mkdir(parents=True)
    (outdir / "results").chmod(0o777)
    env = {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "disable", "PGTZ": "PST8PDT"}
    argv = [
        str(pg_regress_binary()),
        f"--bindir={pgserver_bin_dir()}",
        f"--inputdir={inputdir}",
        f"--expecteddir={inputdir}",
        f"--outputdir={outdir}",
        f"--schedule={schedule}",
        f"--host={host}",
        f"--port={port}",
        f"--user={SUPERUSER}",
        "--max-connections=20",
    ]
    print(f"{name}: pg_regress against {host}:{port} ...", flush=True)
    started = time.monotonic()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    (outdir / "pg_regress.log").write_text(result.stdout + result.stderr)
    if result.returncode == 2 or not (outdir / "results").exists():
        raise BenchError(
            f"{name}: pg_regress could not run:\n{(result.stdout + result.stderr)[-3000:]}"
        )
    print(f"{name}: {len(_RESULT.findall(result.stdout))} tests in {seconds:.0f} s", flush=True)
    return Run(name, outdir, result.returncode, seconds)


def start_pgguard(stack: contextlib.ExitStack, workdir: Path, pg: EmbeddedPostgres) -> Target:
    # The suite sends statements of hundreds of kilobytes (numeric_big, copy); the default
    # budget is for a shared machine, not for the regression suite's intentionally huge texts.
    extra = "\n[limits]\nparse_budget = 30\n"
    return start_observing_pgguard(stack, workdir, pg, AGENT_PASSWORD, "regress@example.com", extra)


# --- comparison ---------------------------------------------------------------------------------


def compare(tests: list[str], first: Run, second: Run, guarded: Run, report: Path) -> int:
    unstable = [t for t in tests if first.result(t) != second.result(t)]
    stable = [t for t in tests if t not in unstable]
    differ = [t for t in stable if first.result(t) != guarded.result(t)]
    with report.open("w") as out:
        for test in differ:
            out.write(f"=== {test}\n")
            result = subprocess.run(
                [
                    "diff",
                    "-u",
                    str(first.outdir / "results" / f"{test}.out"),
                    str(guarded.outdir / "results" / f"{test}.out"),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            out.write(result.stdout or "(missing output)\n")
    rows = [
        ("tests in the schedule", str(len(tests))),
        ("unstable directly (differ between two direct runs; left out)", str(len(unstable))),
        ("stable tests compared", str(len(stable))),
        ("identical through pgguard", str(len(stable) - len(differ))),
        ("different through pgguard", str(len(differ))),
        ("observe-mode greeting NOTICEs taken out (one per session)", str(guarded.greetings())),
        (
            "wall time: direct, direct again, through pgguard",
            f"{first.seconds:.0f} s, {second.seconds:.0f} s, {guarded.seconds:.0f} s",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    print()
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    if unstable:
        print(f"\nunstable: {' '.join(unstable)}")
    if differ:
        print(f"\ndifferent through pgguard: {' '.join(differ)}\ndiffs: {report}")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sql-dir", type=Path, required=True, help="the suite's *.sql files")
    parser.add_argument(
        "--schedule",
        type=Path,
        default=BENCH_DIR / "pg_regress_schedule",
        help="a parallel_schedule (default: PostgreSQL 16's, reconstructed)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    options = parser.parse_args(argv)
    available = {path.stem for path in options.sql_dir.glob("*.sql")}
    groups = parse_schedule(options.schedule, available)
    tests = [test for group in groups for test in group]
    if not tests:
        print(f"no tests of {options.schedule} in {options.sql_dir}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="pgguard-regress-"))
    workdir.chmod(0o755)
    try:
        with contextlib.ExitStack() as stack:
            inputdir = make_inputdir(options.sql_dir, workdir)
            schedule = workdir / "schedule"
            write_schedule(groups, schedule)
            runs = []
            for name in ("direct", "direct-again"):
                pg = start_cluster(stack, workdir, f"pg-{name}")
                runs.append(
                    run_pg_regress(  # over the unix socket: trust, as the suite expects
                        name, inputdir, schedule, workdir, str(pg.socket_dir), pg.port, ""
                    )
                )
                pg.destroy()
            for result in (runs[0].outdir / "results").glob("*.out"):
                shutil.copy(result, inputdir / "expected" / result.name)
            pg = start_cluster(stack, workdir, "pg-guarded")
            target = start_pgguard(stack, workdir, pg)
            runs.append(
                run_pg_regress(
                    "through-pgguard",
                    inputdir,
                    schedule,
                    workdir,
                    "127.0.0.1",
                    target.port,
                    AGENT_PASSWORD,
                )
            )
            return compare(tests, *runs, workdir / "differences.diff")
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
