"""The repository explains itself: every `docs/design.md §N` cited in code,
tests, bench, deploy and docs names a section that exists there, and nothing
cites a design file outside the repository or an issue number."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIRS = ("broker", "client", "coordinator", "router", "shardq", "tests", "bench", "deploy", "docs")
SKIP = {"results", "__pycache__"}
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".toml", ""}
CITE = re.compile(r"design\.md §(\d+)(?:\.(\d+))?")
# Built from pieces so this file does not match itself.
OUTSIDE = re.compile("DES" + r"IGN §|\b[Ii]ssue[- ]#?\d")


def sources() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for d in DIRS:
        for p in (ROOT / d).rglob("*"):
            if p.is_file() and p.suffix in SUFFIXES and not SKIP & set(p.parts):
                files.append(p)
    return files


def sections() -> set[tuple[int, int | None]]:
    """(N, None) for each `## N.` heading, (N, M) for `### N.M` and for the
    numbered items of §9 (the guarantees)."""
    found: set[tuple[int, int | None]] = set()
    in_nine = False
    for line in (ROOT / "docs" / "design.md").read_text().splitlines():
        if m := re.match(r"## (\d+)\. ", line):
            found.add((int(m[1]), None))
            in_nine = m[1] == "9"
        elif m := re.match(r"### (\d+)\.(\d+) ", line):
            found.add((int(m[1]), int(m[2])))
        elif in_nine and (m := re.match(r"(\d+)\. ", line)):
            found.add((9, int(m[1])))
    return found


def test_every_design_citation_names_an_existing_section() -> None:
    known = sections()
    assert {(n, None) for n in range(1, 13)} <= known
    bad = []
    for path in sources():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in CITE.finditer(line):
                key = (int(m[1]), int(m[2]) if m[2] else None)
                if key not in known:
                    bad.append(f"{path.relative_to(ROOT)}:{i}: {m[0]}")
    assert bad == []


def test_nothing_cites_an_outside_design_file_or_an_issue_number() -> None:
    bad = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
           for path in sources() if path != Path(__file__).resolve()
           for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
           if OUTSIDE.search(line)]
    assert bad == []
