"""The Teams bot channel (placeholder: interface only, being built)."""

from __future__ import annotations

from fastapi import FastAPI

from pgguard.approvals.model import ApprovalRequest
from pgguard.approvals.service import ApprovalService
from pgguard.settings import TeamsBotSettings
from pgguard.web.auth import ApproverDirectory


class TeamsBot:
    def __init__(self, settings: TeamsBotSettings, public_url: str) -> None:
        self.settings = settings
        self.public_url = public_url

    def register(
        self, app: FastAPI, service: ApprovalService, approvers: ApproverDirectory
    ) -> None:
        raise NotImplementedError

    async def request_created(self, request: ApprovalRequest) -> None:
        raise NotImplementedError

    async def request_updated(self, request: ApprovalRequest) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None
