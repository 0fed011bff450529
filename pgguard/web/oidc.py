"""OpenID Connect sign-in for the approval page: authorization code flow with PKCE.

Owns: the provider's discovery document and signing keys (both fetched lazily and cached), the
authorize URL, the code-for-token exchange, and the checks that turn an ID token into a
`VerifiedIdentity`. What the browser carries between ``begin`` and ``finish`` is a
`PendingSignIn` (state, nonce, PKCE verifier, where to go next, expiry); the page layer keeps it
in a short-lived signed cookie, so no server-side state is needed.

Invariants:
* The ID token comes straight from the token endpoint over a back channel and is still fully
  verified: signature with a key from the provider's JWKS, an asymmetric algorithm the provider
  announced (never ``none``, never HS*), ``iss`` equal to the configured issuer, ``aud`` holding
  our client id (and ``azp`` equal to it), ``exp``/``iat``/``nbf`` within ``leeway``, ``nonce``
  equal to the one this sign-in started with, and the tenant and subject claims present.
* An unknown ``kid`` refetches the JWKS at most once per `JWKS_REFETCH_SECONDS` (key rotation),
  so forged tokens cannot make pgguard hammer the provider.
* Every failure is a `SignInError` whose message never holds a token, a code or the secret.

Microsoft Entra ID: the issuer is ``https://login.microsoftonline.com/{tenant}/v2.0``; identity is
keyed on ``tid`` + ``oid`` (immutable), never on e-mail or UPN. When a user is in more groups than
fit in a token, Entra drops ``groups`` and sends ``_claim_names``/``_claim_sources`` ("group
overage") instead; pgguard does not call Microsoft Graph to resolve them, so for such a user only
``roles`` (app roles) and ``[[approvers]] subject`` mapping apply. App roles are the robust choice.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote_plus, urlsplit

import httpx
import jwt

# Authlib ships no type information; these three helpers take and return plain strings.
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from pgguard.errors import PgGuardError
from pgguard.settings import OidcSettings
from pgguard.web.auth import VerifiedIdentity

log = logging.getLogger(__name__)

OIDC_CALLBACK_PATH = "/auth/callback"
PENDING_SECONDS = 600  # how long a browser may spend at the provider
JWKS_REFETCH_SECONDS = 60.0
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # RFC 6749 error codes are this plain


class SignInError(PgGuardError):
    """A sign-in could not be completed; ``status`` is the HTTP status the page answers with."""

    sqlstate = "28000"
    status = 401


class BadCallback(SignInError):
    """The callback does not belong to the sign-in this browser started (state, code missing)."""

    status = 400


class ProviderUnavailable(SignInError):
    """The identity provider could not be reached or answered nonsense."""

    status = 502


@dataclass(frozen=True, slots=True)
class PendingSignIn:
    """A started sign-in, carried by the browser (signed by the caller) until the callback."""

    state: str
    nonce: str
    code_verifier: str
    next_path: str
    expires_at: int

    def dumps(self) -> str:
        """URL-safe text for a cookie; the caller signs it (it holds no secret of its own)."""
        raw = json.dumps(asdict(self), separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def loads(cls, text: str) -> PendingSignIn:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            data = json.loads(raw)
            return cls(
                state=_text(data["state"]),
                nonce=_text(data["nonce"]),
                code_verifier=_text(data["code_verifier"]),
                next_path=_text(data["next_path"]),
                expires_at=int(data["expires_at"]),
            )
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise BadCallback("the sign-in cookie is malformed; start the sign-in again") from None

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def matches(self, state: str) -> bool:
        """Whether ``state`` from the callback is this sign-in's (constant time)."""
        return hmac.compare_digest(state.encode("utf-8", "replace"), self.state.encode())


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    """The parts of the discovery document pgguard relies on."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: frozenset[str]  # asymmetric ones the provider signs ID tokens with
    token_auth_methods: tuple[str, ...]


class OidcSignIn:
    """Sign-in with one OpenID Connect provider, for one redirect URI."""

    def __init__(self, settings: OidcSettings, redirect_uri: str) -> None:
        self.settings = settings
        self.redirect_uri = redirect_uri
        self._http = httpx.AsyncClient(timeout=settings.timeout, follow_redirects=False)
        self._lock = asyncio.Lock()
        self._metadata: ProviderMetadata | None = None
        self._keys: dict[str, dict[str, Any]] = {}  # kid -> JWK
        self._keys_fetched_at: float | None = None
        self._spent: dict[str, int] = {}  # state -> expiry of sign-ins completed here

    async def aclose(self) -> None:
        await self._http.aclose()

    async def begin(self, next_path: str) -> tuple[str, PendingSignIn]:
        """Where to send the browser (the provider's authorize URL) and what to keep meanwhile."""
        metadata = await self.metadata()
        pending = PendingSignIn(
            state=generate_token(32),
            nonce=generate_token(32),
            code_verifier=generate_token(64),  # RFC 7636: 43-128 unreserved characters
            next_path=next_path,
            expires_at=int(time.time()) + PENDING_SECONDS,
        )
        url = prepare_grant_uri(
            metadata.authorization_endpoint,
            self.settings.client_id,
            "code",
            redirect_uri=self.redirect_uri,
            scope=" ".join(self.settings.scopes),
            state=pending.state,
            nonce=pending.nonce,
            code_challenge=create_s256_code_challenge(pending.code_verifier),
            code_challenge_method="S256",
        )
        return str(url), pending

    async def finish(self, pending: PendingSignIn, params: Mapping[str, str]) -> VerifiedIdentity:
        """Check the callback, redeem its code and verify the ID token; SignInError otherwise."""
        if not pending.matches(params.get("state", "")):
            raise BadCallback("the sign-in response does not match the sign-in this browser began")
        if pending.expired():
            raise BadCallback("the sign-in took longer than 10 minutes; start it again")
        if "error" in params:
            raise SignInError(
                f"the identity provider refused the sign-in: {_provider_error(params)}"
            )
        code = params.get("code", "")
        if not code:
            raise BadCallback("the sign-in response carries no authorization code")
        self._check_unspent(pending)
        id_token = await self._redeem(code, pending)
        # Spent once the provider has honoured the code (not before: junk callbacks with a real
        # sign-in cookie must not be able to fill this memory).
        self._spent[pending.state] = pending.expires_at
        return await self.verify(id_token, pending.nonce)

    async def verify(self, id_token: str, nonce: str) -> VerifiedIdentity:
        """The identity an ID token vouches for, after every check in the module docstring."""
        metadata = await self.metadata()
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise SignInError("the identity provider returned a malformed ID token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in metadata.algorithms:
            raise SignInError(
                f"the ID token is signed with {str(algorithm)[:16]!r}, which is not one of the "
                f"provider's asymmetric algorithms ({', '.join(sorted(metadata.algorithms))})"
            )
        key = await self._signing_key(header.get("kid"), algorithm)
        claims = self._decode(id_token, key, algorithm, metadata.issuer)
        return self._identity(claims, nonce)

    async def metadata(self) -> ProviderMetadata:
        """The discovery document, fetched on first use and kept (endpoints do not move)."""
        if self._metadata is not None:
            return self._metadata
        async with self._lock:
            if self._metadata is None:
                url = self.settings.metadata_url()
                self._metadata = _parse_metadata(await self._get_json(url), self.settings)
            return self._metadata

    # --- internals ------------------------------------------------------------------------------

    def _check_unspent(self, pending: PendingSignIn) -> None:
        """A replayed callback is refused here as well as by the provider (one-time codes)."""
        now = int(time.time())
        for state, expiry in list(self._spent.items()):
            if expiry <= now:
                del self._spent[state]
        if pending.state in self._spent:
            raise SignInError("this sign-in response was already used; start the sign-in again")

    async def _redeem(self, code: str, pending: PendingSignIn) -> str:
        metadata = await self.metadata()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": pending.code_verifier,
        }
        headers = {"Accept": "application/json"}
        secret = self.settings.client_secret
        if secret is None:
            form["client_id"] = self.settings.client_id  # a public client: PKCE is the proof
        elif "client_secret_post" in metadata.token_auth_methods:
            form["client_id"] = self.settings.client_id
            form["client_secret"] = secret.get_secret_value()
        elif "client_secret_basic" in metadata.token_auth_methods:
            # RFC 6749 2.3.1: both parts are form-encoded before they are joined and encoded.
            pair = f"{quote_plus(self.settings.client_id)}:{quote_plus(secret.get_secret_value())}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            raise SignInError(
                "the identity provider accepts neither client_secret_post nor "
                "client_secret_basic at its token endpoint"
            )
        try:
            response = await self._http.post(metadata.token_endpoint, data=form, headers=headers)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(_unreachable(metadata.token_endpoint, exc)) from None
        body = _json_object(response)
        if response.status_code >= 500:
            raise ProviderUnavailable(
                f"the identity provider's token endpoint failed (HTTP {response.status_code})"
            )
        if response.status_code != 200:
            described = _provider_error(body) if body else f"HTTP {response.status_code}"
            raise SignInError(f"the identity provider refused the authorization code: {described}")
        id_token = body.get("id_token") if body else None
        if not isinstance(id_token, str) or not id_token:
            raise SignInError("the identity provider's token response holds no ID token")
        return id_token

    def _decode(self, id_token: str, key: jwt.PyJWK, algorithm: str, issuer: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key,
                algorithms=[algorithm],
                audience=self.settings.client_id,
                issuer=issuer,
                leeway=self.settings.leeway,
                options={"require": ["iss", "aud", "exp", "iat"]},
            )
        except jwt.ExpiredSignatureError:
            raise SignInError("the ID token has expired") from None
        except jwt.ImmatureSignatureError:
            raise SignInError("the ID token is not valid yet (check the clocks)") from None
        except jwt.InvalidSignatureError:
            raise SignInError("the ID token's signature does not verify") from None
        except jwt.InvalidIssuerError:
            raise SignInError("the ID token was not issued by the configured issuer") from None
        except jwt.InvalidAudienceError:
            raise SignInError("the ID token was issued for another application") from None
        except jwt.MissingRequiredClaimError as exc:
            raise SignInError(f"the ID token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise SignInError(f"the ID token is invalid ({type(exc).__name__})") from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        azp = claims.get("azp")
        if (len(audiences) > 1 or azp is not None) and azp != self.settings.client_id:
            raise SignInError("the ID token was issued for another application (azp)")
        return claims

    def _identity(self, claims: Mapping[str, Any], nonce: str) -> VerifiedIdentity:
        presented = claims.get("nonce")
        if not isinstance(presented, str) or not hmac.compare_digest(
            presented.encode("utf-8", "replace"), nonce.encode()
        ):
            raise SignInError("the ID token's nonce does not belong to this sign-in")
        subject = claims.get(self.settings.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise SignInError(f"the ID token lacks the {self.settings.subject_claim!r} claim")
        tenant = ""
        if self.settings.tenant_claim:
            found = claims.get(self.settings.tenant_claim)
            if not isinstance(found, str) or not found:
                raise SignInError(f"the ID token lacks the {self.settings.tenant_claim!r} claim")
            expected = self.settings.tenant_id
            if expected is not None and not hmac.compare_digest(found.encode(), expected.encode()):
                raise SignInError("the ID token belongs to another tenant")
            tenant = found
        if "groups" not in claims and "groups" in (claims.get("_claim_names") or {}):
            log.info("groups overage for subject %s: only roles and subject mapping apply", subject)
        return VerifiedIdentity(
            tenant=tenant,
            subject=subject,
            name=_optional_text(claims.get("name")),
            username=_optional_text(claims.get("preferred_username")),
            groups=_strings(claims.get("groups")),
            roles=_strings(claims.get("roles")),
        )

    async def _signing_key(self, kid: object, algorithm: str) -> jwt.PyJWK:
        if kid is not None and not isinstance(kid, str):
            raise SignInError("the ID token's key id is malformed")
        if not self._keys:
            await self._refresh_keys()  # first use, or the last fetch failed or listed nothing
        entry = self._pick_key(kid)
        if entry is None and self._may_refetch_keys():
            await self._refresh_keys()  # the provider may have rotated its keys
            entry = self._pick_key(kid)
        if entry is None:
            raise SignInError("the ID token is signed with a key the provider does not list")
        if entry.get("alg", algorithm) != algorithm:
            raise SignInError("the ID token's algorithm is not the one its key is for")
        try:
            # Bound to the token's algorithm, so a key of another type cannot be misused for it.
            return jwt.PyJWK(entry, algorithm=algorithm)
        except (jwt.PyJWTError, KeyError, TypeError, ValueError):
            raise SignInError("the ID token's algorithm does not fit its key") from None

    def _pick_key(self, kid: str | None) -> dict[str, Any] | None:
        if kid is not None:
            return self._keys.get(kid)
        # No key id: acceptable only when the provider publishes exactly one key.
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    def _may_refetch_keys(self) -> bool:
        last = self._keys_fetched_at
        return last is None or time.monotonic() - last >= JWKS_REFETCH_SECONDS

    async def _refresh_keys(self) -> None:
        metadata = await self.metadata()
        self._keys_fetched_at = time.monotonic()  # before the fetch: failures count as attempts
        self._keys = _parse_jwks(await self._get_json(metadata.jwks_uri))

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = await self._http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(_unreachable(url, exc)) from None
        body = _json_object(response)
        if response.status_code != 200 or body is None:
            raise ProviderUnavailable(
                f"the identity provider answered {url} with HTTP {response.status_code}"
                + ("" if body is not None else " and no JSON object")
            )
        return body


def _parse_metadata(doc: Mapping[str, Any], settings: OidcSettings) -> ProviderMetadata:
    where = settings.metadata_url()
    issuer = doc.get("issuer")
    if issuer != settings.issuer:
        raise ProviderUnavailable(
            f"the discovery document at {where} names issuer {str(issuer)[:200]!r}, not the "
            f"configured {settings.issuer!r}"
        )
    endpoints = {}
    for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        value = doc.get(name)
        if not isinstance(value, str) or not _safe_url(value):
            raise ProviderUnavailable(
                f"the discovery document at {where} has no usable {name} (https, or http on "
                "loopback only)"
            )
        endpoints[name] = value
    offered = doc.get("id_token_signing_alg_values_supported") or ["RS256"]
    algorithms = frozenset(a for a in _strings(offered) if a in ASYMMETRIC_ALGORITHMS)
    if not algorithms:
        raise ProviderUnavailable(
            f"the identity provider at {where} offers no asymmetric ID token signing algorithm"
        )
    methods = _strings(doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"])
    return ProviderMetadata(
        issuer=issuer,
        authorization_endpoint=endpoints["authorization_endpoint"],
        token_endpoint=endpoints["token_endpoint"],
        jwks_uri=endpoints["jwks_uri"],
        algorithms=algorithms,
        token_auth_methods=methods,
    )


def _parse_jwks(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    keys: dict[str, dict[str, Any]] = {}
    entries = doc.get("keys")
    if not isinstance(entries, list):
        raise ProviderUnavailable("the identity provider's JWKS has no 'keys' list")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") == "oct":
            continue  # a shared secret is never an identity provider's signing key
        try:
            jwt.PyJWK(entry)
        except (jwt.PyJWTError, KeyError, TypeError, ValueError):
            continue  # a key this PyJWT cannot use: not one we can verify with anyway
        keys[str(entry.get("kid", f"#{index}"))] = entry
    return keys


def _safe_url(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "https":
        return bool(parts.hostname)
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _provider_error(params: Mapping[str, Any]) -> str:
    """``error: description`` from a provider's error answer, trimmed and never echoing junk."""
    code = params.get("error")
    code_text = code if isinstance(code, str) and _ERROR_CODE.match(code) else "unknown_error"
    description = params.get("error_description")
    if isinstance(description, str) and description.strip():
        return f"{code_text}: {' '.join(description.split())[:300]}"
    return code_text


def _unreachable(url: str, exc: httpx.HTTPError) -> str:
    parts = urlsplit(url)
    return f"the identity provider at {parts.scheme}://{parts.netloc} is unreachable ({exc!r})"


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected text")
    return value


def _optional_text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(item for item in value if isinstance(item, str))
