"""The engine process: wire the settings, SQLite, key ring and HTTP server, and run until a signal.

Owns process start and stop: read the environment, open SQLite and the key ring, serve HTTP until
SIGTERM or SIGINT, then close SQLite. ``main`` returns the exit code: 0 after a clean stop, 1 when
the data or the port cannot be opened, 2 on a configuration error (the message names the variable,
never its value). Logs go to stderr; ``LOG_LEVEL`` (default INFO) sets their level.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import sys

from .config import ConfigError, EngineConfig, load_config
from .keys import KeyFileError, KeyRing
from .routes import Routes
from .server import HttpServer
from .store import MessageStore

__all__ = ["main"]

_log = logging.getLogger("bap_refengine")


async def _run(config: EngineConfig) -> None:
    store = MessageStore.open(config.db_path)
    try:
        keys = KeyRing.load(config.data_dir, config.key_hash)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        routes = Routes(config, keys, store)
        server = HttpServer(routes, config.host, config.port, config.shutdown_grace_seconds)
        await server.serve(stop)
        _log.info("stopped")
    finally:
        store.close()


def main() -> int:
    """Run the engine; returns the process exit code."""
    level = os.environ.get("LOG_LEVEL", "").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(os.environ)
        asyncio.run(_run(config))
    except (ConfigError, KeyFileError) as exc:
        _log.error("configuration error: %s", exc)
        return 2
    except (OSError, sqlite3.Error) as exc:
        _log.error("cannot start: %s", exc)
        return 1
    return 0
