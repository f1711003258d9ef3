"""README's first run by hand works as written for a newcomer: `lastmile up` first, the
StudyInstanceUID from the command that makes the study, files outside the clone, dcmtk's
storescu (not pynetdicom's in .venv/bin), and no link outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _first_run() -> list[str]:
    start = README.index("A first run by hand")
    block = re.search(r"```sh\n(.*?)```", README[start:], re.S)
    assert block is not None
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line]


def test_first_run_starts_lastmile_and_uses_dcmtk_outside_the_clone() -> None:
    lines = _first_run()
    assert lines[0] == ".venv/bin/lastmile up"
    work = next(x for x in lines if x.startswith("work="))
    assert "mktemp -d" in work
    store = next(x for x in lines if "storescu" in x)
    assert "/usr/bin/storescu " in store and '"$work"/*.dcm' in store
    assert any(x.startswith(".venv/bin/lastmile audit \"$uid\"") for x in lines)
    assert "../shared" not in README and "DESIGN.md" not in README


def test_the_study_line_prints_the_uid_of_what_it_wrote(tmp_path: Path) -> None:
    line = next(x for x in _first_run() if x.startswith("uid="))
    code = re.search(r'-c "(.*?)" "\$work"', line)
    assert code is not None
    res = subprocess.run([sys.executable, "-c", code.group(1), str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    uid = res.stdout.strip()
    files = list(tmp_path.glob("*.dcm"))
    assert files and {str(pydicom.dcmread(f).StudyInstanceUID) for f in files} == {uid}
