"""The engine key ring: which key hashes are accepted now, and live rotation.

Owns ``<data dir>/bap-keys.json`` ({current_hash, previous_hash, previous_valid_until}), written
atomically (temp file, fsync, rename). Only sha256 hashes are ever stored or compared; a plaintext
key is hashed on arrival and never kept, logged or echoed.

Which hash wins at start: the file, so a restart keeps a rotated key; unless the environment's
hash is neither the file's current nor its previous hash, in which case the orchestrator has
re-created the engine with a newer key and the environment wins (the file is rewritten to match).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from typing import NamedTuple

from .config import is_key_hash

__all__ = ["KEY_FILE_NAME", "KeyFileError", "KeyRing", "KeyState"]

KEY_FILE_NAME = "bap-keys.json"
_log = logging.getLogger("bap_refengine.keys")


class KeyFileError(Exception):
    """Raised when there is no usable key: no environment hash and no readable key file."""


class KeyState(NamedTuple):
    """The persisted key material. ``previous_valid_until`` is a Unix time in seconds."""

    current_hash: str
    previous_hash: str | None = None
    previous_valid_until: float | None = None

    def to_json(self) -> dict[str, object]:
        """The on-disk form."""
        return {
            "current_hash": self.current_hash,
            "previous_hash": self.previous_hash,
            "previous_valid_until": self.previous_valid_until,
        }

    @classmethod
    def from_json(cls, raw: object) -> KeyState:
        """Parse the on-disk form; raises ValueError when it is malformed."""
        if not isinstance(raw, dict) or not is_key_hash(raw.get("current_hash")):
            raise ValueError("current_hash missing or malformed")
        previous = raw.get("previous_hash")
        until = raw.get("previous_valid_until")
        if previous is not None and not is_key_hash(previous):
            raise ValueError("previous_hash malformed")
        if until is not None and (isinstance(until, bool) or not isinstance(until, int | float)):
            raise ValueError("previous_valid_until malformed")
        return cls(
            current_hash=str(raw["current_hash"]).lower(),
            previous_hash=str(previous).lower() if previous is not None else None,
            previous_valid_until=float(until) if previous is not None and until is not None else None,
        )


def _read(path: str) -> KeyState | None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        return KeyState.from_json(json.loads(text))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        # A damaged file must not lock the orchestrator out when it can still supply the key.
        _log.warning("ignoring unreadable %s: %s", KEY_FILE_NAME, exc)
        return None


def _write_atomic(path: str, state: KeyState) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    data = json.dumps(state.to_json(), separators=(",", ":")).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    # fsync the directory too, so the rename itself survives a power cut.
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class KeyRing:
    """Accepts the current key hash, plus the previous one while its overlap window is open."""

    def __init__(self, path: str, state: KeyState, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._state = state
        self._clock = clock

    @classmethod
    def load(cls, data_dir: str, env_hash: str | None, clock: Callable[[], float] = time.time) -> KeyRing:
        """Pick the starting key state (see the module docstring); raises KeyFileError if none."""
        path = os.path.join(data_dir, KEY_FILE_NAME)
        stored = _read(path)
        if stored is not None and env_hash in (None, stored.current_hash, stored.previous_hash):
            return cls(path, stored, clock)
        if env_hash is None:
            raise KeyFileError("no key: set ENGINE_KEY_HASH (or ENGINE_API_KEY for development)")
        ring = cls(path, KeyState(current_hash=env_hash), clock)
        if stored is not None:
            _log.info("environment key hash is newer than %s; using it", KEY_FILE_NAME)
            _write_atomic(path, ring._state)
        return ring

    @property
    def state(self) -> KeyState:
        """The key material in force."""
        return self._state

    def accepts(self, key: bytes | None, *, current_only: bool = False) -> bool:
        """True when sha256(key) matches the current hash, or (unless ``current_only``) the previous
        one inside its overlap window."""
        if not key:
            return False
        offered = hashlib.sha256(key).hexdigest()
        # Compare against both hashes unconditionally so timing does not reveal which matched.
        ok_current = hmac.compare_digest(offered, self._state.current_hash)
        previous, until = self._state.previous_hash, self._state.previous_valid_until
        ok_previous = (
            not current_only
            and previous is not None
            and until is not None
            and hmac.compare_digest(offered, previous)
            and self._clock() < until
        )
        return ok_current or ok_previous

    def rotate(self, new_hash: str, overlap_seconds: int) -> None:
        """Make ``new_hash`` current; the old hash stays valid for ``overlap_seconds`` (0 = never).

        Persists before switching, so an answered rotation always survives a restart.
        """
        if overlap_seconds > 0:
            new_state = KeyState(new_hash.lower(), self._state.current_hash, self._clock() + overlap_seconds)
        else:
            new_state = KeyState(new_hash.lower())
        _write_atomic(self._path, new_state)
        self._state = new_state
