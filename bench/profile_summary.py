"""Summarise py-spy's collapsed stacks (`--format raw`): where the orchestrator spends its time.

    python bench/profile_summary.py PROFILE.collapsed

Prints the share of samples by leaf frame (self time), by package of the leaf, and the
inclusive share of every frame below the server's entry points.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

_IDLE = ("Condition.wait (threading.py", "Thread._bootstrap (", "Queue.get (queue.py")  # parked worker threads
_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::(?P<line>\d+))?\)$")


def _package(path: str) -> str:
    """py-spy names files relative to their sys.path entry: 'starlette/routing.py', 'threading.py'."""
    path = path.split("site-packages/", 1)[-1].split("/src/", 1)[-1]
    parts = path.split("/")
    if parts[0] == "bap_engine" and len(parts) > 1:
        return "bap_engine." + parts[1].removesuffix(".py")
    return parts[0].removesuffix(".py")


def _name(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), frame.strip()
    file = m.group("file")
    short = file.split("site-packages/", 1)[-1].split("/src/", 1)[-1]
    return f"{m.group('func')} ({short})", _package(file)


def summarize(collapsed: str, top: int = 25) -> str:
    leaf: Counter[str] = Counter()
    leaf_pkg: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames or frames[-1].startswith(_IDLE):
            idle += n
            continue
        name, pkg = _name(frames[-1])
        leaf[name] += n
        leaf_pkg[pkg] += n
        for fname in {_name(f)[0] for f in frames}:
            inclusive[fname] += n
    total -= idle
    if total <= 0:
        return "no samples\n"
    out = [f"{total} samples, shares of them below ({idle} more of parked worker threads left out); a leaf of "
           "Runner.run is time inside uvloop's C event loop (I/O and idle)", "", "self time by package:"]
    out += [f"  {n * 100 / total:5.1f}%  {p}" for p, n in leaf_pkg.most_common(15)]
    out += ["", "self time by function:"]
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in leaf.most_common(top)]
    out += ["", "inclusive time (frames under 50 %: below the server's entry points):"]
    below = [(f, n) for f, n in inclusive.most_common() if n * 2 < total]
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in below[:top]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(summarize(fh.read()), end="")
