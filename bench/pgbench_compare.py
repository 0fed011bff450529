"""pgbench select-only throughput and latency: direct to Postgres vs pgguard vs pgbouncer.

One run starts everything it measures in a temporary directory: an embedded PostgreSQL
(``pgguard.embedded``), pgguard (``python -m pgguard.cli serve``, with and without the ledger),
pgbouncer in session pooling mode (installed from Debian packages when missing and run as root)
and ``bare_relay.py`` (a Python relay that only forwards bytes: the floor). For every query mode
and client count it runs ``pgbench -S`` against the targets back to back (interleaved, so drift on a
shared machine hits them alike), parses tps, average latency and the number of transactions, and
samples the proxy process's CPU time (user + system) around each run to get CPU µs per query.

Invariants: all pgbench traffic uses TCP on 127.0.0.1 (the direct baseline too), every child
process and temporary file is cleaned up on success, failure and Ctrl-C, and speed is only
reported, never asserted: the exit code says whether every run completed, not whether pgguard
was fast enough.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

from pgguard.dsn import parse_dsn
from pgguard.embedded import SUPERUSER, EmbeddedPostgres, free_port, pgserver_bin_dir
from pgguard.statedb import setup
from pgguard.statedb.apply import apply

BENCH_DIR = Path(__file__).resolve().parent
DEBIAN_PGBENCH = Path("/usr/lib/postgresql/15/bin/pgbench")
PGBOUNCER_CANDIDATES = (Path("/usr/sbin/pgbouncer"), Path("/usr/bin/pgbouncer"))
RUN_AS = "pgserver"  # pgbouncer refuses to run as root; the embedded Postgres runs as this user
DATABASE = "postgres"
AGENT, AGENT_PASSWORD = "bench", "bench-password"
UPSTREAM_ROLE, UPSTREAM_PASSWORD = "pgguard_scram", "scram-secret"
# pgguard-noledger: the same proxy with [ledger] enabled = false, to measure the ledger's cost.
# bare-relay: bare_relay.py, bytes forwarded and nothing else - the floor under a Python proxy.
TARGETS = ("direct", "pgguard", "pgguard-noledger", "pgbouncer", "bare-relay")
LEDGER_TARGET = 0.9  # pgguard tps / pgguard-noledger tps
MODES = ("simple", "extended", "prepared")
TPS_TARGET = 1.0  # pgguard tps / pgbouncer tps, at more than one client
LATENCY_TARGET = 1.2  # pgguard added latency / pgbouncer added latency, at one client
START_TIMEOUT = 30.0


class BenchError(RuntimeError):
    """A component did not start or the harness cannot go on; the message says which and why."""


# --- options ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    duration: int
    warmup: int
    scale: int
    clients: tuple[int, ...]
    modes: tuple[str, ...]
    targets: tuple[str, ...]
    repeat: int
    output: Path
    keep: bool
    load_before: float = field(default_factory=lambda: os.getloadavg()[0])
    started: datetime.datetime = field(default_factory=datetime.datetime.now)


def parse_options(argv: Sequence[str] | None = None) -> Options:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=15, help="seconds per measured run")
    parser.add_argument(
        "--warmup", type=int, default=2, help="unreported run before each (0: none)"
    )
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor")
    parser.add_argument("--clients", default="8,1", help="comma-separated client counts")
    parser.add_argument("--modes", default="simple,extended", help=f"subset of {','.join(MODES)}")
    parser.add_argument("--targets", default=",".join(TARGETS), help="subset of the default")
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is shown")
    parser.add_argument(
        "--output", type=Path, default=BENCH_DIR / "results" / f"pgbench-{stamp}.md"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    modes, targets = _split(args.modes), _split(args.targets)
    for value, allowed in [*((m, MODES) for m in modes), *((t, TARGETS) for t in targets)]:
        if value not in allowed:
            parser.error(f"unknown value {value!r}; choose from {', '.join(allowed)}")
    try:
        clients = tuple(int(c) for c in _split(args.clients))
    except ValueError:
        parser.error(f"--clients must be integers, got {args.clients!r}")
    if min(clients, default=0) < 1 or args.duration < 1 or args.repeat < 1 or args.warmup < 0:
        parser.error("--clients, --duration and --repeat must be at least 1")
    return Options(
        duration=args.duration,
        warmup=args.warmup,
        scale=args.scale,
        clients=clients,
        modes=modes,
        targets=tuple(t for t in TARGETS if t in targets),
        repeat=args.repeat,
        output=args.output,
        keep=args.keep,
    )


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


# --- tools ------------------------------------------------------------------------------------


def find_pgbench() -> Path:
    for candidate in (DEBIAN_PGBENCH, pgserver_bin_dir() / "pgbench"):
        if candidate.exists():
            return candidate
    raise BenchError("pgbench not found (neither Debian's postgresql-15 nor pgserver's)")


def find_pgbouncer() -> Path | None:
    found = shutil.which("pgbouncer")
    if found:
        return Path(found)
    return next((p for p in PGBOUNCER_CANDIDATES if p.exists()), None)


def ensure_pgbouncer() -> Path:
    """pgbouncer's path, installing the Debian packages first when missing and run as root."""
    found = find_pgbouncer()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError("pgbouncer is not installed: apt-get install pgbouncer postgresql-client")
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "pgbouncer", "postgresql-client"],
    ):
        print("+", " ".join(command), flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(command, env=env, check=False).returncode != 0:
            raise BenchError(f"{' '.join(command)} failed")
    found = find_pgbouncer()
    if found is None:
        raise BenchError("pgbouncer still not found after apt-get install")
    return found


def tool_version(path: Path) -> str:
    result = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=False)
    return (
        (result.stdout or result.stderr).strip().splitlines()[0] if result.returncode == 0 else "?"
    )


