"""Tests write their screenshots and files under test-artifacts/ (ignored by git), never
into the tracked docs/: `make screenshots` is the one command that refreshes those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_test_writes_into_the_tracked_docs() -> None:
    docs_path = re.compile(r"""["']docs["']\s*\)?\s*/|docs/screenshots""")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")
                 if p != Path(__file__) and docs_path.search(p.read_text())]
    assert offenders == []
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^screenshots:", makefile, re.M)
    assert "docs/screenshots" in makefile
