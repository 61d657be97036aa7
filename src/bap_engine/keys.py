"""Keys: platform and engine key generation, hashing, and Fernet sealing of engine keys.

The master key is passed in; this module never reads configuration.
"""

from __future__ import annotations

import hashlib
import secrets

from cryptography.fernet import Fernet, InvalidToken

__all__ = ["new_platform_key", "new_engine_key", "hash_key", "KeySealer"]


def new_platform_key() -> str:
    return "pk-sept-" + secrets.token_urlsafe(32)


def new_engine_key() -> str:
    return "sk-sept-" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """SHA-256 hex of a key, as stored and as engines compare."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeySealer:
    """Encrypts engine keys at rest with the master key (Fernet)."""

    def __init__(self, master_key: str) -> None:
        self._fernet = Fernet(master_key.encode())

    def seal(self, key: str) -> str:
        return self._fernet.encrypt(key.encode()).decode()

    def open(self, token: str) -> str:
        """Decrypt an engine key. Raises ValueError if the master key does not match."""
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ValueError("engine key cannot be decrypted with this master key") from None
