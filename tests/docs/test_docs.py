"""The documentation site: generated pages match the code, the site builds, hand-written pages keep up.

- the generated pages (docs/reference/openapi.json, routes.md, error-codes.md and
  docs/operations/configuration.md) are exactly what scripts/gen_docs.py makes from the code now;
- `mkdocs build --strict` succeeds (every link and anchor resolves, every page is in the nav);
- every route of the OpenAPI document, every state transition, every audit action and every
  Prometheus metric is named in its hand-written page, and the README's walk-through is the
  quickstart's;
- no page refers to anything outside the repository.

No database, no network: a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from bap_engine.states import TRANSITIONS, AuditAction, EngineState

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FIX = "run `make docs` (or `.venv/bin/python scripts/gen_docs.py`) and commit the regenerated files"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _text(rel: str) -> str:
    return (ROOT / rel).read_text(encoding="utf-8")


def test_generated_pages_match_the_code() -> None:
    done = _run("scripts/gen_docs.py", "--check")
    assert done.returncode == 0, f"generated docs differ from the code: {FIX}\n{done.stderr}{done.stdout}"


def test_site_builds_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = _run("-m", "mkdocs", "build", "--strict", "--quiet", "--config-file", str(ROOT / "mkdocs.yml"),
                "--site-dir", str(site))
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr}{done.stdout}"
    for page in ("index.html", "reference/routes.html", "reference/openapi.json", "operations/configuration.html",
                 "operations/security.html", "architecture.html"):
        assert (site / page).is_file(), page
    assert "Reporting a vulnerability" in (site / "operations/security.html").read_text(encoding="utf-8")


def test_every_route_is_in_the_endpoints_page() -> None:
    doc = json.loads(_text("docs/reference/openapi.json"))
    page = _text("docs/reference/endpoints.md")
    missing = [f"{method.upper()} {path}" for path, ops in doc["paths"].items() for method in ops
               if f"`{method.upper()} {path}`" not in page]
    assert not missing, f"routes without a hand-written entry in docs/reference/endpoints.md: {missing}"


def test_state_table_is_the_code() -> None:
    page = _text("docs/reference/states.md")
    rows = dict(re.findall(r"^\| `([a-z]+)` \| (.+) \|$", page, re.M))
    documented = {state: set(re.findall(r"`([a-z]+)`", rows.get(state, ""))) for state in map(str, EngineState)}
    actual = {str(src): {str(dst) for dst in dsts} for src, dsts in TRANSITIONS.items()}
    assert documented == actual, "docs/reference/states.md's transition table differs from states.TRANSITIONS"
    missing = [str(a) for a in AuditAction if f"`{a}`" not in page]
    assert not missing, f"audit actions missing from docs/reference/states.md: {missing}"


def test_every_metric_is_in_the_metrics_page() -> None:
    names = set(re.findall(r'"(bap_[a-z_]+)"', _text("src/bap_engine/api/metrics.py")))
    page = _text("docs/operations/metrics.md")
    assert names, "no metric names found in api/metrics.py"
    missing = sorted(n for n in names if f"`{n}" not in page)
    assert not missing, f"metrics missing from docs/operations/metrics.md: {missing}"


def test_readme_walkthrough_is_the_quickstart() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", _text("README.md"), re.S)
    assert len(blocks) >= 2, "README.md lost its two commands or its walk-through"
    quickstart = _text("docs/quickstart.md")
    for block in blocks[:2]:
        assert block in quickstart, f"README.md and docs/quickstart.md disagree on:\n{block}"


def test_nothing_refers_outside_the_repository() -> None:
    files = [*DOCS.rglob("*.md"), ROOT / "mkdocs.yml", ROOT / "README.md", ROOT / "scripts/gen_docs.py"]
    outside = re.compile(r"/w[o]rk/|\.\./sh[a]red|/home/|/Users/|spec/API\.md")
    bad = [str(f.relative_to(ROOT)) for f in files if outside.search(f.read_text(encoding="utf-8"))]
    assert not bad, f"files naming a path outside the repository: {bad}"
    for target in re.findall(r"\]\(([^)#\s]+)", _text("README.md")):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which is not in the repository"


def test_typescript_client_types_come_from_the_same_document() -> None:
    """The TypeScript client's types are generated from this document: a stale copy fails here."""
    ours = json.loads((ROOT / "docs" / "reference" / "openapi.json").read_text())
    theirs = json.loads((ROOT / "clients" / "typescript" / "openapi.json").read_text())
    assert theirs == ours, "run `make docs`, then `npm run gen` in clients/typescript"
