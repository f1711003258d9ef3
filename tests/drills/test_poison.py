"""Drills: a poison event, and a pipeline whose model always raises.

Both end dead-lettered (``system.delivery.failed`` with the reason) and the consumer
goes on with the next message. Moved from tests/events/test_jetstream.py and
tests/engine/test_worker_failures.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from demo.phantoms import brain_mr_study, pelvis_study
from engine.feed import feed_study
from engine.registry import deployed_event
from engine.spec import LoadedPipeline, load_pipeline
from engine.worker import EngineWorker, WorkerConfig
from events.base import Event
from events.catalogue import DeliveryFailed, InferenceCompleted, InferenceFailed, Stage
from events.jetstream import Delivery, EventBus
from events.subjects import PREFIX, type_filter
from tests.drills.report import record
from tests.engine.conftest import SECRET, RunningWorker, has, wait_for
from tests.events.test_jetstream import _collect_dead_letters, requested

pytestmark = pytest.mark.server


async def test_malformed_messages_are_dead_lettered_with_the_reason(bus: EventBus) -> None:
    t0 = time.perf_counter()
    subject = f"{PREFIX}._.engine.inference.requested"
    await bus.js.publish(subject, b"\x89PNG not an event")
    await bus.js.publish(subject, b'{"type": "engine.inference.requested", "schema_version": 1}')
    await bus.publish(requested(3))
    handled: list[str] = []
    stop = asyncio.Event()

    async def handle(event: Event, delivery: Delivery) -> None:
        handled.append(event.event_id)
        stop.set()

    await asyncio.wait_for(
        bus.consume("w", handle, filter_subjects=[type_filter("engine.inference.requested")],
                    stop=stop), timeout=10)
    dead = await _collect_dead_letters(bus)
    assert len(handled) == 1
    assert len(dead) == 2
    assert dead[0].reason.startswith("undecodable: not a Lastmile event")
    assert dead[1].reason.startswith("undecodable: invalid engine.inference.requested")
    assert dead[0].payload_size == len(b"\x89PNG not an event")
    record("poison events",
           done="two undecodable messages (not an event; an event missing its fields) "
                "ahead of a good one on a durable consumer's subject",
           items=3, acknowledged=3, lost=0, duration_s=time.perf_counter() - t0,
           dead_lettered=len(dead), handled=len(handled))


def _onnx_pipeline(tmp: Path, base: LoadedPipeline, name: str, graph: onnx.GraphProto
                   ) -> LoadedPipeline:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp / f"{name}.onnx"
    onnx.save(model, str(path))
    data = yaml.safe_load(base.path.read_text())
    data["model"].update(path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                         card=str(base.card_path))
    spec = tmp / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_pipeline(spec)


def _raising_graph() -> onnx.GraphProto:
    """Reshape to a shape that never fits: ONNX Runtime raises on every call."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 32, 64, 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [7, 3])
    return helper.make_graph([helper.make_node("Reshape", ["image", "shape"], ["logits"])],
                             "raises", [x], [y], [shape])


def _wrong_shape_graph() -> onnx.GraphProto:
    """Returns its input: one channel where the pipeline declares two classes."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 1, 32, 64, 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 1, 32, 64, 64])
    return helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])],
                             "wrong", [x], [y])


FAILING = {"_raising_graph": "model always raises (ONNX Runtime error)",
           "_wrong_shape_graph": "model always fails (wrong output shape)"}


@pytest.mark.slow
@pytest.mark.parametrize(("graph", "message"), [
    (_raising_graph, "ModelFailed"), (_wrong_shape_graph, "expected (2, 2, 32, 64, 64)")])
async def test_failing_model_ends_final_or_dead_lettered_and_queue_moves_on(
    bus: EventBus, reference: dict, worker_config: WorkerConfig, tmp_path: Path,
    graph, message: str,  # type: ignore[no-untyped-def]
) -> None:
    t0 = time.perf_counter()
    broken = _onnx_pipeline(tmp_path, reference["bts"], "broken", graph())
    hfd = reference["hfd"]
    for p in (broken, hfd):
        await bus.publish(deployed_event(p, actor="test", stage=Stage.VALIDATION))
    study = brain_mr_study(701)
    other = pelvis_study(702, images=1, size=256)
    async with RunningWorker(bus, EngineWorker({"bts": broken, "hfd": hfd}, worker_config)):
        await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                         pipeline="bts", called_ae="LM_BTS")
        await feed_study(bus, other.datasets, worker_config.instances_dir, SECRET,
                         pipeline="hfd", called_ae="LM_HFD")
        await wait_for(bus, other.study_uid, has("engine.inference.completed"))
        # the runtime raising is an edge (device, memory: engine.errors), retried then
        # dead-lettered; a model whose output never fits its pipeline file fails the same
        # way on the same bytes, so it is final at the first attempt
        retried = graph is _raising_graph
        evs = await wait_for(bus, study.study_uid,
                             has("system.delivery.failed" if retried
                                 else "engine.inference.failed"))
    failed = sorted((e for e in evs if isinstance(e, InferenceFailed)), key=lambda e: e.attempt)
    if retried:
        assert [f.attempt for f in failed] == [1, 2] and [f.final for f in failed] == [False, True]
        dead = next(e for e in evs if isinstance(e, DeliveryFailed))
        assert dead.deliveries == 2 and dead.original_type == "ingest.study.completed"
    else:
        assert [(f.attempt, f.final) for f in failed] == [(1, True)]
        assert not any(isinstance(e, DeliveryFailed) for e in evs)
    assert all(f.operator == "SlidingWindowInferer" and message in f.error for f in failed)
    others = await wait_for(bus, other.study_uid, has("engine.inference.completed"))
    assert sum(isinstance(e, InferenceCompleted) for e in others) == 1
    assert not any(isinstance(e, InferenceCompleted) for e in evs)
    record(FAILING[graph.__name__],
           done="a BTS pipeline whose model fails on every call, and an HFD study "
                "behind it, on one worker (2 attempts)",
           items=2, acknowledged=2, lost=0, duration_s=time.perf_counter() - t0,
           attempts=len(failed), dead_lettered=int(retried), other_study_completed=1)
