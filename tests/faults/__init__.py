"""Fault injection on real components: Postgres outages, hung engines, a restarted dockerd, a full disk."""
