"""`OidcSignIn` against the local identity provider, without the pages around it.

What the page tests cannot easily reach: key rotation and the JWKS refetch limit, discovery
caching and its issuer check, an unreachable provider, both ways of client authentication, public
clients, PKCE as the provider checks it, and an expired sign-in.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from pgguard.settings import OidcSettings
from pgguard.web import oidc as oidc_module
from pgguard.web.auth import VerifiedIdentity
from pgguard.web.oidc import (
    BadCallback,
    OidcSignIn,
    PendingSignIn,
    ProviderUnavailable,
    SignInError,
)
from tests.integration.oidc.helpers import (
    ADMIT_GROUP,
    ADMIT_ROLE,
    BOB,
    CALLBACK,
    CLIENT_ID,
    CLIENT_SECRET,
    TENANT,
    at_provider,
)
from tests.oidc_provider import OidcProvider


def settings_for(provider: OidcProvider, **changes: Any) -> OidcSettings:
    fields: dict[str, Any] = {
        "issuer": provider.issuer,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "tenant_id": TENANT,
        "allowed_groups": [ADMIT_GROUP],
        **changes,
    }
    return OidcSettings(**fields)


@pytest.fixture
def local_provider() -> Iterator[OidcProvider]:
    with OidcProvider(
        tenant_id=TENANT, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, redirect_uris=[CALLBACK]
    ) as running:
        running.user = BOB
        yield running


@pytest.fixture
async def client(local_provider: OidcProvider) -> AsyncIterator[OidcSignIn]:
    signing_in = OidcSignIn(settings_for(local_provider), CALLBACK)
    try:
        yield signing_in
    finally:
        await signing_in.aclose()


async def started(client: OidcSignIn) -> tuple[PendingSignIn, dict[str, str]]:
    """A sign-in begun and consented to: what the browser brings back to the callback."""
    url, pending = await client.begin("/requests")
    path = await at_provider(url)
    return pending, dict(parse_qsl(urlsplit(path).query))


async def signed_in(client: OidcSignIn) -> VerifiedIdentity:
    pending, params = await started(client)
    return await client.finish(pending, params)


async def test_a_valid_sign_in_yields_the_entra_identity(
    client: OidcSignIn, local_provider: OidcProvider
) -> None:
    identity = await signed_in(client)
    assert identity == VerifiedIdentity(
        tenant=TENANT,
        subject=BOB.oid,
        name=BOB.name,
        username=BOB.preferred_username,
        groups=BOB.groups,
        roles=(),
    )
    await signed_in(client)
    assert local_provider.discovery_requests == 1  # cached
    assert local_provider.jwks_requests == 1


async def test_rotated_keys_are_fetched_but_unknown_keys_at_most_once_a_minute(
    client: OidcSignIn, local_provider: OidcProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    await signed_in(client)
    assert local_provider.jwks_requests == 1
    local_provider.forge_next = "unknown_kid"
    with pytest.raises(SignInError, match="key the provider does not list"):
        await signed_in(client)
    # Fetched a moment ago: a forged key id does not make pgguard ask again.
    assert local_provider.jwks_requests == 1
    local_provider.rotate_key()
    with pytest.raises(SignInError, match="key the provider does not list"):
        await signed_in(client)
    assert local_provider.jwks_requests == 1
    # Once the minute is over, the new key is fetched, once, and accepted.
    monkeypatch.setattr(oidc_module, "JWKS_REFETCH_SECONDS", 0.0)
    assert (await signed_in(client)).subject == BOB.oid
    assert local_provider.jwks_requests == 2
    assert (await signed_in(client)).subject == BOB.oid
    assert local_provider.jwks_requests == 2
    local_provider.forge_next = "unknown_kid"
    with pytest.raises(SignInError, match="key the provider does not list"):
        await signed_in(client)
    assert local_provider.jwks_requests == 3  # one refetch, then refusal


async def test_a_discovery_document_for_another_issuer_is_refused(
    local_provider: OidcProvider,
) -> None:
    # Same document URL, but the configured issuer differs from the one the document names.
    settings = settings_for(
        local_provider,
        issuer=local_provider.issuer + "/",
        discovery_url=local_provider.issuer + "/.well-known/openid-configuration",
    )
    client = OidcSignIn(settings, CALLBACK)
    try:
        with pytest.raises(ProviderUnavailable, match="not the configured") as caught:
            await client.begin("/requests")
    finally:
        await client.aclose()
    assert caught.value.status == 502


async def test_an_unreachable_provider_is_a_clear_error() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = OidcSignIn(
        OidcSettings(issuer=f"http://127.0.0.1:{port}/t/v2.0", client_id=CLIENT_ID, timeout=2),
        CALLBACK,
    )
    try:
        with pytest.raises(ProviderUnavailable, match="unreachable") as caught:
            await client.begin("/requests")
    finally:
        await client.aclose()
    assert f"127.0.0.1:{port}" in caught.value.message
    assert caught.value.status == 502


async def test_client_secret_basic_when_the_provider_offers_only_that() -> None:
    with OidcProvider(
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uris=[CALLBACK],
        auth_methods=("client_secret_basic",),
    ) as provider:
        provider.user = BOB
        client = OidcSignIn(settings_for(provider), CALLBACK)
        try:
            assert (await signed_in(client)).subject == BOB.oid
            # The secret holds characters that must be form-encoded inside the Basic header.
            assert provider.token_requests[-1].auth_method == "client_secret_basic"
            assert provider.token_requests[-1].status == 200
            assert "client_secret" not in provider.token_requests[-1].fields
        finally:
            await client.aclose()


async def test_a_wrong_client_secret_is_refused_by_the_provider(
    local_provider: OidcProvider,
) -> None:
    client = OidcSignIn(settings_for(local_provider, client_secret="not-the-secret"), CALLBACK)
    try:
        with pytest.raises(SignInError, match="invalid_client") as caught:
            await signed_in(client)
    finally:
        await client.aclose()
    assert "not-the-secret" not in caught.value.message
    assert caught.value.status == 401


async def test_a_public_client_sends_its_id_and_pkce_only() -> None:
    with OidcProvider(
        tenant_id=TENANT, client_id=CLIENT_ID, client_secret=None, redirect_uris=[CALLBACK]
    ) as provider:
        provider.user = BOB
        client = OidcSignIn(settings_for(provider, client_secret=None), CALLBACK)
        try:
            assert (await signed_in(client)).subject == BOB.oid
        finally:
            await client.aclose()
        assert provider.token_requests[-1].auth_method == "none"
        assert "client_id" in provider.token_requests[-1].fields
        assert "code_verifier" in provider.token_requests[-1].fields


async def test_the_provider_refuses_a_code_without_its_verifier(
    client: OidcSignIn, local_provider: OidcProvider
) -> None:
    pending, params = await started(client)
    other = dataclasses.replace(pending, code_verifier="x" * 64)
    with pytest.raises(SignInError, match="PKCE verification failed"):
        await client.finish(other, params)
    assert local_provider.token_requests[-1].status == 400


async def test_an_expired_or_mismatched_sign_in_is_refused_before_the_provider_is_asked(
    client: OidcSignIn, local_provider: OidcProvider
) -> None:
    pending, params = await started(client)
    asked = len(local_provider.token_requests)
    with pytest.raises(BadCallback, match="10 minutes"):
        await client.finish(
            dataclasses.replace(pending, expires_at=pending.expires_at - 601), params
        )
    with pytest.raises(BadCallback, match="does not match"):
        await client.finish(pending, {**params, "state": pending.state + "x"})
    with pytest.raises(BadCallback, match="no authorization code"):
        await client.finish(pending, {"state": pending.state})
    assert len(local_provider.token_requests) == asked
    # None of that spent the sign-in: the genuine callback still completes it.
    assert (await client.finish(pending, params)).subject == BOB.oid


def test_a_pending_sign_in_survives_its_cookie_and_junk_does_not() -> None:
    pending = PendingSignIn("s" * 43, "n" * 43, "v" * 86, "/requests/abc?x=1", 1_900_000_000)
    text = pending.dumps()
    assert all(c.isalnum() or c in "-_" for c in text)  # cookie-safe without quoting
    assert PendingSignIn.loads(text) == pending
    for junk in ("", "!!!", "e30", text[:-4], "bnVsbA"):
        with pytest.raises(BadCallback):
            PendingSignIn.loads(junk)


async def test_role_claims_and_extra_audiences(
    client: OidcSignIn, local_provider: OidcProvider
) -> None:
    local_provider.user = dataclasses.replace(BOB, groups=(), roles=(ADMIT_ROLE, "Reader"))
    identity = await signed_in(client)
    assert identity.roles == (ADMIT_ROLE, "Reader")
    assert identity.groups == ()
    local_provider.forge_next = "extra_audience"
    with pytest.raises(SignInError, match="another application"):
        await signed_in(client)
