"""Generate the synchronous client `_sync.py` from the asyncio one `_async.py`.

The sync client is derived, never mirrored by hand (the approach of httpcore's unasync script):
a token-level rewrite of `_async.py` that drops `await` and the `async` of `async def/with/for`,
swaps each name of `NAMES` for its sync twin (in code and in strings: `AsyncBapClient` →
`BapClient`, `httpx.AsyncClient` → `httpx.Client`, `aclose` → `close`, `asyncio.sleep` →
`time.sleep`, ...), and replaces the module docstring. Standard library only.

    python clients/python/scripts/gen_sync.py          # rewrite _sync.py
    python clients/python/scripts/gen_sync.py --check  # exit 1 when the committed _sync.py is stale

tests/packaging/test_client_sync_generated.py fails when `_sync.py` differs from `generate()`.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tokenize
from pathlib import Path

__all__ = ["ASYNC_PATH", "SYNC_PATH", "NAMES", "generate", "main"]

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "bap_engine_client"
ASYNC_PATH = PACKAGE / "_async.py"
SYNC_PATH = PACKAGE / "_sync.py"

NAMES: dict[str, str] = {
    "AsyncBapClient": "BapClient",
    "AsyncClient": "Client",
    "AsyncBaseTransport": "BaseTransport",
    "AsyncIterator": "Iterator",
    "AsyncIterable": "Iterable",
    "AsyncGenerator": "Generator",
    "StopAsyncIteration": "StopIteration",
    "aclose": "close",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "__aiter__": "__iter__",
    "__anext__": "__next__",
    "asyncio": "time",
}
_WORDS = re.compile(r"\b(" + "|".join(map(re.escape, NAMES)) + r")\b")

HEADER = "# GENERATED from _async.py by clients/python/scripts/gen_sync.py: do not edit by hand.\n"
DOCSTRING = '''"""`BapClient`: the synchronous client (httpx.Client), method for method `AsyncBapClient`.

Generated from `_async.py` by `scripts/gen_sync.py`: edit `_async.py`, then run
`python clients/python/scripts/gen_sync.py` (a test fails when this file is stale).
"""'''

Edit = tuple[int, int, str]  # start offset, end offset, replacement


def _offsets(source: str) -> list[int]:
    """The offset in `source` of each line's first character, indexed by tokenize's 1-based row."""
    starts, total = [0, 0], 0
    for line in source.splitlines(keepends=True):
        total += len(line)
        starts.append(total)
    return starts


def _edits(source: str) -> list[Edit]:
    """Every rewrite of the module, as (start, end, text) spans of `source`, in source order."""
    starts = _offsets(source)
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    edits: list[Edit] = []
    docstring_seen = False
    for i, tok in enumerate(tokens):
        start = starts[tok.start[0]] + tok.start[1]
        end = starts[tok.end[0]] + tok.end[1]
        following = tokens[i + 1] if i + 1 < len(tokens) else tok
        if tok.type == tokenize.NAME and (
            tok.string == "await" or (tok.string == "async" and following.string in ("def", "with", "for"))
        ):
            # drop the keyword and the blank up to the next token
            edits.append((start, starts[following.start[0]] + following.start[1], ""))
        elif tok.type == tokenize.NAME and tok.string in NAMES:
            edits.append((start, end, NAMES[tok.string]))
        elif tok.type == tokenize.STRING and not docstring_seen:
            docstring_seen = True
            edits.append((start, end, DOCSTRING))
        elif tok.type in (tokenize.STRING, tokenize.COMMENT):
            edits.append((start, end, _WORDS.sub(lambda m: NAMES[m.group(1)], tok.string)))
    return edits


def generate(async_source: str) -> str:
    """The source of `_sync.py` for the given source of `_async.py`."""
    out = async_source
    for start, end, text in reversed(_edits(async_source)):
        out = out[:start] + text + out[end:]
    return HEADER + out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 when _sync.py is stale")
    args = parser.parse_args(argv)
    wanted = generate(ASYNC_PATH.read_text(encoding="utf-8"))
    current = SYNC_PATH.read_text(encoding="utf-8") if SYNC_PATH.exists() else ""
    if args.check:
        if current != wanted:
            sys.stderr.write(f"{SYNC_PATH.name} is stale: run python clients/python/scripts/gen_sync.py\n")
            return 1
        return 0
    if current != wanted:
        SYNC_PATH.write_text(wanted, encoding="utf-8")
        sys.stdout.write(f"wrote {SYNC_PATH}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
