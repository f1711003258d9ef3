"""Done-when: studies sent by dcmtk's storescu to LM_BTS, LM_LTS and LM_HFD (through the
real ingest SCP and completion detector) come back to Orthanc as dciodvfy-clean SEG/SR,
with per-operator timings and correct volumes."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from demo.phantoms import abdomen_ct_study, brain_mr_study, pelvis_study
from engine.registry import deployed_event
from engine.worker import EngineWorker, WorkerConfig
from events.catalogue import (
    InferenceCompleted,
    OperatorFinished,
    ResultPublished,
    Stage,
    StudyCompleted,
)
from events.jetstream import EventBus
from events.nats_server import free_port
from tests.engine.conftest import SECRET, Orthanc, RunningWorker, dciodvfy_errors, has, wait_for
from tests.engine.test_worker_pipelines import with_pacs

pytestmark = [
    pytest.mark.server, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="Debian dcmtk not installed"),
]


async def _storescu(port: int, called: str, files: list[Path]) -> None:
    proc = await asyncio.create_subprocess_exec(
        "storescu", "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port),
        *map(str, files), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"})
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode(errors="replace")


async def test_dcmtk_to_pipeline_aes_gives_seg_sr_back_in_orthanc(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, orthanc: Orthanc,
    tmp_path: Path,
) -> None:
    from ingest.app import IngestApp, IngestOptions
    from ingest.dicom_scp import ScpConfig
    from ingest.rules_file import RulesFile

    options = IngestOptions(instances_dir=worker_config.instances_dir,
                            scp=ScpConfig(port=free_port()), min_free_bytes=0)
    ingest = IngestApp(options, SECRET, RulesFile.open(None))
    pipelines = {n: with_pacs(reference[n], tmp_path, orthanc) for n in ("bts", "lts", "hfd")}
    for p in pipelines.values():
        await bus.publish(deployed_event(p, actor="test", stage=Stage.VALIDATION))
    studies = {"bts": brain_mr_study(1101, lesion_radius_mm=14.0),
               "lts": abdomen_ct_study(1102),
               "hfd": pelvis_study(1103, images=5, size=1024)}
    stop = asyncio.Event()
    ingest_task = asyncio.create_task(ingest.run(bus, stop))
    try:
        await asyncio.wait_for(ingest.scp.started.wait(), 15)
        while ingest.detector is None or not ingest.detector.ready.is_set():
            await asyncio.sleep(0.02)
        assert ingest.scp.port is not None
        async with RunningWorker(bus, EngineWorker(pipelines, worker_config)):
            for name, study in studies.items():
                files = study.write(tmp_path / "send" / name)
                await _storescu(ingest.scp.port, f"LM_{name.upper()}", files)
            results = {}
            for name, study in studies.items():
                evs = await wait_for(bus, study.study_uid,
                                     has("engine.inference.completed"), 90)
                results[name] = evs
    finally:
        stop.set()
        await asyncio.wait_for(ingest_task, 15)
    expected_objects = 0
    for name, evs in results.items():
        assert any(isinstance(e, StudyCompleted) and e.pipeline == name for e in evs)
        done = next(e for e in evs if isinstance(e, InferenceCompleted))
        ops = [e.operator for e in evs if isinstance(e, OperatorFinished)]
        assert ops == [op.op for op in pipelines[name].spec.operators]
        sent = [e for e in evs
                if isinstance(e, ResultPublished) and e.destination.startswith("pacs")]
        assert len(sent) == len(done.result_keys) >= 1
        expected_objects += len(sent)
        for key in done.result_keys:
            assert dciodvfy_errors(worker_config.results_dir / key) == []
    bts_done = next(e for e in results["bts"] if isinstance(e, InferenceCompleted))
    truth = studies["bts"].truth_volumes_ml()["lesion"]
    lesion = next(m.value for m in bts_done.measurements if m.name == "volume_lesion")
    assert abs(lesion - truth) / truth < 0.05
    assert len(orthanc.get("/instances")) == expected_objects  # type: ignore[arg-type]
