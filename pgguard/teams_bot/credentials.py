"""The bot's own identity towards the Bot Connector: client-credentials tokens from Entra ID.

Owns: `AppCredentials` (fetches and caches the access token the bot sends to the Bot Connector),
`TokenUnavailable`, and `client_assertion` (the signed JWT that stands in for a client secret
when the bot authenticates with a certificate).

Invariants:
- The token endpoint is ``{login_url}/{tenant_id}/oauth2/v2.0/token``; nothing else ever sees the
  client secret or a client assertion.
- The app password, the certificate's private key and every access token live only in private
  attributes: never in ``repr``, a log line or an error message. Errors from Entra ID are logged
  by their ``error`` code only (its description can quote the request).
- A token is reused until shortly before it expires; concurrent callers share one fetch; a token
  the Bot Connector refused is dropped (`forget`) so the next call fetches a fresh one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlencode

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from pydantic import SecretStr

from pgguard.errors import ConfigError
from pgguard.settings import TeamsBotSettings
from pgguard.teams_bot.transport import exchange

ASSERTION_LIFETIME_S = 600  # Entra accepts client assertions valid for up to 10 minutes
REFRESH_MARGIN_S = 300.0  # fetch a new token this long before the old one expires
_ERROR_CODE = re.compile(r"[a-z_]{1,40}")


class TokenUnavailable(Exception):
    """No access token now; ``what`` says why in words safe to log."""

    def __init__(self, what: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.retryable = retryable
        self.retry_after = retry_after


class _CertificateKey:
    """The app's certificate (for its thumbprint) and RSA private key (to sign assertions)."""

    __slots__ = ("_key", "thumbprint")

    def __init__(self, key: RSAPrivateKey, thumbprint: str) -> None:
        self._key = key
        self.thumbprint = thumbprint  # x5t: base64url SHA-1 of the DER certificate

    @classmethod
    def load(cls, path: Path) -> _CertificateKey:
        """Read a PEM file holding the certificate and its unencrypted RSA private key."""
        where = "teams.bot.certificate"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
        try:
            certificate = x509.load_pem_x509_certificate(data)
        except ValueError:
            raise ConfigError(f"{where}: {path} holds no PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            # The message names the file, never its content: it may be most of a private key.
            raise ConfigError(
                f"{where}: {path} holds no unencrypted PEM private key next to the certificate"
            ) from None
        if not isinstance(key, RSAPrivateKey):
            raise ConfigError(f"{where}: the private key must be RSA (assertions are RS256)")
        if _spki(certificate.public_key()) != _spki(key.public_key()):
            raise ConfigError(f"{where}: the private key does not belong to the certificate")
        der = certificate.public_bytes(serialization.Encoding.DER)
        return cls(key, _b64url(hashlib.sha1(der).digest()))

    def sign(self, claims: dict[str, object]) -> str:
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"x5t": self.thumbprint})

    def __repr__(self) -> str:
        return f"_CertificateKey(thumbprint={self.thumbprint!r})"


class AppCredentials:
    """Access tokens for the Bot Connector, by client secret or by certificate."""

    __slots__ = (
        "_app_id",
        "_certificate",
        "_lock",
        "_refresh_at",
        "_scope",
        "_secret",
        "_token",
        "_token_url",
        "_transport",
    )

    def __init__(self, settings: TeamsBotSettings, transport: httpx.AsyncBaseTransport) -> None:
        self._token_url = (
            f"{settings.login_url.rstrip('/')}/{quote(settings.tenant_id, safe='')}"
            "/oauth2/v2.0/token"
        )
        self._app_id = settings.app_id
        self._scope = settings.token_scope
        self._secret: SecretStr | None = settings.app_password
        self._certificate = (
            _CertificateKey.load(settings.certificate) if settings.certificate else None
        )
        self._transport = transport
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0  # time.monotonic()

    def __repr__(self) -> str:
        kind = "certificate" if self._certificate is not None else "client secret"
        return f"AppCredentials(app_id={self._app_id!r}, by={kind}, token_url={self._token_url!r})"

    @property
    def token_url(self) -> str:
        return self._token_url

    async def token(self, limit: float) -> str:
        """A valid access token, fetched (one attempt, within ``limit`` s) when none is cached."""
        try:
            async with asyncio.timeout(limit), self._lock:
                if self._token is not None and time.monotonic() < self._refresh_at:
                    return self._token
                self._token = None
                token, lifetime = await self._fetch(limit)
                self._token = token
                self._refresh_at = time.monotonic() + lifetime - min(REFRESH_MARGIN_S, lifetime / 2)
                return token
        except TimeoutError:  # waiting for another caller's fetch took all the time there was
            raise TokenUnavailable(f"no token within {limit:.1f} s", retryable=True) from None

    def forget(self, token: str) -> None:
        """Drop ``token`` (the Bot Connector refused it) unless a newer one replaced it already."""
        if self._token == token:
            self._token = None

    async def _fetch(self, limit: float) -> tuple[str, float]:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._app_id,
            "scope": self._scope,
        }
        if self._certificate is not None:
            form["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            form["client_assertion"] = client_assertion(
                self._certificate, self._app_id, self._token_url
            )
        elif self._secret is not None:
            form["client_secret"] = self._secret.get_secret_value()
        result = await exchange(
            self._transport,
            "POST",
            self._token_url,
            limit=limit,
            content=urlencode(form).encode("ascii"),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
            },
        )
        body = result.json_object()
        if not result.ok:
            raise TokenUnavailable(
                f"token endpoint: {result.what}{_error_code(body)}",
                retryable=result.retryable,
                retry_after=result.retry_after,
            )
        token = body.get("access_token") if body else None
        lifetime = body.get("expires_in") if body else None
        if isinstance(lifetime, str) and lifetime.isdigit():
            lifetime = int(lifetime)
        if not isinstance(token, str) or not token or not isinstance(lifetime, int | float):
            raise TokenUnavailable("token endpoint: answer without a usable token", retryable=True)
        return token, max(float(lifetime), 0.0)


def client_assertion(certificate: _CertificateKey, app_id: str, token_url: str) -> str:
    """The RS256 client assertion Entra ID accepts instead of a secret (x5t names the cert)."""
    now = int(time.time())
    return certificate.sign(
        {
            "aud": token_url,
            "iss": app_id,
            "sub": app_id,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + ASSERTION_LIFETIME_S,
        }
    )


def _error_code(body: dict[str, object] | None) -> str:
    code = body.get("error") if body else None
    return f" ({code})" if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
