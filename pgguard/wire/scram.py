"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL uses it (protocol docs 53.3.1), both sides.

``ScramServer`` authenticates agents against a stored verifier (PostgreSQL's
``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` format) and supports channel
binding ``tls-server-end-point`` (SCRAM-SHA-256-PLUS). ``ScramClient`` authenticates pgguard to
the upstream server. Both are plain state machines: messages in, messages out, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass

from pgguard.errors import AuthenticationFailed, ProtocolViolation, UpstreamUnavailable

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE = "tls-server-end-point"
DEFAULT_ITERATIONS = 4096
_NONCE_BYTES = 18


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ProtocolViolation("malformed SCRAM message: bad base64") from exc


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def saslprep(password: str) -> bytes:
    """Normalise a password the way PostgreSQL does (RFC 4013), falling back to raw bytes.

    PostgreSQL applies SASLprep when it can and uses the password as-is when the password is not
    valid under it, so both sides must make the same choice for the same string.
    """
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if not stringprep.in_table_b1(ch)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    if any(check(ch) for ch in normalized for check in prohibited):
        return password.encode("utf-8")
    return normalized.encode("utf-8")


@dataclass(frozen=True, slots=True)
class Verifier:
    """A stored SCRAM-SHA-256 secret: what a server keeps instead of the password."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_password(
        cls, password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> Verifier:
        salt = salt if salt is not None else secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        return cls(
            iterations=iterations,
            salt=salt,
            stored_key=hashlib.sha256(client_key).digest(),
            server_key=_hmac(salted, b"Server Key"),
        )

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """Parse ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` (ValueError if bad)."""
        try:
            method, params, keys = text.split("$")
            iterations_text, salt_text = params.split(":")
            stored_text, server_text = keys.split(":")
            verifier = cls(
                iterations=int(iterations_text),
                salt=base64.b64decode(salt_text, validate=True),
                stored_key=base64.b64decode(stored_text, validate=True),
                server_key=base64.b64decode(server_text, validate=True),
            )
        except ValueError as exc:
            raise ValueError("not a SCRAM-SHA-256 verifier") from exc
        if method != MECHANISM or verifier.iterations < 1 or len(verifier.stored_key) != 32:
            raise ValueError("not a SCRAM-SHA-256 verifier")
        if len(verifier.server_key) != 32:
            raise ValueError("not a SCRAM-SHA-256 verifier")
        return verifier

    def serialize(self) -> str:
        return (
            f"{MECHANISM}${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )


def mock_verifier(secret: bytes, username: str) -> Verifier:
    """A stable fake verifier for unknown agents, so they cannot be told apart from known ones."""
    digest = hmac.new(secret, username.encode("utf-8"), hashlib.sha256).digest()
    return Verifier(
        iterations=DEFAULT_ITERATIONS, salt=digest[:16], stored_key=digest, server_key=digest
    )


def _parse_attributes(text: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ProtocolViolation("malformed SCRAM message")
        attrs.setdefault(part[0], part[2:])
    return attrs


class ScramServer:
    """Server side of one SCRAM exchange.

    ``channel_binding`` is the ``tls-server-end-point`` data (hash of our certificate) when the
    connection is TLS, else ``None``. Call ``first`` with the SASLInitialResponse data and
    ``final`` with the SASLResponse data; ``final`` raises AuthenticationFailed on a wrong proof.
    """

    def __init__(self, verifier: Verifier, *, channel_binding: bytes | None, known: bool) -> None:
        self._verifier = verifier
        self._cbind = channel_binding
        self._known = known
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    def mechanisms(self) -> list[str]:
        return [MECHANISM_PLUS, MECHANISM] if self._cbind is not None else [MECHANISM]

    def first(self, mechanism: str, data: bytes) -> bytes:
        if mechanism not in self.mechanisms():
            raise ProtocolViolation("client selected an invalid SASL authentication mechanism")
        text = _decode(data)
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ProtocolViolation("malformed SCRAM message")
        cb_flag, authzid, bare = parts
        self._check_channel_binding_flag(mechanism, cb_flag)
        if authzid:
            raise ProtocolViolation("client uses authorization identity, which is not supported")
        attrs = _parse_attributes(bare)
        client_nonce = attrs.get("r", "")
        if not client_nonce or "m" in attrs:
            raise ProtocolViolation("malformed SCRAM message: missing nonce")
        self._gs2_header = f"{cb_flag},,"
        self._client_first_bare = bare
        self._nonce = client_nonce + _b64(secrets.token_bytes(_NONCE_BYTES))
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        return self._server_first.encode("ascii")

    def _check_channel_binding_flag(self, mechanism: str, cb_flag: str) -> None:
        if mechanism == MECHANISM_PLUS:
            if cb_flag != f"p={CHANNEL_BINDING_TYPE}":
                raise ProtocolViolation("unsupported SCRAM channel-binding type")
        elif cb_flag == "y" and self._cbind is not None:
            # The client thinks we cannot bind although we offered it: a downgrade attack.
            raise AuthenticationFailed("SCRAM channel binding negotiation error")
        elif cb_flag not in ("n", "y"):
            raise ProtocolViolation("malformed SCRAM message: channel-binding flag")

    def final(self, data: bytes) -> bytes:
        text = _decode(data)
        without_proof, sep, proof_text = text.rpartition(",p=")
        if not sep:
            raise ProtocolViolation("malformed SCRAM message: missing proof")
        attrs = _parse_attributes(without_proof)
        if attrs.get("r") != self._nonce:
            raise ProtocolViolation("SCRAM nonce mismatch")
        expected_cbind = self._gs2_header.encode("ascii")
        if self._gs2_header.startswith("p="):
            assert self._cbind is not None
            expected_cbind += self._cbind
        if not hmac.compare_digest(_unb64(attrs.get("c", "")), expected_cbind):
            raise AuthenticationFailed("SCRAM channel binding check failed")
        proof = _unb64(proof_text)
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        v = self._verifier
        signature = _hmac(v.stored_key, auth_message)
        if len(proof) != len(signature):
            raise AuthenticationFailed("password authentication failed")
        client_key = _xor(proof, signature)
        ok = hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key)
        if not (ok and self._known):
            raise AuthenticationFailed("password authentication failed")
        return f"v={_b64(_hmac(v.server_key, auth_message))}".encode("ascii")


class ScramClient:
    """Client side of one SCRAM exchange, for pgguard's own login to the upstream server."""

    def __init__(self, password: str, mechanisms: list[str], channel_binding: bytes | None) -> None:
        self._password = password
        if channel_binding is not None and MECHANISM_PLUS in mechanisms:
            self.mechanism = MECHANISM_PLUS
            self._gs2_header = f"p={CHANNEL_BINDING_TYPE},,"
            self._cbind = channel_binding
        elif MECHANISM in mechanisms:
            self.mechanism = MECHANISM
            # "y": we could bind but the server did not offer it (RFC 5802 section 6).
            self._gs2_header = "y,," if channel_binding is not None else "n,,"
            self._cbind = b""
        else:
            raise UpstreamUnavailable(
                f"upstream offers no supported SASL mechanism ({', '.join(mechanisms)})"
            )
        self._nonce = _b64(secrets.token_bytes(_NONCE_BYTES))
        self._client_first_bare = f"n=,r={self._nonce}"
        self._server_signature = b""

    def first(self) -> bytes:
        return f"{self._gs2_header}{self._client_first_bare}".encode("ascii")

    def final(self, server_first: bytes) -> bytes:
        text = _decode(server_first)
        attrs = _parse_attributes(text)
        nonce, salt_text, iter_text = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not nonce.startswith(self._nonce) or not iter_text.isdigit():
            raise UpstreamUnavailable("upstream sent an invalid SCRAM challenge")
        salted = hashlib.pbkdf2_hmac(
            "sha256", saslprep(self._password), _unb64(salt_text), int(iter_text)
        )
        client_key = _hmac(salted, b"Client Key")
        cbind = _b64(self._gs2_header.encode("ascii") + self._cbind)
        without_proof = f"c={cbind},r={nonce}"
        auth_message = f"{self._client_first_bare},{text},{without_proof}".encode()
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={_b64(_xor(client_key, signature))}".encode("ascii")

    def verify(self, server_final: bytes) -> None:
        attrs = _parse_attributes(_decode(server_final))
        if "e" in attrs:
            raise UpstreamUnavailable(f"upstream SCRAM error: {attrs['e']}")
        if not hmac.compare_digest(_unb64(attrs.get("v", "")), self._server_signature):
            raise UpstreamUnavailable("upstream server failed SCRAM verification")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("malformed SCRAM message: not UTF-8") from exc


def md5_password(password: str, user: str, salt: bytes) -> bytes:
    """The md5 response: 'md5' + md5(md5(password + user) + salt) (53.3.1 AuthenticationMD5)."""
    inner = hashlib.md5((password + user).encode("utf-8")).hexdigest().encode("ascii")
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode("ascii")


def certificate_end_point_hash(der_certificate: bytes) -> bytes:
    """tls-server-end-point channel binding data (RFC 5929 section 4.1).

    The certificate's signature hash algorithm decides, with MD5 and SHA-1 upgraded to SHA-256.
    """
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der_certificate)
    algorithm = cert.signature_hash_algorithm
    name = algorithm.name if algorithm is not None else "sha256"
    if name in ("md5", "sha1"):
        name = "sha256"
    return hashlib.new(name, der_certificate).digest()
