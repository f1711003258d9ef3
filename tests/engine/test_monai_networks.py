"""MONAI's own architectures (``UNet``, ``SegResNet``), trained on our phantoms, deployed
as TorchScript and as ONNX: the same study through both runtimes gives the same mask,
and both equal MONAI's own inference with the transforms the pipeline file names.

The weights are the committed state dicts (``demo.training.monai_nets``); the programs
are exported from them here. Each pipeline runs through the real worker on a real
nats-server; MONAI's side reads the series with MONAI's ``PydicomReader`` (a reader that
is not ours) and is done by hand: ``Orientation``, ``NormalizeIntensity``,
``SlidingWindowInferer`` on the ``nn.Module``, the inverse of the orientation, argmax,
``KeepLargestConnectedComponent``. About 7 s (UNet) and 17 s (SegResNet) on this machine,
three times that under load (``slow``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from engine.ops.postprocess import dice

torch = pytest.importorskip("torch", reason="needs torch (train extra)")
pytest.importorskip("monai", reason="needs MONAI (train extra)")
pytest.importorskip("onnx", reason="the ONNX export needs onnx (train extra)")

FLAIR = "AX T2 FLAIR"  # the series the BTS pipeline selects in brain_mr_study


def _monai_own(series: Path, net: Any, operators: dict[str, dict[str, Any]]
               ) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's inference on the series folder: the lesion mask on the reader's grid
    (column, row, slice) and that grid's RAS affine."""
    from monai.data import MetaTensor
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import (
        Compose,
        KeepLargestConnectedComponent,
        LoadImage,
        NormalizeIntensity,
        Orientation,
    )

    image = LoadImage(reader="PydicomReader", image_only=True,
                      ensure_channel_first=True)(str(series))
    pre = Compose([Orientation(**operators["Orientation"]),
                   NormalizeIntensity(**operators["NormalizeIntensity"])])
    x = pre(image)
    window = {k: v for k, v in operators["SlidingWindowInferer"].items() if k != "classes"}
    with torch.no_grad():
        logits = SlidingWindowInferer(**window)(x[None], net)[0]
    out = MetaTensor(logits.as_tensor(), meta=dict(x.meta))
    out.applied_operations = list(x.applied_operations)
    back = pre.inverse(out)  # onto the grid the reader gave
    labels = back.as_tensor().argmax(0, keepdim=True)
    labels = KeepLargestConnectedComponent(**operators["KeepLargestConnectedComponent"])(
        labels)
    return np.asarray(labels[0]).astype(bool), np.asarray(image.affine, np.float64)


def _seg_on_grid(seg_path: Path, sources: list[pydicom.Dataset], affine: np.ndarray
                 ) -> np.ndarray:
    """The SEG's lesion mask on the reader's grid: slice k is the source image whose
    Image Position (Patient) is that slice's origin (RAS -> LPS: x, y negated)."""
    import highdicom as hd

    corner = [np.array([-p[0], -p[1], p[2]]) for p in
              (affine @ np.array([0.0, 0.0, k, 1.0]) for k in range(len(sources)))]
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in sources])
    order = [str(sources[int(np.argmin(np.linalg.norm(positions - c, axis=1)))]
                 .SOPInstanceUID) for c in corner]
    assert len(set(order)) == len(sources)
    seg = hd.seg.segread(seg_path)
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=order,
                                               ignore_spatial_locations=True,
                                               assert_missing_frames_are_empty=True)
    return np.transpose(frames[..., 0] > 0, (2, 1, 0))  # (slice, row, col) -> (col, row, slice)


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("network", ["unet", "segresnet"])
async def test_monai_network_same_mask_on_onnx_torchscript_and_monai(
        bus, tmp_path: Path, network: str) -> None:
    from demo.phantoms import brain_mr_study
    from demo.training.monai_nets import export_onnx_file, export_torchscript, load_network
    from engine.feed import completed_event, feed_study
    from engine.registry import deployed_event
    from engine.runtimes import ORT_CPU, TORCH
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

    net = load_network(network)  # checks the state dict's sha256
    models = tmp_path / "models"
    files = {TORCH: export_torchscript(net, models / f"{network}.ts"),
             ORT_CPU: export_onnx_file(net, models / f"{network}.onnx")}
    names = {TORCH: f"bts{network}torch", ORT_CPU: f"bts{network}onnx"}
    pipelines = {names[rt]: load_pipeline(model_pipeline(REFERENCE_DIR / "bts.yaml", path,
                                                         tmp_path, names[rt], runtime=rt))
                 for rt, path in files.items()}
    config = WorkerConfig(instances_dir=tmp_path / "instances",
                          results_dir=tmp_path / "results", secret=SECRET,
                          worker_id=f"w-{network}", max_attempts=1, ack_wait_s=60.0,
                          heartbeat_s=1.0)
    for loaded in pipelines.values():
        await bus.publish(deployed_event(loaded, actor="test", stage=Stage.VALIDATION))
    study = brain_mr_study(131, lesion_radius_mm=14.0)
    stored, _ = await feed_study(bus, study.datasets, config.instances_dir, SECRET,
                                 pipeline=names[ORT_CPU], called_ae="LM_BTS", complete=False)
    async with RunningWorker(bus, EngineWorker(pipelines, config)):
        for name in pipelines:
            await bus.publish(completed_event(stored, pipeline=name))
        events = await wait_for(bus, study.study_uid,
                                has("engine.inference.completed", 2), timeout_s=180)
    results = {e.pipeline: e for e in events if isinstance(e, InferenceCompleted)}
    assert {rt: results[n].runtime for rt, n in names.items()} == {TORCH: TORCH,
                                                                  ORT_CPU: ORT_CPU}

    # MONAI's own inference on the same series, as written to disk
    sources = [d for d in study.datasets if d.SeriesDescription == FLAIR]
    series = tmp_path / "series"
    series.mkdir()
    for i, ds in enumerate(sources):
        ds.save_as(series / f"{i:03d}.dcm", enforce_file_format=True)
    operators = {op.op: dict(op.params) for op in pipelines[names[TORCH]].spec.operators}
    theirs, affine = _monai_own(series, net, operators)

    masks: dict[str, np.ndarray] = {}
    for rt, name in names.items():
        seg = next(config.results_dir / k for k in results[name].result_keys if "seg" in k)
        assert dciodvfy_errors(seg) == [], seg
        masks[rt] = _seg_on_grid(seg, sources, affine)
    onnx, ts = masks[ORT_CPU], masks[TORCH]
    assert onnx.shape == ts.shape == theirs.shape
    # a real lesion mask, not an empty or whole-field one
    assert 0 < theirs.sum() < 0.05 * theirs.size
    truth = np.transpose(study.labels == 1, (2, 1, 0))
    print(f"{network}: dice onnx/torch {dice(onnx, ts):.5f}, onnx/monai "
          f"{dice(onnx, theirs):.5f}, torch/monai {dice(ts, theirs):.5f}, "
          f"monai/truth {dice(theirs, truth):.3f}")
    assert dice(onnx, ts) >= 0.999
    assert dice(onnx, theirs) >= 0.999
    assert dice(ts, theirs) >= 0.999
    # the trained weights, on the right voxels: the mask finds the phantom's lesion
    assert dice(theirs, truth) > 0.8
