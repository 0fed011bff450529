"""Ordinary trouble is quiet and truthful: a client gone mid-reply ends its session at INFO with
no traceback and no XX000; start-up errors are one line naming the setting, exit code 2.

The proxy runs on uvloop here, as ``pgguard serve`` runs it: writing to a transport the peer has
reset raises there (``unable to perform operation on <TCPTransport closed=True>``).
"""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import uvloop

from pgguard.wire import messages as m
from tests.support import ProxyThread, RawClient, agent_settings


class UvloopProxyThread(ProxyThread):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.loop.close()
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)


@pytest.fixture(scope="module")
def uv_proxy(upstream_dsn: str) -> Iterator[ProxyThread]:
    thread = UvloopProxyThread(agent_settings(upstream_dsn)).start()
    try:
        yield thread
    finally:
        thread.stop()


def reset_mid_reply(port: int) -> None:
    raw = RawClient.connect(port)
    raw.login()
    raw.send(m.query("SELECT repeat('x', 1000) FROM generate_series(1, 100000)"))
    got = 0
    while got < 4 * 1024 * 1024:  # read at full speed: the reply flows without backpressure
        got += len(raw.sock.recv(1 << 20))
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.sock.close()  # RST: the peer is gone while ~100 MB are still on their way


def test_client_gone_mid_reply_is_quiet(
    uv_proxy: ProxyThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(5):
        reset_mid_reply(uv_proxy.port)
    time.sleep(1.0)
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert noisy == [], [r.getMessage() for r in noisy]
    closed = [r for r in caplog.records if r.getMessage().endswith(": closed")]
    assert len(closed) >= 5
    with psycopg.connect(uv_proxy.dsn(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)


def run_serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgguard.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_config(path: Path, upstream_dsn: str, **sections: str) -> Path:
    text = "\n".join(
        [
            f'data_dir = "{path.parent / "data"}"',
            "[listen]",
            sections.get("listen", 'host = "127.0.0.1"\nport = 0'),
            "[upstream]",
            f'dsn = "{sections.get("upstream", upstream_dsn)}"',
            "connect_timeout = 3",
            "[ledger]",
            "enabled = false",
            "[limits]",
            sections.get("limits", ""),
            # The HTTP side (health, metrics) starts without approvers too: never on 8080 here.
            "" if "[http]" in sections.get("extra", "") else "[http]\nport = 0",
            sections.get("extra", ""),
            "[[agents]]",
            'name = "agent"\npassword = "pw"\nowner = "alice@example.com"',
        ]
    )
    path.write_text(text)
    return path


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("pgguard:")]
    assert "Traceback" not in stderr, stderr
    assert len(errors) == 1, stderr
    return errors[0]


def test_port_in_use_is_one_line_exit_2(upstream_dsn: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path / "p.toml", upstream_dsn, listen=f'host = "127.0.0.1"\nport = {port}'
        )
        result = run_serve(config)
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert "listen.port" in line
    assert str(port) in line


def test_upstream_unreachable_is_one_line_exit_2(upstream_dsn: str, tmp_path: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = write_config(
        tmp_path / "u.toml",
        upstream_dsn,
        upstream=f"postgresql://postgres@127.0.0.1:{port}/postgres",
        limits="startup_wait = 0",  # no retrying: the error at once
    )
    result = run_serve(config)
    assert result.returncode == 2, result.stderr
    assert "upstream.dsn" in one_line(result.stderr)


def test_upstream_unreachable_after_the_start_up_wait_is_exit_2(
    upstream_dsn: str, tmp_path: Path
) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = write_config(
        tmp_path / "w.toml",
        upstream_dsn,
        upstream=f"postgresql://postgres@127.0.0.1:{port}/postgres",
        limits="startup_wait = 2",
    )
    started = time.monotonic()
    result = run_serve(config)
    assert time.monotonic() - started >= 2  # it retried before giving up
    assert result.returncode == 2, result.stderr
    assert "waiting for upstream" in result.stderr
    assert "upstream.dsn" in one_line(result.stderr)


def test_http_port_in_use_is_one_line_exit_2(
    upstream_dsn: str, state_dsn: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        extra = "\n".join(
            [
                "[state]",
                f'dsn = "{state_dsn}"',
                "[http]",
                f'host = "127.0.0.1"\nport = {port}',
                "[[approvers]]",
                'id = "dba"\nname = "DBA"',
                f'token_sha256 = "{"0" * 64}"',
            ]
        )
        config = write_config(tmp_path / "h.toml", upstream_dsn, extra=extra)
        result = run_serve(config)
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert "http.port" in line
    assert str(port) in line


def test_upstream_refusing_the_login_is_one_line_exit_2(direct_dsn: str, tmp_path: Path) -> None:
    parts = urlsplit(direct_dsn)
    wrong = parts._replace(netloc=f"no_such_role:wrong@{parts.hostname}:{parts.port}").geturl()
    result = run_serve(write_config(tmp_path / "w.toml", wrong))
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert "upstream.dsn" in line
    assert "28" in line  # the server's SQLSTATE class 28: invalid authorization


def test_upstream_gone_mid_copy_is_quiet(
    uv_proxy: ProxyThread, direct_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(3):
        with psycopg.connect(uv_proxy.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE sink (t text)")
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            killer = threading.Timer(0.3, _terminate, (direct_dsn, pid))
            killer.start()
            with pytest.raises(psycopg.OperationalError):
                _copy_forever(conn)
            killer.join()
    time.sleep(0.5)
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert noisy == [], [r.getMessage() for r in noisy]


def _copy_forever(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    with conn.cursor().copy("COPY sink FROM STDIN") as copy:
        row = b"x" * 8000 + b"\n"
        for _ in range(200_000):
            copy.write(row)


def _terminate(direct_dsn: str, pid: int) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
