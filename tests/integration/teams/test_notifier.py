"""The notifier against a real local webhook: delivery, retries, expiry, pacing, secrecy."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

import pytest

from pgguard.approvals.teams import (
    MAX_MESSAGE_BYTES,
    TeamsWebhookNotifier,
    build_request_card,
    envelope,
)
from pgguard.errors import ConfigError
from tests.integration.teams.fakes import PUBLIC_URL, decision, live_request
from tests.teams_stub import HANG, Reply, TeamsStub


async def test_202_is_delivered_once(teams_stub: TeamsStub, notifier: TeamsWebhookNotifier) -> None:
    request = live_request()
    await notifier.request_created(request)
    assert len(teams_stub.requests) == 1
    posted = teams_stub.requests[0]
    assert posted.path == teams_stub.path
    assert posted.headers["content-type"].startswith("application/json")
    body = posted.json
    assert body["type"] == "message"
    assert body == envelope(build_request_card(request, PUBLIC_URL, now=None)) | {
        "attachments": body["attachments"]  # the expiry countdown depends on the clock
    }
    attachment = body["attachments"][0]  # type: ignore[index]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert attachment["content"]["actions"] == [
        {
            "type": "Action.OpenUrl",
            "title": "Review request",
            "url": "https://pgguard.example.com/requests/req7abc",
        }
    ]
    assert (notifier.sent, notifier.failures) == (1, 0)


async def test_any_2xx_is_delivery(teams_stub: TeamsStub, notifier: TeamsWebhookNotifier) -> None:
    teams_stub.script([200])
    await notifier.request_created(live_request())
    assert (len(teams_stub.requests), notifier.sent, notifier.failures) == (1, 1, 0)


async def test_429_honours_retry_after(
    teams_stub: TeamsStub, notifier: TeamsWebhookNotifier
) -> None:
    teams_stub.script([Reply.too_many(retry_after=1), 202])
    await notifier.request_created(live_request())
    first, second = teams_stub.requests
    assert second.at - first.at >= 0.9
    assert first.body == second.body
    assert (notifier.sent, notifier.failures) == (1, 0)


async def test_5xx_is_retried(teams_stub: TeamsStub, notifier: TeamsWebhookNotifier) -> None:
    teams_stub.script([500, 503, 202])
    await notifier.request_created(live_request())
    assert len(teams_stub.requests) == 3
    assert (notifier.sent, notifier.failures) == (1, 0)


@pytest.mark.parametrize("status", [400, 401, 404, 413])
async def test_other_4xx_is_not_retried(
    teams_stub: TeamsStub, notifier: TeamsWebhookNotifier, status: int
) -> None:
    teams_stub.script([status, 202])
    await notifier.request_created(live_request())
    assert len(teams_stub.requests) == 1
    assert (notifier.sent, notifier.failures) == (0, 1)


async def test_hanging_webhook_times_out_until_expiry(teams_stub: TeamsStub) -> None:
    teams_stub.default = Reply(500)
    teams_stub.script([HANG] * 50)
    notifier = TeamsWebhookNotifier(teams_stub.url, PUBLIC_URL, timeout=0.3)
    request = live_request(expires_in=1.5)
    started = time.monotonic()
    try:
        await notifier.request_created(request)
    finally:
        await notifier.aclose()
    elapsed = time.monotonic() - started
    assert len(teams_stub.requests) >= 2  # timed out, then retried
    assert elapsed <= 2.0  # may give up earlier: a drawn backoff can overshoot the expiry
    assert (notifier.sent, notifier.failures) == (0, 1)


async def test_never_retries_past_expiry(teams_stub: TeamsStub) -> None:
    teams_stub.default = Reply(500)
    notifier = TeamsWebhookNotifier(teams_stub.url, PUBLIC_URL, timeout=5.0)
    request = live_request(expires_in=1.0)
    deadline = time.monotonic() + 1.0
    started = time.monotonic()
    try:
        await notifier.request_created(request)
    finally:
        await notifier.aclose()
    assert time.monotonic() - started <= 1.5
    assert len(teams_stub.requests) >= 2
    assert all(posted.at < deadline for posted in teams_stub.requests)
    assert (notifier.sent, notifier.failures) == (0, 1)


async def test_retry_after_beyond_expiry_gives_up_at_once(
    teams_stub: TeamsStub, notifier: TeamsWebhookNotifier
) -> None:
    teams_stub.script([Reply.too_many(retry_after=30)])
    started = time.monotonic()
    await notifier.request_created(live_request(expires_in=5.0))
    assert time.monotonic() - started < 1.0
    assert (len(teams_stub.requests), notifier.failures) == (1, 1)


async def test_expired_request_is_not_posted(
    teams_stub: TeamsStub, notifier: TeamsWebhookNotifier
) -> None:
    await notifier.request_created(live_request(expires_in=-1.0))
    assert (len(teams_stub.requests), notifier.failures) == (0, 1)


async def test_unreachable_webhook_is_retried_then_counted() -> None:
    async with TeamsStub() as gone:
        url = gone.url  # a port nobody listens on once the stub is stopped
    notifier = TeamsWebhookNotifier(url, PUBLIC_URL, timeout=0.5)
    try:
        await notifier.request_created(live_request(expires_in=0.8))
    finally:
        await notifier.aclose()
    assert (notifier.sent, notifier.failures) == (0, 1)


async def test_rate_limit_spaces_posts(
    teams_stub: TeamsStub, notifier: TeamsWebhookNotifier
) -> None:
    requests = [live_request(id=f"req{i}") for i in range(12)]
    started = time.monotonic()
    await asyncio.gather(*(notifier.request_created(r) for r in requests))
    elapsed = time.monotonic() - started
    assert len(teams_stub.requests) == 12
    assert elapsed >= 2.5  # 4 per second: the 12th goes out 2.75 s after the first
    # Post k (from 0) may not leave before its slot, k / 4 s after the start; it can arrive
    # later (a slow machine delays any of them, and so can shrink the gap after a late one),
    # never earlier. So every arrival is checked against its slot, not against its neighbour.
    arrivals = sorted(posted.at for posted in teams_stub.requests)
    early = [k for k, at in enumerate(arrivals) if at < started + k * 0.25 - 0.01]
    assert early == []
    assert notifier.sent == 12


async def test_one_megabyte_statement_is_posted_within_limit(
    teams_stub: TeamsStub, notifier: TeamsWebhookNotifier
) -> None:
    request = live_request(statement="SELECT '" + "x" * 1_048_576 + "'", reason="r" * 100_000)
    await notifier.request_created(request)
    (posted,) = teams_stub.requests
    assert len(posted.body) <= MAX_MESSAGE_BYTES
    assert b"bytes cut; full text on the approval page" in posted.body
    assert notifier.sent == 1


async def test_webhook_url_is_never_logged_nor_in_repr(
    teams_stub: TeamsStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # Generous timeouts: this test is about what is logged, not about timing, and must not
    # flake when the machine is busy.
    notifier = TeamsWebhookNotifier(teams_stub.url, PUBLIC_URL, timeout=1.5)
    teams_stub.script([500, Reply.too_many(0.1), 202, 400, HANG])
    teams_stub.default = Reply(503)
    try:
        await notifier.request_created(live_request())  # 500, 429, 202
        await notifier.request_created(live_request())  # 400
        await notifier.request_created(live_request(expires_in=2.0))  # hang, then 503s
        teams_stub.default = Reply(202)
        teams_stub.script([503])
        await notifier.request_updated(live_request(state="cancelled"))  # 503, 202
    finally:
        await notifier.aclose()
    secret = urlsplit(teams_stub.url).query
    assert caplog.records, "the notifier logs its outcomes"
    assert "req7abc" in caplog.text
    for text in (caplog.text, repr(notifier), *(str(r.args) for r in caplog.records)):
        assert teams_stub.url not in text
        assert "sig=" not in text
        assert secret not in text
        assert teams_stub.path not in text
    assert (notifier.sent, notifier.failures) == (2, 2)


@pytest.mark.parametrize("bad", ["not a url", "ftp://host/x", "https://"])
def test_bad_webhook_url_is_a_config_error_without_the_url(bad: str) -> None:
    with pytest.raises(ConfigError) as raised:
        TeamsWebhookNotifier(bad, PUBLIC_URL)
    assert bad not in str(raised.value)


@pytest.mark.parametrize(
    ("state", "decisions", "headline"),
    [
        ("approved", (decision("Bob", "approve"),), "Approved by Bob"),
        ("denied", (decision("Carol", "deny", "too broad"),), "Denied by Carol: too broad"),
        ("expired", (), "Expired"),
        ("cancelled", (), "Cancelled"),
    ],
)
async def test_follow_up_cards_are_posted(
    teams_stub: TeamsStub,
    notifier: TeamsWebhookNotifier,
    state: str,
    decisions: tuple[object, ...],
    headline: str,
) -> None:
    # An expired request's expiry is behind it; the follow-up still goes out.
    await notifier.request_updated(live_request(expires_in=-5, state=state, decisions=decisions))
    (body,) = teams_stub.received
    card = body["attachments"][0]["content"]  # type: ignore[index]
    assert card["body"][0]["items"][0]["text"].startswith(headline)
    assert card["actions"][0]["url"] == "https://pgguard.example.com/requests/req7abc"
    assert notifier.sent == 1


async def test_untouched_pending_update_posts_nothing(
    teams_stub: TeamsStub, notifier: TeamsWebhookNotifier
) -> None:
    await notifier.request_updated(live_request())
    assert teams_stub.requests == []


async def test_decision_stops_retrying_the_review_card(
    teams_stub: TeamsStub, notifier: TeamsWebhookNotifier
) -> None:
    teams_stub.script([500] * 100)  # the review card keeps failing ...
    created = asyncio.create_task(notifier.request_created(live_request(expires_in=30)))
    await asyncio.sleep(0.3)
    teams_stub.default = Reply(202)
    teams_stub._script.clear()
    # ... until the request is approved elsewhere: the follow-up goes out, the review card stops.
    await notifier.request_updated(
        live_request(state="approved", decisions=(decision("Bob", "approve"),))
    )
    await asyncio.wait_for(created, 6.0)
    assert notifier.failures == 0
    assert (
        teams_stub.received[-1]["attachments"][0]["content"]["body"][0]["items"][0][  # type: ignore[index]
            "text"
        ]
        == "Approved by Bob"
    )
