"""HTTP bodies are bounded before they are read: a stranger's upload costs pgguard nothing.

pgguard's HTTP server runs in this very process (PgguardThread), so the process's resident size
is what an attacker's upload would cost the proxy's agents.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from pgguard.policy import SHIPPED_RULES_DIR
from tests.integration.holds.helpers import TOKENS, hold_settings
from tests.support import PgguardThread

MIB = 1024 * 1024
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def pgguard(
    upstream_dsn: str, state_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgguardThread]:
    rules = Path(SHIPPED_RULES_DIR)
    settings = hold_settings(
        upstream_dsn,
        state_dsn,
        rules,
        f"pgguard_bodies_{secrets.token_hex(4)}",
    )
    settings = settings.model_copy(
        update={"http": settings.http.model_copy(update={"max_body_bytes": LIMIT})}
    )
    thread = PgguardThread(settings).start()
    try:
        yield thread
    finally:
        thread.stop()


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def send_upload(url: str, path: str, headers: dict[str, str], total: int) -> tuple[bytes, int]:
    """POST ``total`` bytes (with the given headers) as fast as the server takes them.

    Returns the server's answer and how many body bytes it let us send before it answered and
    closed: when the server never reads the body, that is at most a few socket buffers.
    """
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    head = f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode())
    chunk = b"x" * MIB
    sent = 0
    chunked = headers.get("Transfer-Encoding") == "chunked"
    try:
        while sent < total:
            if chunked:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            else:
                sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    sock.settimeout(10)
    answer = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    return answer, sent


def test_200_mib_without_token_is_refused_before_its_body_is_read(pgguard: PgguardThread) -> None:
    before = rss_bytes()
    started = time.monotonic()
    answer, sent = send_upload(
        pgguard.http_url,
        "/api/requests/r-1/approve",
        {"Content-Type": "application/json", "Content-Length": str(200 * MIB)},
        200 * MIB,
    )
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    # The server answered and closed long before the client could push 200 MiB.
    assert sent < 32 * MIB, sent
    assert rss_bytes() - before < 32 * MIB
    assert time.monotonic() - started < 10


def test_wrong_token_is_refused_before_its_body_is_read(pgguard: PgguardThread) -> None:
    answer, sent = send_upload(
        pgguard.http_url,
        "/api/requests/r-1/deny",
        {"Authorization": "Bearer not-a-token", "Content-Length": str(200 * MIB)},
        200 * MIB,
    )
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert sent < 32 * MIB


def test_declared_length_above_the_limit_is_413_for_an_approver(pgguard: PgguardThread) -> None:
    answer, sent = send_upload(
        pgguard.http_url,
        "/api/requests/r-1/deny",
        {"Authorization": f"Bearer {TOKENS['dba1']}", "Content-Length": str(200 * MIB)},
        200 * MIB,
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"http.max_body_bytes" in answer
    assert sent < 32 * MIB


def test_chunked_body_is_cut_off_at_the_limit(pgguard: PgguardThread) -> None:
    before = rss_bytes()
    answer, sent = send_upload(
        pgguard.http_url,
        "/api/requests/r-1/deny",
        {
            "Authorization": f"Bearer {TOKENS['dba1']}",
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
        },
        200 * MIB,
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 32 * MIB
    assert rss_bytes() - before < 32 * MIB


def test_page_form_above_the_limit_is_413(pgguard: PgguardThread) -> None:
    # /login takes no credential by nature: its body is bounded all the same.
    answer, sent = send_upload(
        pgguard.http_url,
        "/login",
        {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": str(200 * MIB)},
        200 * MIB,
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 32 * MIB


def test_ordinary_calls_still_work_and_the_proxy_serves(pgguard: PgguardThread) -> None:
    with httpx.Client(base_url=pgguard.http_url, timeout=10) as client:
        headers = {"Authorization": f"Bearer {TOKENS['dba1']}"}
        assert client.get("/api/requests", headers=headers).status_code == 200
        missing = client.post("/api/requests/nope/deny", headers=headers, json={"reason": "no"})
        assert missing.status_code == 404
        assert client.get("/api/requests").status_code == 401
        assert client.get("/healthz").json() == {"status": "ok"}
    with psycopg.connect(pgguard.dsn(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
