"""Approvals a database writer cannot forge: the state MAC key and what each MAC binds.

Owns: `StateKey` (an HMAC-SHA256 key pgguard holds and the state database never sees),
`load_state_key` (from ``[state] signing_key``, ``[state] signing_key_file``, or a key file
created at first start), and the three MACs stored beside the approval rows:

- ``statement_digest``: a keyed digest of the exact statement bytes and Bind parameters the
  policy judged. It is keyed so that storing it reveals nothing about the values it covers.
- ``request_mac``: binds a request's id to that digest and to the context it was judged in
  (agent, owner, database, session, fingerprint) and to the rule's terms (approver groups,
  quorum, remember window), so a writer cannot move a decision to another statement, lower the
  quorum or widen a remembered approval.
- ``decision_mac``: binds one verdict to the request id, the statement digest, the context, the
  approver's normalised identity and the channel it came through.
- ``state_mac``: binds a final state that no approver decides (expired, cancelled) to the request.

Invariants: every MAC is HMAC-SHA256 over a canonical JSON array (a fixed field order, so no two
inputs share bytes) prefixed by a purpose tag, so a MAC made for one purpose never verifies for
another. Verification uses ``hmac.compare_digest``. A missing or malformed MAC never verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from pgguard.approvals.identity import normalise_identity
from pgguard.errors import ConfigError

log = logging.getLogger(__name__)

MAC_VERSION = "v1"
KEY_FILE_NAME = "state-signing.key"
MIN_KEY_CHARS = 32
_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class RequestBinding:
    """What a request's MAC covers; the holding instance knows each field independently."""

    request_id: str
    statement_digest: str
    agent: str
    owner: str
    database: str
    session_id: str
    fingerprint: str
    approver_groups: tuple[str, ...]
    min_approvals: int
    remember_s: float | None


@dataclass(frozen=True, slots=True, repr=False)
class StateKey:
    """The approval MAC key. ``key_id`` names it in logs without revealing it."""

    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) < _KEY_BYTES:
            raise ConfigError("the state signing key must be at least 32 bytes")

    def __repr__(self) -> str:
        return f"StateKey(id={self.key_id})"

    @property
    def key_id(self) -> str:
        return hashlib.sha256(b"pgguard key id\0" + self.secret).hexdigest()[:12]

    def _mac(self, purpose: str, fields: Sequence[object]) -> str:
        message = orjson.dumps([purpose, *fields])
        return MAC_VERSION + ":" + hmac.digest(self.secret, message, "sha256").hex()

    def _verifies(self, purpose: str, fields: Sequence[object], mac: str | None) -> bool:
        if not mac:
            return False
        return hmac.compare_digest(self._mac(purpose, fields), mac)

    # --- the statement -----------------------------------------------------------------------

    def statement_digest(self, statement: bytes, parameters: bytes | None) -> str:
        """A keyed digest of the exact statement bytes and the raw Bind message (if any)."""
        digest = hmac.new(self.secret, b"statement\0", "sha256")
        digest.update(len(statement).to_bytes(8, "big"))
        digest.update(statement)
        if parameters is not None:
            digest.update(b"\1" + len(parameters).to_bytes(8, "big"))
            digest.update(parameters)
        return digest.hexdigest()

    # --- requests ------------------------------------------------------------------------------

    def request_mac(self, binding: RequestBinding) -> str:
        return self._mac("request", _request_fields(binding))

    def request_verifies(self, binding: RequestBinding, mac: str | None) -> bool:
        return self._verifies("request", _request_fields(binding), mac)

    # --- decisions -----------------------------------------------------------------------------

    def decision_mac(
        self, binding: RequestBinding, verdict: str, approver_id: str, channel: str
    ) -> str:
        return self._mac("decision", _decision_fields(binding, verdict, approver_id, channel))

    def decision_verifies(
        self,
        binding: RequestBinding,
        verdict: str,
        approver_id: str,
        channel: str,
        mac: str | None,
    ) -> bool:
        fields = _decision_fields(binding, verdict, approver_id, channel)
        return self._verifies("decision", fields, mac)

    # --- final states no approver decides ---------------------------------------------------

    def state_mac(self, request_id: str, state: str, statement_digest: str) -> str:
        return self._mac("state", [request_id, state, statement_digest])

    def state_verifies(
        self, request_id: str, state: str, statement_digest: str, mac: str | None
    ) -> bool:
        return self._verifies("state", [request_id, state, statement_digest], mac)


def _request_fields(b: RequestBinding) -> list[object]:
    return [
        b.request_id,
        b.statement_digest,
        b.agent,
        normalise_identity(b.owner),
        b.database,
        b.session_id,
        b.fingerprint,
        sorted(b.approver_groups),
        int(b.min_approvals),
        None if b.remember_s is None else float(b.remember_s),  # as double precision reads back
    ]


def _decision_fields(
    b: RequestBinding, verdict: str, approver_id: str, channel: str
) -> list[object]:
    return [
        b.request_id,
        b.statement_digest,
        b.agent,
        b.database,
        b.session_id,
        verdict,
        normalise_identity(approver_id),
        channel,
    ]


# --- loading the key ---------------------------------------------------------------------------


def load_state_key(secret: str | None, key_file: Path | None, data_dir: Path) -> StateKey:
    """The configured key, or the key file (created with mode 0600 at first start).

    ``secret`` (``[state] signing_key``) wins; then ``key_file`` (``[state] signing_key_file``,
    which must exist when it is configured); else ``<data_dir>/state-signing.key``, created when
    missing. Several instances must share one key: the instance that records a decision is not
    always the one that holds the statement.
    """
    if secret is not None:
        if len(secret) < MIN_KEY_CHARS:
            raise ConfigError(f"state.signing_key must be at least {MIN_KEY_CHARS} characters")
        return StateKey(hashlib.sha256(b"pgguard state key\0" + secret.encode()).digest())
    if key_file is not None:
        return StateKey(_read_key_file(key_file, "state.signing_key_file"))
    default = data_dir / KEY_FILE_NAME
    if not default.exists():
        _create_key_file(default)
    return StateKey(_read_key_file(default, "the state signing key"))


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc}") from None
    if path.stat().st_mode & 0o077:
        raise ConfigError(
            f"{what}: {path} is readable by other users; chmod 600 it (it authenticates "
            "every approval decision)"
        )
    if len(text) < MIN_KEY_CHARS:
        raise ConfigError(f"{what}: {path} must hold at least {MIN_KEY_CHARS} characters")
    return hashlib.sha256(b"pgguard state key\0" + text.encode("ascii")).digest()


def _create_key_file(path: Path) -> None:
    """A new random key, written 0600 in a 0700 directory without ever being world-readable."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another instance sharing the directory made it first
    except OSError as exc:
        raise ConfigError(f"cannot create the state signing key {path}: {exc}") from None
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(secrets.token_hex(_KEY_BYTES) + "\n")
        out.flush()
        os.fsync(out.fileno())
    log.warning(
        "created a new state signing key in %s: every pgguard instance sharing this state "
        "database must use the same key (copy the file, or set [state] signing_key)",
        path,
    )
