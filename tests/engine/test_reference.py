"""Issue 16 item 9: the operator and pipeline-file reference is generated from the
code, and engine/README.md holds exactly what the generator gives (so it never goes
stale); every registered operator, every parameter and every file key is in it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engine import reference
from engine.pipeline_model import PipelineSpec
from engine.steps import OPERATORS, MonaiParams

README = Path(__file__).resolve().parents[2] / "engine" / "README.md"
FIX = ".venv/bin/lastmile pipelines reference --readme engine/README.md"


def test_the_readme_holds_the_generated_reference() -> None:
    held = reference.section(README.read_text(encoding="utf-8"))
    assert held is not None, "engine/README.md lost its reference markers"
    assert held == reference.markdown(), f"engine/README.md is stale: run {FIX}"


def test_every_operator_and_parameter_is_described() -> None:
    text = reference.markdown()
    ops = reference.operators()
    for name, op in OPERATORS.items():
        assert f"**`{name}`**" in ops, name
        if issubclass(op.params, MonaiParams):
            for key in op.params.own:
                assert f"| `{key}` (Lastmile) |" in ops, (name, key)
            continue
        for field, info in op.params.model_fields.items():
            assert info.description, f"{name}.{field} has no Field(description=...)"
            assert f"| `{field}` |" in ops
    assert "| `roi_size` | Sequence[int] \\| int | required |" in ops  # MONAI's own
    assert "| `size` | [integer, integer] | required | pixels |" in ops  # a unit
    assert "| `selection.max_spacing_mm` | number | none | mm |" in text


def test_every_key_of_the_file_is_described() -> None:
    keys = reference.file_keys()

    def walk(model: type, prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = prefix + (info.alias or name)
            assert f"| `{key}` |" in keys, key
            assert info.description, f"{key} has no Field(description=...)"

    walk(PipelineSpec, "")
    for key in ("selection.tie_break", "input.pixel_spacing_mm", "model.output.values",
                "model.output.activation", "results.seg", "codes.NAME.site",
                "publishers[].stages", "targets.runtime_s", "operators[].params"):
        assert f"| `{key}` |" in keys, key
    assert "| `models` | mapping string → mapping (keys as `model`) |" in keys
    assert "| `outputs` |" not in keys  # version 1's name


def test_the_command_prints_it_and_rewrites_only_the_marked_part(tmp_path: Path) -> None:
    printed = subprocess.run([sys.executable, "-m", "lastmile", "pipelines", "reference"],
                             capture_output=True, text=True, check=True, timeout=120)
    assert printed.stdout == reference.markdown()
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n\n{reference.START}\nSTALE-TEXT\n{reference.END}\n\n## after\n")
    subprocess.run([sys.executable, "-m", "lastmile", "pipelines", "reference",
                    "--readme", str(readme)], capture_output=True, text=True, check=True,
                   timeout=120)
    text = readme.read_text()
    assert text.startswith("# top\n\n") and text.endswith(f"{reference.END}\n\n## after\n")
    assert reference.section(text) == reference.markdown() and "STALE-TEXT" not in text
