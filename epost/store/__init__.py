"""The queue store: queued messages in one SQLite database (SPEC §4)."""
