"""OIDC sign-in on the approval page, through a running pgguard and a local identity provider.

Each refusal case changes one thing about an otherwise valid sign-in, so a pass means that one
check works. Decisions made after sign-in are read back from the REST API and the ledger.
"""

from __future__ import annotations

import asyncio
import json
import re
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import pytest

from tests.integration.holds.helpers import PUBLIC_URL, TOKENS, auth, wait_for_request
from tests.integration.oidc.helpers import (
    AGENT_PASSWORDS,
    ALICE,
    ALICE_BY_NAME,
    ALICES_AGENT,
    BOB,
    CLIENT_ID,
    CLIENT_SECRET,
    DANA,
    EVE,
    RITA,
    at_provider,
    begin,
    callback,
    ledger_statement,
    page_as,
    pair,
    set_cookies,
    sign_in,
)
from tests.oidc_provider import Forgery, OidcProvider
from tests.support import PgguardThread


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match is not None
    return match.group(1)


async def test_login_page_offers_the_identity_provider_and_no_token_form(
    pgguard: PgguardThread,
) -> None:
    async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as client:
        shown = await client.get("/login", params={"next": "/requests/abc"})
        assert shown.status_code == 200
        assert "Sign in with your organisation account" in shown.text
        assert 'href="/login/oidc?next=/requests/abc"' in shown.text
        assert 'name="token"' not in shown.text
        refused = await client.post("/login", data={"token": TOKENS["dba1"], "next": "/requests"})
        assert refused.status_code == 403
        assert "Token sign-in is off" in refused.text
        assert "pgguard_session" not in refused.headers.get("set-cookie", "")
        # ... while the same token still works for the API (and so for the CLI).
        listed = await client.get("/api/requests", headers=auth("dba1"))
        assert listed.status_code == 200
        assert isinstance(listed.json(), list)


