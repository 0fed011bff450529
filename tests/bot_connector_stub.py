"""A local stand-in for Microsoft's side of a Teams bot, for the bot tests.

Owns: `BotConnectorStub` — one HTTP server (its own thread and event loop, so a blocked test loop
never stalls pgguard's calls) playing three services:

* Entra ID's token endpoint, ``{login_url}/{tenant}/oauth2/v2.0/token``: checks the client
  credentials — the client secret, or a client assertion whose RS256 signature verifies against
  the test certificate, whose ``x5t`` is that certificate's thumbprint, ``aud`` the token URL,
  ``iss`` = ``sub`` = the app id, with ``exp``/``nbf``/``jti`` (each ``jti`` once) — and issues
  random access tokens.
* The Bot Framework's OpenID metadata and JWKS, with its own RSA keys and endorsements.
* A Bot Connector service recording each posted (POST) and updated (PUT) activity, refusing
  access tokens it did not issue, answering with scripted statuses first when told to
  (`connector_script` for any call, `post_script` for new messages only).

and the channel's side: `mint` signs Bot Connector tokens (any key, algorithm or claim, for the
forgeries), `invoke` builds ``adaptiveCard/action`` invoke activities as Teams sends them.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import hmac
import itertools
import json
import secrets
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pgguard.web.server import HttpServer

APP_ID = "6f1c2c0e-5b1a-4a51-9d0e-b07b07b07b07"
TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
OTHER_TENANT_ID = "0e0e0e0e-0000-4000-8000-000000000bad"
APP_PASSWORD = "stub-app-password-never-logged"
CONVERSATION_ID = "19:pgguard-approvals@thread.tacv2"
ISSUER = "https://api.botframework.com"
SCOPE = "https://api.botframework.com/.default"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass(frozen=True, slots=True)
class StubKey:
    """An RSA key of the channel; published in the JWKS unless it is the rogue one."""

    kid: str
    private: rsa.RSAPrivateKey
    endorsements: tuple[str, ...] | None

    def jwk(self) -> dict[str, object]:
        numbers = self.private.public_key().public_numbers()
        entry: dict[str, object] = {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "n": _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
            "e": _b64url(numbers.e.to_bytes(3, "big")),
        }
        if self.endorsements is not None:
            entry["endorsements"] = list(self.endorsements)
        return entry

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass(frozen=True, slots=True)
class Recorded:
    """One call to the Bot Connector service as the stub saw it."""

    method: str
    conversation_id: str
    activity_id: str  # the new id for a POST, the addressed one for a PUT
    body: dict[str, Any]
    authorization: str

    @property
    def card(self) -> dict[str, Any]:
        attachment = self.body["attachments"][0]
        assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
        card = attachment["content"]
        assert isinstance(card, dict)
        return card

    def request_id(self) -> str | None:
        """The request id the card's buttons or link name."""
        for action in self.card.get("actions", []):
            data = action.get("data")
            if isinstance(data, dict) and "request_id" in data:
                return str(data["request_id"])
            url = action.get("url")
            if isinstance(url, str) and "/requests/" in url:
                return url.rsplit("/", 1)[-1]
        return None


