"""SCRAM-SHA-256 against RFC 7677's test vector, and server/client against each other."""

from __future__ import annotations

import base64

import pytest

from pgguard.errors import AuthenticationFailed, ProtocolViolation
from pgguard.wire import scram
from pgguard.wire.scram import ScramClient, ScramServer, Verifier

# RFC 7677 section 3: user "user", password "pencil".
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_PROOF = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
RFC_SERVER_SIGNATURE = "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_client_matches_rfc_7677_vector() -> None:
    client = ScramClient("pencil", [scram.MECHANISM], None)
    # The RFC's client-first-message-bare names the user; PostgreSQL leaves it empty. Use the RFC's.
    client._nonce = RFC_CLIENT_NONCE
    client._client_first_bare = f"n=user,r={RFC_CLIENT_NONCE}"
    final = client.final(RFC_SERVER_FIRST.encode()).decode()
    assert final.endswith(f",p={RFC_PROOF}")
    client.verify(f"v={RFC_SERVER_SIGNATURE}".encode())


def test_verifier_round_trip_and_postgres_format() -> None:
    verifier = Verifier.from_password("pencil", salt=RFC_SALT)
    text = verifier.serialize()
    assert text.startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")
    assert Verifier.parse(text) == verifier


@pytest.mark.parametrize(
    "bad", ["", "md5abc", "SCRAM-SHA-256$x:y$z:w", "SCRAM-SHA-256$4096:AAAA$AAAA:AAAA"]
)
def test_verifier_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError, match="not a SCRAM"):
        Verifier.parse(bad)


def exchange(
    password: str,
    server_password: str,
    *,
    binding: bytes | None = None,
    client_binding: bytes | None = None,
    known: bool = True,
) -> None:
    server = ScramServer(
        Verifier.from_password(server_password), channel_binding=binding, known=known
    )
    client = ScramClient(password, server.mechanisms(), client_binding)
    server_first = server.first(client.mechanism, client.first())
    server_final = server.final(client.final(server_first))
    client.verify(server_final)


def test_server_and_client_agree() -> None:
    exchange("s3cret-ü", "s3cret-ü")


def test_wrong_password_fails() -> None:
    with pytest.raises(AuthenticationFailed):
        exchange("wrong", "right")


def test_unknown_agent_fails_even_with_matching_proof() -> None:
    with pytest.raises(AuthenticationFailed):
        exchange("x", "x", known=False)


def test_channel_binding_plus() -> None:
    exchange("pw", "pw", binding=b"cert-hash", client_binding=b"cert-hash")


def test_channel_binding_mismatch_fails() -> None:
    with pytest.raises(AuthenticationFailed):
        exchange("pw", "pw", binding=b"cert-hash", client_binding=b"other-hash")


def test_downgrade_to_no_binding_is_detected() -> None:
    server = ScramServer(Verifier.from_password("pw"), channel_binding=b"h", known=True)
    with pytest.raises(AuthenticationFailed):
        server.first(scram.MECHANISM, b"y,,n=,r=abc")


@pytest.mark.parametrize(
    "first", [b"", b"n,,", b"n,,n=,", b"x,,n=,r=a", b"n,a=admin,n=,r=a", b"\xff\xfe"]
)
def test_malformed_client_first(first: bytes) -> None:
    server = ScramServer(Verifier.from_password("pw"), channel_binding=None, known=True)
    with pytest.raises((ProtocolViolation, AuthenticationFailed)):
        server.first(scram.MECHANISM, first)
