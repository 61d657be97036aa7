"""Policy documents (the quota itself is enforced under the product lock by lifecycle: tests/api)."""

from __future__ import annotations

import pytest

from bap_engine.errors import ValidationFailed
from bap_engine.policy import Policy, parse_policy


def test_empty_policy_means_no_limits() -> None:
    p = parse_policy({})
    assert (p.max_engines, p.rate_limit_rpm, p.engine_version, p.warm_pool) == (None, None, None, None)


def test_full_policy() -> None:
    p = parse_policy({"max_engines": 3, "rate_limit_rpm": 60, "engine_version": "img:1.2", "warm_pool": 0})
    assert (p.max_engines, p.rate_limit_rpm, p.engine_version, p.warm_pool) == (3, 60, "img:1.2", 0)
    with pytest.raises((TypeError, ValueError)):
        setattr(p, "max_engines", 4)  # frozen  # noqa: B010


@pytest.mark.parametrize(
    ("raw", "where"),
    [({"bogus": 1}, "bogus"), ({"max_engines": "5"}, "max_engines"), ({"max_engines": True}, "max_engines"),
     ({"max_engines": 2.0}, "max_engines"), ({"max_engines": -1}, "max_engines"),
     ({"max_engines": 2**31}, "max_engines"), ({"rate_limit_rpm": 0}, "rate_limit_rpm"),
     ({"rate_limit_rpm": "yes"}, "rate_limit_rpm"), ({"rate_limit_rpm": 2**40}, "rate_limit_rpm"),
     ({"engine_version": ""}, "engine_version"), ({"engine_version": 1}, "engine_version"),
     ({"engine_version": "a\x00"}, "engine_version"), ({"engine_version": "x" * 201}, "engine_version"),
     ({"warm_pool": -1}, "warm_pool"), ({"warm_pool": 101}, "warm_pool"), ({"warm_pool": 2.5}, "warm_pool"),
     ({"warm_pool": None, "x": 1}, "x")],
)
def test_bad_policies(raw: dict[str, object], where: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_policy(raw)
    assert info.value.message.startswith(f"policy.{where}")
    assert "\n" not in info.value.message


@pytest.mark.parametrize("raw", [None, [], "max_engines=1", 5, [("max_engines", 1)]])
def test_policy_must_be_an_object(raw: object) -> None:
    with pytest.raises(ValidationFailed, match="JSON object"):
        parse_policy(raw)


def test_null_values_mean_unset() -> None:
    assert parse_policy({"max_engines": None}) == Policy()


def test_warm_pool_takes_0_to_100() -> None:
    assert parse_policy({"warm_pool": 100}).warm_pool == 100
    with pytest.raises(ValidationFailed, match="warm_pool"):
        parse_policy({"warm_pool": 101})
