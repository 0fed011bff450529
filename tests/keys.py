"""A fixed state MAC key for tests that open the approval store or service directly.

pgguard itself loads its key from settings (`pgguard.approvals.signing.load_state_key`); tests
that build the parts by hand use this one, and the statement bytes a held request stands for.
"""

from __future__ import annotations

from pgguard.approvals.signing import StateKey

STATE_KEY = StateKey(bytes(range(32)))
STATEMENT = b"COPY finance.invoices TO STDOUT"
DIGEST = STATE_KEY.statement_digest(STATEMENT, None)