# --- targets and processes --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where pgbench connects, and the process whose CPU time counts as the proxy's."""

    name: str
    port: int
    user: str
    password: str
    pid: int | None = None
    log: Path | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGPASSWORD": self.password,
            "PGDATABASE": DATABASE,
            "PGSSLMODE": "disable",
            "PGGSSENCMODE": "disable",
            "PGCONNECT_TIMEOUT": "5",
        }


def spawn(
    stack: contextlib.ExitStack, argv: list[str], log: Path, *, as_user: str | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (Ctrl-C reaches us, not it), stopped when ``stack`` is.

    PGGUARD_* variables are dropped: they would override the generated configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGGUARD_")}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            start_new_session=True,
            user=as_user,
            group=as_user,
            extra_groups=[] if as_user else None,
        )
    stack.callback(stop_process, proc)
    return proc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def log_tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").rstrip()
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def wait_until_ready(target: Target, proc: subprocess.Popen[bytes], psql: Path) -> None:
    """Poll ``SELECT 1`` through ``target`` until it answers; BenchError with its log if not."""
    deadline = time.monotonic() + START_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{target.name} exited with code {proc.returncode} during start-up; "
                f"log tail:\n{log_tail(target.log)}"
            )
        result = subprocess.run(
            [str(psql), "-X", "-At", "-c", "SELECT 1"],
            env=target.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0 and result.stdout.strip() == "1":
            return
        last = result.stderr.strip()
        time.sleep(0.3)
    raise BenchError(
        f"{target.name} did not answer SELECT 1 within {START_TIMEOUT:.0f}s: {last}\n"
        f"log tail:\n{log_tail(target.log)}"
    )


def noteworthy_log(target: Target) -> str | None:
    """pgguard logs only warnings and errors; pgbouncer also logs its routine start-up."""
    if target.log is None or not target.log.exists():
        return None
    lines = target.log.read_text(errors="replace").splitlines()
    if target.name == "pgbouncer":
        lines = [line for line in lines if re.search(r"\b(WARNING|ERROR|FATAL)\b", line)]
    if not lines:
        return None
    return f"{target.name} logged {len(lines)} line(s); the last ones:\n" + "\n".join(lines[-25:])


def give_to_run_as_user(*paths: Path) -> None:
    """As root, hand ``paths`` to the pgbouncer user, readable by it only."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(RUN_AS)
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o700 if path.is_dir() else 0o600)


def start_postgres(stack: contextlib.ExitStack, workdir: Path) -> EmbeddedPostgres:
    pg = EmbeddedPostgres(workdir / "pgdata")
    stack.callback(pg.destroy)
    print(f"starting PostgreSQL ({pg.bin_dir}) on port {pg.port} ...", flush=True)
    try:
        pg.start()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        raise BenchError(f"PostgreSQL did not start: {exc}") from exc
    return pg


def initialize_pgbench(pg: EmbeddedPostgres, pgbench: Path, scale: int) -> None:
    print(f"pgbench -i -s {scale} (directly, unix socket) ...", flush=True)
    result = subprocess.run(
        [
            str(pgbench),
            *f"-i -q -s {scale} -p {pg.port} -U postgres {DATABASE}".split(),
            *("-h", str(pg.socket_dir)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"pgbench -i failed:\n{result.stderr[-2000:]}")
    for statement in ("VACUUM ANALYZE", "CHECKPOINT"):  # one each: VACUUM refuses a transaction
        superuser_sql(pg, statement)


def superuser_sql(pg: EmbeddedPostgres, sql: str) -> str:
    try:
        return pg.psql(sql)
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"{sql!r} failed on PostgreSQL: {exc.stderr.strip()}") from exc


def direct_target(pg: EmbeddedPostgres) -> Target:
    return Target("direct", pg.port, UPSTREAM_ROLE, UPSTREAM_PASSWORD)


def start_pgguard(
    stack: contextlib.ExitStack,
    workdir: Path,
    pg: EmbeddedPostgres,
    psql: Path,
    *,
    ledger: bool = True,
) -> tuple[Target, subprocess.Popen[bytes]]:
    name = "pgguard" if ledger else "pgguard-noledger"
    port, config, log = free_port(), workdir / f"{name}.toml", workdir / f"{name}.log"
    spool = workdir / f"{name}-spool"
    # The upstream role is a superuser, so the ledger's state lives in a cluster of its own:
    # pgguard refuses to start otherwise.
    state = (
        f"\n[state]\ndsn = {json.dumps(start_state_cluster(stack, workdir))}\n" if ledger else ""
    )
    config.write_text(  # data_dir: keys and ledger anchors stay in the run's directory
        f'log_level = "WARNING"\ndata_dir = {json.dumps(str(workdir / (name + "-data")))}\n'
        '\n[listen]\nhost = "127.0.0.1"\n'
        f"port = {port}\n\n[upstream]\ndsn = {json.dumps(pg.unix_dsn(UPSTREAM_ROLE, DATABASE))}\n"
        f'\n[[agents]]\nname = "{AGENT}"\npassword = "{AGENT_PASSWORD}"\n'
        'owner = "bench-owner@example.com"\n'
        f"\n[ledger]\nenabled = {str(ledger).lower()}\nspool_dir = {json.dumps(str(spool))}\n"
        # Health and metrics listen on 8080 by default: two pgguards (and a running one) collide.
        + '\n[http]\nhost = "127.0.0.1"\nport = 0\n'
        + state
    )
    argv = [sys.executable, "-m", "pgguard.cli", "serve", "--config", str(config)]
    print(f"starting {name} on port {port}: {' '.join(argv)}", flush=True)
    proc = spawn(stack, argv, log)
    target = Target(name, port, AGENT, AGENT_PASSWORD, proc.pid, log)
    wait_until_ready(target, proc, psql)
    return target, proc


def start_state_cluster(stack: contextlib.ExitStack, workdir: Path) -> str:
    """pgguard's state database in a cluster of its own (``pgguard state init``'s set-up)."""
    pg = EmbeddedPostgres(workdir / "statedata")
    stack.callback(pg.destroy)
    print(f"starting the state cluster on port {pg.port} ...", flush=True)
    pg.start()
    plan = setup.StatePlan(password=setup.new_password())
    asyncio.run(apply(plan, pg.superuser_dsn()))
    return setup.state_dsn(plan, parse_dsn(pg.superuser_dsn()))


def start_observing_pgguard(
    stack: contextlib.ExitStack,
    workdir: Path,
    pg: EmbeddedPostgres,
    password: str,
    owner: str,
    extra_toml: str = "",
) -> Target:
    """`pgguard serve` in observe mode in front of ``pg``, ledger on (state in a cluster of its
    own), one agent named like ``pg``'s superuser: what a test suite that logs in as the
    superuser runs through unchanged (driver_suites.py, pg_regress_compare.py)."""
    port, config, log = free_port(), workdir / "pgguard.toml", workdir / "pgguard.log"
    config.write_text(
        f'log_level = "WARNING"\ndata_dir = {json.dumps(str(workdir / "data"))}\n'
        '\n[policy]\nmode = "observe"\n'
        f'\n[listen]\nhost = "127.0.0.1"\nport = {port}\n'
        f"\n[upstream]\ndsn = {json.dumps(pg.superuser_dsn())}\n"
        f'\n[[agents]]\nname = "{SUPERUSER}"\npassword = "{password}"\n'
        f'owner = "{owner}"\n'
        f"\n[ledger]\nspool_dir = {json.dumps(str(workdir / 'spool'))}\n"
        f"\n[state]\ndsn = {json.dumps(start_state_cluster(stack, workdir))}\n"
        "\n[http]\nport = 0\n" + extra_toml
    )
    argv = [sys.executable, "-m", "pgguard.cli", "serve", "--config", str(config)]
    print(f"starting pgguard on port {port} (observe mode, ledger on) ...", flush=True)
    proc = spawn(stack, argv, log)
    target = Target("pgguard", port, SUPERUSER, password, proc.pid, log)
    wait_until_ready(target, proc, pgserver_bin_dir() / "psql")
    return target


def start_bare_relay(
    stack: contextlib.ExitStack, workdir: Path, pg: EmbeddedPostgres, psql: Path
) -> tuple[Target, subprocess.Popen[bytes]]:
    port, log = free_port(), workdir / "bare-relay.log"
    socket_path = pg.socket_dir / f".s.PGSQL.{pg.port}"
    argv = [sys.executable, str(BENCH_DIR / "bare_relay.py"), str(socket_path), str(port)]
    print(f"starting bare-relay on port {port}: {' '.join(argv)}", flush=True)
    proc = spawn(stack, argv, log)
    # Transparent: pgbench authenticates with PostgreSQL through it, as for the direct target.
    target = Target("bare-relay", port, UPSTREAM_ROLE, UPSTREAM_PASSWORD, proc.pid, log)
    wait_until_ready(target, proc, psql)
    return target, proc


def start_pgbouncer(
    stack: contextlib.ExitStack, workdir: Path, pg: EmbeddedPostgres, psql: Path, pool_size: int
) -> tuple[Target, subprocess.Popen[bytes]]:
    binary = ensure_pgbouncer()
    port, home = free_port(), workdir / "pgbouncer"
    home.mkdir()
    config, userlist, log = home / "pgbouncer.ini", home / "userlist.txt", workdir / "pgbouncer.log"
    userlist.write_text(f'"{AGENT}" "{AGENT_PASSWORD}"\n')
    config.write_text(
        f"[databases]\n{DATABASE} = host={pg.socket_dir} port={pg.port} dbname={DATABASE} "
        f"user={UPSTREAM_ROLE}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n"
        f"unix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {userlist}\n"
        f"pool_mode = session\ndefault_pool_size = {pool_size}\nmax_client_conn = {pool_size * 4}\n"
        "ignore_startup_parameters = extra_float_digits\nlog_connections = 0\n"
        "log_disconnections = 0\n"
    )
    give_to_run_as_user(home, config, userlist)
    as_user = RUN_AS if os.geteuid() == 0 else None
    print(
        f"starting {binary} on port {port} (session pooling, pool {pool_size}"
        f"{', as ' + RUN_AS if as_user else ''}) ...",
        flush=True,
    )
    proc = spawn(stack, [str(binary), str(config)], log, as_user=as_user)
    target = Target("pgbouncer", port, AGENT, AGENT_PASSWORD, proc.pid, log)
    wait_until_ready(target, proc, psql)
    return target, proc


# --- measuring --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads), from psutil or /proc."""
    try:
        import psutil  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@dataclass(frozen=True, slots=True)
