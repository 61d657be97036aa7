"""Key generation, hashing and sealing (with a previous master key during a rotation)."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography.fernet import Fernet

from bap_engine.config import ConfigError, load_settings
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


# ---- a master-key rotation: the previous key opens, the current one seals ------------------------
def test_sealer_with_previous_opens_both_and_seals_with_the_new_key() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    under_old, under_new = KeySealer(old).seal("sk-sept-old"), KeySealer(new).seal("sk-sept-new")
    sealer = KeySealer(new, old)
    assert sealer.has_previous and not KeySealer(new).has_previous
    assert sealer.open(under_old) == "sk-sept-old" and sealer.open(under_new) == "sk-sept-new"
    token = sealer.seal("sk-sept-fresh")
    assert KeySealer(new).open(token) == "sk-sept-fresh"  # the new key alone opens what it seals
    with pytest.raises(ValueError):
        KeySealer(old).open(token)
    assert sealer.is_current(under_new) and sealer.is_current(token) and not sealer.is_current(under_old)


def test_reseal_moves_a_value_to_the_new_key_and_leaves_a_current_one() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    sealer = KeySealer(new, old)
    under_old = KeySealer(old).seal("sk-sept-abc")
    moved = sealer.reseal(under_old)
    assert moved is not None and moved != under_old
    assert KeySealer(new).open(moved) == "sk-sept-abc"
    assert sealer.reseal(moved) is None  # already current: nothing to write
    assert KeySealer(new).reseal(KeySealer(new).seal("x")) is None


def test_a_value_sealed_under_neither_key_fails_clearly() -> None:
    old, new, other = (Fernet.generate_key().decode() for _ in range(3))
    key = new_engine_key()
    token = KeySealer(other).seal(key)
    sealer = KeySealer(new, old)
    for call in (sealer.open, sealer.reseal, KeySealer(new).reseal):
        with pytest.raises(ValueError) as info:
            call(token)
        text = str(info.value)
        assert "cannot be decrypted" in text
        for secret in (key, token, old, new, other):
            assert secret not in text
        err = info.value  # no chained InvalidToken shown with it
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert not sealer.is_current(token)
    with pytest.raises(ValueError, match="previous master key"):
        sealer.open("not a token")


def test_previous_master_key_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    monkeypatch.setenv("ORCH_MASTER_KEY", new)
    monkeypatch.setenv("ORCH_MASTER_KEY_PREVIOUS", old)
    s = load_settings()
    assert (s.master_key, s.master_key_previous) == (new, old)
    assert old not in repr(s) and old not in str(s)
    monkeypatch.setenv("ORCH_MASTER_KEY_PREVIOUS", "")  # emptied instead of removed: unset
    assert load_settings().master_key_previous is None
    monkeypatch.delenv("ORCH_MASTER_KEY_PREVIOUS")
    assert load_settings().master_key_previous is None
    monkeypatch.setenv("ORCH_MASTER_KEY_PREVIOUS", "not-a-fernet-key-but-secret")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "ORCH_MASTER_KEY_PREVIOUS" in str(info.value) and "not-a-fernet-key-but-secret" not in str(info.value)
