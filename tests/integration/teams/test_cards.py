"""The Teams cards: exact envelope, what a reviewer sees, follow-ups, and the 28 KB limit."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from pgguard.approvals.teams import (
    MAX_MESSAGE_BYTES,
    build_request_card,
    build_update_card,
    encode_envelope,
    envelope,
)
from tests.integration.teams.fakes import NOW, PUBLIC_URL, decision, fake_request

PAGE = "https://pgguard.example.com/requests/req7abc"


def _texts(card: dict[str, object]) -> list[str]:
    """Every TextBlock/TextRun text and fact (as "title: value") in a card, depth first."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("type") in ("TextBlock", "TextRun"):
                found.append(str(node["text"]))
            if "title" in node and "value" in node:
                found.append(f"{node['title']}: {node['value']}")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(card)
    return found


def _facts(card: dict[str, object]) -> dict[str, str]:
    return dict(t.split(": ", 1) for t in _texts(card) if ": " in t and not t.startswith("Appr"))


def test_envelope_is_exactly_what_workflows_expects() -> None:
    card = build_request_card(fake_request(), PUBLIC_URL, now=NOW)
    assert envelope(card) == {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "content": card},
        ],
    }
    assert card["type"] == "AdaptiveCard"
    assert card["version"] == "1.4"


def test_request_card_shows_what_a_reviewer_needs() -> None:
    request = fake_request()
    card = build_request_card(request, PUBLIC_URL, now=NOW)
    facts = _facts(card)
    assert facts["Agent"] == "report-bot"
    assert facts["Owner"] == "alice@example.com"
    assert facts["Database"] == "sales"
    assert facts["Categories"] == "export, pii"
    assert facts["Rules"] == "export.copy-to, pii.customers"
    assert facts["Reason"] == "monthly churn report for finance"
    assert facts["Expires"] == "2026-03-01T12:15:00+00:00 (in 15 min)"
    body = card["body"]
    assert isinstance(body, list)
    sql_blocks = [b for b in body if b.get("type") == "RichTextBlock"]
    assert sql_blocks[0] == {
        "type": "RichTextBlock",
        "inlines": [{"type": "TextRun", "text": request.statement, "fontType": "Monospace"}],
    }
    assert card["actions"] == [{"type": "Action.OpenUrl", "title": "Review request", "url": PAGE}]
    assert "full text on the approval page" not in " ".join(_texts(card))


def test_missing_reason_is_said_plainly() -> None:
    card = build_request_card(fake_request(reason=None), PUBLIC_URL, now=NOW)
    assert _facts(card)["Reason"] == "(no reason given)"


def test_one_megabyte_statement_fits_with_a_note() -> None:
    statement = "SELECT " + ", ".join(f"col_{i}" for i in range(120_000)) + " FROM wide_tail"
    assert len(statement) > 1_000_000
    request = fake_request(
        statement=statement,
        reason="because " * 5_000,
        agent="a" * 10_000,
        rule_ids=tuple(f"rule-{i}" for i in range(2_000)),
        parameters=tuple("<text " + "x" * 500 + ">" for i in range(500)),
    )
    card = build_request_card(request, PUBLIC_URL, now=NOW)
    encoded = encode_envelope(envelope(card))
    assert len(encoded) <= MAX_MESSAGE_BYTES
    texts = " ".join(_texts(card))
    assert "bytes cut; full text on the approval page" in texts
    assert "SELECT col_0, col_1" in texts  # head kept
    assert "FROM wide_tail" in texts  # tail kept
    assert len(encoded) > MAX_MESSAGE_BYTES // 2  # the statement got the room that was left
    assert card["actions"] == [{"type": "Action.OpenUrl", "title": "Review request", "url": PAGE}]


@pytest.mark.parametrize(
    "filler",
    ["\x01", '"', "\n", "é", "😀", "\\"],
    ids=["control", "quote", "newline", "two-byte", "four-byte", "backslash"],
)
def test_escape_heavy_statements_fit(filler: str) -> None:
    request = fake_request(statement=filler * 300_000, reason=filler * 3_000)
    for build in (build_request_card, build_update_card):
        card = build(request, PUBLIC_URL, now=NOW)
        assert len(encode_envelope(envelope(card))) <= MAX_MESSAGE_BYTES


def test_lone_surrogates_do_not_break_encoding() -> None:
    card = build_request_card(fake_request(statement="SELECT '\udc80'"), PUBLIC_URL, now=NOW)
    assert len(encode_envelope(envelope(card))) <= MAX_MESSAGE_BYTES


def test_approved_follow_up() -> None:
    request = fake_request(
        state="approved",
        decided_at=NOW + timedelta(minutes=3),
        decisions=(decision("Bob Admin", "approve", "ok for finance"),),
    )
    card = build_update_card(request, PUBLIC_URL, now=NOW)
    texts = _texts(card)
    assert texts[0] == "Approved by Bob Admin"
    assert any("ok for finance" in t for t in texts)
    assert card["actions"] == [{"type": "Action.OpenUrl", "title": "Open request", "url": PAGE}]


