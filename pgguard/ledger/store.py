"""The ledger table in the state database: DDL, migrations, and batch inserts (asyncpg).

Owns: ``<schema>.ledger_entries`` (one row per full entry; every field a plain column, and
``content`` the hashed envelope), ``<schema>.ledger_packs`` (ordinary statements in the packed
form, many to a row, as the proxy's path writes them), ``<schema>.ledger_rows`` (packed entries
expanded one to a row, with indexes, off the proxy's path: see `pgguard.ledger.expander`; the
function ``<schema>.ledger_expand``), ``<schema>.ledger_checkpoints`` (signed chain heads), the
views ``<schema>.ledger`` (all three as one table of entries, for auditors) and
``<schema>.ledger_pending`` (the packs not expanded yet, as rows),
``<schema>.ledger_schema_version``, `LedgerStore` (one connection, reconnected on demand),
`row_values` (and `content_row_values`), `checkpoint_values`, `COLUMNS` and `CHECKPOINT_COLUMNS`.

Invariants: migrations are numbered, applied once each, under a transaction-level advisory lock
distinct from the approvals one. Each batch is one transaction. Full entries are inserted ``ON
CONFLICT DO NOTHING`` and packed entries only above the chain's stored packs' highest seq, so
shipping the same sealed entry twice stores it once (that highest seq is looked for in
``ledger_rows`` too: expansion moves packs there); checkpoints likewise ``ON CONFLICT DO
NOTHING``. Every call has a timeout; asyncpg
and OS errors leave this module as `LedgerStoreUnavailable`, and the connection is dropped so
the next call reconnects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from pgguard.approvals.schema import checked_schema
from pgguard.errors import PgGuardError
from pgguard.ledger.chain import Sealed, SealedEntry, canonical_bytes
from pgguard.ledger.checkpoint import SignedCheckpoint
from pgguard.ledger.packed import PackedEntry, pack_body

log = logging.getLogger(__name__)

_MIGRATION_LOCK = 0x7067756C  # "pgul": pg_advisory_xact_lock key for ledger migrations

MIGRATIONS: tuple[str, ...] = (
    # 1: the ledger
    """
    CREATE TABLE {s}.ledger_entries (
        chain_id           text NOT NULL,
        seq                bigint NOT NULL CHECK (seq >= 1),
        prev_hash          text NOT NULL,
        prev_entry_id      text NOT NULL,
        hash               text NOT NULL,
        entry_id           text NOT NULL UNIQUE,
        kind               text NOT NULL,
        instance_id        text NOT NULL,
        session_id         text NOT NULL,
        received_at        timestamptz NOT NULL,
        decided_at         timestamptz,
        agent              text NOT NULL,
        owner              text NOT NULL,
        client_address     text NOT NULL,
        application_name   text NOT NULL,
        database           text NOT NULL,
        upstream_role      text NOT NULL,
        statement          text NOT NULL,
        fingerprint        text NOT NULL,
        categories         text[] NOT NULL,
        rule_ids           text[] NOT NULL,
        action             text NOT NULL,
        request_id         text,
        approvers          jsonb NOT NULL,
        reason             text,
        statement_entry_id text,
        completed_at       timestamptz,
        command_tag        text,
        rows               bigint,
        sqlstate           text,
        error_message      text,
        duration_ms        double precision,
        detail             jsonb NOT NULL,
        content            jsonb NOT NULL,
        stored_at          timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (chain_id, seq)
    );
    CREATE INDEX ledger_entries_received ON {s}.ledger_entries (received_at DESC);
    CREATE INDEX ledger_entries_agent ON {s}.ledger_entries (agent, received_at DESC);
    CREATE INDEX ledger_entries_request ON {s}.ledger_entries (request_id)
        WHERE request_id IS NOT NULL;
    CREATE INDEX ledger_entries_statement_entry ON {s}.ledger_entries (statement_entry_id)
        WHERE statement_entry_id IS NOT NULL;
    """,
    # 2: ordinary statements, many to a row (see pgguard.ledger.packed), and one view of both
    """
    CREATE TABLE {s}.ledger_packs (
        chain_id      text NOT NULL,
        first_seq     bigint NOT NULL CHECK (first_seq >= 1),
        last_seq      bigint NOT NULL CHECK (last_seq >= first_seq),
        entries       integer NOT NULL CHECK (entries >= 1),
        first_received timestamptz NOT NULL,
        last_received timestamptz NOT NULL,
        body          text NOT NULL,
        stored_at     timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (chain_id, first_seq)
    );
    -- Stored as it is: the body is compact already, and compressing it would cost the server
    -- CPU it shares with the statements being recorded.
    ALTER TABLE {s}.ledger_packs ALTER COLUMN body SET STORAGE EXTERNAL;
    CREATE INDEX ledger_packs_received ON {s}.ledger_packs (last_received DESC);
    -- The pack branch reads entries by position: the order of packed.PACKED_FIELDS.
    CREATE VIEW {s}.ledger AS
        SELECT chain_id, seq, hash, prev_hash, prev_entry_id, entry_id, kind, instance_id,
               session_id, received_at, decided_at, agent, owner, client_address,
               application_name, database, upstream_role, statement, fingerprint, categories,
               rule_ids, action, request_id, approvers, reason, statement_entry_id,
               completed_at, command_tag, rows, sqlstate, error_message, duration_ms, detail,
               stored_at, false AS packed
        FROM {s}.ledger_entries
        UNION ALL
        SELECT p.chain_id, (e.value->>0)::bigint, b.body->'hashes'->>(e.n::int - 1),
               e.value->>3, e.value->>2, e.value->>1, 'statement', s->>'instance_id',
               s->>'session_id',
               to_timestamp(0) + ((e.value->>6)::bigint * interval '1 microsecond'), NULL,
               s->>'agent', s->>'owner', s->>'client_address', s->>'application_name',
               s->>'database', s->>'upstream_role', t->>'statement', t->>'fingerprint',
               ARRAY(SELECT jsonb_array_elements_text(t->'categories')),
               ARRAY(SELECT jsonb_array_elements_text(t->'rule_ids')), t->>'action', NULL,
               '[]'::jsonb, NULL, NULL,
               to_timestamp(0) + ((e.value->>7)::bigint * interval '1 microsecond'),
               e.value->>8, (e.value->>9)::bigint, e.value->>10, e.value->>11,
               (e.value->>12)::double precision / 1000, '{{}}'::jsonb, p.stored_at, true
        FROM {s}.ledger_packs p
        CROSS JOIN LATERAL (SELECT p.body::jsonb AS body) b
        CROSS JOIN LATERAL jsonb_array_elements(b.body->'entries') WITH ORDINALITY e(value, n)
        CROSS JOIN LATERAL (SELECT b.body->'refs'->(e.value->>4) AS s,
                                   b.body->'refs'->(e.value->>5) AS t) r;
    """,
    # 3: signed checkpoints of chain heads (see pgguard.ledger.checkpoint). The columns copy the
    # signed payload for queries; verification reads the payload.
    """
    CREATE TABLE {s}.ledger_checkpoints (
        chain_id      text NOT NULL,
        seq           bigint NOT NULL CHECK (seq >= 1),
        final         boolean NOT NULL,
        head_hash     text NOT NULL,
        head_entry_id text NOT NULL,
        signed_at     timestamptz NOT NULL,
        instance_id   text NOT NULL,
        key_id        text NOT NULL,
        payload       text NOT NULL,
        signature     text NOT NULL,
        stored_at     timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (chain_id, seq, final)
    );
    """,
    # 4: packs expanded into indexed rows off the proxy's path (issue 19). The proxy still
    # writes one ledger_packs row per batch; `ledger_expand` (called by the expander, see
    # pgguard.ledger.expander) moves whole packs into ledger_rows, one row per entry, in one
    # transaction, so each entry is in exactly one of the two tables at any time. The view keeps
    # its columns; its pack branch now parses each body once (`ledger_unpack`; the old one
    # re-parsed the body for every entry it held), and only the packs not yet expanded go
    # through it.
    """
    CREATE TABLE {s}.ledger_rows (
        chain_id         text NOT NULL,
        seq              bigint NOT NULL CHECK (seq >= 1),
        hash             text NOT NULL,
        prev_hash        text NOT NULL,
        prev_entry_id    text NOT NULL,
        entry_id         text NOT NULL,
        instance_id      text NOT NULL,
        session_id       text NOT NULL,
        received_at      timestamptz NOT NULL,
        agent            text NOT NULL,
        owner            text NOT NULL,
        client_address   text NOT NULL,
        application_name text NOT NULL,
        database         text NOT NULL,
        upstream_role    text NOT NULL,
        statement        text NOT NULL,
        fingerprint      text NOT NULL,
        categories       text[] NOT NULL,
        rule_ids         text[] NOT NULL,
        action           text NOT NULL,
        completed_at     timestamptz NOT NULL,
        command_tag      text,
        rows             bigint,
        sqlstate         text,
        error_message    text,
        stored_at        timestamptz NOT NULL,
        PRIMARY KEY (chain_id, seq)
    );
    CREATE INDEX ledger_rows_received ON {s}.ledger_rows (received_at, chain_id, seq);
    CREATE INDEX ledger_rows_agent ON {s}.ledger_rows (agent, received_at, chain_id, seq);
    CREATE INDEX ledger_rows_session ON {s}.ledger_rows (session_id, received_at);
    CREATE INDEX ledger_rows_action ON {s}.ledger_rows (action, received_at, chain_id, seq);
    CREATE INDEX ledger_rows_categories ON {s}.ledger_rows USING gin (categories);
    CREATE INDEX ledger_entries_order ON {s}.ledger_entries (received_at, chain_id, seq);
    CREATE INDEX ledger_entries_session ON {s}.ledger_entries (session_id, received_at);
    CREATE INDEX ledger_entries_action ON {s}.ledger_entries
        (action, received_at, chain_id, seq);
    CREATE INDEX ledger_entries_categories ON {s}.ledger_entries USING gin (categories);
    CREATE INDEX ledger_entries_approvers ON {s}.ledger_entries
        USING gin (approvers jsonb_path_ops);
    -- One pack's entries as ledger_rows' columns. A plpgsql function, so the body is parsed
    -- once per pack: in a plain query the planner substitutes the parsed body back into every
    -- reference to it, re-parsing the whole pack for each entry it holds.
    CREATE FUNCTION {s}.ledger_unpack(body text) RETURNS TABLE (
        seq bigint, hash text, prev_hash text, prev_entry_id text, entry_id text,
        instance_id text, session_id text, received_at timestamptz, agent text, owner text,
        client_address text, application_name text, database text, upstream_role text,
        statement text, fingerprint text, categories text[], rule_ids text[], action text,
        completed_at timestamptz, command_tag text, rows bigint, sqlstate text,
        error_message text
    ) LANGUAGE plpgsql STABLE AS $$
    #variable_conflict use_column
    DECLARE
        b jsonb := body::jsonb;
        refs jsonb := b->'refs';
    BEGIN
        RETURN QUERY
        SELECT (e.value->>0)::bigint, e.hash, e.value->>3, e.value->>2, e.value->>1,
               r.s->>'instance_id', r.s->>'session_id',
               to_timestamp(0) + ((e.value->>6)::bigint * interval '1 microsecond'),
               r.s->>'agent', r.s->>'owner', r.s->>'client_address',
               r.s->>'application_name', r.s->>'database', r.s->>'upstream_role',
               r.t->>'statement', r.t->>'fingerprint',
               ARRAY(SELECT jsonb_array_elements_text(r.t->'categories')),
               ARRAY(SELECT jsonb_array_elements_text(r.t->'rule_ids')), r.t->>'action',
               to_timestamp(0) + ((e.value->>7)::bigint * interval '1 microsecond'),
               e.value->>8, (e.value->>9)::bigint, e.value->>10, e.value->>11
        FROM ROWS FROM (
            jsonb_array_elements(b->'entries'), jsonb_array_elements_text(b->'hashes')
        ) e(value, hash)
        CROSS JOIN LATERAL (SELECT refs->(e.value->>4) AS s, refs->(e.value->>5) AS t) r;
    END
    $$;
    -- The packs not expanded yet, as ledger_rows' rows (plus the pack's first_seq).
    CREATE VIEW {s}.ledger_pending AS
        SELECT p.chain_id, u.seq, u.hash, u.prev_hash, u.prev_entry_id, u.entry_id,
               u.instance_id, u.session_id, u.received_at, u.agent, u.owner, u.client_address,
               u.application_name, u.database, u.upstream_role, u.statement, u.fingerprint,
               u.categories, u.rule_ids, u.action, u.completed_at, u.command_tag, u.rows,
               u.sqlstate, u.error_message, p.stored_at, p.first_seq
        FROM {s}.ledger_packs p CROSS JOIN LATERAL {s}.ledger_unpack(p.body) u;
    CREATE OR REPLACE VIEW {s}.ledger AS
        SELECT chain_id, seq, hash, prev_hash, prev_entry_id, entry_id, kind, instance_id,
               session_id, received_at, decided_at, agent, owner, client_address,
               application_name, database, upstream_role, statement, fingerprint, categories,
               rule_ids, action, request_id, approvers, reason, statement_entry_id,
               completed_at, command_tag, rows, sqlstate, error_message, duration_ms, detail,
               stored_at, false AS packed
        FROM {s}.ledger_entries
        UNION ALL
        SELECT chain_id, seq, hash, prev_hash, prev_entry_id, entry_id, 'statement',
               instance_id, session_id, received_at, NULL::timestamptz, agent, owner,
               client_address, application_name, database, upstream_role, statement,
               fingerprint, categories, rule_ids, action, NULL::text, '[]'::jsonb, NULL::text,
               NULL::text, completed_at, command_tag, rows, sqlstate, error_message,
               (extract(epoch FROM completed_at - received_at) * 1000)::double precision,
               '{{}}'::jsonb, stored_at, true
        FROM {s}.ledger_rows
        UNION ALL
        SELECT chain_id, seq, hash, prev_hash, prev_entry_id, entry_id, 'statement',
               instance_id, session_id, received_at, NULL::timestamptz, agent, owner,
               client_address, application_name, database, upstream_role, statement,
               fingerprint, categories, rule_ids, action, NULL::text, '[]'::jsonb, NULL::text,
               NULL::text, completed_at, command_tag, rows, sqlstate, error_message,
               (extract(epoch FROM completed_at - received_at) * 1000)::double precision,
               '{{}}'::jsonb, stored_at, true
        FROM {s}.ledger_pending;
    -- Moves up to max_packs of the oldest packs into ledger_rows; how many entries it moved.
    -- SKIP LOCKED: two expanders never take the same pack, and none waits for the other.
    -- Only packs stored at least min_age ago: a pack is readable as a pack for that long.
    CREATE FUNCTION {s}.ledger_expand(max_packs integer, min_age interval DEFAULT '0 s')
    RETURNS bigint LANGUAGE sql AS $$
        WITH picked AS (
            SELECT chain_id, first_seq FROM {s}.ledger_packs
            WHERE stored_at <= now() - min_age
            ORDER BY stored_at LIMIT max_packs FOR UPDATE SKIP LOCKED
        ), moved AS (
            INSERT INTO {s}.ledger_rows
            SELECT v.chain_id, v.seq, v.hash, v.prev_hash, v.prev_entry_id, v.entry_id,
                   v.instance_id, v.session_id, v.received_at, v.agent, v.owner,
                   v.client_address, v.application_name, v.database, v.upstream_role,
                   v.statement, v.fingerprint, v.categories, v.rule_ids, v.action,
                   v.completed_at, v.command_tag, v.rows, v.sqlstate, v.error_message,
                   v.stored_at
            FROM picked k JOIN {s}.ledger_pending v
                ON v.chain_id = k.chain_id AND v.first_seq = k.first_seq
            RETURNING 1
        ), gone AS (
            DELETE FROM {s}.ledger_packs p USING picked k
            WHERE p.chain_id = k.chain_id AND p.first_seq = k.first_seq
        )
        SELECT count(*) FROM moved
    $$;
    """,
    # 5: retention (pgguard ledger prune, see pgguard.ledger.prune): per chain, the signed
    # checkpoint the chain was cut at. Entries up to its seq are gone; verify starts the chain
    # there, and accepts the cut only if a signed checkpoint proves that head.
    """
    CREATE TABLE {s}.ledger_prunes (
        chain_id      text PRIMARY KEY,
        seq           bigint NOT NULL CHECK (seq >= 1),
        head_hash     text NOT NULL,
        head_entry_id text NOT NULL,
        before        timestamptz NOT NULL,
        removed       bigint NOT NULL,
        pruned_at     timestamptz NOT NULL DEFAULT now()
    );
    """,
)

CHECKPOINT_COLUMNS = (
    "chain_id",
    "seq",
    "final",
    "head_hash",
    "head_entry_id",
    "signed_at",
    "instance_id",
    "key_id",
    "payload",
    "signature",
)

# Every column but stored_at, in insert order; `row_values` gives them for one sealed entry.
COLUMNS: tuple[str, ...] = (
    "chain_id",
    "seq",
    "prev_hash",
    "prev_entry_id",
    "hash",
    "entry_id",
    "kind",
    "instance_id",
    "session_id",
    "received_at",
    "decided_at",
    "agent",
    "owner",
    "client_address",
    "application_name",
    "database",
    "upstream_role",
    "statement",
    "fingerprint",
    "categories",
    "rule_ids",
    "action",
    "request_id",
    "approvers",
    "reason",
    "statement_entry_id",
    "completed_at",
    "command_tag",
    "rows",
    "sqlstate",
    "error_message",
    "duration_ms",
    "detail",
    "content",
)
# The fields an outcome adds to the statement it completes.
OUTCOME_COLUMNS = COLUMNS[COLUMNS.index("completed_at") : COLUMNS.index("detail")]
JSONB_COLUMNS = frozenset({"approvers", "detail", "content"})


_STAGING = "pgguard_ledger_staging"  # a temporary table, one per connection


class LedgerStoreUnavailable(PgGuardError):
    """The state database could not be reached or did not answer in time."""

    sqlstate = "58030"


def row_values(sealed: SealedEntry, content: dict[str, object]) -> tuple[object, ...]:
    """The column values of one sealed entry; ``content`` is its envelope's ``entry`` part.

    Text columns come from ``content`` (already cleaned for jsonb), so the columns always agree
    with the hashed envelope; jsonb columns are given as JSON text.
    """
    e = sealed.entry
    return content_row_values(
        (sealed.chain_id, sealed.seq, sealed.prev_hash, sealed.prev_entry_id, sealed.hash),
        (e.received_at, e.decided_at, e.completed_at),
        content,
        sealed.canonical,
    )


def content_row_values(
    position: tuple[str, int, str, str, str],
    times: tuple[datetime, datetime | None, datetime | None],
    content: Mapping[str, object],
    canonical: bytes,
) -> tuple[object, ...]:
    """`row_values` from the parts of a sealed entry: its ``position`` (chain id, seq, prev
    hash, prev entry id, hash), its ``times`` (received, decided, completed), ``content``
    and the ``canonical`` envelope (what `verify` has of a row, without a `LedgerEntry`)."""
    received_at, decided_at, completed_at = times
    return (
        *position,
        content["entry_id"],
        content["kind"],
        content["instance_id"],
        content["session_id"],
        received_at,
        decided_at,
        content["agent"],
        content["owner"],
        content["client_address"],
        content["application_name"],
        content["database"],
        content["upstream_role"],
        content["statement"],
        content["fingerprint"],
        content["categories"],
        content["rule_ids"],
        content["action"],
        content["request_id"],
        _json_text(content["approvers"]),
        content["reason"],
        content["statement_entry_id"],
        completed_at,
        content["command_tag"],
        content["rows"],
        content["sqlstate"],
        content["error_message"],
        content["duration_ms"] if isinstance(content["duration_ms"], int | float) else None,
        _json_text(content["detail"]),
        canonical.decode("utf-8"),
    )


def checkpoint_values(signed: SignedCheckpoint) -> tuple[object, ...]:
    """The ``ledger_checkpoints`` column values of ``signed``, in `CHECKPOINT_COLUMNS` order."""
    c = signed.checkpoint
    return (
        c.chain_id,
        c.seq,
        c.final,
        c.head_hash,
        c.head_entry_id,
        datetime.fromisoformat(c.signed_at),
        c.instance_id,
        c.key_id,
        signed.payload.decode("utf-8"),
        signed.signature_text(),
    )


def _json_text(value: object) -> str:
    return canonical_bytes(value).decode("utf-8")  # type: ignore[arg-type]


def migration_statements(quoted_schema: str) -> tuple[str, str, str, str]:
    """(lock, bootstrap, read version, record version) statements for the runner."""
    return (
        f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})",
        f"CREATE SCHEMA IF NOT EXISTS {quoted_schema}; "
        f"CREATE TABLE IF NOT EXISTS {quoted_schema}.ledger_schema_version "
        "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
        f"SELECT coalesce(max(version), 0) FROM {quoted_schema}.ledger_schema_version",
        f"INSERT INTO {quoted_schema}.ledger_schema_version (version) VALUES ($1)",
    )


async def migrate(conn: asyncpg.Connection, quoted_schema: str, timeout: float) -> None:  # noqa: ASYNC109
    """Bring the ledger tables up to date (idempotent; safe with several instances starting)."""
    lock, bootstrap, read_version, record_version = migration_statements(quoted_schema)
    async with conn.transaction():
        await conn.execute(lock, timeout=timeout)
        await conn.execute(bootstrap, timeout=timeout)
        version = await conn.fetchval(read_version, timeout=timeout)
        for number, ddl in enumerate(MIGRATIONS, start=1):
            if number > version:
                log.info("applying ledger schema migration %d", number)
                await conn.execute(ddl.format(s=quoted_schema), timeout=timeout)
                await conn.execute(record_version, number, timeout=timeout)


class LedgerStore:
    """One lazily (re)connected asyncpg connection that inserts batches of sealed entries."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "pgguard",
        timeout: float = 5.0,
        server_settings: Mapping[str, str] | None = None,
    ) -> None:
        self._dsn = dsn
        self._quoted = checked_schema(schema)
        self._timeout = timeout
        # lock_timeout/statement_timeout (StateSettings.server_settings): a lock someone else
        # holds on the ledger's tables fails a shipping round (the spool takes over), never hangs
        self._server_settings = dict(server_settings or {})
        self._conn: asyncpg.Connection | None = None
        self._migrated = False
        placeholders = ", ".join(f"${i}" for i in range(1, len(COLUMNS) + 1))
        self._insert = (
            f"INSERT INTO {self._quoted}.ledger_entries ({', '.join(COLUMNS)}) "
            f"VALUES ({placeholders}) ON CONFLICT DO NOTHING"
        )
        columns = ", ".join(COLUMNS)
        self._insert_staged = (
            f"INSERT INTO {self._quoted}.ledger_entries ({columns}) "
            f"SELECT {columns} FROM {_STAGING} ORDER BY chain_id, seq ON CONFLICT DO NOTHING"
        )
        self._staged: asyncpg.Connection | None = None
        # Per chain, the highest packed seq this connection knows to be committed (what
        # _packs_watermark would answer); forgotten whenever the connection is dropped.
        self._stored_seq: dict[str, int] = {}
        # Packs move to ledger_rows once expanded: the highest packed seq is in either table.
        self._packs_watermark = (
            f"SELECT greatest(coalesce((SELECT max(last_seq) FROM {self._quoted}.ledger_packs "
            f"WHERE chain_id = $1), 0), coalesce((SELECT max(seq) FROM {self._quoted}.ledger_rows "
            "WHERE chain_id = $1), 0))"
        )
        self._insert_checkpoint_sql = (
            f"INSERT INTO {self._quoted}.ledger_checkpoints ({', '.join(CHECKPOINT_COLUMNS)}) "
            f"VALUES ({', '.join(f'${i}' for i in range(1, len(CHECKPOINT_COLUMNS) + 1))}) "
            "ON CONFLICT DO NOTHING"
        )
        self._insert_pack_sql = (
            f"INSERT INTO {self._quoted}.ledger_packs (chain_id, first_seq, last_seq, entries, "
            "first_received, last_received, body) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        )

    @property
    def table(self) -> str:
        return f"{self._quoted}.ledger_entries"

    async def insert(self, batch: Sequence[Sealed]) -> None:
        """Store ``batch`` in one transaction (entries already stored are left as they are)."""
        if not batch:
            return
        rows: list[tuple[object, ...]] = []
        packs: dict[str, list[PackedEntry]] = {}
        checkpoints: list[tuple[object, ...]] = []
        for sealed in batch:
            if type(sealed) is PackedEntry:
                chain = packs.get(sealed.chain_id)
                if chain is None:
                    chain = packs[sealed.chain_id] = []
                chain.append(sealed)
            elif type(sealed) is SignedCheckpoint:
                checkpoints.append(checkpoint_values(sealed))
            else:
                assert isinstance(sealed, SealedEntry)
                rows.append(row_values(sealed, _entry_part(sealed)))
        try:
            await asyncio.wait_for(self._insert_rows(rows, packs, checkpoints), self._timeout)
        except PgGuardError:
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self._drop()
            raise LedgerStoreUnavailable(
                f"the ledger state database failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def connect(self) -> None:
        """Connect and migrate now (else the first insert does); LedgerStoreUnavailable if not."""
        try:
            await asyncio.wait_for(self._connection(), self._timeout * 2)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self._drop()
            raise LedgerStoreUnavailable(
                f"could not connect to the ledger state database: {type(exc).__name__}"
            ) from exc

    async def close(self) -> None:
        self._stored_seq.clear()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), self._timeout)
        except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError):
            conn.terminate()

    async def _insert_rows(
        self,
        rows: list[tuple[object, ...]],
        packs: dict[str, list[PackedEntry]],
        checkpoints: list[tuple[object, ...]],
    ) -> None:
        conn = await self._connection()
        if not rows and not checkpoints and len(packs) == 1:
            # The usual batch: one chain's packed entries. One INSERT is atomic by itself, so
            # it needs no transaction block - one round trip instead of four.
            ((chain_id, entries),) = packs.items()
            if chain_id in self._stored_seq:
                last = await self._insert_pack(conn, chain_id, entries)
                self._stored_seq[chain_id] = last
                return
        committed: dict[str, int] = {}
        async with conn.transaction():
            if rows:
                await self._copy_entries(conn, rows)
            for chain_id, entries in packs.items():
                committed[chain_id] = await self._insert_pack(conn, chain_id, entries)
            if checkpoints:
                await conn.executemany(
                    self._insert_checkpoint_sql, checkpoints, timeout=self._timeout
                )
        self._stored_seq.update(committed)

    async def _insert_pack(
        self, conn: asyncpg.Connection, chain_id: str, entries: list[PackedEntry]
    ) -> int:
        """Insert the entries above the chain's stored watermark; the new watermark."""
        # Exactly-once without a per-entry key: a chain is shipped in seq order, one batch per
        # transaction, so what is stored of it is always a prefix; entries at or below the
        # stored packs' highest seq were shipped before (say, by an attempt whose answer was lost).
        # The watermark is read from the database once per connection, then followed here; any
        # failure drops the connection and with it what was followed (see `_drop`).
        stored = self._stored_seq.get(chain_id)
        if stored is None:
            stored = await conn.fetchval(self._packs_watermark, chain_id, timeout=self._timeout)
            assert stored is not None
        fresh = [e for e in entries if e.seq > stored]
        if not fresh:
            return stored
        await conn.execute(
            self._insert_pack_sql,
            chain_id,
            fresh[0].seq,
            fresh[-1].seq,
            len(fresh),
            _received(fresh[0]),
            _received(fresh[-1]),
            pack_body(fresh),
            timeout=self._timeout,
        )
        return fresh[-1].seq

    async def _copy_entries(self, conn: asyncpg.Connection, rows: list[tuple[object, ...]]) -> None:
        # Binary COPY into a per-connection staging table, then one set-based INSERT: far less
        # work for the server than a row-by-row INSERT, and the server's CPU is shared with the
        # statements being recorded. ON CONFLICT keeps shipping exactly-once.
        if conn is not self._staged:
            await conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} "
                f"(LIKE {self.table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
                timeout=self._timeout,
            )
            self._staged = conn
        await conn.copy_records_to_table(
            _STAGING, records=rows, columns=list(COLUMNS), timeout=self._timeout
        )
        await conn.execute(self._insert_staged, timeout=self._timeout)

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self._dsn,
                timeout=self._timeout,
                command_timeout=self._timeout,
                server_settings={**self._server_settings, "application_name": "pgguard-ledger"},
            )
        if not self._migrated:
            await migrate(self._conn, self._quoted, self._timeout)
            self._migrated = True
        return self._conn

    async def _drop(self) -> None:
        self._stored_seq.clear()  # an answer may have been lost: ask the database again
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


def _entry_part(sealed: SealedEntry) -> dict[str, object]:
    envelope = orjson.loads(sealed.canonical)
    entry: dict[str, object] = envelope["entry"]
    return entry


def _received(entry: PackedEntry) -> datetime:
    return _EPOCH + timedelta(microseconds=entry.received_us)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
