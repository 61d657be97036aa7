"""Command line: `bap-engine serve | migrate | products ...` (main.py) and the commands that talk to
a running server over HTTP through the client (remote.py)."""

from bap_engine.cli.main import app, main

__all__ = ["app", "main"]
