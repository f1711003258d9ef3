"""The ``torch`` runtime: choice by model format, and the same study through ONNX Runtime
and through TorchScript gives the same result (real nats-server, real worker)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engine.errors import RuntimeUnavailable
from engine.runtimes import (
    AUTO,
    ORT_CPU,
    TENSORRT,
    TORCH,
    HostCapabilities,
    model_format,
    select_runtime,
)

CPU_HOST = HostCapabilities(gpu=False, ort_providers=("CPUExecutionProvider",),
                            tensorrt_importable=False, pycuda_importable=False,
                            torch_importable=True)
GPU_HOST = HostCapabilities(gpu=True, ort_providers=("CPUExecutionProvider",),
                            tensorrt_importable=False, pycuda_importable=False,
                            torch_importable=True)


def test_model_format_follows_the_file_suffix() -> None:
    assert model_format(Path("m.onnx")) == "onnx"
    for name in ("m.ts", "m.pt", "m.PTH", "m.pt2"):
        assert model_format(Path(name)) == "torch"
    with pytest.raises(RuntimeUnavailable, match="not a known model format"):
        model_format(Path("m.h5"))


def test_auto_runs_a_pytorch_program_on_torch_and_says_where() -> None:
    cpu = select_runtime(AUTO, CPU_HOST, "torch")
    assert (cpu.name, "CPU (no GPU)" in cpu.reason) == (TORCH, True)
    gpu = select_runtime(AUTO, GPU_HOST, "torch")
    assert gpu.name == TORCH and "CUDA" in gpu.reason
    # ONNX files keep their own choice
    assert select_runtime(AUTO, CPU_HOST, "onnx").name == ORT_CPU


def test_a_runtime_that_cannot_load_the_format_is_refused_with_the_reason() -> None:
    with pytest.raises(RuntimeUnavailable, match="PyTorch program"):
        select_runtime(TENSORRT, GPU_HOST, "torch")
    with pytest.raises(RuntimeUnavailable, match="ONNX file"):
        select_runtime(TORCH, CPU_HOST, "onnx")
    no_torch = HostCapabilities(gpu=False, ort_providers=(), tensorrt_importable=False,
                                pycuda_importable=False, torch_importable=False)
    with pytest.raises(RuntimeUnavailable, match="torch not installed"):
        select_runtime(AUTO, no_torch, "torch")


# ----------------------------------------------------------------- same study, two runtimes

torch = pytest.importorskip("torch", reason="the torch runtime needs torch (train extra)")


def _seg_mask(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array.astype(bool)


@pytest.mark.server
@pytest.mark.slow
async def test_bts_through_torchscript_equals_onnx_runtime(bus, reference, tmp_path: Path
                                                           ) -> None:
    from demo.phantoms import brain_mr_study
    from demo.training.torchscript import export_reference
    from engine.feed import completed_event, feed_study
    from engine.registry import deployed_event
    from engine.spec import REFERENCE_DIR, load_pipeline
    from engine.worker import EngineWorker, WorkerConfig
    from events.catalogue import InferenceCompleted, Stage
    from tests.engine.conftest import (
        SECRET,
        RunningWorker,
        dciodvfy_errors,
        has,
        model_pipeline,
        wait_for,
    )

    program, _ = export_reference("bts", tmp_path / "models")
    torch_bts = load_pipeline(model_pipeline(REFERENCE_DIR / "bts.yaml", program, tmp_path,
                                             "btstorch"))
    pipelines = {"bts": reference["bts"], "btstorch": torch_bts}
    config = WorkerConfig(instances_dir=tmp_path / "instances",
                          results_dir=tmp_path / "results", secret=SECRET,
                          worker_id="w-torch", max_attempts=1, ack_wait_s=60.0,
                          heartbeat_s=1.0)
    for loaded in pipelines.values():
        await bus.publish(deployed_event(loaded, actor="test", stage=Stage.VALIDATION))
    study = brain_mr_study(131, lesion_radius_mm=14.0)
    # one study, stored once, completed for both pipelines: the same bytes in each run
    stored, _ = await feed_study(bus, study.datasets, config.instances_dir, SECRET,
                                 pipeline="bts", called_ae="LM_BTS", complete=False)
    worker = EngineWorker(pipelines, config)
    async with RunningWorker(bus, worker):
        for name in pipelines:
            await bus.publish(completed_event(stored, pipeline=name))
        events = await wait_for(bus, study.study_uid,
                                has("engine.inference.completed", 2), timeout_s=180)
    results = {e.pipeline: e for e in events if isinstance(e, InferenceCompleted)}
    masks: dict[str, np.ndarray] = {}
    for name, done in results.items():
        seg = next(config.results_dir / k for k in done.result_keys if "seg" in k)
        assert dciodvfy_errors(seg) == [], seg
        masks[name] = _seg_mask(seg)
    assert results["btstorch"].runtime == TORCH
    assert "CPU" in results["btstorch"].runtime_reason
    a, b = masks["bts"], masks["btstorch"]
    assert a.shape == b.shape and a.sum() > 0
    dice = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    assert dice >= 0.999, dice
    vol = {n: next(m.value for m in r.measurements if m.name == "volume_lesion")
           for n, r in results.items()}
    assert abs(vol["bts"] - vol["btstorch"]) / vol["bts"] < 0.001, vol


def test_gpu_check_bundle_runs_on_cpu_and_compares_with_its_reference(tmp_path: Path) -> None:
    """The bundle `lastmile bench gpu` makes runs with its self-contained script; here only
    the CPU mode (no GPU on the build machines) and every model must pass."""
    from bench.gpu import build_bundle, run_check

    manifest = build_bundle(tmp_path / "bundle", names=("bts", "hfd"), segresnet=False)
    names = {m["name"] for m in manifest["models"]}
    assert names == {"bts", "hfd"}
    rc = run_check(tmp_path / "bundle", runs=1, json_out=tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())
    assert rc == 0 and result["ok"], result
    rows = {(r["model"], r["mode"]) for r in result["rows"]}
    assert {(n, "cpu-fp32") for n in names} <= rows
    hfd = next(r for r in result["rows"] if r["model"] == "hfd")
    assert hfd["agreement"] == 1.0 and hfd["rel_diff"] < 1e-4
    # a corrupted reference is caught (the comparison can fail)
    data = dict(np.load(tmp_path / "bundle" / "bts.npz"))
    data["ref_logits"] = -data["ref_logits"]
    np.savez_compressed(tmp_path / "bundle" / "bts.npz", **data)
    assert run_check(tmp_path / "bundle", runs=1, only=("bts",)) == 1
