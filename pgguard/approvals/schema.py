"""The approval tables in the state database, and their idempotent migrations.

Owns: the DDL of ``<schema>.approval_requests`` and ``<schema>.approval_decisions`` (with the
MAC columns that `pgguard.approvals.signing` fills and checks), the Teams
bot's ``bot_messages`` (which message shows which request) and ``bot_seen_activities`` (invokes
already acted on, for replay refusal), and the migration runner. Every column an auditor needs
is a plain column (text, text[], jsonb, timestamptz), so the tables read well without pgguard.

Invariants: migrations are numbered, applied in order, each once, under a transaction-level
advisory lock, so several instances starting together never race. Schema names are plain
identifiers; anything else is refused before it reaches SQL.
"""

from __future__ import annotations

import re

from pgguard.errors import ConfigError

NOTIFY_CHANNEL = "pgguard_approvals"
_MIGRATION_LOCK = 0x70677561  # "pgua": pg_advisory_xact_lock key for approval migrations
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")

MIGRATIONS: tuple[str, ...] = (
    # 1: requests and decisions
    """
    CREATE TABLE {s}.approval_requests (
        id               text PRIMARY KEY,
        state            text NOT NULL CHECK (state IN
                             ('pending', 'approved', 'denied', 'expired', 'cancelled')),
        agent            text NOT NULL,
        owner            text NOT NULL,
        database         text NOT NULL,
        client_address   text NOT NULL,
        application_name text NOT NULL,
        statement        text NOT NULL,
        parameters       text[] NOT NULL,
        fingerprint      text NOT NULL,
        categories       text[] NOT NULL,
        rule_ids         text[] NOT NULL,
        reason           text,
        approver_groups  text[] NOT NULL,
        min_approvals    integer NOT NULL CHECK (min_approvals >= 1),
        remember_s       double precision CHECK (remember_s > 0),
        expires_in_s     double precision NOT NULL CHECK (expires_in_s > 0),
        session_id       text NOT NULL,
        instance_id      text NOT NULL,
        touches          jsonb NOT NULL,
        created_at       timestamptz NOT NULL DEFAULT now(),
        expires_at       timestamptz NOT NULL,
        decided_at       timestamptz,
        remembered_from  text REFERENCES {s}.approval_requests (id),
        state_reason     text,
        CHECK ((state = 'pending') = (decided_at IS NULL))
    );
    CREATE INDEX approval_requests_pending_expiry
        ON {s}.approval_requests (expires_at) WHERE state = 'pending';
    CREATE INDEX approval_requests_remembered
        ON {s}.approval_requests (agent, fingerprint, decided_at DESC)
        WHERE state = 'approved' AND remember_s IS NOT NULL AND remembered_from IS NULL;
    CREATE INDEX approval_requests_created ON {s}.approval_requests (created_at DESC);
    CREATE TABLE {s}.approval_decisions (
        request_id    text NOT NULL REFERENCES {s}.approval_requests (id),
        approver_id   text NOT NULL,
        approver_name text NOT NULL,
        verdict       text NOT NULL CHECK (verdict IN ('approve', 'deny')),
        channel       text NOT NULL,
        comment       text NOT NULL,
        decided_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (request_id, approver_id)
    );
    """,
    # 2: the Teams bot's posted cards, and the invoke activities it has already acted on
    """
    CREATE TABLE {s}.bot_messages (
        request_id      text PRIMARY KEY REFERENCES {s}.approval_requests (id),
        conversation_id text NOT NULL,
        activity_id     text NOT NULL,
        posted_at       timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE {s}.bot_seen_activities (
        activity_id text PRIMARY KEY,
        seen_at     timestamptz NOT NULL DEFAULT now(),
        keep_until  timestamptz NOT NULL
    );
    CREATE INDEX bot_seen_activities_keep ON {s}.bot_seen_activities (keep_until);
    """,
    # 3: MACs made with a key the database never sees (pgguard.approvals.signing); rows without
    # them, or with wrong ones, release nothing
    """
    ALTER TABLE {s}.approval_requests
        ADD COLUMN statement_digest text,
        ADD COLUMN request_mac      text,
        ADD COLUMN state_mac        text;
    ALTER TABLE {s}.approval_decisions ADD COLUMN mac text;
    """,
    # 4: return mode (pgguard.proxy.returned): when the approved statement ran, so it runs once
    """
    ALTER TABLE {s}.approval_requests ADD COLUMN run_at timestamptz;
    CREATE INDEX approval_requests_returned
        ON {s}.approval_requests (agent, database, fingerprint) WHERE run_at IS NULL;
    """,
)


def checked_schema(schema: str) -> str:
    """The schema name, double-quoted, after checking it is a plain lowercase identifier."""
    if not _IDENTIFIER.fullmatch(schema):
        raise ConfigError(f"state schema name {schema!r} is not a plain lowercase identifier")
    return f'"{schema}"'


def migration_statements(quoted_schema: str) -> tuple[str, str, str, str]:
    """(lock, bootstrap, read version, record version) statements for the runner."""
    return (
        f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})",
        f"CREATE SCHEMA IF NOT EXISTS {quoted_schema}; "
        f"CREATE TABLE IF NOT EXISTS {quoted_schema}.approval_schema_version "
        "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        f"SELECT coalesce(max(version), 0) FROM {quoted_schema}.approval_schema_version",
        f"INSERT INTO {quoted_schema}.approval_schema_version (version) VALUES ($1)",
    )
