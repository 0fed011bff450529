"""A local OpenID Connect provider for tests, shaped like Microsoft Entra ID's v2.0 endpoints.

It has its own RSA key pair and serves a discovery document, a JWKS, an authorize endpoint that
consents at once for `OidcProvider.user` (the "current user", whose claims a test sets) and a
token endpoint with one-time codes, client authentication, redirect URI matching and a PKCE
check. `OidcProvider.forge_next` makes the next ID token wrong in one chosen way, so tests can
show that the relying party refuses it. It runs uvicorn on a free 127.0.0.1 port on its own
thread, so synchronous and asyncio tests (and a real browser) reach it over real sockets.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import unquote_plus, urlencode

import jwt
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

Forgery = Literal[
    "bad_signature",  # signed by another key under the provider's key id
    "unknown_kid",  # signed by a key the JWKS does not list
    "wrong_issuer",
    "wrong_audience",
    "extra_audience",  # our client and another one, without azp
    "expired",
    "not_yet_valid",
    "other_tenant",
    "wrong_nonce",
    "missing_oid",
    "alg_none",
    "alg_hs256",  # an HMAC over the client secret: a shared secret is not the provider's key
]

OTHER_TENANT = "99999999-0000-4000-8000-000000000000"


@dataclass(frozen=True)
class User:
    """The person who is signed in at the provider (Entra claim names)."""

    oid: str
    name: str
    preferred_username: str
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Grant:
    client_id: str
    redirect_uri: str
    code_challenge: str
    nonce: str | None
    user: User
    expires_at: float


@dataclass
class TokenRequest:
    """What the relying party sent to /token (no secrets): for assertions on client auth."""

    auth_method: str
    status: int
    fields: tuple[str, ...] = field(default_factory=tuple)


class OidcProvider:
    def __init__(
        self,
        *,
        tenant_id: str,
        client_id: str,
        client_secret: str | None,
        redirect_uris: Iterable[str],
        auth_methods: tuple[str, ...] = ("client_secret_post", "client_secret_basic"),
    ) -> None:
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uris = set(redirect_uris)
        self.auth_methods = auth_methods
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.issuer = f"{self.url}/{tenant_id}/v2.0"
        self.keys: dict[str, rsa.RSAPrivateKey] = {"key-1": _new_key()}
        self.kid = "key-1"  # the key ID tokens are signed with
        self._stranger = _new_key()  # for forgeries
        self.user = User(
            oid="00000000-0000-4000-8000-0000000000aa", name="Nobody", preferred_username=""
        )
        self.forge_next: Forgery | None = None
        self.refuse_next: str | None = None  # an OAuth error code for the next /authorize
        self.token_endpoint_down = False
        self.discovery_requests = 0
        self.jwks_requests = 0
        self.token_requests: list[TokenRequest] = []
        self.issued_id_tokens: list[str] = []
        self._grants: dict[str, _Grant] = {}
        prefix = f"/{tenant_id}"
        app = Starlette(
            routes=[
                Route(f"{prefix}/v2.0/.well-known/openid-configuration", self._discovery),
                Route(f"{prefix}/discovery/v2.0/keys", self._jwks),
                Route(f"{prefix}/oauth2/v2.0/authorize", self._authorize),
                Route(f"{prefix}/oauth2/v2.0/token", self._token, methods=["POST"]),
            ]
        )
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False, loop="asyncio"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> OidcProvider:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test OIDC provider did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    def __enter__(self) -> OidcProvider:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- knobs ----------------------------------------------------------------------------------

    def rotate_key(self) -> str:
        """Sign from now on with a new key, published next to the old one; its key id."""
        self.kid = f"key-{len(self.keys) + 1}"
        self.keys[self.kid] = _new_key()
        return self.kid

    @property
    def authorization_endpoint(self) -> str:
        return f"{self.url}/{self.tenant_id}/oauth2/v2.0/authorize"

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/{self.tenant_id}/oauth2/v2.0/token"

    # --- endpoints ------------------------------------------------------------------------------

    async def _discovery(self, _request: Request) -> Response:
        self.discovery_requests += 1
        return JSONResponse(
            {
                "issuer": self.issuer,
                "authorization_endpoint": self.authorization_endpoint,
                "token_endpoint": self.token_endpoint,
                "jwks_uri": f"{self.url}/{self.tenant_id}/discovery/v2.0/keys",
                "response_types_supported": ["code"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": list(self.auth_methods),
                "code_challenge_methods_supported": ["S256"],
                "scopes_supported": ["openid", "profile", "email"],
            }
        )

    async def _jwks(self, _request: Request) -> Response:
        self.jwks_requests += 1
        keys = []
        for kid, key in self.keys.items():
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            keys.append({**jwk, "kid": kid, "use": "sig"})  # Entra lists no "alg" either
        return JSONResponse({"keys": keys})

    async def _authorize(self, request: Request) -> Response:
        q = request.query_params
        if q.get("client_id") != self.client_id or q.get("redirect_uri") not in self.redirect_uris:
            # RFC 6749 4.1.2.1: never redirect to an unverified redirect URI.
            return HTMLResponse("unknown client or redirect_uri", status_code=400)
        redirect_uri = q["redirect_uri"]
        state = q.get("state")

        def back(**params: str) -> Response:
            if state is not None:
                params["state"] = state
            return RedirectResponse(f"{redirect_uri}?{urlencode(params)}", status_code=302)

        if self.refuse_next is not None:
            error, self.refuse_next = self.refuse_next, None
            return back(error=error, error_description="The user declined to sign in.")
        if q.get("response_type") != "code":
            return back(error="unsupported_response_type")
        if "openid" not in q.get("scope", "").split():
            return back(error="invalid_scope")
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return back(error="invalid_request", error_description="PKCE with S256 is required")
        code = secrets.token_urlsafe(32)
        self._grants[code] = _Grant(
            client_id=self.client_id,
            redirect_uri=redirect_uri,
            code_challenge=q["code_challenge"],
            nonce=q.get("nonce"),
            user=replace(self.user),
            expires_at=time.time() + 300,
        )
        return back(code=code)

    async def _token(self, request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        method, client_id, secret = _client_credentials(request, form)
        record = TokenRequest(method, 200, tuple(sorted(k for k in form if k != "client_secret")))
        self.token_requests.append(record)

        def refuse(status: int, error: str, description: str) -> Response:
            record.status = status
            return JSONResponse({"error": error, "error_description": description}, status)

        if self.token_endpoint_down:
            return refuse(503, "temporarily_unavailable", "the token service is down")
        if client_id != self.client_id:
            return refuse(401, "invalid_client", "unknown client")
        if self.client_secret is not None and (
            method not in self.auth_methods or secret != self.client_secret
        ):
            return refuse(401, "invalid_client", "client authentication failed")
        if self.client_secret is None and secret is not None:
            return refuse(401, "invalid_client", "a public client has no secret")
        if form.get("grant_type") != "authorization_code":
            return refuse(400, "unsupported_grant_type", "only authorization_code")
        grant = self._grants.pop(form.get("code", ""), None)  # one use, even a failed one
        if grant is None or grant.expires_at < time.time():
            return refuse(400, "invalid_grant", "the code is unknown, used or expired")
        if grant.redirect_uri != form.get("redirect_uri"):
            return refuse(400, "invalid_grant", "redirect_uri does not match")
        verifier = form.get("code_verifier", "")
        if not verifier or _s256(verifier) != grant.code_challenge:
            return refuse(400, "invalid_grant", "PKCE verification failed")
        id_token = self._id_token(grant)
        self.issued_id_tokens.append(id_token)
        return JSONResponse(
            {
                "token_type": "Bearer",
                "access_token": secrets.token_urlsafe(32),
                "expires_in": 3600,
                "scope": "openid profile",
                "id_token": id_token,
            },
            headers={"Cache-Control": "no-store"},
        )

    # --- tokens ---------------------------------------------------------------------------------

    def _id_token(self, grant: _Grant) -> str:
        now = int(time.time())
        user = grant.user
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.client_id,
            "exp": now + 3600,
            "iat": now,
            "nbf": now,
            "sub": "pairwise-" + hashlib.sha256(user.oid.encode()).hexdigest()[:24],
            "oid": user.oid,
            "tid": self.tenant_id,
            "name": user.name,
            "preferred_username": user.preferred_username,
            "ver": "2.0",
        }
        if grant.nonce is not None:
            claims["nonce"] = grant.nonce
        if user.groups:
            claims["groups"] = list(user.groups)
        if user.roles:
            claims["roles"] = list(user.roles)
        forgery, self.forge_next = self.forge_next, None
        key, kid = self.keys[self.kid], self.kid
        match forgery:
            case "bad_signature":
                key = self._stranger
            case "unknown_kid":
                key, kid = self._stranger, "key-nobody-published"
            case "wrong_issuer":
                claims["iss"] = f"{self.url}/{OTHER_TENANT}/v2.0"
            case "wrong_audience":
                claims["aud"] = "another-application"
            case "extra_audience":
                claims["aud"] = [self.client_id, "another-application"]
            case "expired":
                claims.update(exp=now - 3600, iat=now - 7200, nbf=now - 7200)
            case "not_yet_valid":
                claims.update(nbf=now + 3600, iat=now + 3600)
            case "other_tenant":
                claims["tid"] = OTHER_TENANT
            case "wrong_nonce":
                claims["nonce"] = "a-nonce-from-another-sign-in"
            case "missing_oid":
                del claims["oid"]
            case "alg_none":
                return jwt.encode(claims, "", algorithm="none", headers={"kid": kid})
            case "alg_hs256":
                hmac_key = self.client_secret or "a-shared-secret-of-thirty-two-bytes!"
                return jwt.encode(claims, hmac_key, algorithm="HS256", headers={"kid": kid})
            case None:
                pass
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _client_credentials(
    request: Request, form: dict[str, str]
) -> tuple[str, str | None, str | None]:
    """(method, client_id, secret) as the client presented them (RFC 6749 2.3.1)."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        try:
            pair = base64.b64decode(header[6:]).decode()
        except ValueError:
            return "client_secret_basic", None, None
        client_id, _, secret = pair.partition(":")
        return "client_secret_basic", unquote_plus(client_id), unquote_plus(secret)
    if "client_secret" in form:
        return "client_secret_post", form.get("client_id"), form["client_secret"]
    return "none", form.get("client_id"), None
