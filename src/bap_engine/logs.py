"""JSON logs, one object per line, with every secret scrubbed.

A line is `{"ts", "level", "logger", "msg", <extra fields>}`. A record logged with `exc_info` adds
`error` (the exception class name), `error_message` (its str) and `traceback` (the whole formatted
traceback, chained causes included, as one string); one logged with `stack_info` adds `stack`. The
line stays one line: newlines inside strings are JSON-escaped.

Callers pass ids only, never keys; as a second guard the formatter scrubs the line: platform and
engine keys (`pk-sept-…`, `sk-sept-…`), webhook secrets (`whsec_…`), Fernet tokens (`gAAAAA…`) and
Fernet keys (the master key's shape), and every value given to `register_secrets` (the configured
admin and master keys, which can be any string, so they are matched literally) become `[redacted]`,
wherever they are: message, extra fields, traceback. All of it is one compiled pattern.

The scrub is cheap where it matters (the request log is the only INFO line on the admit path): a
few substring tests over the finished line, then the pattern only if one of them hits; a line that
really matches is rebuilt field by field, so the result is always valid JSON.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType

import orjson

__all__ = ["configure_logging", "JsonFormatter", "register_secrets", "redact", "REDACTED"]

REDACTED = "[redacted]"
_SKIP = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_B64 = "[A-Za-z0-9_-]"
_NOT_B64 = "(?<![A-Za-z0-9_-])"
# Secret shapes. Keys are "pk-sept-"/"sk-sept-" + token_urlsafe(32); a Fernet token starts with
# version 0x80 and a big-endian timestamp whose high bytes are zero; a Fernet key is 32 bytes of
# url-safe base64 (43 characters and one "=") standing alone.
_SHAPES = (
    f"[ps]k-sept-{_B64}{{8,}}",
    "whsec_[A-Za-z0-9_+/=-]{8,}",
    f"gAAAAA{_B64}{{20,}}={{0,2}}",
    f"{_NOT_B64}{_B64}{{43}}=(?![A-Za-z0-9_=-])",
)
# A registered value shorter than this would also match ordinary words (and is guessable anyway).
_MIN_LITERAL = 6

_lock = threading.Lock()
_literals: set[str] = set()
# Every shape above contains one of these; a plain substring test is ~10x cheaper than the regex
# (CPython's re tries each alternative at every position), so the regex runs only after a hit.
_SHAPE_NEEDLES = ("k-sept-", "whsec_", "gAAAAA", "=")


class _Scrubber:
    """The substrings that trigger the scrub, and the one pattern it applies, compiled on first
    need: a process that registers many values (a test session) compiles only when a line hits."""

    def __init__(self, literals: set[str]) -> None:
        ordered = sorted(literals, key=len, reverse=True)  # a value containing another goes whole
        self.needles = (*_SHAPE_NEEDLES, *ordered)
        self._source = "|".join((*_SHAPES, *map(re.escape, ordered)))
        self._pattern: re.Pattern[str] | None = None

    @property
    def pattern(self) -> re.Pattern[str]:
        if self._pattern is None:  # two threads may both compile: same result, no harm
            self._pattern = re.compile(self._source)
        return self._pattern

    def may_hold_secret(self, line: str) -> bool:
        for needle in self.needles:
            if needle in line:
                return True
        return False


_scrubber = _Scrubber(_literals)


def register_secrets(*values: str | None) -> None:
    """Scrub these exact values from every log line from now on (None and short values are skipped).

    Called at start-up with the configured admin and master keys."""
    global _scrubber
    with _lock:
        for value in values:
            if value is not None and len(value) >= _MIN_LITERAL:
                _literals.add(value)
                # the fast path tests the serialized line, where quotes, backslashes and
                # control characters appear escaped
                _literals.add(orjson.dumps(value).decode()[1:-1])
        _scrubber = _Scrubber(_literals)  # one assignment: a concurrent format sees old or new


def redact(text: str) -> str:
    """`text` with every secret replaced by `[redacted]`."""
    return _scrubber.pattern.sub(REDACTED, text)


def _scrub(value: object, pattern: re.Pattern[str]) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {str(_scrub(k, pattern)): _scrub(v, pattern) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v, pattern) for v in value]
    return pattern.sub(REDACTED, value if isinstance(value, str) else str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _SKIP and not key.startswith("_"):
                doc[key] = value
        self._add_error(record, doc)
        line = orjson.dumps(doc, default=str).decode()
        scrubber = _scrubber
        if not scrubber.may_hold_secret(line) or scrubber.pattern.search(line) is None:
            return line
        return orjson.dumps(_scrub(doc, scrubber.pattern)).decode()

    def _add_error(self, record: logging.LogRecord, doc: dict[str, object]) -> None:
        if record.exc_info and record.exc_info[0] is not None:
            doc["error"] = record.exc_info[0].__name__
            doc["error_message"] = str(record.exc_info[1])
            if not record.exc_text:  # cached like logging.Formatter does, for the other handlers
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["traceback"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("bap_engine").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    logging.getLogger("bap_engine").critical(
        "uncaught exception in thread", exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        extra={"thread_name": args.thread.name if args.thread else None},
    )


def configure_logging(level: str, *secrets: str | None) -> None:
    """JSON lines on stderr at `level`, scrubbing `secrets` too; uncaught exceptions are logged
    through it (a raw traceback would bypass the scrub)."""
    register_secrets(*secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pgserver", "alembic"):  # chatty at INFO about their own start-up
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
