"""One-click approval inside Teams through a Teams bot (Azure Bot, Universal Actions).

Pieces, each in its own module: `transport` (one HTTP exchange, retry timing), `credentials`
(the bot's client-credentials token, by secret or certificate), `connector` (posting and
updating messages through the Bot Connector REST API), `cards` (the Approve/Deny card),
`channel_auth` (verifying the Bot Connector's JWT and the activity it carries), `endpoint`
(``POST /api/messages``: replay refusal, clicker mapping, decisions) and `bot` (`TeamsBot`, the
notifier and endpoint together, as `pgguard.proxy.assembly` uses it).
"""

from __future__ import annotations

from pgguard.teams_bot.bot import TeamsBot
from pgguard.teams_bot.endpoint import MESSAGES_PATH

__all__ = ["MESSAGES_PATH", "TeamsBot"]
