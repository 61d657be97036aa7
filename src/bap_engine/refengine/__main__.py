"""Entry point: ``python -m bap_engine.refengine`` (see ``engine.py`` for what the process does).

asyncio imports ``ssl`` only to offer TLS, which this plain-HTTP engine never serves, and that
import is about a fifth of the start time. A ``None`` entry in ``sys.modules`` makes ``import ssl``
raise ImportError, the path asyncio already takes on a Python built without ssl. It is set here,
before anything imports asyncio, and only when this package runs as the program.
"""

import sys

sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

from .engine import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