def app_certificate() -> tuple[bytes, bytes]:
    """A fresh self-signed app certificate: (PEM with certificate and key, certificate alone)."""
    key = new_rsa_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgguard-bot-test")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem + key_pem, cert_pem


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class BotConnectorStub:
    """``with BotConnectorStub() as stub:`` then point ``[teams.bot]`` at `stub.bot_settings()`."""

    app_password: str | None = APP_PASSWORD
    certificate_pem: bytes | None = None  # the app's certificate (no key): assertions verify
    posted: list[Recorded] = field(default_factory=list)
    updated: list[Recorded] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    refused_token_requests: list[str] = field(default_factory=list)
    refused_connector_calls: list[str] = field(default_factory=list)
    connector_calls: int = 0  # every call to the Bot Connector service, answered or refused
    metadata_fetches: int = 0
    keys_fetches: int = 0
    connector_script: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    post_script: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)  # POSTs only
    token_script: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.signing = StubKey("stub-signing-1", new_rsa_key(), ("msteams", "emulator"))
        self.skype_only = StubKey("stub-skype-only", new_rsa_key(), ("skype",))
        self.rogue = StubKey("stub-rogue", new_rsa_key(), ("msteams",))  # never published
        self.published = [self.signing, self.skype_only]
        self._issued: set[str] = set()
        self._assertion_ids: set[str] = set()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: HttpServer | None = None

    # --- life cycle -----------------------------------------------------------------------------

    def __enter__(self) -> BotConnectorStub:
        self._thread.start()
        self._server = HttpServer(self._app(), "127.0.0.1", 0)
        self._call(self._server.start())
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._server is not None:
            self._call(self._server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(30)

    # --- where things are -----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._server is not None, "stub not started"
        return f"http://127.0.0.1:{self._server.port}"

    @property
    def login_url(self) -> str:
        return f"{self.base_url}/login"

    @property
    def token_url(self) -> str:
        return f"{self.login_url}/{TENANT_ID}/oauth2/v2.0/token"

    @property
    def openid_metadata_url(self) -> str:
        return f"{self.base_url}/botframework/v1/.well-known/openidconfiguration"

    @property
    def service_url(self) -> str:
        return f"{self.base_url}/connector/"  # Teams' service URLs end with a slash

    def bot_settings(self, **overrides: object) -> dict[str, object]:
        """The ``[teams.bot]`` section for a pgguard that talks to this stub."""
        section: dict[str, object] = {
            "app_id": APP_ID,
            "tenant_id": TENANT_ID,
            "service_url": self.service_url,
            "conversation_id": CONVERSATION_ID,
            "login_url": self.login_url,
            "openid_metadata_url": self.openid_metadata_url,
            "timeout": 3.0,
        }
        if self.app_password is not None:
            section["app_password"] = self.app_password
        section.update(overrides)
        return section

    def cards_for(self, request_id: str) -> list[Recorded]:
        return [r for r in self.posted if r.request_id() == request_id]

    def updates_for(self, request_id: str) -> list[Recorded]:
        return [r for r in self.updated if r.request_id() == request_id]

    def issued_token_count(self) -> int:
        with self._lock:
            return len(self._issued)

    # --- the channel's side: tokens and activities ------------------------------------------------

    def mint(
        self,
        *,
        key: StubKey | None = None,
        kid: str | None = None,
        algorithm: str = "RS256",
        hmac_secret: bytes | None = None,
        issuer: str = ISSUER,
        audience: str = APP_ID,
        expires_in: float = 3600,
        not_before_in: float = -60,
        service_url: str | None = None,
        omit: tuple[str, ...] = (),
        extra: dict[str, object] | None = None,
    ) -> str:
        """A Bot Connector token; by default a valid one for this stub's app and service URL."""
        key = key or self.signing
        now = time.time()
        claims: dict[str, object] = {
            "iss": issuer,
            "aud": audience,
            "exp": int(now + expires_in),
            "nbf": int(now + not_before_in),
            "serviceurl": service_url or self.service_url,
        }
        claims.update(extra or {})
        for name in omit:
            claims.pop(name, None)
        headers = {"kid": kid or key.kid, "typ": "JWT"}
        if algorithm == "RS256":
            return jwt.encode(claims, key.private, algorithm="RS256", headers=headers)
        if algorithm == "none":
            return _by_hand(claims, {**headers, "alg": "none"}, lambda _: b"")
        assert algorithm == "HS256", algorithm
        assert hmac_secret is not None, "HMAC forgeries need a secret"
        return _by_hand(
            claims,
            {**headers, "alg": "HS256"},
            lambda signed: hmac.new(hmac_secret, signed, hashlib.sha256).digest(),
        )

    def invoke(
        self,
        request_id: str,
        verb: str,
        *,
        clicker: str,
        name: str = "Teams User",
        comment: str | None = None,
        activity_id: str | None = None,
        tenant: str = TENANT_ID,
        service_url: str | None = None,
        channel_id: str = "msteams",
    ) -> dict[str, object]:
        """An ``adaptiveCard/action`` invoke as Teams sends it when ``clicker`` clicks ``verb``."""
        data: dict[str, object] = {"request_id": request_id}
        if comment is not None:
            data["comment"] = comment
        return {
            "type": "invoke",
            "name": "adaptiveCard/action",
            "id": activity_id or f"f:{secrets.token_hex(8)}",
            "timestamp": "2026-03-01T12:00:00.000Z",
            "channelId": channel_id,
            "serviceUrl": service_url or self.service_url,
            "from": {"id": f"29:{secrets.token_hex(6)}", "name": name, "aadObjectId": clicker},
            "recipient": {"id": f"28:{APP_ID}", "name": "pgguard"},
            "conversation": {
                "id": CONVERSATION_ID,
                "conversationType": "channel",
                "tenantId": tenant,
            },
            "channelData": {"tenant": {"id": tenant}},
            "replyToId": "1",
            "value": {
                "action": {"type": "Action.Execute", "verb": verb, "data": data},
                "trigger": "manual",
            },
        }

    # --- the server -------------------------------------------------------------------------------

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/botframework/v1/.well-known/openidconfiguration")
        async def metadata() -> dict[str, object]:
            self.metadata_fetches += 1
            return {
                "issuer": ISSUER,
                "authorization_endpoint": "https://invalid.example",
                "jwks_uri": f"{self.base_url}/botframework/v1/.well-known/keys",
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            }

        @app.get("/botframework/v1/.well-known/keys")
        async def keys() -> dict[str, object]:
            self.keys_fetches += 1
            return {"keys": [k.jwk() for k in self.published]}

        @app.post("/login/{tenant}/oauth2/v2.0/token")
        async def token(tenant: str, request: Request) -> Response:
            form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
            self.token_requests.append(form)
            if self.token_script:
                return JSONResponse({"error": "temporarily_unavailable"}, self.token_script.pop(0))
            why = self._refuse_credentials(tenant, form)
            if why is not None:
                self.refused_token_requests.append(why)
                return JSONResponse(
                    {"error": "invalid_client", "error_description": f"AADSTS7000215: {why}"}, 401
                )
            access = f"stub-access-{secrets.token_urlsafe(24)}"
            with self._lock:
                self._issued.add(access)
            return JSONResponse(
                {"token_type": "Bearer", "expires_in": 3599, "access_token": access}
            )

        @app.post("/connector/v3/conversations/{conversation_id}/activities")
        async def post_activity(conversation_id: str, request: Request) -> Response:
            return await self._connector_call("POST", conversation_id, None, request)

        @app.put("/connector/v3/conversations/{conversation_id}/activities/{activity_id}")
        async def put_activity(
            conversation_id: str, activity_id: str, request: Request
        ) -> Response:
            return await self._connector_call("PUT", conversation_id, activity_id, request)

        return app

    def _refuse_credentials(self, tenant: str, form: dict[str, str]) -> str | None:
        """Why these client credentials are refused, or None when they are good."""
        if tenant != TENANT_ID:
            return "unknown tenant"
        if form.get("grant_type") != "client_credentials" or form.get("client_id") != APP_ID:
            return "wrong grant or client"
        if form.get("scope") != SCOPE:
            return "wrong scope"
        if self.certificate_pem is None:
            if self.app_password is None or form.get("client_secret") != self.app_password:
                return "invalid client secret"
            return None
        if "client_secret" in form or form.get("client_assertion_type") != ASSERTION_TYPE:
            return "expected a client assertion"
        return self._refuse_assertion(form.get("client_assertion", ""))

    def _refuse_assertion(self, assertion: str) -> str | None:
        assert self.certificate_pem is not None
        certificate = x509.load_pem_x509_certificate(self.certificate_pem)
        der = certificate.public_bytes(serialization.Encoding.DER)
        thumbprint = _b64url(hashlib.sha1(der).digest())
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                certificate.public_key(),
                algorithms=["RS256"],
                audience=self.token_url,
                issuer=APP_ID,
                options={"require": ["exp", "nbf", "jti", "sub", "iss", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            return f"bad assertion ({type(exc).__name__})"
        if header.get("x5t") != thumbprint:
            return "assertion names another certificate"
        if claims["sub"] != APP_ID:
            return "assertion subject is not the app"
        with self._lock:
            if claims["jti"] in self._assertion_ids:
                return "assertion replayed"
            self._assertion_ids.add(claims["jti"])
        return None

    async def _connector_call(
        self, method: str, conversation_id: str, activity_id: str | None, request: Request
    ) -> Response:
        self.connector_calls += 1
        authorization = request.headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            known = scheme == "Bearer" and token in self._issued
        if not known:
            self.refused_connector_calls.append(f"{method} without a token the stub issued")
            return JSONResponse({"error": {"code": "Unauthorized"}}, 401)
        script = (
            self.post_script if method == "POST" and self.post_script else self.connector_script
        )
        if script:
            scripted = script.pop(0)
            status, headers = scripted if isinstance(scripted, tuple) else (scripted, {})
            return JSONResponse({"error": {"code": "Scripted"}}, status, headers=headers)
        body = await request.json()
        new_id = activity_id or f"1{next(self._ids):012d}"
        record = Recorded(method, conversation_id, new_id, body, authorization)
        (self.posted if method == "POST" else self.updated).append(record)
        return JSONResponse({"id": new_id}, 201 if method == "POST" else 200)


def _by_hand(
    claims: dict[str, object], headers: dict[str, str], sign: Callable[[bytes], bytes]
) -> str:
    """A token PyJWT would refuse to make (``alg: none``; HMAC keyed with a public key)."""
    signed = f"{_b64url(json.dumps(headers).encode())}.{_b64url(json.dumps(claims).encode())}"
    return f"{signed}.{_b64url(sign(signed.encode('ascii')))}"
