"""Verifying that an incoming activity really comes from the Bot Connector, for this bot.

Owns: `ChannelKeys` (the Bot Framework's published signing keys, from its OpenID metadata),
`ChannelVerifier` (the token checks, then the activity checks), `ChannelToken`,
`VerifiedActivity`, `ChannelAuthError` (→ 401) and `ChannelKeysUnavailable` (→ 503).

Invariants:
- The token is checked before anything is read from the body: ``Authorization: Bearer``, RS256
  and nothing else (no ``none``, no HMAC), a ``kid`` naming a published key, the signature,
  ``iss`` = the configured token issuer, ``aud`` = the app id, ``exp``/``nbf``/``iat`` within the
  configured clock skew.
- Then the activity: channel ``msteams``, endorsed by the signing key when the key lists
  endorsements, the token's ``serviceurl`` claim = the activity's ``serviceUrl`` = the configured
  service URL, and every tenant the activity names (``conversation.tenantId``,
  ``channelData.tenant.id``, at least one) = the configured tenant.
- Keys are cached; a ``kid`` not in the cache refetches them at most once per
  `REFETCH_INTERVAL_S`, so forged tokens with made-up kids cannot make pgguard hammer Microsoft.
- Error reasons are for the log; the HTTP answer stays generic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
import jwt

from pgguard.errors import ConfigError
from pgguard.settings import TeamsBotSettings
from pgguard.teams_bot.transport import exchange

log = logging.getLogger(__name__)

TEAMS_CHANNEL = "msteams"
REFETCH_INTERVAL_S = 60.0  # an unknown kid refetches the keys at most this often
RETRY_EMPTY_S = 5.0  # with no keys at all, a failed fetch is retried at most this often
KEYS_MAX_AGE_S = 24 * 3600.0  # refetch known keys daily (the SDK keeps them 5 days)
_SERVICE_URL_CLAIMS = ("serviceurl", "serviceUrl")


class ChannelAuthError(Exception):
    """The request is not from the Bot Connector for this bot; ``reason`` is for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChannelKeysUnavailable(Exception):
    """The signing keys could not be fetched and none are cached: nothing can be verified."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    key: jwt.PyJWK
    endorsements: tuple[str, ...] | None  # None: the key lists none (no channel restriction)


@dataclass(frozen=True, slots=True)
class ChannelToken:
    """A Bot Connector token whose signature and standard claims were checked."""

    claims: Mapping[str, object]
    key: SigningKey

    @property
    def expires_at(self) -> float:
        exp = self.claims.get("exp")
        return float(exp) if isinstance(exp, int | float) else time.time()


@dataclass(frozen=True, slots=True)
class VerifiedActivity:
    """An activity whose channel, service URL and tenant matched its verified token."""

    activity: Mapping[str, object]
    tenant: str
    token: ChannelToken


class ChannelKeys:
    """The OpenID metadata's ``jwks_uri`` keys, cached, refetched when stale or on a new kid."""

    def __init__(
        self, metadata_url: str, transport: httpx.AsyncBaseTransport, *, timeout: float
    ) -> None:
        self._metadata_url = metadata_url
        self._transport = transport
        self._timeout = timeout
        self._keys: dict[str, SigningKey] = {}
        self._fetched_at = float("-inf")  # time.monotonic() of the last successful fetch
        self._tried_at = float("-inf")  # ... of the last attempt, successful or not
        self._lock = asyncio.Lock()

    async def get(self, kid: str) -> SigningKey | None:
        """The published key ``kid``, or None when Microsoft does not publish it."""
        key = self._keys.get(kid)
        if key is not None and time.monotonic() - self._fetched_at < KEYS_MAX_AGE_S:
            return key
        async with self._lock:
            key = self._keys.get(kid)
            now = time.monotonic()
            stale = now - self._fetched_at >= KEYS_MAX_AGE_S
            if key is not None and not stale:
                return key  # another caller refreshed while this one waited
            wait = RETRY_EMPTY_S if not self._keys else REFETCH_INTERVAL_S
            if now - self._tried_at >= wait:
                self._tried_at = now
                await self._refresh()
            if not self._keys:
                raise ChannelKeysUnavailable("no Bot Framework signing keys could be fetched")
            return self._keys.get(kid)

    async def _refresh(self) -> None:
        """Fetch metadata and keys; on failure keep what is cached (logged)."""
        try:
            keys = await self._fetch()
        except ChannelKeysUnavailable as exc:
            log.warning("teams bot: could not refresh the Bot Framework keys: %s", exc)
            return
        self._keys = keys
        self._fetched_at = time.monotonic()
        log.info("teams bot: %d Bot Framework signing keys loaded", len(keys))

    async def _fetch(self) -> dict[str, SigningKey]:
        metadata = await self._get_json(self._metadata_url, "OpenID metadata")
        jwks_uri = metadata.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not _acceptable_keys_url(jwks_uri, self._metadata_url):
            raise ChannelKeysUnavailable("the OpenID metadata names no usable jwks_uri")
        document = await self._get_json(jwks_uri, "signing keys")
        entries = document.get("keys")
        if not isinstance(entries, list):
            raise ChannelKeysUnavailable("the signing key document has no key list")
        keys = {}
        for entry in entries:
            key = _signing_key(entry)
            if key is not None:
                keys[key.kid] = key
        if not keys:
            raise ChannelKeysUnavailable("the signing key document has no usable RSA key")
        return keys

    async def _get_json(self, url: str, what: str) -> dict[str, object]:
        result = await exchange(
            self._transport, "GET", url, limit=self._timeout, headers={"Accept": "application/json"}
        )
        body = result.json_object()
        if not result.ok or body is None:
            raise ChannelKeysUnavailable(f"{what}: {result.what}")
        return body


