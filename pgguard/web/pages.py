"""The approval pages: a request's review page, the list of pending ones, sign-in.

Server-rendered (Jinja2, autoescaped). A pending request's page carries one small same-origin
script (``/assets/status.js``, no framework) that polls ``/requests/{id}/status`` (JSON) and
updates the state and time left in place, so a decision made elsewhere (API, CLI, another
approver) or an expiry shows without reloading the form and losing a comment being typed. The
list of pending requests still refreshes itself (it has no form).

Sign-in: with ``[oidc]`` configured, approvers sign in with the identity provider only
(authorization code flow with PKCE, see `pgguard.web.oidc`); the sign-in in progress travels in
a signed ten-minute cookie (``pgguard_oidc``, sent to the callback path only) and is used once.
Without an identity provider (the demo), an approver signs in with their approver token (the one
the API and CLI use, which keep working either way). The session is a short-lived signed cookie
(HMAC-SHA256 over the approver and expiry; ``HttpOnly``, ``SameSite=Lax``, ``Secure`` when the
public URL is https). Every decision is a POST carrying a CSRF token bound to the session,
checked in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Protocol
from urllib.parse import quote

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from pgguard.approvals.cards import NO_REASON, detail_facts, touches_text, wants_text
from pgguard.approvals.model import ApprovalRequest, Approver
from pgguard.approvals.service import ApprovalService
from pgguard.errors import PgGuardError
from pgguard.web.auth import ApproverDirectory
from pgguard.web.oidc import (
    OIDC_CALLBACK_PATH,
    PENDING_SECONDS,
    OidcSignIn,
    PendingSignIn,
    SignInError,
)

log = logging.getLogger(__name__)

COOKIE = "pgguard_session"
PENDING_COOKIE = "pgguard_oidc"
SESSION_SECONDS = 1800
REFRESH_SECONDS = 5

_templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
)


class Sessions:
    """Signed session cookies and CSRF tokens.

    The cookie carries the approver as it was verified at sign-in (id, name, groups, aliases) and
    how (``token`` or ``oidc``), so an identity admitted by its group claims needs no server-side
    state. Sessions are short-lived (``http.session_seconds``) for that reason.
    """

    def __init__(self, secret: bytes, *, secure: bool, lifetime: int = SESSION_SECONDS) -> None:
        self._secret = secret
        self.secure = secure
        self.lifetime = lifetime

    def issue(self, approver: Approver, via: str) -> str:
        body = {
            "id": approver.id,
            "name": approver.name,
            "groups": list(approver.groups),
            "aliases": list(approver.aliases),
            "via": via,
            "exp": int(time.time()) + self.lifetime,
        }
        payload = base64.urlsafe_b64encode(json.dumps(body).encode()).decode()
        return f"{payload}.{self._sign(payload)}"

    def read(self, cookie: str | None) -> tuple[Approver, str, str] | None:
        """(approver, how they signed in, session value) for a valid, unexpired cookie."""
        if not cookie or "." not in cookie:
            return None
        payload, signature = cookie.rsplit(".", 1)
        if not _same(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload.encode()))
            if not isinstance(data, dict) or int(data["exp"]) < time.time():
                return None
            approver = Approver(
                str(data["id"]),
                str(data["name"]),
                tuple(str(g) for g in data["groups"]),
                tuple(str(a) for a in data["aliases"]),
            )
            return approver, str(data["via"]), cookie
        except (ValueError, KeyError, TypeError):
            return None

    def csrf(self, session: str) -> str:
        return self._sign(f"csrf:{session}")

    def check_csrf(self, session: str, token: str) -> bool:
        return _same(token, self.csrf(session))

    def sign(self, text: str) -> str:
        return self._sign(text)

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode(), hashlib.sha256).hexdigest()


def register_pages(
    app: FastAPI,
    service: ApprovalService,
    approvers: ApproverDirectory,
    *,
    secret: bytes | None,
    public_url: str,
    session_seconds: int = SESSION_SECONDS,
    oidc: OidcSignIn | None = None,
) -> None:
    sessions = Sessions(
        secret or secrets.token_bytes(32),
        secure=public_url.startswith("https"),
        lifetime=session_seconds,
    )

    def signed_in(request: Request) -> tuple[Approver, str] | None:
        found = sessions.read(request.cookies.get(COOKIE))
        if found is None:
            return None
        approver, via, session = found
        if via == "token":
            # A token approver removed from the configuration loses the page with it.
            current = approvers.by_id(approver.id)
            return (current, session) if current is not None else None
        return approver, session

    def page(name: str, status: int = 200, /, **context: object) -> HTMLResponse:
        html = _templates.get_template(name).render(time_left=_time_left, **context)
        return HTMLResponse(html, status_code=status, headers=_SECURITY_HEADERS)

    def to_login(next_path: str) -> RedirectResponse:
        return RedirectResponse(f"/login?next={quote(next_path)}", status_code=303)

    @app.get("/login")
    async def login_form(next: str = "/requests") -> HTMLResponse:
        return page("login.html", next=_local(next), oidc=oidc is not None)

    if oidc is not None:
        _register_oidc(app, oidc, approvers, sessions, page)

    @app.post("/login")
    async def login(
        token: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/requests",
    ) -> Response:
        if oidc is not None:
            # One way in per deployment: with an identity provider, a leaked approver token must
            # not also open the page (it still works for the API and the CLI, by design).
            return page(
                "signin_problem.html",
                403,
                heading="Token sign-in is off",
                message="This pgguard signs approvers in with the organisation's identity "
                "provider. Approver tokens work for the API and the CLI only.",
                next=_local(next),
            )
        approver = approvers.by_token(token) if token else None
        if approver is None:
            return page(
                "login.html",
                401,
                next=_local(next),
                flash="Unknown approver token.",
                flash_kind="error",
            )
        response = RedirectResponse(_local(next), status_code=303)
        response.set_cookie(
            COOKIE,
            sessions.issue(approver, "token"),
            max_age=sessions.lifetime,
            httponly=True,
            samesite="lax",
            secure=sessions.secure,
        )
        return response

    @app.post("/logout")
    async def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
        who = signed_in(request)
        response = RedirectResponse("/login", status_code=303)
        if who is not None and sessions.check_csrf(who[1], csrf):
            response.delete_cookie(COOKIE)
        return response

    @app.get("/requests")
    async def pending(request: Request) -> Response:
        who = signed_in(request)
        if who is None:
            return to_login("/requests")
        items = await service.store.list(None)
        waiting = [r for r in items if r.state == "pending"]
        return page(
            "list.html",
            approver=who[0],
            csrf=sessions.csrf(who[1]),
            requests=waiting,
            refresh=REFRESH_SECONDS,
        )

    @app.get("/requests/{request_id}")
    async def review(request: Request, request_id: str) -> Response:
        who = signed_in(request)
        if who is None:
            return to_login(f"/requests/{request_id}")
        found = await service.store.get(request_id)
        if found is None:
            return page(
                "list.html",
                404,
                approver=who[0],
                csrf=sessions.csrf(who[1]),
                requests=[],
                flash="No such request.",
                flash_kind="error",
            )
        return page("request.html", approver=who[0], csrf=sessions.csrf(who[1]), **_shown(found))

    @app.get("/requests/{request_id}/status")
    async def status(request: Request, request_id: str) -> Response:
        if signed_in(request) is None:
            return JSONResponse({"detail": "sign in"}, status_code=401, headers=_SECURITY_HEADERS)
        found = await service.store.get(request_id)
        if found is None:
            return JSONResponse({"detail": "no such request"}, 404, headers=_SECURITY_HEADERS)
        title, when = _when(found)
        body = {"state": found.state.value, "when_title": title, "when": when}
        return JSONResponse(body, headers=_SECURITY_HEADERS)

    @app.get("/assets/status.js")
    async def status_script() -> Response:
        return Response(_STATUS_SCRIPT, media_type="text/javascript", headers=_SECURITY_HEADERS)

    async def decide(
        request: Request, request_id: str, verb: str, csrf: str, comment: str
    ) -> Response:
        who = signed_in(request)
        if who is None:
            return to_login(f"/requests/{request_id}")
        approver, session = who
        if not sessions.check_csrf(session, csrf):
            return page(
                "list.html",
                403,
                approver=approver,
                csrf=sessions.csrf(session),
                requests=[],
                flash="The form expired; reload the page and try again.",
                flash_kind="error",
            )
        try:
            if verb == "approve":
                await service.approve(request_id, approver, comment, "page")
            else:
                await service.deny(request_id, approver, comment, "page")
        except PgGuardError as exc:
            found = await service.store.get(request_id)
            if found is None:
                return to_login("/requests")
            return page(
                "request.html",
                409 if "already" in exc.message else 403,
                approver=approver,
                csrf=sessions.csrf(session),
                **_shown(found),
                flash=exc.message,
                flash_kind="error",
            )
        return RedirectResponse(f"/requests/{request_id}", status_code=303)

    @app.post("/requests/{request_id}/approve")
    async def approve(
        request: Request,
        request_id: str,
        csrf: Annotated[str, Form()] = "",
        comment: Annotated[str, Form(max_length=2000)] = "",
    ) -> Response:
        return await decide(request, request_id, "approve", csrf, comment)

    @app.post("/requests/{request_id}/deny")
    async def deny(
        request: Request,
        request_id: str,
        csrf: Annotated[str, Form()] = "",
        comment: Annotated[str, Form(max_length=2000)] = "",
    ) -> Response:
        return await decide(request, request_id, "deny", csrf, comment)


class _Page(Protocol):
    def __call__(self, name: str, status: int = 200, /, **context: object) -> HTMLResponse: ...


def _register_oidc(
    app: FastAPI,
    oidc: OidcSignIn,
    approvers: ApproverDirectory,
    sessions: Sessions,
    page: _Page,
) -> None:
    """GET /login/oidc starts a sign-in at the provider; GET /auth/callback completes it."""

    def cookie_for(pending: PendingSignIn) -> str:
        payload = pending.dumps()
        # Its own signing context, so a pending sign-in can never pass for a session or back.
        return f"{payload}.{sessions.sign('oidc-pending:' + payload)}"

    def pending_of(cookie: str | None) -> PendingSignIn | None:
        if not cookie or "." not in cookie:
            return None
        payload, signature = cookie.rsplit(".", 1)
        if not _same(signature, sessions.sign("oidc-pending:" + payload)):
            return None
        try:
            return PendingSignIn.loads(payload)
        except SignInError:
            return None

    def forget_pending(response: Response) -> Response:
        response.delete_cookie(
            PENDING_COOKIE,
            path=OIDC_CALLBACK_PATH,
            httponly=True,
            samesite="lax",
            secure=sessions.secure,
        )
        return response

    def problem(
        status: int, heading: str, message: str, next_path: str, **extra: object
    ) -> Response:
        shown = page(
            "signin_problem.html", status, heading=heading, message=message, next=next_path, **extra
        )
        return forget_pending(shown)

    @app.get("/login/oidc")
    async def oidc_begin(next: str = "/requests") -> Response:
        target = _local(next)
        try:
            url, pending = await oidc.begin(target)
        except SignInError as exc:
            log.warning("OIDC sign-in could not start: %s", exc.message)
            return problem(
                exc.status, _HEADINGS.get(exc.status, "Sign-in failed"), exc.message, target
            )
        response = RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})
        response.set_cookie(
            PENDING_COOKIE,
            cookie_for(pending),
            max_age=PENDING_SECONDS,
            path=OIDC_CALLBACK_PATH,  # the browser shows it to the callback and nothing else
            httponly=True,
            samesite="lax",  # Lax: sent on the provider's top-level redirect back to us
            secure=sessions.secure,
        )
        return response

    @app.get(OIDC_CALLBACK_PATH)
    async def oidc_callback(request: Request) -> Response:
        pending = pending_of(request.cookies.get(PENDING_COOKIE))
        if pending is None:
            return problem(
                400,
                _HEADINGS[400],
                "This browser has no sign-in in progress here: it expired after ten minutes, was "
                "already completed, or was started elsewhere. Start the sign-in again.",
                "/requests",
            )
        target = _local(pending.next_path)
        try:
            identity = await oidc.finish(pending, request.query_params)
        except SignInError as exc:
            log.warning("OIDC sign-in failed: %s", exc.message)
            return problem(
                exc.status, _HEADINGS.get(exc.status, "Sign-in failed"), exc.message, target
            )
        approver = approvers.by_identity(identity)
        if approver is None:
            log.warning(
                "OIDC sign-in refused: tenant %s subject %s is not an approver",
                identity.tenant,
                identity.subject,
            )
            shown = identity.name or identity.username or identity.subject
            if identity.username and identity.username != shown:
                shown = f"{shown} ({identity.username})"
            return problem(
                403,
                _HEADINGS[403],
                "This account may not decide requests on this pgguard. An administrator can "
                f"add its object id {identity.subject} as an approver's subject, or the account "
                "to one of the allowed groups or app roles.",
                target,
                who=shown,
            )
        response = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
        response.set_cookie(
            COOKIE,
            sessions.issue(approver, "oidc"),
            max_age=sessions.lifetime,
            httponly=True,
            samesite="lax",
            secure=sessions.secure,
        )
        log.info("approver %s signed in through the identity provider", approver.id)
        return forget_pending(response)


_HEADINGS = {
    400: "This sign-in cannot be completed",
    401: "Sign-in failed",
    403: "Not an approver",
    502: "The identity provider could not be reached",
}

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _same(presented: str, expected: str) -> bool:
    """Constant-time comparison that also takes hostile, non-ASCII input (compare_digest on str
    raises TypeError for it)."""
    return hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode("utf-8"))


def _local(path: str) -> str:
    """Only same-site paths as redirect targets (no open redirect). Browsers read ``/\\host``
    like ``//host`` and drop tabs and newlines, so those are refused too."""
    safe = (
        path.startswith("/")
        and not path.startswith(("//", "/\\"))
        and not any(ord(c) < 0x20 or c == "\x7f" for c in path)
    )
    return path if safe else "/requests"


_STATUS_SCRIPT = (Path(__file__).parent / "static" / "status.js").read_text(encoding="utf-8")


def _shown(request: ApprovalRequest) -> dict[str, object]:
    """What request.html shows besides the request itself."""
    title, when = _when(request)
    return {
        "r": request,
        "touches": touches_text(request.touches),
        "details": detail_facts(request.touches),
        "wants": wants_text(request.categories),
        "no_reason": NO_REASON,
        "when_title": title,
        "when": when,
    }


def _when(request: ApprovalRequest) -> tuple[str, str]:
    """The time row, named truthfully: time left, decided at, expired at, cancelled at."""
    stamp = "%Y-%m-%d %H:%M:%S UTC"
    if request.state == "pending":
        return "Time left", _time_left(request)
    moment = request.decided_at or request.expires_at
    title = {"expired": "Expired at", "cancelled": "Cancelled at"}.get(request.state, "Decided at")
    return title, moment.astimezone(UTC).strftime(stamp)


def _time_left(request: ApprovalRequest) -> str:
    seconds = int((request.expires_at - datetime.now(UTC)).total_seconds())
    if seconds <= 0:
        return "expiring now"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"
