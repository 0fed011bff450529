"""The bot authenticating with a certificate instead of a client secret.

The stub's token endpoint accepts only a client assertion signed with the test certificate's
key, naming that certificate (``x5t``), for this app and this token URL, each ``jti`` once.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import jwt
import pytest

from pgguard.settings import TeamsBotSettings
from pgguard.teams_bot.credentials import AppCredentials, TokenUnavailable
from tests.bot_connector_stub import APP_ID, BotConnectorStub, app_certificate
from tests.integration.bot.helpers import answered_card, bot_settings, click, wait_for_card
from tests.integration.holds.helpers import eventually, wait_for_request
from tests.support import PgguardThread


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """(PEM file with the app's certificate and key, the certificate alone)."""
    bundle, cert_pem = app_certificate()
    path = tmp_path_factory.mktemp("bot-cert") / "app.pem"
    path.write_bytes(bundle)
    path.chmod(0o600)
    return path, cert_pem


@pytest.fixture(scope="module")
def stub(certificate: tuple[Path, bytes]) -> Iterator[BotConnectorStub]:
    with BotConnectorStub(app_password=None, certificate_pem=certificate[1]) as running:
        yield running


@pytest.fixture(scope="module")
def pgguard(
    upstream_dsn: str,
    state_dsn: str,
    rules_dir: Path,
    stub: BotConnectorStub,
    certificate: tuple[Path, bytes],
) -> Iterator[PgguardThread]:
    schema = f"pgguard_botcert_{secrets.token_hex(4)}"
    spool = Path(tempfile.mkdtemp(prefix="pgguard-spool-"))
    bot = stub.bot_settings(certificate=str(certificate[0]))
    assert "app_password" not in bot
    thread = PgguardThread(
        bot_settings(upstream_dsn, state_dsn, rules_dir, schema, spool, bot)
    ).start()
    try:
        yield thread
    finally:
        thread.stop()


async def test_a_bot_with_a_certificate_posts_and_decides(
    pgguard: PgguardThread, api: httpx.AsyncClient, stub: BotConnectorStub
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        running = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
        request = await wait_for_request(api, "hold_t")
        await wait_for_card(stub, request["id"])
        # The token came from a verified client assertion, never a secret.
        assert stub.refused_token_requests == []
        form = stub.token_requests[-1]
        assert "client_secret" not in form
        header = jwt.get_unverified_header(form["client_assertion"])
        assert (header["alg"], len(header["x5t"])) == ("RS256", 27)  # base64url SHA-1
        answered_card(await click(api, stub, request["id"], "approve", "dba1"))
        assert await asyncio.wait_for(running, 10) == "DROP TABLE"
        await eventually(lambda: bool(stub.updates_for(request["id"])))
    finally:
        await conn.close()


async def test_an_assertion_signed_by_another_certificate_is_refused(
    stub: BotConnectorStub, tmp_path: Path
) -> None:
    impostor, _ = app_certificate()  # right app id, wrong key pair
    (tmp_path / "impostor.pem").write_bytes(impostor)
    settings = TeamsBotSettings(**stub.bot_settings(certificate=str(tmp_path / "impostor.pem")))
    transport = httpx.AsyncHTTPTransport()
    try:
        credentials = AppCredentials(settings, transport)
        with pytest.raises(TokenUnavailable) as info:
            await credentials.token(3.0)
    finally:
        await transport.aclose()
    assert not info.value.retryable
    assert "invalid_client" in info.value.what
    assert stub.refused_token_requests[-1] == "bad assertion (InvalidSignatureError)"
    assert APP_ID in repr(credentials)
    assert "PRIVATE" not in repr(credentials)
