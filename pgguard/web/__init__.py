"""HTTP side of pgguard: the approval REST API (and, later, the approval page and Teams bot)."""
