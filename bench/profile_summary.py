"""Summarise py-spy's collapsed stacks (`--format raw`): where the orchestrator spends its time.

    python bench/profile_summary.py PROFILE.collapsed

Prints the share of samples by leaf frame (self time), by package of the leaf, and the
inclusive share of our own functions (bap_engine.*) and of the main library entry points.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::(?P<line>\d+))?\)$")


def _package(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/bap_engine/" in path:
        rest = path.split("/bap_engine/", 1)[1]
        return "bap_engine." + rest.split("/", 1)[0].removesuffix(".py")
    if "/lib/python3" in path:
        return "stdlib." + path.rsplit("/", 1)[-1].removesuffix(".py")
    return path.rsplit("/", 1)[-1]


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
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        name, pkg = _name(frames[-1])
        leaf[name] += n
        leaf_pkg[pkg] += n
        seen: set[str] = set()
        for f in frames:
            fname, fpkg = _name(f)
            if fname not in seen and (fpkg.startswith("bap_engine") or fpkg in ("starlette", "fastapi", "asyncpg",
                                                                                    "uvicorn", "pydantic")):
                inclusive[fname] += n
                seen.add(fname)
    if not total:
        return "no samples\n"
    out = [f"{total} samples (py-spy --nonblocking; idle samples included)", "", "self time by package:"]
    out += [f"  {n * 100 / total:5.1f}%  {p}" for p, n in leaf_pkg.most_common(15)]
    out += ["", "self time by function:"]
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in leaf.most_common(top)]
    out += ["", "inclusive time, our code and the web/db libraries:"]
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(summarize(fh.read()), end="")
