"""Helpers for the OIDC sign-in tests: pgguard's settings, identities, and one sign-in by hand.

A sign-in is driven the way a browser does it: GET /login/oidc on pgguard (which sets the
``pgguard_oidc`` cookie and redirects), GET the provider's authorize URL (which consents at once
and redirects to the public callback URL), then GET that callback on pgguard with the cookie.
pgguard's public URL is https, so its cookies are ``Secure``; the tests speak plain HTTP to the
service behind it and hand the cookies over themselves.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from pgguard.settings import Settings
from tests.integration.holds.helpers import PUBLIC_URL, TOKENS, sha
from tests.oidc_provider import Forgery, OidcProvider, User
from tests.support import AGENT, AGENT_PASSWORD, OWNER, agent_settings

TENANT = "3f1c0c9e-7a52-4d0b-9d4e-0c6a9b1d2e3f"
CLIENT_ID = "5b7e2d1a-pgguard-approvals"
CLIENT_SECRET = "Qx8~client.secret_with-Entra+chars/and=padding"
ADMIT_GROUP = "0b1f6a2c-9c0e-4f55-8d7e-6a1b2c3d4e5f"  # Entra sends group object ids
ADMIT_ROLE = "PgGuard.Approver"
CALLBACK = f"{PUBLIC_URL}/auth/callback"

ALICES_AGENT = "alices-agent"  # owned by Alice's object id: she may not approve its statements
BROWSER_AGENT = "browser-agent"  # every statement it sends is held (rule below)
AGENT_PASSWORDS = {ALICES_AGENT: "alices-agent-password", BROWSER_AGENT: "browser-agent-password"}

# Configured by subject ([[approvers]] subject = her oid), with no token.
DANA = User(
    oid="8d2b7c1e-0f4a-4e9b-a6c3-111111111111",
    name="Dana Subject",
    preferred_username="dana@contoso.example",
)
# Admitted by an allowed group only.
BOB = User(
    oid="8d2b7c1e-0f4a-4e9b-a6c3-222222222222",
    name="Bob Group",
    preferred_username="bob@contoso.example",
    groups=("some-other-group", ADMIT_GROUP),
)
# Admitted by an allowed app role only.
RITA = User(
    oid="8d2b7c1e-0f4a-4e9b-a6c3-333333333333",
    name="Rita Role",
    preferred_username="rita@contoso.example",
    roles=(ADMIT_ROLE,),
)
# In an allowed group, and the owner (by object id) of ALICES_AGENT.
ALICE = User(
    oid="8d2b7c1e-0f4a-4e9b-a6c3-444444444444",
    name="Alice Owner",
    preferred_username="alice@contoso.example",
    groups=(ADMIT_GROUP,),
)
# In an allowed group; her user name is the owner of AGENT (an e-mail address).
ALICE_BY_NAME = User(
    oid="8d2b7c1e-0f4a-4e9b-a6c3-555555555555",
    name="Alice by name",
    preferred_username=OWNER,
    groups=(ADMIT_GROUP,),
)
# Signed in fine, but in no allowed group or role.
EVE = User(
    oid="8d2b7c1e-0f4a-4e9b-a6c3-666666666666",
    name="Eve Outsider",
    preferred_username="eve@contoso.example",
    groups=("marketing",),
    roles=("Reader",),
)

OIDC_RULES = f"""
version: 1
rules:
  - id: test.browser-agent
    description: Every statement of the agent "{BROWSER_AGENT}" goes to review.
    match: {{agents: [{BROWSER_AGENT}]}}
    action: hold
  - id: test.browser-short
    description: The browser agent's statements on oidc_short_t expire in 2 s (the page test).
    match: {{agents: [{BROWSER_AGENT}], tables: [oidc_short_t]}}
    action: hold
    hold_timeout: 2