async def test_the_authorize_request_carries_pkce_nonce_and_state(
    pgguard: PgguardThread, provider: OidcProvider
) -> None:
    cookie, url = await begin(pgguard.http_url, "/requests/xyz")
    assert url.startswith(provider.authorization_endpoint + "?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert query["client_id"] == CLIENT_ID
    assert query["response_type"] == "code"
    assert query["redirect_uri"] == f"{PUBLIC_URL}/auth/callback"
    assert query["code_challenge_method"] == "S256"
    assert len(query["code_challenge"]) == 43  # base64url of a SHA-256 digest
    assert "openid" in query["scope"].split()
    assert len(query["state"]) >= 32
    assert len(query["nonce"]) >= 32
    assert CLIENT_SECRET not in url
    # Two sign-ins never share state or nonce.
    _, other = await begin(pgguard.http_url)
    other_query = {k: v[0] for k, v in parse_qs(urlsplit(other).query).items()}
    assert other_query["state"] != query["state"]
    assert other_query["nonce"] != query["nonce"]
    assert other_query["code_challenge"] != query["code_challenge"]
    async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as client:
        started = await client.get("/login/oidc", params={"next": "/requests"})
    line = set_cookies(started)["pgguard_oidc"]
    for attribute in ("HttpOnly", "Secure", "Path=/auth/callback", "Max-Age=600"):
        assert attribute in line
    assert "samesite=lax" in line.lower()
    assert cookie.startswith("pgguard_oidc=")


async def test_approver_by_subject_signs_in_and_approves(
    pgguard: PgguardThread, provider: OidcProvider, api: httpx.AsyncClient, state_dsn: str
) -> None:
    response = await sign_in(pgguard.http_url, provider, DANA, next_path="/requests")
    assert response.status_code == 303
    assert response.headers["location"] == "/requests"
    cookies = set_cookies(response)
    session = cookies["pgguard_session"]
    for attribute in ("HttpOnly", "Secure", f"Max-Age={pgguard.settings.http.session_seconds}"):
        assert attribute in session
    assert "samesite=lax" in session.lower()
    # The sign-in cookie is spent.
    assert "Max-Age=0" in cookies["pgguard_oidc"]
    assert "Path=/auth/callback" in cookies["pgguard_oidc"]  # else the browser keeps it
    # The client used the secret at the token endpoint, by the first method the provider offers.
    assert provider.token_requests[-1].auth_method == "client_secret_post"
    assert "code_verifier" in provider.token_requests[-1].fields

    conn = await asyncpg.connect(pgguard.dsn())
    page = httpx.AsyncClient(
        base_url=pgguard.http_url, timeout=10, headers={"Cookie": pair(session)}
    )
    try:
        running = asyncio.create_task(
            conn.execute("COPY (SELECT * FROM oidc_t WHERE email = 'ada@example.com') TO STDOUT")
        )
        request = await wait_for_request(api, "oidc_t")
        review = await page.get(f"/requests/{request['id']}")
        assert review.status_code == 200
        assert "Dana by subject" in review.text  # the configured approver's name
        assert "&lt;email&gt;" in review.text
        assert "ada@example.com" not in review.text
        done = await page.post(
            f"/requests/{request['id']}/approve",
            data={"csrf": csrf_of(review.text), "comment": "signed in with Entra"},
        )
        assert done.status_code == 303
        assert await asyncio.wait_for(running, 10) == "COPY 1"
    finally:
        await page.aclose()
        await conn.close()
    decided = await api.get(f"/api/requests/{request['id']}", headers=auth("dba1"))
    assert decided.json()["state"] == "approved"
    (decision,) = decided.json()["decisions"]
    assert decision["approver_id"] == "dana"
    assert decision["channel"] == "page"
    assert decision["comment"] == "signed in with Entra"
    entry = await ledger_statement(state_dsn, pgguard.settings.state.schema_name, request["id"])
    approvers = entry["approvers"]
    approvers = json.loads(approvers) if isinstance(approvers, str) else approvers
    assert approvers[0]["id"] == "dana"
    assert approvers[0]["channel"] == "page"


async def test_group_admitted_identity_denies(
    pgguard: PgguardThread, provider: OidcProvider, api: httpx.AsyncClient
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    page = await page_as(pgguard.http_url, provider, BOB)
    try:
        running = asyncio.create_task(conn.execute("COPY oidc_t TO STDOUT"))
        request = await wait_for_request(api, "COPY oidc_t")
        review = await page.get(f"/requests/{request['id']}")
        assert "Bob Group" in review.text
        done = await page.post(
            f"/requests/{request['id']}/deny",
            data={"csrf": csrf_of(review.text), "comment": "not today"},
        )
        assert done.status_code == 303
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not today"):
            await asyncio.wait_for(running, 10)
    finally:
        await page.aclose()
        await conn.close()
    decided = (await api.get(f"/api/requests/{request['id']}", headers=auth("dba1"))).json()
    assert decided["state"] == "denied"
    (decision,) = decided["decisions"]
    # Identity is the immutable object id, never the e-mail address or display name.
    assert decision["approver_id"] == BOB.oid
    assert decision["approver_name"] == "Bob Group"
    assert decision["channel"] == "page"


async def test_role_admitted_identity_signs_in(
    pgguard: PgguardThread, provider: OidcProvider
) -> None:
    response = await sign_in(pgguard.http_url, provider, RITA, next_path="/requests/r1")
    assert response.status_code == 303
    assert response.headers["location"] == "/requests/r1"
    page = httpx.AsyncClient(
        base_url=pgguard.http_url,
        timeout=10,
        headers={"Cookie": pair(set_cookies(response)["pgguard_session"])},
    )
    async with page:
        listing = await page.get("/requests")
    assert listing.status_code == 200
    assert "Rita Role" in listing.text


async def test_identity_in_no_allowed_group_is_refused(
    pgguard: PgguardThread, provider: OidcProvider
) -> None:
    response = await sign_in(pgguard.http_url, provider, EVE)
    assert response.status_code == 403
    assert "Eve Outsider" in response.text
    assert EVE.oid in response.text  # what an administrator needs to admit her
    assert "pgguard_session" not in set_cookies(response)


REFUSALS: list[tuple[Forgery, str]] = [
    ("bad_signature", "signature does not verify"),
    ("unknown_kid", "key the provider does not list"),
    ("wrong_issuer", "not issued by the configured issuer"),
    ("wrong_audience", "issued for another application"),
    ("extra_audience", "issued for another application"),
    ("expired", "has expired"),
    ("not_yet_valid", "not valid yet"),
    ("other_tenant", "another tenant"),
    ("wrong_nonce", "nonce"),
    ("missing_oid", "lacks the &#39;oid&#39; claim"),
    ("alg_none", "not one of the provider"),
    ("alg_hs256", "not one of the provider"),
]


@pytest.mark.parametrize(("forgery", "reason"), REFUSALS)
async def test_forged_id_tokens_are_refused(
    pgguard: PgguardThread, provider: OidcProvider, forgery: Forgery, reason: str
) -> None:
    issued = len(provider.issued_id_tokens)
    response = await sign_in(pgguard.http_url, provider, DANA, forge=forgery)
    assert len(provider.issued_id_tokens) == issued + 1  # the provider did issue the forgery
    assert response.status_code == 401, response.text
    assert reason in response.text
    assert "Sign-in failed" in response.text
    assert "pgguard_session" not in set_cookies(response)
    # The page names the problem, never the token or the secret.
    assert provider.issued_id_tokens[-1] not in response.text
    assert provider.issued_id_tokens[-1].split(".")[1] not in response.text
    assert CLIENT_SECRET not in response.text


async def test_state_mismatch_and_missing_or_forged_cookie_are_refused(
    pgguard: PgguardThread, provider: OidcProvider
) -> None:
    provider.user = DANA
    cookie, url = await begin(pgguard.http_url)
    path = await at_provider(url)
    tampered = re.sub(r"state=[^&]+", "state=someone-elses-state", path)
    assert tampered != path
    mismatch = await callback(pgguard.http_url, tampered, cookie)
    assert mismatch.status_code == 400
    assert "does not match" in mismatch.text
    assert "pgguard_session" not in set_cookies(mismatch)

    cookie, url = await begin(pgguard.http_url)
    path = await at_provider(url)
    missing = await callback(pgguard.http_url, path, None)
    assert missing.status_code == 400
    assert "no sign-in in progress" in missing.text
    name, value = cookie.split("=", 1)
    payload, signature = value.rsplit(".", 1)
    forged = await callback(pgguard.http_url, path, f"{name}={payload}.{'0' * len(signature)}")
    assert forged.status_code == 400
    # A session cookie is not a sign-in cookie, even though the same key signs both.
    session_like = await callback(pgguard.http_url, path, f"pgguard_session={value}")
    assert session_like.status_code == 400
    # The genuine pair still works: nothing above consumed it.
    assert (await callback(pgguard.http_url, path, cookie)).status_code == 303


async def test_a_callback_works_once(pgguard: PgguardThread, provider: OidcProvider) -> None:
    provider.user = DANA
    cookie, url = await begin(pgguard.http_url)
    path = await at_provider(url)
    first = await callback(pgguard.http_url, path, cookie)
    assert first.status_code == 303
    # A browser has dropped the sign-in cookie by now ...
    without_cookie = await callback(pgguard.http_url, path, None)
    assert without_cookie.status_code == 400
    # ... and someone who kept it cannot replay the callback either.
    with_old_cookie = await callback(pgguard.http_url, path, cookie)
    assert with_old_cookie.status_code == 401
    assert "already used" in with_old_cookie.text
    assert "pgguard_session" not in set_cookies(with_old_cookie)


async def test_provider_errors_become_pages(pgguard: PgguardThread, provider: OidcProvider) -> None:
    provider.user = DANA
    provider.refuse_next = "access_denied"
    cookie, url = await begin(pgguard.http_url)
    declined = await callback(pgguard.http_url, await at_provider(url), cookie)
    assert declined.status_code == 401
    assert "access_denied" in declined.text
    assert "The user declined to sign in." in declined.text

    provider.token_endpoint_down = True
    try:
        cookie, url = await begin(pgguard.http_url)
        down = await callback(pgguard.http_url, await at_provider(url), cookie)
    finally:
        provider.token_endpoint_down = False
    assert down.status_code == 502
    assert "could not be reached" in down.text
    assert CLIENT_SECRET not in down.text


async def test_no_open_redirect_after_sign_in(
    pgguard: PgguardThread, provider: OidcProvider
) -> None:
    for hostile in ("//evil.example/x", "https://evil.example/x", "/\\evil.example/x"):
        response = await sign_in(pgguard.http_url, provider, DANA, next_path=hostile)
        assert response.status_code == 303
        assert response.headers["location"] == "/requests"


@pytest.mark.parametrize("by_object_id", [True, False], ids=["owner-is-oid", "owner-is-username"])
async def test_an_agents_owner_cannot_approve_its_statement(
    pgguard: PgguardThread, provider: OidcProvider, api: httpx.AsyncClient, by_object_id: bool
) -> None:
    # ALICE owns ALICES_AGENT by object id; ALICE_BY_NAME's user name is the owner of AGENT.
    if by_object_id:
        owner = ALICE
        dsn = pgguard.dsn(user=ALICES_AGENT, password=AGENT_PASSWORDS[ALICES_AGENT])
    else:
        owner = ALICE_BY_NAME
        dsn = pgguard.dsn()
    conn = await asyncpg.connect(dsn)
    page = await page_as(pgguard.http_url, provider, owner)
    try:
        running = asyncio.create_task(conn.execute("COPY oidc_t TO STDOUT"))
        request = await wait_for_request(api, "COPY oidc_t")
        review = await page.get(f"/requests/{request['id']}")
        refused = await page.post(
            f"/requests/{request['id']}/approve", data={"csrf": csrf_of(review.text)}
        )
        assert refused.status_code == 403
        assert "own" in refused.text.lower()
        still = (await api.get(f"/api/requests/{request['id']}", headers=auth("dba1"))).json()
        assert still["state"] == "pending"
        await api.post(
            f"/api/requests/{request['id']}/deny", json={"reason": "cleanup"}, headers=auth("dba1")
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncio.wait_for(running, 10)
    finally:
        await page.aclose()
        await conn.close()
