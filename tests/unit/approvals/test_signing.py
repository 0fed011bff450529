"""The state MAC key and what each MAC binds (issue 14, deliverable 3)."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from pgguard.approvals.signing import KEY_FILE_NAME, RequestBinding, StateKey, load_state_key
from pgguard.errors import ConfigError

KEY = StateKey(b"k" * 32)
BINDING = RequestBinding(
    request_id="r1",
    statement_digest=KEY.statement_digest(b"DROP TABLE t", None),
    agent="agent",
    owner="alice@example.com",
    database="app",
    session_id="s1",
    fingerprint="fp",
    approver_groups=("dba",),
    min_approvals=2,
    remember_s=None,
)


def test_every_bound_field_changes_the_request_mac() -> None:
    mac = KEY.request_mac(BINDING)
    assert KEY.request_verifies(BINDING, mac)
    changes: dict[str, object] = {
        "request_id": "r2",
        "statement_digest": KEY.statement_digest(b"DROP TABLE u", None),
        "agent": "other",
        "owner": "bob@example.com",
        "database": "other",
        "session_id": "s2",
        "fingerprint": "fp2",
        "approver_groups": (),
        "min_approvals": 1,
        "remember_s": 60.0,
    }
    for name, value in changes.items():
        assert not KEY.request_verifies(dataclasses.replace(BINDING, **{name: value}), mac), name


def test_owner_spelling_does_not_change_the_mac() -> None:
    mac = KEY.request_mac(BINDING)
    assert KEY.request_verifies(dataclasses.replace(BINDING, owner="Alice@Example.com"), mac)


def test_decision_mac_binds_verdict_approver_channel_and_request() -> None:
    mac = KEY.decision_mac(BINDING, "approve", "dba1", "api")
    assert KEY.decision_verifies(BINDING, "approve", "dba1", "api", mac)
    assert KEY.decision_verifies(BINDING, "approve", "DBA1", "api", mac)  # one identity
    assert not KEY.decision_verifies(BINDING, "deny", "dba1", "api", mac)
    assert not KEY.decision_verifies(BINDING, "approve", "dba2", "api", mac)
    assert not KEY.decision_verifies(BINDING, "approve", "dba1", "teams", mac)
    other = dataclasses.replace(BINDING, request_id="r2")
    assert not KEY.decision_verifies(other, "approve", "dba1", "api", mac)


def test_macs_of_one_purpose_never_verify_for_another() -> None:
    state = KEY.state_mac("r1", "approved", BINDING.statement_digest)
    assert KEY.state_verifies("r1", "approved", BINDING.statement_digest, state)
    assert not KEY.state_verifies("r1", "cancelled", BINDING.statement_digest, state)
    assert not KEY.request_verifies(BINDING, state)
    assert not KEY.decision_verifies(BINDING, "approve", "dba1", "api", state)


@pytest.mark.parametrize("mac", [None, "", "v1:", "v1:" + "0" * 64, "garbage"])
def test_missing_or_malformed_macs_never_verify(mac: str | None) -> None:
    assert not KEY.request_verifies(BINDING, mac)


def test_statement_digest_binds_exact_bytes_and_parameters() -> None:
    base = KEY.statement_digest(b"SELECT $1", b"\x00\x01")
    assert base != KEY.statement_digest(b"SELECT $1 ", b"\x00\x01")
    assert base != KEY.statement_digest(b"SELECT $1", b"\x00\x02")
    assert base != KEY.statement_digest(b"SELECT $1", None)
    # The boundary between the text and the parameters is part of the input.
    assert KEY.statement_digest(b"ab", b"c") != KEY.statement_digest(b"a", b"bc")
    assert StateKey(b"j" * 32).statement_digest(b"SELECT $1", b"\x00\x01") != base


def test_a_new_key_file_is_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    key = load_state_key(None, None, data_dir)
    path = data_dir / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert load_state_key(None, None, data_dir) == key  # read back, not made again


def test_a_readable_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("x" * 40)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_state_key(None, path, tmp_path)


def test_short_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 32"):
        load_state_key("short", None, tmp_path)
    path = tmp_path / "k"
    path.write_text("short")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="at least 32"):
        load_state_key(None, path, tmp_path)


def test_the_configured_secret_wins_and_is_never_shown(tmp_path: Path) -> None:
    key = load_state_key("s" * 40, None, tmp_path)
    assert not (tmp_path / KEY_FILE_NAME).exists()
    assert "sss" not in repr(key)
    assert key == load_state_key("s" * 40, None, tmp_path)
    assert key != load_state_key("t" * 40, None, tmp_path)