"""


def new_provider(*redirect_uris: str) -> OidcProvider:
    return OidcProvider(
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uris=redirect_uris or (CALLBACK,),
    )


def oidc_settings(
    upstream_dsn: str,
    state_dsn: str,
    rules_dir: Path,
    schema: str,
    provider: OidcProvider,
    *,
    public_url: str = PUBLIC_URL,
    http_port: int = 0,
) -> Settings:
    return agent_settings(
        upstream_dsn,
        state_dsn,
        agents=[
            {"name": AGENT, "password": AGENT_PASSWORD, "owner": OWNER},
            {"name": ALICES_AGENT, "password": AGENT_PASSWORDS[ALICES_AGENT], "owner": ALICE.oid},
            {"name": BROWSER_AGENT, "password": AGENT_PASSWORDS[BROWSER_AGENT], "owner": OWNER},
        ],
        policy={"rules_dir": str(rules_dir)},
        state={"schema": schema},
        http={"host": "127.0.0.1", "port": http_port, "public_url": public_url},
        oidc={
            "issuer": provider.issuer,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "tenant_id": TENANT,
            "allowed_groups": [ADMIT_GROUP],
            "allowed_roles": [ADMIT_ROLE],
        },
        approvers=[
            {
                "id": "dba1",
                "name": "Dana DBA",
                "groups": ["dba"],
                "token_sha256": sha(TOKENS["dba1"]),
            },
            {"id": "dana", "name": "Dana by subject", "groups": ["dba"], "subject": DANA.oid},
        ],
        ledger={"spool_dir": tempfile.mkdtemp(prefix="pgguard-spool-")},
    )


def set_cookies(response: httpx.Response) -> dict[str, str]:
    """Each cookie the response sets, by name, as its whole Set-Cookie line."""
    found = {}
    for line in response.headers.get_list("set-cookie"):
        found[line.split("=", 1)[0]] = line
    return found


def pair(set_cookie_line: str) -> str:
    return set_cookie_line.split(";", 1)[0]


async def begin(http_url: str, next_path: str = "/requests") -> tuple[str, str]:
    """(the pgguard_oidc cookie as ``name=value``, the provider URL pgguard redirects to)."""
    async with httpx.AsyncClient(base_url=http_url, timeout=10) as client:
        response = await client.get("/login/oidc", params={"next": next_path})
    assert response.status_code == 303, response.text
    return pair(set_cookies(response)["pgguard_oidc"]), response.headers["location"]


async def at_provider(authorize_url: str, public_url: str = PUBLIC_URL) -> str:
    """The callback (path and query) the provider sends the browser back to."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(authorize_url)
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(f"{public_url}/auth/callback?"), location
    return location.removeprefix(public_url)


async def callback(http_url: str, path: str, cookie: str | None) -> httpx.Response:
    headers = {"Cookie": cookie} if cookie else {}
    async with httpx.AsyncClient(base_url=http_url, timeout=10) as client:
        return await client.get(path, headers=headers)


async def sign_in(
    http_url: str,
    provider: OidcProvider,
    user: User,
    *,
    forge: Forgery | None = None,
    next_path: str = "/requests",
) -> httpx.Response:
    """The callback's answer after a whole sign-in of ``user`` (303 on success)."""
    provider.user = user
    provider.forge_next = forge
    cookie, url = await begin(http_url, next_path)
    return await callback(http_url, await at_provider(url), cookie)


async def page_as(http_url: str, provider: OidcProvider, user: User) -> httpx.AsyncClient:
    """A client holding the session cookie of ``user``, signed in through the provider."""
    response = await sign_in(http_url, provider, user)
    assert response.status_code == 303, response.text
    session = pair(set_cookies(response)["pgguard_session"])
    return httpx.AsyncClient(base_url=http_url, timeout=10, headers={"Cookie": session})


async def ledger_statement(dsn: str, schema: str, request_id: str) -> Any:
    """The ledger's statement entry for a held request (waits for it to be written)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(10):
            while True:
                row = await conn.fetchrow(
                    f"SELECT * FROM {schema}.ledger_entries "
                    "WHERE kind = 'statement' AND request_id = $1",
                    request_id,
                )
                if row is not None:
                    return row
                await asyncio.sleep(0.1)
    finally:
        await conn.close()
