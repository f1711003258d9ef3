"""Issue 16: deploy while `lastmile up` runs, send to the new AE title, get a result;
re-runs after a file change; nothing dropped. Real processes throughout: nats-server,
`lastmile up` (receiver, completion, worker), the `lastmile` command line, dcmtk's
storescu as the modality."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from demo.phantoms import pelvis_study
from engine.spec import REFERENCE_DIR
from events.catalogue import (
    InferenceCompleted,
    InstanceRejected,
    PipelineDeployed,
    ResultSuperseded,
    StudyNotRun,
    StudyRerunRequested,
)
from events.deployments import PIPELINE_EVENTS
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port
from tests.drills.procs import LASTMILE, clean_env, lastmile_up, storescu
from tests.engine.conftest import has, wait_for

pytestmark = [
    pytest.mark.server, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="Debian dcmtk not installed"),
]


def own_pipeline(folder: Path, name: str = "myhip", ae: str = "LM_MYHIP",
                 description: str = "AI hips (site model)") -> Path:
    """A site's own pipeline file, outside every pipelines folder: the HFD model under
    another name and AE title (model and card by absolute path)."""
    text = (REFERENCE_DIR / "hfd.yaml").read_text()
    models = (REFERENCE_DIR.parent / "models").resolve()
    text = (text.replace("name: hfd\n", f"name: {name}\n")
            .replace("ae_title: LM_HFD", f"ae_title: {ae}")
            .replace("../models/", f"{models}/")
            .replace("series_description: AI hips HFD", f"series_description: {description}"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LASTMILE, *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


async def test_deploy_while_running_then_send_rerun_and_retire(tmp_path: Path) -> None:
    me = "os:" + pwd.getpwuid(os.geteuid()).pw_name
    site = tmp_path / "site"
    pipeline = own_pipeline(site)
    rules = tmp_path / "rules.yaml"
    # a rule may name a pipeline that is deployed from the log only (never listed here):
    # `ghost` is never deployed, so its studies must be recorded as not run
    rules.write_text("rules:\n  - {id: cr-ghost, pipelines: [ghost], "
                     "when: {tag: Modality, one_of: [CR, DX]}}\n")
    nats_port, dicom_port = free_port(), free_port()
    server = EmbeddedNats(tmp_path / "nats", port=nats_port, sync="always").start()
    env = clean_env(state_dir=str(tmp_path / "state"), nats_url=server.url,
                    dicom_port=str(dicom_port), services='["ingest", "engine"]',
                    pipelines_dir=str(tmp_path / "no-pipelines"), dicom_min_free_mb="0",
                    routing_rules=str(rules))
    study = pelvis_study(1601, images=2, size=256)
    files = study.write(tmp_path / "send")
    bus = await EventBus.connect(BusSettings(servers=(server.url,)))
    try:
        with lastmile_up(env, tmp_path / "up.log", wait_port=dicom_port):
            # 1. not deployed yet: the receiver refuses the AE title (nothing accepted
            # that would not run)
            sent = await storescu(dicom_port, "LM_MYHIP", files)
            assert sent.returncode != 0 and not sent.succeeded, sent.output
            # 2. deploy while running: no restart, the next association is accepted
            r = await asyncio.to_thread(cli, env, "pipelines", "deploy", str(pipeline),
                                        "--stage", "validation", "--why", "site model trial")
            assert r.returncode == 0, r.stdout + r.stderr
            assert "AE title LM_MYHIP" in r.stdout
            sent = await storescu(dicom_port, "LM_MYHIP", files)
            assert sent.returncode == 0 and len(sent.succeeded) == 2, sent.output
            evs = await wait_for(bus, study.study_uid, has("engine.inference.completed"), 120)
            first = next(e for e in evs if isinstance(e, InferenceCompleted))
            assert first.pipeline == "myhip" and first.result_keys
            refused = [e for e in evs if isinstance(e, InstanceRejected)]
            assert refused == []  # the refusal had no study: it is in the log, not here

            # 3. the same file again changes nothing, and records nothing
            r = await asyncio.to_thread(cli, env, "pipelines", "deploy", str(pipeline))
            assert r.returncode == 0 and "nothing changed" in r.stdout, r.stdout + r.stderr
            deployed = [ev async for _, ev, _ in bus.read(filter_subject=PIPELINE_EVENTS)
                        if isinstance(ev, PipelineDeployed)]
            assert len(deployed) == 1 and deployed[0].stage.value == "validation"

            # 4. `study complete --pipeline` on a complete study: a clear no, exit 1
            r = await asyncio.to_thread(cli, env, "study", "complete", study.study_uid,
                                        "--pipeline", "myhip")
            assert r.returncode == 1, r.stdout + r.stderr
            said = " ".join(r.stderr.split())
            assert "already complete for myhip" in said and "lastmile study rerun" in said

            # 5. the file changes; redeploy, re-run with who and why: a new result that
            # supersedes the first
            own_pipeline(site, description="AI hips (site model v2)")
            r = await asyncio.to_thread(cli, env, "pipelines", "deploy", str(pipeline),
                                        "--stage", "validation", "--why", "new description")
            assert r.returncode == 0 and "deployed myhip" in r.stdout, r.stdout + r.stderr
            r = await asyncio.to_thread(cli, env, "study", "rerun", study.study_uid,
                                        "--pipeline", "myhip", "--why", "file changed",
                                        "--wait", "120")
            assert r.returncode == 0, r.stdout + r.stderr
            assert "outcome: engine.inference.completed" in r.stdout
            evs = await wait_for(bus, study.study_uid, has("engine.result.superseded"), 30)
            rerun = next(e for e in evs if isinstance(e, StudyRerunRequested))
            assert (rerun.actor, rerun.why) == (me, "file changed")
            assert rerun.file_sha256 != deployed[0].file_sha256  # the new file
            second = [e for e in evs if isinstance(e, InferenceCompleted)][-1]
            assert second.run_key != first.run_key and second.causation_id == rerun.event_id
            sup = next(e for e in evs if isinstance(e, ResultSuperseded))
            assert (sup.run_key, sup.superseded_by) == (first.run_key, second.run_key)
            assert sup.reason == f"re-run by hand by {me}: file changed"

            # 6. retired: the AE title is refused again, at once
            r = await asyncio.to_thread(cli, env, "pipelines", "retire", "myhip",
                                        "--why", "trial over")
            assert r.returncode == 0, r.stdout + r.stderr
            sent = await storescu(dicom_port, "LM_MYHIP", files)
            assert sent.returncode != 0 and not sent.succeeded, sent.output

            # 7. routed to a pipeline nobody deployed: completed, then recorded as not
            # run, with the reason (never dropped)
            other = pelvis_study(1602, images=2, size=256)
            sent = await storescu(dicom_port, "LASTMILE", other.write(tmp_path / "other"))
            assert sent.returncode == 0, sent.output
            evs = await wait_for(bus, other.study_uid, has("engine.study.not_run"), 90)
            not_run = next(e for e in evs if isinstance(e, StudyNotRun))
            assert (not_run.pipeline, not_run.reason_code.value) == ("ghost", "not_deployed")
            assert not_run.trigger == "ingest.study.completed"
            assert "ghost is not deployed" in not_run.reason
    finally:
        await bus.close()
        server.stop()
