"""README.md's "Deploy your own model" guide, followed step by step from an empty state:
its fenced blocks marked ``sh guide-up`` (terminal 1) and ``sh guide`` (terminal 2) are
taken from the README as written and run in order, the first as `lastmile up` (real
embedded NATS, receiver, completion, worker), each of the others in bash from the
clone's folder with the variables of the blocks before it. Nothing is mocked: the
deployment, the C-STORE association, the run and the SR are real."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pydicom
import pytest

from events.nats_server import free_port
from tests.drills.procs import clean_env, lastmile_up

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```sh (guide|guide-up)\n(.*?)^```$", re.S | re.M)

pytestmark = [
    pytest.mark.server, pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "lastmile").exists(),
                       reason="the guide runs .venv/bin/lastmile: make setup first"),
]


def guide_blocks(text: str) -> list[tuple[str, str]]:
    """``(kind, body)`` of each marked block, in the README's order."""
    return [(m[1], m[2]) for m in BLOCK.finditer(text)]


def _commands(body: str) -> list[str]:
    return [line.split("#")[0].strip() for line in body.splitlines()
            if line.split("#")[0].strip()]


def test_the_guide_is_marked_for_this_test() -> None:
    blocks = guide_blocks(README.read_text(encoding="utf-8"))
    kinds = [k for k, _ in blocks]
    assert kinds[0] == "guide-up" and kinds.count("guide-up") == 1 and len(kinds) >= 6
    assert _commands(blocks[0][1]) == [".venv/bin/lastmile up"]
    steps = "\n".join(b for _, b in blocks[1:])
    for needed in ("lastmile pipelines deploy", "lastmile check", "lastmile audit",
                   "spec_version: 2"):
        assert needed in steps, needed


def test_deploy_your_own_model_step_by_step(tmp_path: Path) -> None:
    blocks = guide_blocks(README.read_text(encoding="utf-8"))
    state, dicom_port = tmp_path / "state", free_port()
    env = clean_env(state_dir=str(state), nats_port=str(free_port()),
                    dicom_port=str(dicom_port), services='["ingest", "engine"]',
                    pipelines_dir=str(tmp_path / "no-pipelines"), dicom_min_free_mb="0")
    env["TMPDIR"] = str(tmp_path)  # the guide's mktemp -d lands here
    carried = tmp_path / "guide-variables.sh"  # what one block leaves to the next
    env["COLUMNS"] = "200"  # the tables as a wide terminal shows them
    outputs: dict[str, str] = {}  # block -> what it printed
    with lastmile_up(env, tmp_path / "up.log", wait_port=dicom_port, timeout_s=180):
        for i, (_, body) in enumerate(blocks[1:], 1):
            script = (f"set -euo pipefail\nset -a\n[ -f {carried} ] && . {carried}\n"
                      f"{body}\nexport -p > {carried}\n")
            r = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=900, check=False)
            assert r.returncode == 0, f"guide step {i} failed:\n{body}\n{r.stdout}{r.stderr}"
            outputs[body] = " ".join(r.stdout.split())

    def printed(command: str) -> str:
        return next(o for b, o in outputs.items() if command in b)

    model = hashlib.sha256((ROOT / "engine" / "models" / "hfd.onnx").read_bytes()).hexdigest()
    assert printed("sha256sum") == model  # the model's hash, as the guide prints it
    assert "deployed my-hips 0.1.0 in staging, AE title MY_HIPS" in printed(
        "pipelines deploy")
    check = printed("lastmile check")
    assert "│ my-hips │ valid [SR] │" in check, check
    assert "1 study, 5 files" in check and "1 valid; 0 retried run(s), 0 crashed, 0 timed out" \
        in check, check
    audit = printed("lastmile audit")
    for step in ("ingest.study.completed", "engine.series.selected", "engine.result.published",
                 "engine.inference.completed"):
        assert step in audit, (step, audit)
    assert "my-hips" in audit and "model_name=my-hip-net" in audit
    # the result: the SR the run wrote, with the file's series description and codes
    srs = [pydicom.dcmread(p) for p in (state / "results").rglob("*.dcm")]
    sr = next(d for d in srs if d.Modality == "SR")
    assert sr.SeriesDescription == "AI my-hips measurements"
    assert "24136001" in str(sr)  # hip joint, SNOMED CT, from the file's codes:
