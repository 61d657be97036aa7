"""An engine program for the fault suite: the reference engine, which hangs on SIGUSR1.

Run as `python hang_engine.py` (ORCH_ENGINE_COMMAND). It serves exactly as the reference engine
(which it runs as a program, through runpy) until it receives SIGUSR1; then it ignores SIGTERM and
SIGINT and blocks its event loop: the kernel still accepts TCP connections into the listen
backlog, but nothing is ever answered, and only SIGKILL ends it. That is a real hang, unlike
SIGSTOP, which the orchestrator itself uses for sleep (its reconciler resumes a frozen engine
whose row says running, so a SIGSTOP "hang" would be healed as drift, not as a failure).
"""

from __future__ import annotations

import runpy
import signal
import sys
import time
from types import FrameType

HANG_S = 600.0  # bounded: the orchestrator SIGKILLs it long before


def _hang(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(HANG_S)  # runs on the main thread, i.e. inside the engine's event loop


def main() -> None:
    signal.signal(signal.SIGUSR1, _hang)
    sys.argv = ["bap_engine.refengine"]
    runpy.run_module("bap_engine.refengine", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
