"""A real browser decides held statements: headless Chromium, driven by Playwright.

The agent (psycopg, on its own thread) sends a statement that is held; the browser opens the
request's page, is sent through the local identity provider and back, sees the masked statement
and clicks Approve or Deny; the agent's statement then completes, or fails with 42501.

Debian's chromium package provides the browser; these tests skip only when it is not installed.
Playwright's sync API runs on the test's own thread: these are plain (non-async) tests, so
pytest-asyncio's session loop is not running while they do.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.integration.holds.helpers import auth
from tests.integration.oidc.helpers import (
    AGENT_PASSWORDS,
    BOB,
    BROWSER_AGENT,
    DANA,
    oidc_settings,
)
from tests.oidc_provider import OidcProvider, User
from tests.support import PgguardThread

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
    "--disable-background-networking",  # the network is closed: no update or sync calls
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"real-browser tests need Chromium at {CHROMIUM} (Debian: apt-get install chromium)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def browser_pgguard(
    upstream_dsn: str, state_dsn: str, rules_dir: Path, provider: OidcProvider
) -> Iterator[PgguardThread]:
    """A pgguard the browser reaches at its public URL (plain HTTP on loopback, a real port)."""
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    provider.redirect_uris.add(f"{public_url}/auth/callback")
    schema = f"pgguard_oidc_browser_{secrets.token_hex(4)}"
    settings = oidc_settings(
        upstream_dsn, state_dsn, rules_dir, schema, provider, public_url=public_url, http_port=port
    )
    thread = PgguardThread(settings).start()
    try:
        assert thread.http_url == public_url
        yield thread
    finally:
        thread.stop()


def agent_runs(pgguard: PgguardThread, sql: str) -> concurrent.futures.Future[list[Any]]:
    """The agent's statement, running on a thread of its own (it blocks while held)."""
    dsn = pgguard.dsn(user=BROWSER_AGENT, password=AGENT_PASSWORDS[BROWSER_AGENT])

    def run() -> list[Any]:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            return conn.execute(sql).fetchall()

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="agent")
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


def held_request(pgguard: PgguardThread, needle: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=pgguard.http_url, timeout=10) as api:
        while time.monotonic() < deadline:
            response = api.get("/api/requests", params={"state": "pending"}, headers=auth("dba1"))
            assert response.status_code == 200
            for item in response.json():
                if item["agent"] == BROWSER_AGENT and needle in item["statement"]:
                    return dict(item)
            time.sleep(0.05)
    raise AssertionError(f"no held request for {needle!r}")


def decide_in_browser(
    pgguard: PgguardThread,
    provider: OidcProvider,
    user: User,
    request_id: str,
    verb: str,
    shown_as: str,
) -> str:
    """Sign ``user`` in through the provider in Chromium and press ``verb``; the final state.

    ``shown_as`` is the approver's name the page shows (the configured one, for a subject)."""
    from playwright.sync_api import expect, sync_playwright

    provider.user = user
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(f"{pgguard.http_url}/requests/{request_id}")
            assert page.url.startswith(f"{pgguard.http_url}/login?")
            page.get_by_role("link", name="Sign in with your organisation account").click()
            # Off to the provider and back through /auth/callback, to the page asked for.
            page.wait_for_url(f"{pgguard.http_url}/requests/{request_id}")
            statement = page.locator("pre").first
            expect(statement).to_contain_text("<email>")
            assert "ada@example.com" not in page.content()
            expect(page.locator("header")).to_contain_text(shown_as)
            page.locator("textarea[name=comment]").fill(f"{verb} from Chromium")
            page.get_by_role("button", name=verb.capitalize()).click()
            state = page.locator("h1 .state")
            expect(state).to_have_text("approved" if verb == "approve" else "denied")
            expect(page.locator("body")).to_contain_text(f"{verb} from Chromium")
            return str(state.inner_text())
        finally:
            browser.close()


def test_sign_in_and_approve_in_a_browser(
    browser_pgguard: PgguardThread, provider: OidcProvider
) -> None:
    agent = agent_runs(
        browser_pgguard, "SELECT id FROM oidc_t WHERE email = 'ada@example.com' ORDER BY id"
    )
    request = held_request(browser_pgguard, "oidc_t")
    assert not agent.done()
    assert decide_in_browser(
        browser_pgguard, provider, DANA, request["id"], "approve", "Dana by subject"
    ) == ("approved")
    assert agent.result(timeout=15) == [(1,)]
    with httpx.Client(base_url=browser_pgguard.http_url, timeout=10) as api:
        decided = api.get(f"/api/requests/{request['id']}", headers=auth("dba1")).json()
    assert [(d["approver_id"], d["verdict"], d["channel"]) for d in decided["decisions"]] == [
        ("dana", "approve", "page")
    ]


def test_sign_in_and_deny_in_a_browser(
    browser_pgguard: PgguardThread, provider: OidcProvider
) -> None:
    agent = agent_runs(
        browser_pgguard, "SELECT count(*) FROM oidc_t WHERE email = 'ada@example.com'"
    )
    request = held_request(browser_pgguard, "oidc_t")
    assert (
        decide_in_browser(browser_pgguard, provider, BOB, request["id"], "deny", BOB.name)
        == "denied"
    )
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="deny from Chromium") as caught:
        agent.result(timeout=15)
    assert caught.value.sqlstate == "42501"
    with httpx.Client(base_url=browser_pgguard.http_url, timeout=10) as api:
        decided = api.get(f"/api/requests/{request['id']}", headers=auth("dba1")).json()
    assert [(d["approver_id"], d["channel"]) for d in decided["decisions"]] == [(BOB.oid, "page")]
