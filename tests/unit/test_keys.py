"""Key generation, hashing and sealing."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography.fernet import Fernet

from bap_engine.keys import KeySealer, hash_key, new_engine_key, new_platform_key

URLSAFE = re.compile(r"^[A-Za-z0-9_-]+$")


@pytest.mark.parametrize(("make", "prefix"), [(new_platform_key, "pk-sept-"), (new_engine_key, "sk-sept-")])
def test_key_format_and_entropy(make: object, prefix: str) -> None:
    assert callable(make)
    keys = {make() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith(prefix)
        body = key[len(prefix):]
        assert URLSAFE.fullmatch(body)
        assert len(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) >= 32


def test_hash_is_sha256_hex() -> None:
    assert hash_key("sk-sept-abc") == hashlib.sha256(b"sk-sept-abc").hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_key(new_engine_key()))
    assert hash_key("a") != hash_key("b")


def test_sealer_round_trip_and_ciphertext() -> None:
    sealer = KeySealer(Fernet.generate_key().decode())
    key = new_engine_key()
    token = sealer.seal(key)
    assert key not in token and token != sealer.seal(key)  # Fernet: random IV each time
    assert sealer.open(token) == key


def test_wrong_master_key_is_a_clean_error() -> None:
    key = new_engine_key()
    token = KeySealer(Fernet.generate_key().decode()).seal(key)
    other_master = Fernet.generate_key().decode()
    with pytest.raises(ValueError) as info:
        KeySealer(other_master).open(token)
    text = str(info.value)
    assert key not in text and token not in text and other_master not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__