def test_denied_follow_up_carries_the_comment() -> None:
    request = fake_request(
        state="denied", decisions=(decision("Carol DBA", "deny", "use the replica"),)
    )
    card = build_update_card(request, PUBLIC_URL, now=NOW)
    assert _texts(card)[0] == "Denied by Carol DBA: use the replica"
    assert card["actions"] == [{"type": "Action.OpenUrl", "title": "Open request", "url": PAGE}]


@pytest.mark.parametrize(
    ("state", "state_reason", "headline"),
    [
        ("expired", None, "Expired: nobody decided in time; the statement was not executed"),
        ("cancelled", "client disconnected", "Cancelled: client disconnected; the statement"),
        ("cancelled", None, "Cancelled; the statement was not executed"),
    ],
)
def test_ended_follow_ups(state: str, state_reason: str | None, headline: str) -> None:
    request = fake_request(state=state, state_reason=state_reason)
    card = build_update_card(request, PUBLIC_URL, now=NOW)
    assert _texts(card)[0].startswith(headline)
    assert card["actions"] == [{"type": "Action.OpenUrl", "title": "Open request", "url": PAGE}]


def test_partial_approval_follow_up() -> None:
    request = fake_request(min_approvals=2, decisions=(decision("Bob", "approve"),))
    card = build_update_card(request, PUBLIC_URL, now=NOW)
    assert _texts(card)[0] == "Still pending: 1 of 2 approvals (Bob)"


def test_follow_up_with_many_long_decisions_fits() -> None:
    decisions = tuple(decision(f"approver-{i}" * 50, "approve", "c" * 5_000) for i in range(200))
    request = fake_request(state="approved", decisions=decisions, statement="x" * 1_000_000)
    card = build_update_card(request, PUBLIC_URL, now=NOW)
    assert len(encode_envelope(envelope(card))) <= MAX_MESSAGE_BYTES


def test_agent_text_cannot_become_a_link() -> None:
    from pgguard.approvals.teams import build_request_card

    request = fake_request(
        reason="urgent [Approve here](https://evil.example/x) or www.evil.example",
        application_name="mailto:boss@example.com",
        statement='SELECT * FROM "[x](https://evil.example)"',
    )
    text = json.dumps(build_request_card(request, PUBLIC_URL))
    for link in ("](https://evil", "https://evil", "www.evil", "mailto:boss"):
        assert link not in text
    assert "evil.example" in text  # still readable, just not a link


def test_card_sql_is_never_markdown_and_facts_are_escaped() -> None:
    """`price*qty, tax*rate` must not turn italic in Teams: SQL goes in a TextRun (never
    Markdown); agent-controlled fact text has Teams' Markdown characters escaped."""
    request = fake_request(
        statement="SELECT price*qty, tax*rate FROM t", reason="see *this* and _that_"
    )
    card = build_request_card(request, PUBLIC_URL, now=NOW)
    runs = [t for t in _texts(card) if t.startswith("SELECT")]
    assert runs == ["SELECT price*qty, tax*rate FROM t"]
    assert _facts(card)["Reason"] == r"see \*this\* and \_that\_"


def test_card_shows_columns_lock_roles_and_headline_in_words() -> None:
    request = fake_request(
        categories=("privilege",),
        touches={
            "reads": ["people"],
            "columns_read": ["name", "email", "ssn"],
            "masked_columns": ["email", "ssn"],
            "lock": "ACCESS EXCLUSIVE",
            "roles": ["pgguard_upstream"],
            "own_role": True,
            "estimate_skipped": "it calls functions",
        },
    )
    card = build_request_card(request, PUBLIC_URL, now=NOW)
    facts = _facts(card)
    assert _texts(card)[0] == "Approval needed: report-bot wants to change privileges on sales"
    assert facts["Columns read"] == "name, email (sensitive), ssn (sensitive)"
    assert facts["Lock"] == "ACCESS EXCLUSIVE (from the statement kind)"
    assert "pgguard's own upstream role" in facts["Roles"]
    assert "pgguard's own upstream role" in facts["Touches"]
    assert "estimate skipped: it calls functions" in facts["Touches"]


@pytest.mark.parametrize(
    ("state", "title"),
    [("approved", "Decided at"), ("denied", "Decided at"), ("expired", "Expired at")],
)
def test_follow_up_names_the_moment_truthfully(state: str, title: str) -> None:
    decided = NOW + timedelta(minutes=3)
    request = fake_request(state=state, decided_at=decided)
    facts = _facts(build_update_card(request, PUBLIC_URL, now=NOW))
    assert title in facts
    assert "Decided" not in facts or state != "expired"
