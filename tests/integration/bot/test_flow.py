"""One-click approval inside Teams, end to end through the bot (issue 7).

A real client runs a statement through pgguard; the bot posts a card to a local Bot Connector;
a click (an invoke with a locally minted Bot Connector token) decides it; the client sees the
outcome, the decision carries the verified approver, and the posted message is updated.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from pgguard.approvals import ApprovalService, ApprovalStore, RequestState
from pgguard.teams_bot import TeamsBot
from pgguard.web.auth import ApproverDirectory
from tests.bot_connector_stub import CONVERSATION_ID, BotConnectorStub
from tests.integration.bot.helpers import (
    answered_card,
    click,
    execute_verbs,
    get_request,
    held,
    refusal_text,
    send,
    wait_for_card,
)
from tests.integration.holds.helpers import auth, eventually, wait_for_request
from tests.keys import STATE_KEY
from tests.support import PgguardThread


async def test_held_statement_posts_a_card_with_approve_and_deny(
    pgguard: PgguardThread, api: httpx.AsyncClient, stub: BotConnectorStub
) -> None:
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        running = asyncio.create_task(
            conn.execute(
                "COPY (SELECT * FROM dba_only_t WHERE email = 'ada@example.com') TO STDOUT"
            )
        )
        request = await wait_for_request(api, "dba_only_t")
        card = await wait_for_card(stub, request["id"])
        posted = stub.cards_for(request["id"])[0]
        assert posted.conversation_id == CONVERSATION_ID
        assert posted.authorization.startswith("Bearer stub-access-")  # a token the stub issued
        assert posted.body["type"] == "message"
        assert card["type"] == "AdaptiveCard"
        assert tuple(int(p) for p in card["version"].split(".")) >= (1, 4)
        executes = [a for a in card["actions"] if a["type"] == "Action.Execute"]
        assert [(a["verb"], a["data"]) for a in executes] == [
            ("approve", {"request_id": request["id"]}),
            ("deny", {"request_id": request["id"]}),
        ]
        inputs = [b for b in card["body"] if b["type"] == "Input.Text"]
        assert [i["id"] for i in inputs] == ["comment"]
        text = json.dumps(card)
        assert "dba_only_t" in text
        assert "ada@example.com" not in text  # the statement is masked
        for shown in (request["agent"], request["owner"], "test.dba-only", "Expires"):
            assert shown in text
        assert not running.done()
    finally:
        await conn.close()  # the client leaves: its request is cancelled


async def test_click_approves_and_updates_the_message_for_everyone(
    pgguard: PgguardThread, api: httpx.AsyncClient, stub: BotConnectorStub
) -> None:
    async with held(pgguard, api, stub, "DROP TABLE hold_t", "hold_t") as h:
        running, request = h.running, h.request
        posted = stub.cards_for(request["id"])[0]
        response = await click(api, stub, request["id"], "approve", "dba1", comment="go ahead")
        card = answered_card(response)
        assert execute_verbs(card) == []  # decided: no more buttons
        assert "Approved by Dana DBA" in json.dumps(card)
        assert await asyncio.wait_for(running, 10) == "DROP TABLE"
        stored = await get_request(api, request["id"])
        assert stored["state"] == "approved"
        [decision] = stored["decisions"]
        assert (decision["approver_id"], decision["verdict"], decision["channel"]) == (
            "dba1",
            "approve",
            "teams",
        )
        assert decision["comment"] == "go ahead"
        await eventually(lambda: bool(stub.updates_for(request["id"])))
        update = stub.updates_for(request["id"])[-1]
        assert update.activity_id == posted.activity_id
        assert update.conversation_id == CONVERSATION_ID
        assert execute_verbs(update.card) == []
        assert "Approved by Dana DBA" in json.dumps(update.card)


async def test_click_denies_and_the_agent_gets_42501(
    pgguard: PgguardThread, api: httpx.AsyncClient, stub: BotConnectorStub
) -> None:
    async with held(pgguard, api, stub, "DROP TABLE hold_t", "hold_t") as h:
        running, request, conn = h.running, h.request, h.conn
        response = await click(api, stub, request["id"], "deny", "dba2", comment="not today")
        assert "Denied by Drew DBA" in json.dumps(answered_card(response))
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await asyncio.wait_for(running, 10)
        assert info.value.sqlstate == "42501"
        assert "not today" in str(info.value)
        assert await conn.fetchval("SELECT count(*) FROM hold_t") == 1
        stored = await get_request(api, request["id"])
        assert stored["state"] == "denied"
        assert [(d["approver_id"], d["channel"]) for d in stored["decisions"]] == [
            ("dba2", "teams")
        ]
        await eventually(lambda: bool(stub.updates_for(request["id"])))
        assert "Denied by Drew DBA" in json.dumps(stub.updates_for(request["id"])[-1].card)


async def test_quorum_of_two_needs_two_different_clickers(
    pgguard: PgguardThread, api: httpx.AsyncClient, stub: BotConnectorStub
) -> None:
    async with held(pgguard, api, stub, "COPY quorum_t TO STDOUT", "quorum_t") as h:
        running, request = h.running, h.request
        first = answered_card(await click(api, stub, request["id"], "approve", "dba1"))
        # Still pending: the card keeps its buttons and says who approved so far.
        assert execute_verbs(first) == ["approve", "deny"]
        assert "1 of 2 approvals" in json.dumps(first)
        # ... and the posted message shows the same progress to everyone.
        await eventually(lambda: bool(stub.updates_for(request["id"])))
        progress = stub.updates_for(request["id"])[-1].card
        assert execute_verbs(progress) == ["approve", "deny"]
        assert "Dana DBA" in json.dumps(progress)
        again = refusal_text(await click(api, stub, request["id"], "approve", "dba1"))
        assert "already decided" in again
        await asyncio.sleep(0.3)
        assert not running.done()
        second = answered_card(await click(api, stub, request["id"], "approve", "dba2"))
        assert execute_verbs(second) == []
        await asyncio.wait_for(running, 10)
        stored = await get_request(api, request["id"])
        assert stored["state"] == "approved"
        assert sorted(d["approver_id"] for d in stored["decisions"]) == ["dba1", "dba2"]


async def test_self_approval_wrong_group_and_strangers_are_refused(
    pgguard: PgguardThread, api: httpx.AsyncClient, stub: BotConnectorStub
) -> None:
    async with held(pgguard, api, stub, "COPY dba_only_t TO STDOUT", "dba_only_t") as h:
        running, request = h.running, h.request
        own = refusal_text(await click(api, stub, request["id"], "approve", "owner"))
        assert "cannot approve" in own
        group = refusal_text(await click(api, stub, request["id"], "approve", "aud"))
        assert "dba" in group
        stranger = refusal_text(await click(api, stub, request["id"], "approve", "stranger"))
        assert "not a pgguard approver" in stranger
        stored = await get_request(api, request["id"])
        assert (stored["state"], stored["decisions"]) == ("pending", [])
        assert not running.done()
        answered_card(await click(api, stub, request["id"], "approve", "dba2"))
        await asyncio.wait_for(running, 10)


async def test_a_replayed_invoke_is_refused_without_deciding_again(
    pgguard: PgguardThread,
    api: httpx.AsyncClient,
    stub: BotConnectorStub,
    state_dsn: str,
    state_schema: str,
) -> None:
    async with held(pgguard, api, stub, "COPY quorum_t TO STDOUT", "quorum_t") as h:
        running, request = h.running, h.request
        token = stub.mint()
        activity = stub.invoke(
            request["id"], "approve", clicker="11111111-1111-4111-8111-111111111111"
        )
        answered_card(await send(api, activity, token))
        # The very same request again, and the same activity id with another clicker: both are
        # replays of an invoke already acted on, whoever they claim to come from.
        assert "already acted on" in refusal_text(await send(api, activity, token))
        other = {
            **activity,
            "from": {"name": "Drew", "aadObjectId": "22222222-2222-4222-8222-222222222222"},
        }
        assert "already acted on" in refusal_text(await send(api, other, stub.mint()))
        stored = await get_request(api, request["id"])
        assert stored["state"] == "pending"
        assert [d["approver_id"] for d in stored["decisions"]] == ["dba1"]
        # Remembered in the shared state database, so other instances refuse it too.
        state = await asyncpg.connect(state_dsn)
        try:
            seen = await state.fetchval(
                f"SELECT count(*) FROM {state_schema}.bot_seen_activities WHERE activity_id = $1",
                activity["id"],
            )
        finally:
            await state.close()
        assert seen == 1
        await api.post(f"/api/requests/{request['id']}/deny", json={}, headers=auth("dba2"))
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncio.wait_for(running, 10)


async def test_non_action_activities_are_acknowledged_and_ignored(
    api: httpx.AsyncClient, stub: BotConnectorStub
) -> None:
    message = {**stub.invoke("x", "approve", clicker="someone"), "type": "message", "text": "hi"}
    response = await send(api, message, stub.mint())
    assert (response.status_code, response.content) == (200, b"")
    unknown = refusal_text(await send(api, stub.invoke("x", "delete", clicker="c"), stub.mint()))
    assert "does not know" in unknown


async def test_another_instance_updates_the_card_from_the_stored_activity_id(
    pgguard: PgguardThread,
    api: httpx.AsyncClient,
    stub: BotConnectorStub,
    state_dsn: str,
    state_schema: str,
) -> None:
    async with held(pgguard, api, stub, "DROP TABLE hold_t", "hold_t") as h:
        running, request = h.running, h.request
        posted = stub.cards_for(request["id"])[0]
        response = await api.post(
            f"/api/requests/{request['id']}/deny", json={"reason": "no"}, headers=auth("dba1")
        )
        assert response.status_code == 200
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncio.wait_for(running, 10)
        await eventually(lambda: bool(stub.updates_for(request["id"])))  # this instance's own
    # A second bot, as a freshly started instance would have it: nothing in memory, only the
    # shared state database, finds the message and updates it.
    store = await ApprovalStore.open(state_dsn, key=STATE_KEY, schema=state_schema)
    bot = TeamsBot(pgguard.settings.teams.bot, "https://other-instance.example.test")
    try:
        bot.register(
            FastAPI(), ApprovalService(store, state_dsn, key=STATE_KEY), ApproverDirectory([])
        )
        final = await store.get(request["id"])
        assert final is not None
        assert final.state is RequestState.DENIED
        before = len(stub.updates_for(request["id"]))
        await bot.request_updated(final)
        updates = stub.updates_for(request["id"])
        assert len(updates) == before + 1
        assert updates[-1].activity_id == posted.activity_id
        assert "other-instance.example.test" in json.dumps(updates[-1].card)
        assert (bot.sent, bot.failures) == (1, 0)
    finally:
        await bot.aclose()
        await store.close()


async def test_a_card_still_waiting_to_be_posted_is_dropped_once_decided(
    pgguard: PgguardThread, api: httpx.AsyncClient, stub: BotConnectorStub
) -> None:
    stub.post_script.append((429, {"Retry-After": "2"}))  # the first post must wait 2 s
    calls = stub.connector_calls
    conn = await asyncpg.connect(pgguard.dsn())
    try:
        running = asyncio.create_task(conn.execute("DROP TABLE hold_t"))
        request = await wait_for_request(api, "hold_t")
        await eventually(lambda: stub.connector_calls > calls)  # the throttled attempt
        response = await api.post(
            f"/api/requests/{request['id']}/approve", json={}, headers=auth("dba1")
        )
        assert response.json()["state"] == "approved"
        assert await asyncio.wait_for(running, 10) == "DROP TABLE"
        await asyncio.sleep(2.5)  # past the Retry-After: the retry would have happened by now
        assert stub.cards_for(request["id"]) == []
        assert stub.updates_for(request["id"]) == []
        assert stub.connector_calls == calls + 1
    finally:
        stub.post_script.clear()
        await conn.close()


async def test_seen_invokes_are_forgotten_once_their_tokens_are_long_expired(
    state_dsn: str, state_schema: str, pgguard: PgguardThread
) -> None:
    store = await ApprovalStore.open(state_dsn, key=STATE_KEY, schema=state_schema)
    try:
        now = datetime.now(UTC)
        assert await store.first_sighting("f:old-invoke", now - timedelta(seconds=1))
        # Its row was past its keep_until: cleaned up, so the id is new again (its token, which
        # expired long before keep_until, would be refused by the signature checks anyway).
        assert await store.first_sighting("f:old-invoke", now + timedelta(hours=1))
        assert not await store.first_sighting("f:old-invoke", now + timedelta(hours=1))
    finally:
        await store.close()
    state = await asyncpg.connect(state_dsn)
    try:
        overdue = await state.fetchval(
            f"SELECT count(*) FROM {state_schema}.bot_seen_activities WHERE keep_until < now()"
        )
    finally:
        await state.close()
    assert overdue == 0
