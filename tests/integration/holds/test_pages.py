"""The approval page, through a real HTTP client, with a held agent statement behind it."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import httpx
import pytest

from tests.integration.holds.helpers import TOKENS, wait_for_request
from tests.support import PgguardThread


async def signed_in(pgguard: PgguardThread, who: str) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=pgguard.http_url, timeout=10, follow_redirects=False)
    response = await client.post("/login", data={"token": TOKENS[who], "next": "/requests"})
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie.replace("Lax", "lax")
    # Secure, because the public URL is https; this test speaks plain HTTP to the service behind
    # it, so it hands the cookie over itself.
    assert "Secure" in cookie
    client.headers["Cookie"] = cookie.split(";", 1)[0]
    return client


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match is not None
    return match.group(1)


async def test_pages_need_a_signed_in_approver(pgguard: PgguardThread) -> None:
    async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as anonymous:
        assert (await anonymous.get("/requests")).status_code == 303
        bad = await anonymous.post("/login", data={"token": "nope"})
        assert bad.status_code == 401
    async with httpx.AsyncClient(
        base_url=pgguard.http_url, timeout=10, headers={"Cookie": "pgguard_session=eyJ9.abc"}
    ) as forged:
        assert (await forged.get("/requests")).status_code == 303


async def test_review_and_approve_on_the_page(
    pgguard: PgguardThread, api: httpx.AsyncClient
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    page = await signed_in(pgguard, "dba1")
    try:
        running = asyncio.create_task(
            conn.execute("COPY (SELECT * FROM hold_t WHERE email = 'ada@example.com') TO STDOUT")
        )
        request = await wait_for_request(api, "hold_t")
        listing = await page.get("/requests")
        assert request["id"] in listing.text
        review = await page.get(f"/requests/{request['id']}")
        assert review.status_code == 200
        for shown in (
            "agent",
            "alice@example.com",
            "export",
            "default.hold-export",
            "hold_t",
            "&lt;email&gt;",
            "Approve",
            "Deny",
        ):
            assert shown in review.text
        assert "ada@example.com" not in review.text
        assert "default-src 'none'" in review.headers["content-security-policy"]
        url = f"/requests/{request['id']}/approve"
        assert (await page.post(url, data={"csrf": "0" * 64})).status_code == 403
        done = await page.post(url, data={"csrf": csrf_of(review.text), "comment": "ok from page"})
        assert done.status_code == 303
        await asyncio.wait_for(running, 10)
        after = await page.get(f"/requests/{request['id']}")
        assert "approved" in after.text
        assert "ok from page" in after.text
        assert "via page" in after.text
    finally:
        await page.aclose()
        await conn.close()


async def test_owner_cannot_approve_on_the_page(
    pgguard: PgguardThread, api: httpx.AsyncClient
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    page = await signed_in(pgguard, "owner")
    try:
        running = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
        request = await wait_for_request(api, "hold_t")
        review = await page.get(f"/requests/{request['id']}")
        refused = await page.post(
            f"/requests/{request['id']}/approve", data={"csrf": csrf_of(review.text)}
        )
        assert refused.status_code == 403
        assert "own" in refused.text.lower() or "owner" in refused.text.lower()
        await api.post(
            f"/api/requests/{request['id']}/deny",
            json={"reason": "x"},
            headers={"Authorization": f"Bearer {TOKENS['dba1']}"},
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncio.wait_for(running, 10)
        # Decided elsewhere: the page shows it (and stops refreshing).
        shown = await page.get(f"/requests/{request['id']}")
        assert "denied" in shown.text
        assert 'http-equiv="refresh"' not in shown.text
    finally:
        await page.aclose()
        await conn.close()


async def test_no_open_redirect_after_sign_in(pgguard: PgguardThread) -> None:
    async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as client:
        response = await client.post(
            "/login", data={"token": TOKENS["dba1"], "next": "//evil.example/x"}
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/requests"


async def test_hostile_page_input_gets_clear_answers(
    pgguard: PgguardThread, api: httpx.AsyncClient
) -> None:
    page = await signed_in(pgguard, "dba1")
    try:
        # A non-ASCII CSRF token is refused like any wrong one, not a server error.
        refused = await page.post("/requests/nosuchid/approve", data={"csrf": "ü" * 64})
        assert refused.status_code == 403
        # Nothing from the query string is reflected into the page.
        shown = await page.get("/requests/nosuchid?flash=Approve+everything+now")
        assert "Approve everything now" not in shown.text
        # A cookie with a non-ASCII signature is simply not a session.
        async with httpx.AsyncClient(
            base_url=pgguard.http_url,
            timeout=10,
            headers={"Cookie": "pgguard_session=e30.%C3%BC"},
        ) as forged:
            assert (await forged.get("/requests")).status_code == 303
    finally:
        await page.aclose()
