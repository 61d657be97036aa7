"""Every domain error has an HTTP status, and the status is the one spec/API.md gives its code."""

from __future__ import annotations

import inspect

import pytest

from bap_engine import errors
from bap_engine.api.errors import STATUS

# spec/API.md, "Error codes"
SPEC_STATUS = {
    "VALIDATION_ERROR": 400, "PAYLOAD_TOO_LARGE": 413, "INVALID_PLATFORM_KEY": 401, "INVALID_ADMIN_KEY": 401,
    "POLICY_DENIED": 403, "PRODUCT_NOT_FOUND": 404, "ENGINE_NOT_FOUND": 404, "PRODUCT_SLUG_EXISTS": 409,
    "ENGINE_ALREADY_EXISTS": 409, "ENGINE_NOT_RUNNING": 409, "ENGINE_ALREADY_RUNNING": 409, "ENGINE_BUSY": 409,
    "QUOTA_EXCEEDED": 429, "RATE_LIMITED": 429, "INTERNAL_ERROR": 500, "BACKEND_ERROR": 502,
    "PORT_EXHAUSTION": 503, "SERVICE_UNAVAILABLE": 503, "BOOT_TIMEOUT": 504, "WEBHOOK_NOT_FOUND": 404,
}


def _subclasses(cls: type[errors.BapError]) -> list[type[errors.BapError]]:
    found: list[type[errors.BapError]] = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


ALL_ERRORS = sorted({c for c in _subclasses(errors.BapError) if c.__module__ == errors.__name__},
                    key=lambda c: c.__name__)
MODULE_ERRORS = sorted((obj for _, obj in inspect.getmembers(errors, inspect.isclass)
                        if issubclass(obj, errors.BapError) and obj is not errors.BapError), key=lambda c: c.__name__)


def test_every_error_class_is_found() -> None:
    assert ALL_ERRORS == MODULE_ERRORS
    assert {c.__name__ for c in ALL_ERRORS} == set(errors.__all__) - {"BapError"}


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_has_the_spec_status(cls: type[errors.BapError]) -> None:
    assert cls in STATUS, f"{cls.__name__} has no HTTP status in api.errors.STATUS"
    assert STATUS[cls] == SPEC_STATUS[cls.code]
    assert cls.__doc__, "each error says when it is raised"
    assert cls.default_message and "\n" not in cls.default_message


def test_codes_are_one_to_one_with_the_spec() -> None:
    codes = [c.code for c in ALL_ERRORS]
    assert len(codes) == len(set(codes))
    assert set(codes) == set(SPEC_STATUS)
    assert set(STATUS) == set(ALL_ERRORS)


def test_no_domain_error_is_an_http_exception() -> None:
    from starlette.exceptions import HTTPException

    for cls in ALL_ERRORS:
        assert not issubclass(cls, HTTPException)


@pytest.mark.parametrize(("given", "expected"), [(-5, 1), (0, 1), (1, 1), (30, 30), (60, 60), (61, 60), (10**6, 60)])
def test_retry_after_is_whole_seconds_between_1_and_60(given: int, expected: int) -> None:
    err = errors.RateLimited(given)
    assert err.retry_after_s == expected
    assert err.code == "RATE_LIMITED" and err.message == errors.RateLimited.default_message


def test_message_defaults_and_overrides() -> None:
    assert errors.EngineNotFound().message == "engine not found"
    assert str(errors.QuotaExceeded("custom")) == "custom"
