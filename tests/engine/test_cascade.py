"""Cascades: a first model locates the brain, its mask crops the image, the reference BTS
model segments inside the crop, and the result lands on the source grid; equal to the same
steps done by hand with MONAI on the array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import (
    Compose,
    KeepLargestConnectedComponent,
    NormalizeIntensity,
    ScaleIntensityRange,
    Spacing,
)
from monai.transforms.utils import generate_spatial_bounding_box

from demo.phantoms import brain_mr_study
from demo.training.cascade import MARGIN, cascade_pipeline
from engine.dicom_results import Provenance
from engine.errors import SpecError
from engine.feed import feed_study
from engine.ops.postprocess import dice
from engine.ops.volume import series_to_volume
from engine.registry import deployed_event
from engine.runtimes import OnnxRuntimeCpu, TorchRuntime
from engine.spec import load_pipeline
from engine.steps import RunContext, run_steps
from engine.worker import EngineWorker, WorkerConfig
from events.catalogue import InferenceCompleted, OperatorFinished, Stage
from events.jetstream import EventBus
from tests.engine.conftest import SECRET, RunningWorker, dciodvfy_errors, has, wait_for


def _by_hand(array: np.ndarray, spacing: tuple[float, float, float], locator: Path,
             segmenter: Path) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The same steps with MONAI on the (z, y, x) array, without Lastmile's operators."""
    net = torch.jit.load(str(locator))
    img = MetaTensor(torch.from_numpy(array[None].astype(np.float32)),
                     affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))
    pre = Compose([Spacing(pixdim=(6.0, 6.0, 6.0)),
                   ScaleIntensityRange(a_min=0, a_max=720)])
    small = pre(img)
    with torch.inference_mode():
        probs = torch.softmax(net(small[None].as_tensor())[0], 0)
    out = MetaTensor(probs, meta=dict(small.meta))
    out.applied_operations = list(small.applied_operations)
    located = np.asarray(pre.inverse(out).argmax(0)) == 1
    start, end = generate_spatial_bounding_box(located[None], margin=MARGIN)
    box = tuple(slice(max(0, s), min(e, n))  # the margin stays inside the grid
                for s, e, n in zip(start, end, array.shape, strict=True))
    crop = NormalizeIntensity(nonzero=True)(torch.from_numpy(array[box][None].astype(np.float32)))
    session = ort.InferenceSession(str(segmenter), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def segment(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    inferer = SlidingWindowInferer(roi_size=(32, 64, 64), sw_batch_size=2, overlap=0.25,
                                   mode="gaussian")
    with torch.inference_mode():
        logits = inferer(torch.as_tensor(crop)[None], segment)[0]
    labels = KeepLargestConnectedComponent(applied_labels=[1])(logits.argmax(0, keepdim=True))
    full = np.zeros(array.shape, np.uint8)
    full[box] = np.asarray(labels)[0]
    return full, box


@pytest.mark.slow
def test_locate_crop_segment_equals_the_same_steps_by_hand_with_monai(tmp_path: Path) -> None:
    path, locator = cascade_pipeline(tmp_path)
    loaded = load_pipeline(path)
    study = brain_mr_study(31)
    ctx = RunContext(pipeline=loaded, runtime=OnnxRuntimeCpu.load(loaded.model_path),
                     runtimes={"locator": TorchRuntime.load(locator, device="cpu")},
                     datasets=study.datasets,
                     provenance=Provenance("m", "1", "ab" * 32, "bts-cascade", "1", "rk"))
    timings = run_steps(ctx)
    crop = next(t for t in timings if t.operator == "crop_to_labels")
    vol = series_to_volume(ctx.series)
    expected, box = _by_hand(vol.array, vol.spacing, locator, loaded.model_path)
    # the crop really cropped (the brain is smaller than the field of view)
    assert np.prod([s.stop - s.start for s in box]) < 0.85 * vol.array.size
    # Lastmile reports the box in the image's (column, row, slice) order
    ijk = [(int(s.start), int(s.stop)) for s in reversed(box)]
    assert crop.detail == f"box {[a for a, _ in ijk]}..{[b for _, b in ijk]}"
    assert ctx.labels is not None and ctx.labels.shape == vol.array.shape
    assert (expected == 1).sum() > 100 and dice(ctx.labels == 1, study.labels == 1) > 0.8
    assert dice(ctx.labels == 1, expected == 1) >= 0.999
    outside = np.ones(vol.array.shape, bool)
    outside[box] = False
    assert not ctx.labels[outside].any()


def test_an_inferer_naming_an_unknown_model_is_refused_at_load(tmp_path: Path) -> None:
    path, _ = cascade_pipeline(tmp_path)
    text = path.read_text().replace("model: locator", "model: finder")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(SpecError, match=r"bad.yaml:\d+: operators.4.params.model: no model "
                                        r"'finder' under models: \(locator\)"):
        load_pipeline(bad)


@pytest.mark.server
@pytest.mark.slow
async def test_a_worker_runs_a_cascade_with_both_models_and_valid_results(
        bus: EventBus, worker_config: WorkerConfig, tmp_path: Path) -> None:
    path, _ = cascade_pipeline(tmp_path)
    loaded = load_pipeline(path)
    await bus.publish(deployed_event(loaded, actor="test", stage=Stage.VALIDATION))
    study = brain_mr_study(32, lesion_radius_mm=15.0)
    async with RunningWorker(bus, EngineWorker({loaded.name: loaded}, worker_config)):
        await feed_study(bus, study.datasets, worker_config.instances_dir, SECRET,
                         pipeline=loaded.name, called_ae="LM_BTS")
        events = await wait_for(bus, study.study_uid, has("engine.inference.completed"),
                                timeout_s=240)
    done = next(e for e in events if isinstance(e, InferenceCompleted))
    ml = next(m.value for m in done.measurements if m.name == "volume_lesion")
    truth = study.truth_volumes_ml()["lesion"]
    assert abs(ml - truth) / truth < 0.05
    details = {e.operator: e.detail for e in events if isinstance(e, OperatorFinished)}
    assert "on torch (locator)" in (details["SimpleInferer"] or "")
    assert "on onnxruntime-cpu" in (details["SlidingWindowInferer"] or "")
    assert (details["crop_to_labels"] or "").startswith("box ")
    for key in done.result_keys:
        assert dciodvfy_errors(worker_config.results_dir / key) == []
