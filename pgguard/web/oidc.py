"""OpenID Connect sign-in for the approval page (placeholder: interface only, being built)."""

from __future__ import annotations

from pgguard.settings import OidcSettings

OIDC_CALLBACK_PATH = "/auth/callback"


class OidcSignIn:
    def __init__(self, settings: OidcSettings, redirect_uri: str) -> None:
        self.settings = settings
        self.redirect_uri = redirect_uri

    async def aclose(self) -> None:
        return None
