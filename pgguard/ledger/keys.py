"""The ledger's Ed25519 signing key on disk: created at first start, loaded at every start.

Owns: `load_or_create_signing_key`, `public_key_path`, `load_public_key`.

The private key is a PEM file (PKCS#8, unencrypted) that only pgguard's user can read: it is
created with mode 0600 in a directory created with mode 0700, first under a temporary name and
then hard-linked into place, so an instance never reads a half-written key and two instances
starting at once on one data directory end up with the same key. The public key (PEM,
SubjectPublicKeyInfo) is written beside it as ``<name>.pub.pem``: it is what auditors need to
verify the ledger, and it is not a secret.

Errors reading or creating a key become `ConfigError` (pgguard refuses to start).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from pgguard.errors import ConfigError
from pgguard.ledger.checkpoint import key_id

log = logging.getLogger(__name__)


def public_key_path(private_key_file: Path) -> Path:
    """Where the public half of ``private_key_file`` is written: ``x.pem`` → ``x.pub.pem``."""
    name = private_key_file.name
    stem = name[: -len(".pem")] if name.endswith(".pem") else name
    return private_key_file.with_name(f"{stem}.pub.pem")


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The private key in ``path``; created (with its public key beside it) when missing."""
    try:
        return _load_private(path)
    except FileNotFoundError:
        pass
    try:
        key, created = _create(path)
    except OSError as exc:
        raise ConfigError(f"cannot create the ledger signing key {path}: {exc}") from None
    if created:
        log.warning(
            "created the ledger signing key %s (key id %s) and its public key %s: keep the "
            "first secret and off the database host; give the second to auditors; give every "
            "instance the same key or each its own",
            path,
            key_id(key.public_key()),
            public_key_path(path),
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (a private key's file gives its public half)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the public key {path}: {exc}") from None
    try:
        if b"PRIVATE KEY" in data:
            private = load_pem_private_key(data, password=None)
            if isinstance(private, Ed25519PrivateKey):
                return private.public_key()
        else:
            public = load_pem_public_key(data)
            if isinstance(public, Ed25519PublicKey):
                return public
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not a PEM key: {exc}") from None
    raise ConfigError(f"{path} is not an Ed25519 key")


def _load_private(path: Path) -> Ed25519PrivateKey:
    data = path.read_bytes()  # FileNotFoundError: create it
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "the ledger signing key %s is readable by others (mode %04o): chmod 600 it", path, mode
        )
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"[ledger] signing_key_file {path} is not an unencrypted PEM private key: {exc}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"[ledger] signing_key_file {path} is not an Ed25519 key")
    return key


def _create(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """(key, True) when this call created ``path``; (the key found there, False) when another
    process created it first."""
    directory = path.parent
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
        os.chmod(directory, 0o700)  # whatever the umask
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    temporary = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    _write_new(temporary, pem, 0o600)
    try:
        os.link(temporary, path)  # atomic, and fails rather than replace a key another made
    except FileExistsError:
        return _load_private(path), False
    finally:
        temporary.unlink(missing_ok=True)
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    public_file = public_key_path(path)
    public_temporary = directory / f".{public_file.name}.{secrets.token_hex(6)}.tmp"
    _write_new(public_temporary, public, 0o644)
    os.replace(public_temporary, public_file)
    _fsync_directory(directory)
    return key, True


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
