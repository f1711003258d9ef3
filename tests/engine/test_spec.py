"""Pipeline files: the reference ones load; mistakes are reported with file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import SpecError
from engine.spec import REFERENCE_DIR, load_pipeline, parse_pipeline


def _reference_text(name: str) -> str:
    return (REFERENCE_DIR / f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", ["bts", "lts", "hfd"])
def test_reference_pipelines_load_with_model_hash_checked(name: str) -> None:
    loaded = load_pipeline(REFERENCE_DIR / f"{name}.yaml")
    assert loaded.name == name
    assert loaded.model_path.is_file() and loaded.model_path.stat().st_size < 10_000_000
    assert loaded.card_path is not None and "synthetic" in loaded.card_path.read_text()
    assert len(loaded.operator_params) == len(loaded.spec.operators)


def _errors(text: str, tmp: Path = REFERENCE_DIR) -> str:
    with pytest.raises(SpecError) as info:
        parse_pipeline(text, tmp / "x.yaml")
    return str(info.value)


def test_unknown_operator_is_reported_with_its_line() -> None:
    text = _reference_text("bts").replace("- op: argmax", "- op: argmaks")
    line = text.splitlines().index("  - op: argmaks") + 1
    msg = _errors(text)
    assert f"x.yaml:{line}: operators.6.op: unknown operator 'argmaks'" in msg


def test_bad_operator_parameter_names_line_and_key() -> None:
    text = _reference_text("bts").replace("overlap: 0.25", "overlap: 1.5")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "overlap: 1.5" in t)
    msg = _errors(text)
    assert f"x.yaml:{line}: operators.4.params.overlap: MONAI SlidingWindowInferer" in msg
    assert "overlap must be >= 0 and < 1" in msg


def test_unknown_key_and_bad_runtime_are_both_listed() -> None:
    text = _reference_text("hfd").replace("runtime: auto", "runtime: cuda-magic\ncolour: red")
    msg = _errors(text)
    assert "runtime: Value error, unknown runtime 'cuda-magic'" in msg
    assert "colour: unknown key" in msg


def test_model_hash_mismatch_is_refused(tmp_path: Path) -> None:
    text = _reference_text("bts")
    sha = load_pipeline(REFERENCE_DIR / "bts.yaml").spec.model.sha256
    bad = text.replace(sha, "f" * 64).replace("../models/", str(REFERENCE_DIR.parent / "models")
                                              + "/")
    msg = _errors(bad, tmp_path)
    assert "model.sha256" in msg and sha in msg and "expects" in msg


def test_operator_for_the_wrong_task_is_refused() -> None:
    text = _reference_text("hfd").replace("- op: load_images", "- op: load_volume")
    assert "does not apply to task detection2d" in _errors(text)


def test_pacs_publisher_needs_an_address() -> None:
    text = _reference_text("bts") + "  - kind: pacs\n    ae_title: ORTHANC\n"
    assert "a pacs publisher needs ae_title, host and port" in _errors(text)


def test_file_hash_changes_with_the_file() -> None:
    a = parse_pipeline(_reference_text("bts"), REFERENCE_DIR / "a.yaml")
    b = parse_pipeline(_reference_text("bts") + "# comment\n", REFERENCE_DIR / "b.yaml")
    assert a.file_sha256 != b.file_sha256
