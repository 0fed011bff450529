"""The approval page in Chromium: what a reviewer sees in each state, and a comment being typed
survives a decision made elsewhere (issue #17, item 4).

Screenshots of the page - pending, approved, denied, expired - are written to
``$PGGUARD_SCREENSHOT_DIR`` (default: the test's tmp directory) for review.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.integration.holds.helpers import auth
from tests.integration.oidc.helpers import DANA
from tests.integration.oidc.test_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    agent_runs,
    browser_pgguard,
    held_request,
)
from tests.oidc_provider import OidcProvider
from tests.support import PgguardThread

__all__ = ["browser_pgguard"]  # the module-scoped pgguard the browser reaches

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Chromium at {CHROMIUM}")

TYPED = "checking with finance first, do not lose this"


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("PGGUARD_SCREENSHOT_DIR", str(tmp_path)))
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture
def short_table(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS oidc_short_t")
        conn.execute("CREATE TABLE oidc_short_t (id int, email text)")
        conn.execute("GRANT ALL ON oidc_short_t TO PUBLIC")


@pytest.fixture
def page(browser_pgguard: PgguardThread, provider: OidcProvider) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    provider.user = DANA
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            tab = browser.new_page(viewport={"width": 1100, "height": 1000})
            tab.set_default_timeout(15_000)
            tab.goto(f"{browser_pgguard.http_url}/requests")
            tab.get_by_role("link", name="Sign in with your organisation account").click()
            tab.wait_for_url(f"{browser_pgguard.http_url}/requests")
            yield tab
        finally:
            browser.close()


def _decide_by_api(pgguard: PgguardThread, request_id: str, verb: str) -> None:
    with httpx.Client(base_url=pgguard.http_url, timeout=10) as api:
        response = api.post(
            f"/api/requests/{request_id}/{verb}", json={"reason": "elsewhere"}, headers=auth("dba1")
        )
        assert response.status_code == 200


def test_page_states_and_a_typed_comment_survives(
    browser_pgguard: PgguardThread, page: object, shots: Path, short_table: None
) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    base = browser_pgguard.http_url
    # Pending: reason masked, application, columns, lock, time left; SQL with price*qty as is.
    agent = agent_runs(
        browser_pgguard,
        "/* reason='monthly report for 123-45-0042' */ "
        "SELECT id, email, id*id AS price_qty FROM oidc_t WHERE email = 'ada@example.com'",
    )
    request = held_request(browser_pgguard, "oidc_t")
    page.goto(f"{base}/requests/{request['id']}")
    body = page.locator("body")
    expect(body).to_contain_text("monthly report for <ssn>")
    expect(body).to_contain_text("Columns read")
    expect(body).to_contain_text("Time left")
    expect(page.locator("pre").first).to_contain_text("id*id")
    assert "123-45-0042" not in page.content()
    assert "ada@example.com" not in page.content()
    page.screenshot(path=str(shots / "pending.png"), full_page=True)
    # A comment is being typed when someone else approves: the state changes in place, the
    # text stays, the buttons are disabled.
    page.locator("textarea[name=comment]").fill(TYPED)
    _decide_by_api(browser_pgguard, request["id"], "approve")
    expect(page.locator("#state")).to_have_text("approved", timeout=12_000)
    expect(page.locator("textarea[name=comment]")).to_have_value(TYPED)
    expect(page.locator("#decided-elsewhere")).to_be_visible()
    expect(page.get_by_role("button", name="Approve")).to_be_disabled()
    expect(page.locator("#when-title")).to_have_text("Decided at")
    page.screenshot(path=str(shots / "approved-while-typing.png"), full_page=True)
    agent.result(timeout=15)
    page.reload()
    expect(body).to_contain_text("Decided at")
    expect(body).not_to_contain_text("Expired at")
    page.screenshot(path=str(shots / "approved.png"), full_page=True)

    # Denied in the browser.
    agent = agent_runs(browser_pgguard, "SELECT count(*) FROM oidc_t")
    request = held_request(browser_pgguard, "count(")
    page.goto(f"{base}/requests/{request['id']}")
    expect(body).to_contain_text("(no reason given)")
    page.locator("textarea[name=comment]").fill("use the replica")
    page.get_by_role("button", name="Deny").click()
    expect(page.locator("#state")).to_have_text("denied")
    expect(body).to_contain_text("Decided at")
    page.screenshot(path=str(shots / "denied.png"), full_page=True)
    with pytest.raises(psycopg.Error):
        agent.result(timeout=15)

    # Expired: nobody decided within the 2 s of the short rule; the empty form reloads itself.
    agent = agent_runs(browser_pgguard, "COPY oidc_short_t TO STDOUT")
    request = held_request(browser_pgguard, "oidc_short_t")
    assert request["hold_timeout_s"] == 2, request
    page.goto(f"{base}/requests/{request['id']}")
    expect(page.locator("#state")).to_have_text("pending")
    expect(page.locator("#state")).to_have_text("expired", timeout=15_000)
    page.reload()
    expect(page.locator("#when-title")).to_have_text("Expired at")
    page.screenshot(path=str(shots / "expired.png"), full_page=True)
    with pytest.raises(psycopg.Error):
        agent.result(timeout=15)
