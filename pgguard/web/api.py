"""The approval REST API (an exact contract: paths, bodies and status codes are checked).

* ``GET  /api/requests?state=pending`` - list requests (any state when ``state`` is omitted)
* ``GET  /api/requests/{id}``          - one request
* ``POST /api/requests/{id}/approve``  - body ``{"reason": "..."}`` (optional for approve)
* ``POST /api/requests/{id}/deny``     - body ``{"reason": "..."}``
* ``GET  /healthz``, ``/readyz``, ``/metrics``, ``POST /api/reload``: `pgguard.web.ops`

Every ``/api`` call needs ``Authorization: Bearer <token>`` of a configured approver.
Status codes: 200 with the request's JSON; 401 unknown or missing token; 403 not in an approving
group, or self-approval; 404 no such request; 409 already decided or expired; 413 a body larger
than ``[http] max_body_bytes``. The token is checked before the body is read (`BoundedBodies`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pgguard.approvals.model import (
    AlreadyDecided,
    Approver,
    DuplicateApproval,
    IntegrityFailure,
    NotAllowedToApprove,
    RequestNotFound,
    RequestState,
    SelfApproval,
)
from pgguard.approvals.service import ApprovalService
from pgguard.errors import PgGuardError
from pgguard.web.auth import ApproverDirectory
from pgguard.web.limits import BoundedBodies, Scope, header
from pgguard.web.oidc import OidcSignIn
from pgguard.web.pages import SESSION_SECONDS, register_pages


class DecisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=2000)


def _approver(request: Request, authorization: Annotated[str | None, Header()] = None) -> Approver:
    """The approver behind ``Authorization: Bearer <token>``, or 401."""
    directory: ApproverDirectory = request.app.state.approvers
    scheme, _, token = (authorization or "").partition(" ")
    found = directory.by_token(token.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        raise HTTPException(
            401, "unknown or missing approver token", headers={"WWW-Authenticate": "Bearer"}
        )
    return found


def _early_refusal(directory: ApproverDirectory) -> Callable[[Scope], str | None]:
    """API calls without a valid approver token are refused before their body is read.

    The Teams bot's endpoint (``/api/messages``) verifies its own bearer token before it reads
    the body; pages take small forms; both are bounded by ``max_body_bytes`` like everything."""

    def refusal(scope: Scope) -> str | None:
        path: str = scope.get("path", "")
        if path != "/api/requests" and not path.startswith("/api/requests/"):
            return None
        scheme, _, token = header(scope, b"authorization").partition(" ")
        if scheme.lower() == "bearer" and directory.by_token(token.strip()) is not None:
            return None
        return "unknown or missing approver token"

    return refusal


# Module level: FastAPI resolves these string annotations in the module's namespace.
Caller = Annotated[Approver, Depends(_approver)]


def create_app(
    service: ApprovalService,
    approvers: ApproverDirectory,
    *,
    session_secret: bytes | None = None,
    public_url: str = "",
    session_seconds: int = SESSION_SECONDS,
    oidc: OidcSignIn | None = None,
    max_body_bytes: int = 1024 * 1024,
) -> FastAPI:
    app = FastAPI(title="pgguard", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.approvers = approvers
    app.add_middleware(
        BoundedBodies, max_body_bytes=max_body_bytes, admit=_early_refusal(approvers)
    )
    register_pages(
        app,
        service,
        approvers,
        secret=session_secret,
        public_url=public_url,
        session_seconds=session_seconds,
        oidc=oidc,
    )

    @app.get("/api/requests")
    async def list_requests(
        _caller: Caller, state: Annotated[RequestState | None, Query()] = None
    ) -> list[dict[str, object]]:
        return [r.to_json() for r in await service.store.list(state)]

    @app.get("/api/requests/{request_id}")
    async def get_request(request_id: str, _caller: Caller) -> dict[str, object]:
        request = await service.store.get(request_id)
        if request is None:
            raise HTTPException(404, "no such request")
        return request.to_json()

    @app.post("/api/requests/{request_id}/approve")
    async def approve(
        request_id: str, caller: Caller, body: DecisionBody | None = None
    ) -> dict[str, object]:
        comment = body.reason if body is not None else ""
        request = await service.approve(request_id, caller, comment, "api")
        return request.to_json()

    @app.post("/api/requests/{request_id}/deny")
    async def deny(request_id: str, caller: Caller, body: DecisionBody) -> dict[str, object]:
        request = await service.deny(request_id, caller, body.reason, "api")
        return request.to_json()

    @app.exception_handler(PgGuardError)
    async def pgguard_error(_request: object, exc: PgGuardError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=_status_for(exc))

    return app


def _status_for(exc: PgGuardError) -> int:
    if isinstance(exc, RequestNotFound):
        return 404
    if isinstance(exc, SelfApproval | NotAllowedToApprove):
        return 403
    if isinstance(exc, AlreadyDecided | DuplicateApproval | IntegrityFailure):
        return 409
    return 503
