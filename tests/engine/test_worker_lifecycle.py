"""Long runs stay alive (in_progress), amendments re-run under a new key, the `up` service."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from demo.phantoms import brain_mr_study, pelvis_study
from engine.feed import feed_study, stored_events
from engine.registry import deployed_event
from engine.runtimes import ORT_CPU, OnnxRuntimeCpu
from engine.spec import REFERENCE_DIR, load_pipeline
from engine.worker import EngineWorker, WorkerConfig
from events.base import deterministic_id
from events.catalogue import (
    InferenceCompleted,
    InferenceStarted,
    Stage,
    StudyAmended,
)
from events.jetstream import EventBus
from lastmile.services_engine import EngineWorkerService, engine_services, worker_config
from lastmile.settings import Settings
from tests.engine.conftest import SECRET, RunningWorker, has, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]


class SlowRuntime:
    """The real HFD session, slowed down: a run longer than the consumer's ack wait."""

    name = ORT_CPU

    def __init__(self, inner: OnnxRuntimeCpu, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(self.delay_s)
        return self.inner.run(batch)


async def test_a_run_longer_than_ack_wait_is_not_redelivered(
    bus: EventBus, reference: dict, worker_config: WorkerConfig
) -> None:
    hfd = reference["hfd"]
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    worker_config.ack_wait_s, worker_config.heartbeat_s = 1.5, 0.3
    worker = EngineWorker({"hfd": hfd}, worker_config)
    slow = SlowRuntime(OnnxRuntimeCpu.load(hfd.model_path), delay_s=4.0)
    worker._runtimes[(hfd.spec.model.sha256, ORT_CPU)] = slow  # model "already loaded"
    study = pelvis_study(1001, images=1, size=256)
    async with RunningWorker(bus, worker):
        await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                         pipeline="hfd", called_ae="LM_HFD")
        evs = await wait_for(bus, study.study_uid, has("engine.inference.completed"), 30)
    started = [e for e in evs if isinstance(e, InferenceStarted)]
    assert [s.attempt for s in started] == [1]  # alive all along: never redelivered
    done = next(e for e in evs if isinstance(e, InferenceCompleted))
    assert done.inference_s >= 4.0
    assert [o.status for o in worker.outcomes] == ["completed"]


async def test_amended_study_with_rerun_gets_a_new_run_and_result(
    bus: EventBus, reference: dict, worker_config: WorkerConfig
) -> None:
    hfd = reference["hfd"]
    await bus.publish(deployed_event(hfd, actor="test", stage=Stage.VALIDATION))
    study = pelvis_study(1002, images=3, size=256)
    worker = EngineWorker({"hfd": hfd}, worker_config)
    async with RunningWorker(bus, worker):
        await feed_study(bus, study.datasets[:2], worker_config.instances_dir, SECRET,
                         pipeline="hfd", called_ae="LM_HFD")
        await wait_for(bus, study.study_uid, has("engine.inference.completed"))
        late = stored_events(study.datasets[2:], worker_config.instances_dir, SECRET,
                             called_ae="LM_HFD")
        await bus.publish_many(late)
        amended = StudyAmended.new(actor="ingest", study_uid=study.study_uid, pipeline="hfd",
                                   event_id=deterministic_id("amended", study.study_uid, 1),
                                   new_instance_count=1, series_uids=(late[0].series_uid,),
                                   rerun=True)
        await bus.publish(amended)
        evs = await wait_for(bus, study.study_uid, has("engine.inference.completed", 2))
    first, second = [e for e in evs if isinstance(e, InferenceCompleted)]
    assert first.run_key != second.run_key
    assert len(first.findings) == 4 and len(second.findings) == 6  # the late image is in


def test_up_service_uses_settings_and_finds_the_reference_pipelines(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, pipelines_dir=tmp_path / "site-pipelines",
                        site_secret="x" * 32, worker_id="w1")
    service = engine_services(settings)[0]
    assert isinstance(service, EngineWorkerService) and service.name == "engine-worker"
    cfg = worker_config(settings)
    assert cfg.instances_dir == settings.instances_dir and cfg.worker_id == "w1"
    assert cfg.secret == b"x" * 32
    from lastmile.services_engine import pipeline_dirs

    assert pipeline_dirs(settings)[0] == REFERENCE_DIR


def _threshold_graph() -> onnx.GraphProto:
    """A 'model' made by hand: class-1 logit = 10 * (x - 0.5). No code, just a file."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 32, 64, 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2, 32, 64, 64])
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    ten = helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [helper.make_node("Sub", ["image", "half"], ["centred"]),
             helper.make_node("Mul", ["centred", "ten"], ["fg"]),
             helper.make_node("Mul", ["image", "zero"], ["bg"]),
             helper.make_node("Concat", ["bg", "fg"], ["logits"], axis=1)]
    return helper.make_graph(nodes, "threshold", [x], [y], [half, ten, zero])


async def test_a_new_onnx_model_deploys_with_a_pipeline_file_alone(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, tmp_path: Path
) -> None:
    model = helper.make_model(_threshold_graph(),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx_path = tmp_path / "bright-spot.onnx"
    onnx.save(model, str(onnx_path))
    data = yaml.safe_load(reference["bts"].path.read_text())
    data["name"], data["ae_title"] = "bright", "LM_BRIGHT"
    data["operators"][3] = {"op": "ScaleIntensityRange",
                            "params": {"a_min": 600, "a_max": 700, "b_min": 0.0, "b_max": 1.0,
                                       "clip": True}}
    data["operators"] = [op for op in data["operators"] if op["op"] != "longitudinal"]
    data["model"] = {"name": "bright-spot", "version": "0.1", "path": str(onnx_path),
                     "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
                     "card": str(reference["bts"].card_path), "labels": {1: "spot"},
                     "output": {"values": "logits", "activation": "softmax"}}
    spec_path = tmp_path / "bright.yaml"
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    bright = load_pipeline(spec_path)
    await bus.publish(deployed_event(bright, actor="test", stage=Stage.VALIDATION))
    study = brain_mr_study(1003, lesion_radius_mm=16.0)
    async with RunningWorker(bus, EngineWorker({"bright": bright}, worker_config)):
        await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                         pipeline="bright", called_ae="LM_BRIGHT")
        evs = await wait_for(bus, study.study_uid, has("engine.inference.completed"))
    done = next(e for e in evs if isinstance(e, InferenceCompleted))
    spot = next(m.value for m in done.measurements if m.name == "volume_spot")
    truth = study.truth_volumes_ml()["lesion"]
    assert abs(spot - truth) / truth < 0.05
    assert done.model_name == "bright-spot"
