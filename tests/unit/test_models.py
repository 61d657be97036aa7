"""API timestamps and request models."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from bap_engine.api.models import AdmitBody, ProvisionBody, RegisterBody, iso


def test_iso_is_utc_with_z() -> None:
    assert iso(datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)) == "2024-05-06T07:08:09.123Z"
    assert iso(datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)) == "2024-05-06T07:08:09.000Z"
    assert iso(None) is None


def test_iso_converts_other_zones_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert iso(datetime(2024, 5, 6, 9, 8, 9, 500000, tzinfo=plus_two)) == "2024-05-06T07:08:09.500Z"


@pytest.mark.parametrize("user_id", ["a", "A1", "user.name@example.com", "a:b-c_d", "9" * 128])
def test_valid_user_ids(user_id: str) -> None:
    assert ProvisionBody(user_id=user_id).user_id == user_id


@pytest.mark.parametrize("user_id", ["", "../x", "a/b", " a", "a b", "-a", ".a", "_a", "a" * 129, "a\n", "ü", "a\x00"])
def test_invalid_user_ids(user_id: str) -> None:
    with pytest.raises(ValidationError):
        ProvisionBody(user_id=user_id)


def test_strict_types_and_unknown_fields() -> None:
    for bad in ({"auto_provision": "yes"}, {"auto_wake": 1}, {"other": True}):
        with pytest.raises(ValidationError):
            AdmitBody.model_validate(bad)
    assert AdmitBody.model_validate({}) == AdmitBody(auto_provision=False, auto_wake=False)
    with pytest.raises(ValidationError):
        RegisterBody.model_validate({"slug": "ok", "display_name": "x", "extra": 1})
    with pytest.raises(ValidationError):
        RegisterBody.model_validate({"slug": "ok", "display_name": "a\x00b"})
