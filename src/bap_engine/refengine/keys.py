"""The engine key ring: which key hashes are accepted now, and live rotation.

Owns ``<data dir>/bap-keys.json`` ({current_hash, previous_hash, previous_valid_until,
retired_hashes}), written atomically (temp file, fsync, rename). Only sha256 hashes are ever stored
or compared; a plaintext key is hashed on arrival and never kept, logged or echoed.

Which hash wins at start: the file, so a restart keeps a rotated key, as long as the environment's
hash is one the file knows (current, previous or retired). A container restarted by Docker or
Kubernetes keeps the environment it was created with, so after two rotations its
``ENGINE_KEY_HASH`` is neither current nor previous, only retired, and must still lose. A hash the
file has never seen means the orchestrator re-created the engine with a new key: the environment
wins and the file is rewritten to match.
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

__all__ = ["KEY_FILE_NAME", "MAX_RETIRED", "KeyFileError", "KeyRing", "KeyState"]

KEY_FILE_NAME = "bap-keys.json"
MAX_RETIRED = 64  # superseded hashes remembered, oldest dropped first
_log = logging.getLogger("bap_refengine.keys")


class KeyFileError(Exception):
    """Raised when there is no usable key: no environment hash and no readable key file."""


def _hash_field(raw: dict[str, object], name: str) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not is_key_hash(value):
        raise ValueError(f"{name} malformed")
    return value.lower()


class KeyState(NamedTuple):
    """The persisted key material. ``previous_valid_until`` is a Unix time in seconds."""

    current_hash: str
    previous_hash: str | None = None
    previous_valid_until: float | None = None
    retired_hashes: tuple[str, ...] = ()  # every hash that was ever current, oldest first

    def knows(self, key_hash: str) -> bool:
        """True when ``key_hash`` is, or once was, this engine's key hash."""
        return key_hash in (self.current_hash, self.previous_hash) or key_hash in self.retired_hashes

    def superseded_by(self, new_hash: str, previous_valid_until: float) -> KeyState:
        """The state after ``new_hash`` replaces the current hash."""
        retired = tuple(h for h in (*self.retired_hashes, self.current_hash) if h != new_hash)
        return KeyState(new_hash, self.current_hash, previous_valid_until, retired[-MAX_RETIRED:])

    def to_json(self) -> dict[str, object]:
        """The on-disk form."""
        return {
            "current_hash": self.current_hash,
            "previous_hash": self.previous_hash,
            "previous_valid_until": self.previous_valid_until,
            "retired_hashes": list(self.retired_hashes),
        }

    @classmethod
    def from_json(cls, raw: object) -> KeyState:
        """Parse the on-disk form; raises ValueError when it is malformed."""
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        current = _hash_field(raw, "current_hash")
        if current is None:
            raise ValueError("current_hash missing")
        previous = _hash_field(raw, "previous_hash")
        until = raw.get("previous_valid_until")
        if until is not None and (isinstance(until, bool) or not isinstance(until, int | float)):
            raise ValueError("previous_valid_until malformed")
        retired = raw.get("retired_hashes", [])
        if not isinstance(retired, list) or not all(is_key_hash(h) for h in retired):
            raise ValueError("retired_hashes malformed")
        if previous is None or until is None:
            previous, until = None, None
        return cls(current, previous, None if until is None else float(until), tuple(h.lower() for h in retired))


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
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
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
        if stored is not None and (env_hash is None or stored.knows(env_hash)):
            return cls(path, stored, clock)
        if env_hash is None:
            raise KeyFileError("no key: set ENGINE_KEY_HASH (or ENGINE_API_KEY for development)")
        if stored is None:
            return cls(path, KeyState(current_hash=env_hash), clock)
        _log.info("environment key hash is newer than %s; using it", KEY_FILE_NAME)
        ring = cls(path, stored.superseded_by(env_hash, previous_valid_until=clock()), clock)
        _write_atomic(path, ring._state)
        return ring

    def accepts(self, key: bytes | None, *, current_only: bool = False) -> bool:
        """True when sha256(key) matches the current hash, or (unless ``current_only``) the previous
        one inside its overlap window."""
        if not key:
            return False
        offered = hashlib.sha256(key).hexdigest()
        state = self._state
        # Both comparisons always run, in constant time, so timing reveals nothing about either hash.
        ok_current = hmac.compare_digest(offered, state.current_hash)
        ok_previous = hmac.compare_digest(offered, state.previous_hash or "")
        in_window = state.previous_valid_until is not None and self._clock() < state.previous_valid_until
        return ok_current or (ok_previous and in_window and not current_only)

    def rotate(self, new_hash: str, overlap_seconds: int) -> None:
        """Make ``new_hash`` current; the old hash stays valid for ``overlap_seconds`` (0 = not at all).

        Persists before switching, so an answered rotation always survives a restart. Rotating to
        the hash already current changes nothing (a retried rotation must not cut short the
        previous key's window).
        """
        if new_hash.lower() == self._state.current_hash:
            return
        new_state = self._state.superseded_by(new_hash.lower(), self._clock() + overlap_seconds)
        _write_atomic(self._path, new_state)
        self._state = new_state
