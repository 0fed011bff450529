"""Announcing one approval request through several notifiers (Teams webhook and Teams bot).

Each notifier already promises never to raise (a failed notification leaves the request pending
and decidable elsewhere), so fan-out runs them side by side and waits for all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pgguard.approvals.model import ApprovalRequest
from pgguard.approvals.service import Notifier


class FanOutNotifier:
    def __init__(self, notifiers: Sequence[Notifier]) -> None:
        self._notifiers = tuple(notifiers)

    async def request_created(self, request: ApprovalRequest) -> None:
        await asyncio.gather(*(n.request_created(request) for n in self._notifiers))

    async def request_updated(self, request: ApprovalRequest) -> None:
        await asyncio.gather(*(n.request_updated(request) for n in self._notifiers))