class Measurement:
    mode: str
    clients: int
    target: str
    tps: float = 0.0
    latency_ms: float = 0.0
    transactions: int = 0
    cpu_us_per_query: float | None = None
    error: str | None = None


_TPS = re.compile(r"^tps = ([\d.]+)", re.M)
_LATENCY = re.compile(r"^latency average = ([\d.]+) ms", re.M)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.M)


def pgbench_command(pgbench: Path, mode: str, clients: int, seconds: int) -> list[str]:
    options = f"-S -M {mode} -c {clients} -j {min(clients, 2)} -T {seconds} -n"
    return [str(pgbench), *options.split()]


def run_pgbench(
    pgbench: Path, target: Target, mode: str, clients: int, seconds: int
) -> Measurement:
    """One pgbench run against ``target``, with the proxy's CPU time sampled around it."""
    command = pgbench_command(pgbench, mode, clients, seconds)
    before = cpu_seconds(target.pid) if target.pid else None
    result = subprocess.run(
        command,
        env=target.env(),
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    after = cpu_seconds(target.pid) if target.pid else None
    tps, latency, processed = (rx.search(result.stdout) for rx in (_TPS, _LATENCY, _PROCESSED))
    if result.returncode != 0 or not (tps and latency and processed):
        output = (result.stdout + result.stderr).strip().splitlines()[-15:]
        message = f"$ {' '.join(command)}\nexit code {result.returncode}\n" + "\n".join(output)
        return Measurement(mode, clients, target.name, error=message)
    transactions = int(processed.group(1))
    cpu = None
    if before is not None and after is not None and transactions:
        cpu = (after - before) * 1e6 / transactions
    return Measurement(
        mode,
        clients,
        target.name,
        float(tps.group(1)),
        float(latency.group(1)),
        transactions,
        cpu,
    )


@dataclass
class Bench:
    """The state of one benchmark run: the targets, the pgbench binary, what has been measured."""

    options: Options
    pgbench: Path
    targets: list[Target]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def run_all(self) -> None:
        cells = [(m, c) for m in self.options.modes for c in self.options.clients]
        total = len(cells) * self.options.repeat * len(self.targets)
        for mode, clients in cells:
            for _ in range(self.options.repeat):
                for target in self.targets:  # interleaved: one cell's targets back to back
                    self.measure(target, mode, clients, f"[{len(self.measurements) + 1}/{total}]")

    def measure(self, target: Target, mode: str, clients: int, step: str) -> None:
        label = f"{step} -M {mode:8} -c {clients:<3} {target.name:9}"
        if self.is_dead(target):
            self.record(Measurement(mode, clients, target.name, error="process gone"), label)
            return
        if self.options.warmup:
            run_pgbench(self.pgbench, target, mode, clients, self.options.warmup)
        result = run_pgbench(self.pgbench, target, mode, clients, self.options.duration)
        if result.error and self.is_dead(target):
            code = self.processes[target.name].returncode
            result = replace(
                result,
                error=f"{result.error}\n{target.name} died (exit code {code}); log tail:\n"
                f"{log_tail(target.log)}",
            )
        self.record(result, label)

    def is_dead(self, target: Target) -> bool:
        proc = self.processes.get(target.name)
        return proc is not None and proc.poll() is not None

    def record(self, result: Measurement, label: str) -> None:
        self.measurements.append(result)
        if result.error:
            self.problems.append(f"{label.strip()}:\n{result.error}")
            print(f"{label} FAILED: {first_error_line(result.error)}", flush=True)
            return
        cpu = f", {result.cpu_us_per_query:.1f} µs CPU/query" if result.cpu_us_per_query else ""
        print(f"{label} {result.tps:9.0f} tps  {result.latency_ms:.3f} ms{cpu}", flush=True)


def first_error_line(text: str) -> str:
    lines = text.splitlines()
    return next((line for line in lines if "error" in line or "died" in line), lines[-1])


# --- reporting --------------------------------------------------------------------------------


COLUMNS = (
    "mode",
    "clients",
    "target",
    "tps",
    "avg latency ms",
    "proxy CPU µs/query",
    "tps / pgbouncer",
    "tps / direct",
    "added latency ms",
    "added / pgbouncer's",
    "target met?",
)


def median_of(runs: list[Measurement]) -> Measurement | None:
    good = [r for r in runs if r.error is None]
    if not good:
        return None
    cpus = [r.cpu_us_per_query for r in good if r.cpu_us_per_query is not None]
    return replace(
        good[0],
        tps=statistics.median(r.tps for r in good),
        latency_ms=statistics.median(r.latency_ms for r in good),
        transactions=int(statistics.median(r.transactions for r in good)),
        cpu_us_per_query=statistics.median(cpus) if cpus else None,
    )


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def target_met(row: Measurement, bouncer: Measurement | None, direct: Measurement | None) -> str:
    """pgguard only: tps ≥ pgbouncer's above one client; added latency ≤ 1.2x at one client."""
    if row.target != "pgguard" or bouncer is None:
        return ""
    if row.clients > 1:
        return "yes" if row.tps >= TPS_TARGET * bouncer.tps else "no"
    if direct is None or bouncer.latency_ms <= direct.latency_ms:
        return "n/a"
    added = (row.latency_ms - direct.latency_ms) / (bouncer.latency_ms - direct.latency_ms)
    return "yes" if added <= LATENCY_TARGET else "no"


def table_rows(options: Options, measurements: list[Measurement]) -> list[list[str]]:
    rows = []
    for mode in options.modes:
        for clients in options.clients:
            cell = {
                t: median_of(
                    [m for m in measurements if (m.mode, m.clients, m.target) == (mode, clients, t)]
                )
                for t in options.targets
            }
            direct, bouncer = cell.get("direct"), cell.get("pgbouncer")
            for name, row in cell.items():
                rows.append(format_row(mode, clients, name, row, direct, bouncer))
            with_ledger, without = cell.get("pgguard"), cell.get("pgguard-noledger")
            if with_ledger is not None and without is not None:
                ratio = with_ledger.tps / without.tps
                met = "yes" if ratio >= LEDGER_TARGET else "no"
                SUMMARY.append(
                    f"ledger cost, pgguard tps / pgguard-noledger tps (target >= "
                    f"{LEDGER_TARGET}): {mode} {clients} clients: {ratio:.2f} (target met: {met})"
                )
            floor = cell.get("bare-relay")
            if floor is not None and bouncer is not None:
                SUMMARY.append(
                    f"Python floor, bare-relay tps / pgbouncer tps: {mode} {clients} clients: "
                    f"{floor.tps / bouncer.tps:.2f}" + _floor_detail(floor, with_ledger, without)
                )
    return rows


def _floor_detail(
    floor: Measurement, with_ledger: Measurement | None, without: Measurement | None
) -> str:
    """pgguard's own cost over the bare relay: tps ratios and extra proxy CPU per query."""
    parts = []
    for name, row in (("pgguard", with_ledger), ("pgguard-noledger", without)):
        if row is None:
            continue
        extra = (
            f", {row.cpu_us_per_query - floor.cpu_us_per_query:+.1f} µs CPU/query"
            if row.cpu_us_per_query is not None and floor.cpu_us_per_query is not None
            else ""
        )
        parts.append(f"{name} / bare-relay {row.tps / floor.tps:.2f}{extra}")
    return f"; {'; '.join(parts)}" if parts else ""


SUMMARY: list[str] = []  # filled by table_rows: the ledger-cost and Python-floor lines


def format_row(
    mode: str,
    clients: int,
    name: str,
    row: Measurement | None,
    direct: Measurement | None,
    bouncer: Measurement | None,
) -> list[str]:
    if row is None:
        return [mode, str(clients), name, "FAILED", *[""] * (len(COLUMNS) - 4)]
    added = row.latency_ms - direct.latency_ms if direct and name != "direct" else None
    bouncer_added = bouncer.latency_ms - direct.latency_ms if direct and bouncer else None
    cpu = f"{row.cpu_us_per_query:.1f}" if row.cpu_us_per_query is not None else "n/a"
    return [
        mode,
        str(clients),
        name,
        f"{row.tps:.0f}",
        f"{row.latency_ms:.3f}",
        cpu,
        _ratio(row.tps, bouncer.tps if bouncer else None),
        _ratio(row.tps, direct.tps if direct else None),
        f"{added:+.3f}" if added is not None else "n/a",
        _ratio(added, bouncer_added if bouncer_added and bouncer_added > 0 else None),
        target_met(row, bouncer, direct),
    ]


def print_table(rows: list[list[str]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title, markdown_table(rows), *SUMMARY, sep="\n")
        return
    table = Table(title=title)
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i in (0, 2) else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(160, shutil.get_terminal_size().columns)).print(table)
    for line in SUMMARY:
        print(line)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def environment(options: Options, pgbench: Path, pg: EmbeddedPostgres) -> list[str]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    bouncer = find_pgbouncer()
    revision = subprocess.run(
        ["git", "-C", str(BENCH_DIR), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return [
        f"- started: {options.started.isoformat(timespec='seconds')}; load average "
        f"before/after: {options.load_before:.2f}/{os.getloadavg()[0]:.2f} (1 min)",
        f"- machine: {os.cpu_count()} CPUs ({cpu_model}), {platform.platform()}",
        f"- PostgreSQL: {superuser_sql(pg, 'SHOW server_version').strip()} ({pg.bin_dir})",
        f"- pgbench: {pgbench} ({tool_version(pgbench)})",
        f"- pgbouncer: {tool_version(bouncer) if bouncer else 'not installed'} (session pooling)",
        f"- pgguard: git {revision or '?'}, Python {platform.python_version()}",
        f"- per run: pgbench -S -M MODE -c C -j min(C,2) -T {options.duration} -n, "
        f"after a {options.warmup}s warm-up; scale {options.scale}; "
        f"median of {options.repeat} run(s); all targets over TCP 127.0.0.1",
    ]


def write_markdown(
    path: Path, header: list[str], rows: list[list[str]], problems: list[str]
) -> None:
    parts = [
        "# pgbench: direct vs pgguard vs pgbouncer",
        "",
        *header,
        "",
        markdown_table(rows),
        "",
        f"Targets for pgguard: tps ≥ {TPS_TARGET:g}x pgbouncer's above one client; "
        f"added latency ≤ {LATENCY_TARGET:g}x pgbouncer's at one client. Proxy CPU is user+sys "
        "of the proxy process per transaction (one query each with -S).",
        "",
        *(f"- {line}" for line in SUMMARY),
    ]
    if problems:
        parts += ["", "## Problems", "", *(f"```\n{p}\n```" for p in problems)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")


# --- main -------------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pgguard-bench-"))
    path.chmod(0o711)  # the pgserver user must reach the data and pgbouncer directories
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def start_targets(
    stack: contextlib.ExitStack,
    options: Options,
    workdir: Path,
    pg: EmbeddedPostgres,
    psql: Path,
) -> tuple[list[Target], dict[str, subprocess.Popen[bytes]]]:
    targets, processes = [], {}
    for name in options.targets:
        if name == "direct":
            targets.append(direct_target(pg))
            continue
        if name in ("pgguard", "pgguard-noledger"):
            target, proc = start_pgguard(stack, workdir, pg, psql, ledger=name == "pgguard")
        elif name == "bare-relay":
            target, proc = start_bare_relay(stack, workdir, pg, psql)
        else:
            target, proc = start_pgbouncer(stack, workdir, pg, psql, max(options.clients) + 2)
        targets.append(target)
        processes[name] = proc
    return targets, processes


def run(options: Options) -> int:
    pgbench = find_pgbench()
    psql = pgbench.parent / "psql"
    print(f"pgbench: {pgbench} ({tool_version(pgbench)})", flush=True)
    if "pgbouncer" in options.targets:
        ensure_pgbouncer()
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(workspace(options.keep))
        pg = start_postgres(stack, workdir)
        initialize_pgbench(pg, pgbench, options.scale)
        targets, processes = start_targets(stack, options, workdir, pg, psql)
        bench = Bench(options, pgbench, targets, processes)
        bench.run_all()
        bench.problems += [report for t in targets if (report := noteworthy_log(t))]
        header = environment(options, pgbench, pg)
    rows = table_rows(options, bench.measurements)
    print()
    print_table(rows, "pgbench -S: direct vs pgguard vs pgbouncer")
    print("\n".join(header))
    write_markdown(options.output, header, rows, bench.problems)
    for problem in bench.problems:
        print(f"\n--- problem ---\n{problem}")
    print(f"\nwritten to {options.output}")
    failed = sum(1 for m in bench.measurements if m.error)
    if failed:
        print(f"{failed} run(s) failed; see the problems above", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: it is ignored under `cmd &`
        signal.signal(signum, _raise_interrupt)
    try:
        return run(options)
    except BenchError as exc:
        print(f"pgbench_compare: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\npgbench_compare: interrupted; everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
