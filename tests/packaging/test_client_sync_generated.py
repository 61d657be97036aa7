"""The committed sync client is exactly what clients/python/scripts/gen_sync.py makes of `_async.py`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import ModuleType

from tests.packaging.conftest import CLIENT_DIR

SCRIPT = CLIENT_DIR / "scripts" / "gen_sync.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_sync", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_sync_client_is_the_generated_one() -> None:
    gen = _generator()
    wanted = gen.generate(gen.ASYNC_PATH.read_text(encoding="utf-8"))
    assert gen.SYNC_PATH.read_text(encoding="utf-8") == wanted, (
        "_sync.py differs from what scripts/gen_sync.py makes of _async.py: "
        "edit _async.py only, then run python clients/python/scripts/gen_sync.py")


def test_check_mode_exits_zero_on_the_committed_tree() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_rewrite_rules() -> None:
    gen = _generator()
    source = '''"""Module doc of AsyncBapClient."""
import asyncio


class AsyncBapClient:
    """Uses httpx.AsyncClient."""

    async def __aenter__(self) -> AsyncBapClient:
        return self

    async def aclose(self) -> None:
        await asyncio.sleep(0)  # AsyncBapClient in a comment
        async with self._lock:
            async for item in self._items:
                return await self._run(item)
'''
    out = gen.generate(source)
    body = out.split('"""', 2)[2]  # after the module docstring (which names the async module)
    assert "async" not in body and "Async" not in body and "await" not in body
    assert "import time\n" in out and "time.sleep(0)" in out
    assert "class BapClient:" in out and "def __enter__(self) -> BapClient:" in out
    assert "def close(self) -> None:" in out and "# BapClient in a comment" in out
    assert '"""Uses httpx.Client."""' in out
    assert "        with self._lock:\n            for item in self._items:\n" in out
    assert "                return self._run(item)\n" in out
    compile(out, "_sync.py", "exec")
