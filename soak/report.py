"""What the soak prints: progress lines while it runs, then the operations table (per op type
and total: count, ops/s, status-code counts), error codes and admit reasons, the chaos done,
and the checks table with every violation's evidence."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from soak.churn import OPS, Answer

__all__ = ["log", "progress", "ops_table", "codes_table", "checks_table", "server_logs", "CHECKS", "category"]

# check name -> prefixes of tracker keys / ledger kinds that belong to it
CHECKS: dict[str, tuple[str, ...]] = {
    "registry = backend (rows vs processes, no orphans)": ("registry-backend", "orphan", "duplicate-process",
                                                          "untracked", "op-expired"),
    "no port held twice (DB rows, /proc listeners)": ("db-port", "port-"),
    "quota never exceeded (snapshots + audit replay)": ("quota",),
    "shared rate limit (rolling 60 s, both replicas)": ("rate limit",),
    "audit: a row per 2xx answer, coherent per engine": ("2xx without", "admitted engine never provisioned",
                                                         "lifecycle row after"),
    "status codes (no 500; 503 only in the outage)": ("500", "503", "unexpected", "no answer", "QUOTA_EXCEEDED",
                                                      "RATE_LIMITED"),
    "one leader; every replica holds its owner lock": ("leaders", "owner-locks"),
    "replicas stay up and shut down cleanly": ("replica",),
}


def category(key: str) -> str:
    for name, prefixes in CHECKS.items():
        if key.startswith(prefixes):
            return name
    return "other"


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _label(a: Answer) -> str:
    return str(a.status) if a.status else f"ERR:{a.code}"


def progress(answers: Sequence[Answer], since: int, elapsed: float, interval: float, engines: str,
             violations: int) -> None:
    recent = answers[since:]
    ok = sum(a.ok for a in recent)
    statuses = Counter(_label(a) for a in recent)
    top = " ".join(f"{k}:{v}" for k, v in sorted(statuses.items()))
    log(f"t+{elapsed:4.0f}s  {len(recent) / max(interval, 1e-9):6.1f} ops/s ({ok} 2xx; {top})  engines {engines}  "
        f"violations so far: {violations}")


def _render(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    widths = [max(len(str(r[i])) for r in [list(head), *rows]) for i in range(len(head))]
    fmt = [" ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [list(head), *rows]]
    return "\n".join([fmt[0], " ".join("-" * w for w in widths), *fmt[1:]])


def ops_table(answers: Sequence[Answer], seconds: float) -> str:
    by_op: dict[str, list[Answer]] = defaultdict(list)
    for a in answers:
        by_op[a.op].append(a)
    rows = []
    for op in [*OPS, "total"]:
        mine = list(answers) if op == "total" else by_op.get(op, [])
        statuses = Counter(_label(a) for a in mine)
        rows.append([op, str(len(mine)), f"{len(mine) / max(seconds, 1e-9):.1f}", str(sum(a.ok for a in mine)),
                     " ".join(f"{k}:{v}" for k, v in sorted(statuses.items()))])
    return _render(("op", "count", "ops/s", "2xx", "status codes"), rows)


def codes_table(answers: Sequence[Answer]) -> str:
    codes = Counter((a.op, _label(a), a.code) for a in answers if a.code)
    rows = [[op, status, code, str(n)] for (op, status, code), n in sorted(codes.items())]
    return _render(("op", "status", "error code / admit reason", "count"), rows)


def checks_table(runs: int, found: dict[str, list[str]], notes: dict[str, str]) -> str:
    rows = []
    for name in CHECKS:
        bad = found.get(name, [])
        rows.append([name, str(runs), "FAIL" if bad else "PASS", f"{len(bad)} violation(s)" if bad else
                     notes.get(name, "")])
    out = _render(("check", "runs", "result", "detail"), rows)
    for name, evidence in found.items():
        out += f"\n\n-- {name}: {len(evidence)} violation(s)"
        out += "".join(f"\n   * {line}" for line in evidence[:12])
        if len(evidence) > 12:
            out += f"\n   ... and {len(evidence) - 12} more"
    return out


def server_logs(logs: dict[str, Path]) -> list[str]:
    """Per replica: log lines by level, and the distinct error/critical events (logger, msg, error)."""
    out = ["server logs (JSON lines by level; error+ events):"]
    for name, path in logs.items():
        levels: Counter[str] = Counter()
        events: Counter[str] = Counter()
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    doc = json.loads(line)
                except ValueError:
                    levels["not json"] += 1
                    continue
                level = str(doc.get("level", "?")) if isinstance(doc, dict) else "?"
                levels[level] += 1
                if level in ("error", "critical") and isinstance(doc, dict):
                    events[f"{doc.get('logger')}: {doc.get('msg')} ({doc.get('task') or doc.get('worker') or ''}"
                           f"{' ' if doc.get('task') or doc.get('worker') else ''}{doc.get('error', '')})"] += 1
        out.append(f"   {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(levels.items())))
        out += [f"      {n} x {event}" for event, n in events.most_common(8)]
    return out
