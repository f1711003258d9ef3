"""The drills' report: what each drill did, how many items, how many were lost.

Every drill calls ``record(...)`` once it has checked its outcome; the session plugin in
``tests/drills/conftest.py`` writes the records to ``test-artifacts/drills.json`` and
prints them as a table at the end of the run (the table the README quotes). A record is
written only after the drill's assertions passed, so a failed drill leaves no figure.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = ROOT / "test-artifacts" / "drills.json"

Figure = float | int | str


@dataclass(frozen=True)
class DrillRecord:
    """One drill's outcome. ``lost`` counts acknowledged items missing afterwards."""

    drill: str
    done: str
    items: int
    acknowledged: int
    lost: int
    duration_s: float
    extra: dict[str, Figure] = field(default_factory=dict)


COLLECTED: list[DrillRecord] = []


def record(drill: str, *, done: str, items: int, acknowledged: int, lost: int,
           duration_s: float, **extra: Figure) -> DrillRecord:
    """Add a drill's figures to this session's report (call after the assertions)."""
    rec = DrillRecord(drill, done, items, acknowledged, lost, round(duration_s, 2), extra)
    COLLECTED.append(rec)
    return rec


def write_json(records: list[DrillRecord], path: Path = ARTIFACT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(r) for r in records], indent=2) + "\n")
    return path


def _extra(r: DrillRecord) -> str:
    return ", ".join(f"{k} {v}" for k, v in r.extra.items())


def markdown_table(records: list[DrillRecord]) -> str:
    """The table as Markdown, ready to paste into the README."""
    lines = ["| drill | what was done | items | acknowledged | lost | duration s | figures |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r.drill} | {r.done} | {r.items} | {r.acknowledged} | {r.lost} "
                     f"| {r.duration_s} | {_extra(r)} |")
    return "\n".join(lines)
