"""Issue 16, pure parts: the deployment fold (a redeploy of the same hash changes
nothing), the run key (includes the pipeline file's hash), and how a worker finds the
runnable file of a deployed pipeline (its own, else the text from the log) or says why
there is none."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import msgspec

from engine.registry import deployed_event, retired_event, stage_changed_event
from engine.spec import REFERENCE_DIR, load_pipeline
from engine.worker import EngineWorker, WorkerConfig, run_key
from events.catalogue import NotRunReason, Stage, StudyNotRun
from events.deployments import fold_pipelines
from tests.engine.test_live_deploy import own_pipeline


def test_redeploying_the_same_file_changes_nothing_and_a_new_file_does() -> None:
    hfd = load_pipeline(REFERENCE_DIR / "hfd.yaml")
    first = deployed_event(hfd, actor="os:a", reason="trial")
    state = fold_pipelines([first])
    moved = stage_changed_event(state["hfd"], Stage.VALIDATION, actor="user:b", reason="ok")
    again = deployed_event(hfd, actor="os:c", reason="again")  # staging, by someone else
    state = fold_pipelines([first, moved, again])["hfd"]
    assert (state.stage, state.deployed_by, state.last_reason) == (
        Stage.VALIDATION, "os:a", "ok")
    assert state.file_text == hfd.text and state.file_path == str(hfd.path)
    changed = msgspec.structs.replace(again, file_sha256="0" * 64, event_id="another")
    assert fold_pipelines([first, moved, changed])["hfd"].stage == Stage.STAGING
    # after retirement the same file is a new deployment
    retired = retired_event(fold_pipelines([first])["hfd"], actor="os:a", reason="done")
    back = fold_pipelines([first, retired, again])["hfd"]
    assert not back.retired and back.deployed_by == "os:c"


def test_the_run_key_includes_the_pipeline_file_hash() -> None:
    a = run_key("1.2.3", "hfd", "m" * 64, "", "a" * 64)
    assert a != run_key("1.2.3", "hfd", "m" * 64, "", "b" * 64)
    assert a == run_key("1.2.3", "hfd", "m" * 64, "", "a" * 64)
    assert a != run_key("1.2.3", "hfd", "m" * 64, "rerun-event", "a" * 64)


def _worker(tmp_path: Path, own: dict) -> EngineWorker:  # type: ignore[type-arg]
    return EngineWorker(own, WorkerConfig(instances_dir=tmp_path / "i",
                                          results_dir=tmp_path / "r", secret=b"s" * 32))


def test_a_worker_runs_the_deployed_text_or_says_why_it_cannot(tmp_path: Path) -> None:
    path = own_pipeline(tmp_path / "site")
    mine = load_pipeline(path)
    worker = _worker(tmp_path, {})
    none = worker.resolve("myhip", None)
    assert isinstance(none, StudyNotRun) and none.reason_code == NotRunReason.NOT_DEPLOYED
    deployed = fold_pipelines([deployed_event(mine, actor="os:a")])["myhip"]
    from_log = worker.resolve("myhip", deployed)
    assert not isinstance(from_log, StudyNotRun)
    assert from_log.file_sha256 == mine.file_sha256 and from_log.model_path == mine.model_path
    retired = worker.resolve("myhip", replace(deployed, retired=True))
    assert isinstance(retired, StudyNotRun) and retired.reason_code == NotRunReason.RETIRED
    # the worker's own file of another hash: the deployed text wins
    other = own_pipeline(tmp_path / "elsewhere", description="another description")
    assert _worker(tmp_path, {"myhip": load_pipeline(other)}).resolve(
        "myhip", deployed).file_sha256 == mine.file_sha256  # type: ignore[union-attr]
    # no text in the log (an older deployment) and another own file: not run, and why
    old = replace(deployed, file_text=None, file_path=None)
    why = _worker(tmp_path, {"myhip": load_pipeline(other)}).resolve("myhip", old)
    assert isinstance(why, StudyNotRun) and why.reason_code == NotRunReason.FILE_UNAVAILABLE
    assert "deploy it again" in why.reason
    # the deployed text names a model this host does not have
    moved = replace(deployed, file_sha256="9" * 64,
                    file_text=deployed.file_text.replace(".onnx", "-gone.onnx"))  # type: ignore[union-attr]
    gone = _worker(tmp_path, {}).resolve("myhip", moved)
    assert isinstance(gone, StudyNotRun) and gone.reason_code == NotRunReason.FILE_UNAVAILABLE
    assert "cannot be used on this worker" in gone.reason
