"""Keys: platform and engine key generation, hashing, and Fernet sealing of engine keys.

The master key is passed in; this module never reads configuration.
"""

from __future__ import annotations

import hashlib
import secrets

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

__all__ = ["new_platform_key", "new_engine_key", "hash_key", "KeySealer"]


def new_platform_key() -> str:
    return "pk-sept-" + secrets.token_urlsafe(32)


def new_engine_key() -> str:
    return "sk-sept-" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """SHA-256 hex of a key, as stored and as engines compare."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeySealer:
    """Encrypts engine keys (and webhook secrets) at rest with the master key (Fernet).

    With `previous` (ORCH_MASTER_KEY_PREVIOUS, during a master-key rotation) values sealed under
    either key are opened (MultiFernet: the current key is tried first); values are always sealed
    under the current one. No message of this class carries a key, a token or a plaintext."""

    def __init__(self, master_key: str, previous: str | None = None) -> None:
        self._current = Fernet(master_key.encode())
        self._previous = Fernet(previous.encode()) if previous else None
        self._reader: Fernet | MultiFernet = (
            MultiFernet([self._current, self._previous]) if self._previous else self._current)

    @property
    def has_previous(self) -> bool:
        """Whether a previous master key is accepted for reading."""
        return self._previous is not None

    def seal(self, key: str) -> str:
        return self._current.encrypt(key.encode()).decode()

    def open(self, token: str) -> str:
        """Decrypt an engine key. Raises ValueError if neither master key matches."""
        try:
            return self._reader.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ValueError(self._mismatch()) from None

    def is_current(self, token: str) -> bool:
        """Whether `token` opens with the current master key alone."""
        try:
            self._current.decrypt(token.encode())
        except InvalidToken:
            return False
        return True

    def reseal(self, token: str) -> str | None:
        """`token` sealed under the current master key: None when it already is, else a new token
        (it was sealed under the previous key). Raises ValueError if neither key opens it."""
        if self.is_current(token):
            return None
        if self._previous is None:
            raise ValueError(self._mismatch())
        try:
            plain = self._previous.decrypt(token.encode())
        except InvalidToken:
            raise ValueError(self._mismatch()) from None
        return self._current.encrypt(plain).decode()

    def _mismatch(self) -> str:
        if self._previous is None:
            return "engine key cannot be decrypted with this master key"
        return "sealed value cannot be decrypted with the master key nor the previous master key"
