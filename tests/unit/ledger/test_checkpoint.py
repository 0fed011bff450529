"""Checkpoints: when they are due, what their signature covers, and the key files on disk."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from pgguard.errors import ConfigError
from pgguard.ledger.anchors import AnchorFile, read_anchors
from pgguard.ledger.chain import parse_spool_line
from pgguard.ledger.checkpoint import (
    CheckpointSchedule,
    CheckpointSigner,
    KeyRing,
    SignedCheckpoint,
    from_stored,
    key_id,
)
from pgguard.ledger.keys import load_or_create_signing_key, load_public_key, public_key_path

# --- the schedule -----------------------------------------------------------------------------


def test_due_after_n_entries() -> None:
    schedule = CheckpointSchedule(every_entries=1000, every_seconds=5.0, now=100.0)
    assert not schedule.due(999, now=100.1)
    assert schedule.due(1000, now=100.1)
    schedule.signed(1000, now=100.1)
    assert not schedule.due(1999, now=100.2)
    assert schedule.due(2000, now=100.2)
    assert schedule.due(2500, now=100.2)  # a round that sealed more than N at once


def test_due_after_s_seconds_whichever_first() -> None:
    schedule = CheckpointSchedule(every_entries=1000, every_seconds=5.0, now=100.0)
    assert not schedule.due(1, now=104.9)
    assert schedule.due(1, now=105.0)
    schedule.signed(1, now=105.0)
    assert not schedule.due(2, now=109.9)
    assert schedule.due(2, now=110.0)


def test_never_due_when_the_head_did_not_move() -> None:
    schedule = CheckpointSchedule(every_entries=1, every_seconds=0.001, now=0.0)
    assert not schedule.due(0, now=10.0)  # an empty chain
    schedule.signed(7, now=1.0)
    assert not schedule.due(7, now=1000.0)
    assert schedule.last_seq == 7


# --- signing ----------------------------------------------------------------------------------


@pytest.fixture
def signer() -> CheckpointSigner:
    return CheckpointSigner(Ed25519PrivateKey.generate(), "inst-a", "pgguard")


def signed(signer: CheckpointSigner, **changes: object) -> SignedCheckpoint:
    return signer.sign("chain-1", 42, "a" * 64, "e" * 32, final=bool(changes.get("final")))


def ring(signer: CheckpointSigner) -> KeyRing:
    return KeyRing([signer._key.public_key()])


def test_signed_checkpoint_verifies_and_round_trips(signer: CheckpointSigner) -> None:
    checkpoint = signed(signer)
    assert ring(signer).check(checkpoint) is None
    assert checkpoint.checkpoint.key_id == signer.key_id == key_id(signer._key.public_key())
    again = from_stored(checkpoint.payload.decode(), checkpoint.signature_text())
    assert again.checkpoint == checkpoint.checkpoint
    assert ring(signer).check(again) is None
    spooled = parse_spool_line(checkpoint.spool_line())
    assert isinstance(spooled, SignedCheckpoint)
    assert spooled.payload == checkpoint.payload
    assert (spooled.chain_id, spooled.seq) == ("chain-1", 42)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("head_hash", "b" * 64),
        ("seq", 43),
        ("chain_id", "chain-2"),
        ("final", True),
        ("ledger", "other"),
    ],
)
def test_any_changed_field_breaks_the_signature(
    signer: CheckpointSigner, field: str, value: object
) -> None:
    checkpoint = signed(signer)
    body = json.loads(checkpoint.payload)
    body[field] = value
    forged = from_stored(
        orjson.dumps(body, option=orjson.OPT_SORT_KEYS), checkpoint.signature_text()
    )
    assert "does not verify" in (ring(signer).check(forged) or "")


def test_another_key_is_not_trusted(signer: CheckpointSigner) -> None:
    other = CheckpointSigner(Ed25519PrivateKey.generate(), "inst-a", "pgguard")
    problem = ring(signer).check(signed(other))
    assert problem is not None
    assert other.key_id in problem


def test_a_key_id_rewritten_to_the_trusted_one_does_not_help(signer: CheckpointSigner) -> None:
    """Nearest variant: the forger names the trusted key's id in their own checkpoint."""
    forger = CheckpointSigner(Ed25519PrivateKey.generate(), "inst-a", "pgguard")
    forger.key_id = signer.key_id
    assert "does not verify" in (ring(signer).check(signed(forger)) or "")


@pytest.mark.parametrize(
    ("payload", "signature"),
    [
        ("not json", "AAAA"),
        ('{"seq": 1}', "AAAA"),
        ("[]", "AAAA"),
        ('{"chain_id":"c"}', "not base64!"),
    ],
)
def test_malformed_stored_checkpoints_are_value_errors(payload: str, signature: str) -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        from_stored(payload, signature)


def test_anchor_file_appends_and_reads_back(signer: CheckpointSigner, tmp_path: Path) -> None:
    path = tmp_path / "dir" / "anchors.jsonl"
    anchors = AnchorFile(path)
    anchors.append([signed(signer), signed(signer, final=True)])
    anchors.close()
    with path.open("ab") as f:
        f.write(b'{"checkpoint": {"torn')  # a crash mid-line
    anchors = AnchorFile(path)
    anchors.append([signed(signer)])
    anchors.close()
    found, damaged = read_anchors(path)
    assert [c.checkpoint.final for c in found] == [False, True, False]
    assert len(damaged) == 1
    assert "line 3" in damaged[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- key files --------------------------------------------------------------------------------


def test_key_is_created_with_mode_0600_and_its_public_half_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "data" / "ledger-signing.pem"
    key = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    public = public_key_path(path)
    assert public == tmp_path / "data" / "ledger-signing.pub.pem"
    assert load_public_key(public) == key.public_key()
    assert load_public_key(path) == key.public_key()  # a private key file gives its public half
    assert load_or_create_signing_key(path).public_key() == key.public_key()  # loaded, not remade
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_a_key_of_another_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    ec = generate_private_key(SECP256R1())
    path.write_bytes(ec.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_or_create_signing_key(path)
    path.write_text("garbage")
    with pytest.raises(ConfigError, match="PEM"):
        load_or_create_signing_key(path)