class ChannelVerifier:
    """The Bot Connector's JWT, then the activity it came with; see the module docstring."""

    def __init__(self, settings: TeamsBotSettings, keys: ChannelKeys) -> None:
        self._app_id = settings.app_id
        self._issuer = settings.token_issuer
        self._skew = settings.clock_skew
        self._tenant = settings.tenant_id
        try:
            self._service_url = normal_service_url(settings.service_url)
        except ValueError:
            raise ConfigError("teams.bot.service_url must be an absolute http(s) URL") from None
        self._keys = keys

    async def verify_token(self, authorization: str | None) -> ChannelToken:
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ChannelAuthError("no bearer token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise ChannelAuthError("malformed token") from None
        if header.get("alg") != "RS256":
            raise ChannelAuthError(f"algorithm {str(header.get('alg'))[:16]!r} is not RS256")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ChannelAuthError("token names no signing key (kid)")
        key = await self._keys.get(kid)
        if key is None:
            raise ChannelAuthError(f"unknown signing key {kid[:64]!r}")
        try:
            claims = jwt.decode(
                token,
                key.key.key,
                algorithms=["RS256"],
                audience=self._app_id,
                issuer=self._issuer,
                leeway=self._skew,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise ChannelAuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise ChannelAuthError("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise ChannelAuthError("token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise ChannelAuthError("token from another issuer") from None
        except jwt.InvalidSignatureError:
            raise ChannelAuthError("bad signature") from None
        except jwt.InvalidTokenError as exc:
            raise ChannelAuthError(f"invalid token ({type(exc).__name__})") from None
        return ChannelToken(claims, key)

    def verify_activity(
        self, token: ChannelToken, activity: Mapping[str, object]
    ) -> VerifiedActivity:
        channel = activity.get("channelId")
        if channel != TEAMS_CHANNEL:
            raise ChannelAuthError(f"channel {str(channel)[:32]!r} is not {TEAMS_CHANNEL}")
        endorsements = token.key.endorsements
        if endorsements is not None and channel not in endorsements:
            raise ChannelAuthError(f"signing key {token.key.kid!r} is not endorsed for {channel}")
        self._check_service_url(token, activity.get("serviceUrl"))
        return VerifiedActivity(activity, self._check_tenant(activity), token)

    def _check_service_url(self, token: ChannelToken, service_url: object) -> None:
        if not isinstance(service_url, str) or not service_url:
            raise ChannelAuthError("activity without serviceUrl")
        claimed = [token.claims[name] for name in _SERVICE_URL_CLAIMS if name in token.claims]
        if not claimed:
            raise ChannelAuthError("token without serviceurl claim")
        try:
            ours = normal_service_url(service_url)
            matches = all(isinstance(c, str) and normal_service_url(c) == ours for c in claimed)
        except ValueError:
            raise ChannelAuthError("unreadable serviceUrl") from None
        if not matches:
            raise ChannelAuthError("serviceurl claim does not match the activity's serviceUrl")
        if ours != self._service_url:
            raise ChannelAuthError("activity's serviceUrl is not the configured service_url")

    def _check_tenant(self, activity: Mapping[str, object]) -> str:
        named = []
        conversation = activity.get("conversation")
        if isinstance(conversation, dict) and "tenantId" in conversation:
            named.append(conversation["tenantId"])
        channel_data = activity.get("channelData")
        tenant = channel_data.get("tenant") if isinstance(channel_data, dict) else None
        if isinstance(tenant, dict) and "id" in tenant:
            named.append(tenant["id"])
        if not named:
            raise ChannelAuthError("activity names no tenant")
        if any(t != self._tenant for t in named):
            raise ChannelAuthError("activity from another tenant")
        return self._tenant


def normal_service_url(url: str) -> str:
    """Service URLs compare without a trailing slash and with a lowercase scheme and host.

    Raises ValueError for something that is not an absolute http(s) URL.
    """
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError("not a URL") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("not an absolute http(s) URL")
    path = parsed.raw_path.decode("ascii", "replace").split("?", 1)[0].rstrip("/")
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme.lower()}://{parsed.host.lower()}{port}{path}"


def _signing_key(entry: object) -> SigningKey | None:
    """One JWK as a SigningKey; None for keys that cannot sign RS256 tokens."""
    if not isinstance(entry, dict) or entry.get("kty") != "RSA":
        return None
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid or entry.get("use", "sig") != "sig":
        return None
    try:
        key = jwt.PyJWK(entry, algorithm="RS256")
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
        log.warning("teams bot: skipping unreadable signing key %r", kid[:64])
        return None
    endorsements: tuple[str, ...] | None = None
    if "endorsements" in entry:
        raw = entry["endorsements"]
        # Present but unreadable endorses nothing: fail closed rather than unrestricted.
        raw_list = raw if isinstance(raw, list) else []
        endorsements = tuple(e for e in raw_list if isinstance(e, str))
    return SigningKey(kid, key, endorsements)


def _acceptable_keys_url(url: str, metadata_url: str) -> bool:
    """https, or http only when the metadata itself is served over http (a local test)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return False
    if not parsed.host:
        return False
    return parsed.scheme == "https" or (
        parsed.scheme == "http" and metadata_url.lower().startswith("http://")
    )
