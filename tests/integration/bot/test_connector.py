"""The bot's outgoing side against the local stand-in: tokens, retries, deadlines, secrecy,
card sizes, and the signing-key cache of its incoming side.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from pgguard.approvals.cards import MAX_MESSAGE_BYTES
from pgguard.approvals.model import ApprovalRequest, DecisionRecord, RequestState
from pgguard.settings import TeamsBotSettings
from pgguard.teams_bot import channel_auth
from pgguard.teams_bot.cards import card_for, message_size, outcome_card, review_card
from pgguard.teams_bot.channel_auth import ChannelKeys, ChannelKeysUnavailable
from pgguard.teams_bot.connector import BotConnector
from pgguard.teams_bot.credentials import AppCredentials
from tests.bot_connector_stub import APP_PASSWORD, BotConnectorStub, StubKey, new_rsa_key
from tests.integration.bot.helpers import PUBLIC_URL, execute_verbs


def a_request(**changes: object) -> ApprovalRequest:
    now = datetime.now(UTC)
    values: dict[str, object] = {
        "id": "reqbotconnector1",
        "state": RequestState.PENDING,
        "agent": "report-bot",
        "owner": "alice@example.com",
        "database": "sales",
        "client_address": "10.0.0.7:51234",
        "application_name": "psql",
        "statement": "COPY customers (email) TO STDOUT WHERE id = $1",
        "parameters": ("<int>",),
        "fingerprint": "fp-1",
        "categories": ("export",),
        "rule_ids": ("export.copy-to",),
        "reason": "monthly report",
        "approver_groups": ("dba",),
        "min_approvals": 1,
        "remember_s": None,
        "expires_in_s": 600.0,
        "session_id": "s1",
        "instance_id": "i1",
        "touches": {"reads": ["customers"]},
        "created_at": now,
        "expires_at": now + timedelta(minutes=10),
        "decided_at": None,
        "decisions": (),
        "remembered_from": None,
        "state_reason": None,
    }
    values.update(changes)
    return ApprovalRequest(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def stub() -> Iterator[BotConnectorStub]:
    with BotConnectorStub() as running:
        yield running


@pytest.fixture
async def connector(stub: BotConnectorStub) -> AsyncIterator[BotConnector]:
    settings = TeamsBotSettings(**stub.bot_settings(timeout=1.0))
    transport = httpx.AsyncHTTPTransport(retries=0)
    credentials = AppCredentials(settings, transport)
    stub.connector_script.clear()
    stub.token_script.clear()
    yield BotConnector(
        settings.service_url,
        settings.conversation_id,
        credentials,
        transport,
        timeout=settings.timeout,
        max_per_second=50,
    )
    await transport.aclose()


def soon(seconds: float = 10.0) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def test_the_token_is_fetched_once_and_reused(
    stub: BotConnectorStub, connector: BotConnector
) -> None:
    before = len(stub.token_requests)
    first = await connector.post("r1", review_card(a_request(id="r1"), PUBLIC_URL), soon())
    second = await connector.post("r2", review_card(a_request(id="r2"), PUBLIC_URL), soon())
    assert first is not None
    assert second not in (None, first)
    assert len(stub.token_requests) == before + 1
    assert stub.token_requests[-1]["client_secret"] == APP_PASSWORD
    assert stub.posted[-1].authorization == stub.posted[-2].authorization
    assert await connector.update("r1", first, outcome_card(a_request(), PUBLIC_URL), soon())
    assert stub.updated[-1].activity_id == first
    assert stub.updated[-1].body["id"] == first


async def test_5xx_and_429_are_retried_honouring_retry_after(
    stub: BotConnectorStub, connector: BotConnector
) -> None:
    stub.connector_script.extend([503, (429, {"Retry-After": "1"})])
    calls = stub.connector_calls
    started = time.monotonic()
    activity_id = await connector.post("r3", review_card(a_request(), PUBLIC_URL), soon())
    assert activity_id is not None
    assert stub.connector_calls - calls == 3
    assert time.monotonic() - started >= 0.9
    assert (connector.sent, connector.failures) == (1, 0)


async def test_a_refused_token_is_replaced_once(
    stub: BotConnectorStub, connector: BotConnector
) -> None:
    await connector.post("r4", review_card(a_request(), PUBLIC_URL), soon())
    tokens = len(stub.token_requests)
    stub.connector_script.extend([401])
    assert await connector.post("r5", review_card(a_request(), PUBLIC_URL), soon())
    assert len(stub.token_requests) == tokens + 1
    stub.connector_script.extend([401, 403])  # refused twice: the second is final
    calls = stub.connector_calls
    assert await connector.post("r6", review_card(a_request(), PUBLIC_URL), soon()) is None
    assert stub.connector_calls - calls == 2


async def test_other_client_errors_are_not_retried(
    stub: BotConnectorStub, connector: BotConnector
) -> None:
    stub.connector_script.extend([400])
    calls = stub.connector_calls
    assert await connector.post("r7", review_card(a_request(), PUBLIC_URL), soon()) is None
    assert stub.connector_calls - calls == 1
    assert connector.failures == 1


async def test_nothing_is_sent_past_the_deadline(
    stub: BotConnectorStub, connector: BotConnector
) -> None:
    stub.connector_script.extend([503] * 200)
    deadline = soon(1.5)
    started = time.monotonic()
    assert await connector.post("r8", review_card(a_request(), PUBLIC_URL), deadline) is None
    assert time.monotonic() - started < 2.5
    assert connector.failures == 1
    calls = stub.connector_calls
    await asyncio.sleep((deadline - datetime.now(UTC)).total_seconds() + 0.3)
    assert stub.connector_calls == calls  # no attempt left running
    stub.connector_script.clear()


async def test_a_superseded_card_is_not_posted(
    stub: BotConnectorStub, connector: BotConnector
) -> None:
    calls = stub.connector_calls
    card = review_card(a_request(), PUBLIC_URL)
    assert await connector.post("r9", card, soon(), superseded=lambda: True) is None
    assert stub.connector_calls == calls


async def test_secrets_stay_out_of_logs_and_reprs(
    stub: BotConnectorStub, connector: BotConnector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stub.token_script.extend([503])  # the token endpoint fails once: retried
    stub.connector_script.extend([401, 500])
    assert await connector.post("r10", review_card(a_request(), PUBLIC_URL), soon())
    issued = {r.authorization.removeprefix("Bearer ") for r in stub.posted}
    assert caplog.records, "the connector logs its outcomes"
    assert "r10" in caplog.text
    for text in (caplog.text, repr(connector), *(str(r.args) for r in caplog.records)):
        assert APP_PASSWORD not in text
        assert "stub-access-" not in text
        assert not any(token in text for token in issued)


def test_cards_fit_the_message_limit_with_their_buttons() -> None:
    huge = "SELECT " + ", ".join(f"column_{i}" for i in range(20_000)) + " FROM t"
    decisions = tuple(
        DecisionRecord(f"a{i}", f"Approver {i}", "approve", "teams", "ok " * 300, datetime.now(UTC))
        for i in range(30)
    )
    for request in (
        a_request(statement=huge),
        a_request(statement=huge, parameters=tuple("x" * 2000 for _ in range(200))),
        a_request(statement=huge, min_approvals=40, decisions=decisions),
    ):
        card = review_card(request, PUBLIC_URL)
        assert message_size(card) <= MAX_MESSAGE_BYTES
        assert execute_verbs(card) == ["approve", "deny"]
        assert "bytes cut" in json.dumps(card)
    final = a_request(statement=huge, state=RequestState.DENIED, decided_at=datetime.now(UTC))
    assert execute_verbs(card_for(final, PUBLIC_URL)) == []
    assert message_size(card_for(final, PUBLIC_URL)) <= MAX_MESSAGE_BYTES


async def test_a_rotated_key_is_found_after_the_refetch_interval(
    stub: BotConnectorStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_auth, "REFETCH_INTERVAL_S", 0.5)
    transport = httpx.AsyncHTTPTransport()
    rotated = StubKey("stub-rotated", new_rsa_key(), ("msteams",))
    try:
        keys = ChannelKeys(stub.openid_metadata_url, transport, timeout=3.0)
        assert await keys.get(stub.signing.kid) is not None
        fetches = stub.keys_fetches
        stub.published.append(rotated)
        assert await keys.get(rotated.kid) is None  # just fetched: no refetch yet
        assert await keys.get("made-up") is None
        assert stub.keys_fetches == fetches
        await asyncio.sleep(0.6)
        found = await keys.get(rotated.kid)
        assert found is not None
        assert found.endorsements == ("msteams",)
        assert stub.keys_fetches == fetches + 1
    finally:
        stub.published.remove(rotated)
        await transport.aclose()


async def test_unreachable_keys_are_an_outage_not_a_verdict() -> None:
    transport = httpx.AsyncHTTPTransport()
    try:
        keys = ChannelKeys("http://127.0.0.1:9/openid", transport, timeout=1.0)
        with pytest.raises(ChannelKeysUnavailable):
            await keys.get("any")
    finally:
        await transport.aclose()
