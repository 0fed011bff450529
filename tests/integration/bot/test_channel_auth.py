"""Every forged credential is refused at ``/api/messages`` before anything is decided.

One statement is held for the whole module; each case sends an Approve click from a configured
approver in which exactly one thing is wrong. Each must get a 401 and leave the request pending
with no decision. A well-formed click and in-skew tokens are accepted, so the refusals are
about the forgery and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from tests.bot_connector_stub import OTHER_TENANT_ID, BotConnectorStub
from tests.integration.bot.helpers import SUBJECTS, get_request, send, wait_for_card
from tests.integration.holds.helpers import auth, wait_for_request
from tests.support import PgguardThread

EVIL_SERVICE_URL = "https://smba.evil.example/amer/"


def _click(stub: BotConnectorStub, request_id: str) -> dict[str, Any]:
    return stub.invoke(request_id, "approve", clicker=SUBJECTS["dba1"])


@dataclass(frozen=True)
class Forgery:
    """A click with one thing wrong; ``logged`` is the reason pgguard must log for it."""

    logged: str
    token: Callable[[BotConnectorStub], str | None]  # None: no Authorization header
    activity: Callable[[BotConnectorStub, str], dict[str, Any]] = _click
    authorization: str | None = None  # a raw header instead of "Bearer <token>"


def _tenant_only_in_channel_data(stub: BotConnectorStub, request_id: str) -> dict[str, Any]:
    return {**_click(stub, request_id), "channelData": {"tenant": {"id": OTHER_TENANT_ID}}}


def _no_tenant(stub: BotConnectorStub, request_id: str) -> dict[str, Any]:
    click = _click(stub, request_id)
    return {**click, "channelData": {}, "conversation": {"id": "19:x@thread.tacv2"}}


FORGERIES = {
    "bad signature": Forgery("bad signature", lambda s: s.mint(key=s.rogue, kid=s.signing.kid)),
    "wrong issuer": Forgery("another issuer", lambda s: s.mint(issuer="https://api.evil.example")),
    "wrong audience": Forgery("another audience", lambda s: s.mint(audience="another-bots-app-id")),
    "expired beyond the skew": Forgery("expired", lambda s: s.mint(expires_in=-301 - 60)),
    "not yet valid beyond the skew": Forgery(
        "not yet valid", lambda s: s.mint(not_before_in=301 + 60)
    ),
    "unknown key": Forgery("unknown signing key", lambda s: s.mint(key=s.rogue)),
    "key not endorsed for msteams": Forgery("not endorsed", lambda s: s.mint(key=s.skype_only)),
    "no exp": Forgery("MissingRequiredClaimError", lambda s: s.mint(omit=("exp",))),
    "no serviceurl claim": Forgery(
        "without serviceurl claim", lambda s: s.mint(omit=("serviceurl",))
    ),
    "serviceurl claim of another service": Forgery(
        "does not match the activity", lambda s: s.mint(service_url=EVIL_SERVICE_URL)
    ),
    "activity and claim both name another service": Forgery(
        "not the configured service_url",
        lambda s: s.mint(service_url=EVIL_SERVICE_URL),
        lambda s, r: s.invoke(r, "approve", clicker=SUBJECTS["dba1"], service_url=EVIL_SERVICE_URL),
    ),
    "other tenant": Forgery(
        "another tenant",
        lambda s: s.mint(),
        lambda s, r: s.invoke(r, "approve", clicker=SUBJECTS["dba1"], tenant=OTHER_TENANT_ID),
    ),
    "other tenant in channelData only": Forgery(
        "another tenant", lambda s: s.mint(), _tenant_only_in_channel_data
    ),
    "no tenant at all": Forgery("names no tenant", lambda s: s.mint(), _no_tenant),
    "another channel": Forgery(
        "is not msteams",
        lambda s: s.mint(),
        lambda s, r: s.invoke(r, "approve", clicker=SUBJECTS["dba1"], channel_id="webchat"),
    ),
    "missing Authorization": Forgery("no bearer token", lambda s: None),
    "basic instead of bearer": Forgery(
        "no bearer token", lambda s: None, authorization="Basic YWRtaW46YWRtaW4="
    ),
    "alg none": Forgery("is not RS256", lambda s: s.mint(algorithm="none")),
    "HS256 keyed with the public key": Forgery(
        "is not RS256", lambda s: s.mint(algorithm="HS256", hmac_secret=s.signing.public_pem())
    ),
    "garbage token": Forgery("malformed token", lambda s: None, authorization="Bearer not.a.jwt"),
}


@pytest.fixture(scope="module")
async def held(
    pgguard: PgguardThread, stub: BotConnectorStub, direct_dsn: str
) -> AsyncIterator[str]:
    """The id of a statement held for the whole module (denied at the end)."""
    direct = await asyncpg.connect(direct_dsn)
    try:
        await direct.execute("CREATE TABLE IF NOT EXISTS forgery_target (id int)")
    finally:
        await direct.close()
    conn = await asyncpg.connect(pgguard.dsn())
    running = asyncio.create_task(conn.execute("DROP TABLE forgery_target"))
    try:
        async with httpx.AsyncClient(base_url=pgguard.http_url, timeout=10) as api:
            request = await wait_for_request(api, "forgery_target")
            await wait_for_card(stub, request["id"])
            yield request["id"]
            await api.post(f"/api/requests/{request['id']}/deny", json={}, headers=auth("dba1"))
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await asyncio.wait_for(running, 10)
    finally:
        await conn.close()


@pytest.mark.parametrize("case", FORGERIES)
async def test_forged_click_is_refused_and_nothing_is_decided(
    case: str,
    held: str,
    api: httpx.AsyncClient,
    stub: BotConnectorStub,
    caplog: pytest.LogCaptureFixture,
) -> None:
    forgery = FORGERIES[case]
    activity = forgery.activity(stub, held)
    if forgery.authorization is not None:
        response = await api.post(
            "/api/messages", json=activity, headers={"Authorization": forgery.authorization}
        )
    else:
        response = await send(api, activity, forgery.token(stub))
    assert response.status_code == 401
    assert response.json() == {"detail": "unauthorized"}  # generic: the reason is only logged
    [refusal] = [r.getMessage() for r in caplog.records if "refused a request" in r.getMessage()]
    assert forgery.logged in refusal
    stored = await get_request(api, held)
    assert (stored["state"], stored["decisions"]) == ("pending", [])


@pytest.mark.parametrize(
    "claims",
    [
        {"expires_in": -120},  # expired two minutes ago: within the 300 s skew
        {"not_before_in": 120},  # valid in two minutes: within the skew
        {},
    ],
    ids=["exp-in-skew", "nbf-in-skew", "fresh"],
)
async def test_well_formed_tokens_are_accepted(
    claims: dict[str, Any], api: httpx.AsyncClient, stub: BotConnectorStub
) -> None:
    message = {**stub.invoke("x", "approve", clicker=SUBJECTS["dba1"]), "type": "message"}
    response = await send(api, message, stub.mint(**claims))
    assert (response.status_code, response.content) == (200, b"")


async def test_the_service_url_claim_may_be_spelled_as_documented(
    api: httpx.AsyncClient, stub: BotConnectorStub
) -> None:
    message = {**stub.invoke("x", "approve", clicker=SUBJECTS["dba1"]), "type": "message"}
    token = stub.mint(extra={"serviceUrl": stub.service_url.rstrip("/")}, omit=("serviceurl",))
    assert (await send(api, message, token)).status_code == 200
    mismatched = stub.mint(extra={"serviceUrl": EVIL_SERVICE_URL})  # and serviceurl is ours
    assert (await send(api, message, mismatched)).status_code == 401


async def test_unknown_keys_refetch_the_key_set_at_most_once_a_minute(
    held: str, api: httpx.AsyncClient, stub: BotConnectorStub
) -> None:
    before = stub.keys_fetches
    for _ in range(5):
        activity = stub.invoke(held, "approve", clicker=SUBJECTS["dba1"])
        response = await send(api, activity, stub.mint(key=stub.rogue, kid=f"made-up-{_}"))
        assert response.status_code == 401
    assert stub.keys_fetches - before <= 1


async def test_hostile_bodies_with_a_valid_token_get_clear_errors(
    api: httpx.AsyncClient, stub: BotConnectorStub
) -> None:
    """A caller holding a channel token still cannot crash the endpoint with its body."""
    headers = {"Authorization": f"Bearer {stub.mint()}", "Content-Type": "application/json"}
    for body in (b"[" * 100_000 + b"]" * 100_000, b"not json", b"[1, 2]", b"\xff\xfe"):
        response = await api.post("/api/messages", content=body, headers=headers)
        assert response.status_code in (400, 413), (body[:10], response.status_code)
    click = {**stub.invoke("x", "approve", clicker=SUBJECTS["dba1"]), "id": "i" * 4096}
    response = await send(api, click, stub.mint())
    assert response.status_code == 200
    assert "activity id" in response.json()["value"]
    assert (await api.get("/healthz")).status_code == 200
