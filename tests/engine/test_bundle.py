"""`lastmile pipelines from-bundle`: a bundle in MONAI's layout, made here from the BTS
reference model as TorchScript, becomes a pipeline file that loads, deploys and runs, with
the bundle's own transforms, labels and model; what cannot be mapped is named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from demo.phantoms import brain_mr_study
from engine.ops.postprocess import dice
from engine.registry import deployed_event, fold_pipelines
from engine.runtimes import TorchRuntime
from engine.spec import load_pipeline
from events.catalogue import Stage
from lastmile.cli import app
from tests.engine.test_monai_ops import REFERENCE_MASKS, run

pytest.importorskip("torch")

METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
              "0.8.1/meta_schema_20220324.json",
    "version": "0.3.1",
    "name": "BTS lesion segmentation",
    "task": "Brain lesion segmentation on FLAIR",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MRI",
                             "num_channels": 1, "spatial_shape": [32, 64, 64],
                             "dtype": "float32"}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                             "spatial_shape": [32, 64, 64], "dtype": "float32",
                             "channel_def": {"0": "background", "1": "lesion"}}},
    },
}

INFERENCE = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "image_key": "image",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/workspace/data",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1,
                    "out_channels": 2, "channels": [16, 32], "strides": [2]},
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "SPL"},
            {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True},
            {"_target_": "scripts.transforms.SkullStripd", "keys": "@image_key"},
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ],
    },
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 64, 64],
                "sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian"},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
             "orig_keys": "@image_key", "nearest_interp": False},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "KeepLargestConnectedComponentd", "keys": "pred",
             "applied_labels": [1]},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir"},
        ],
    },
}


def _bundle(root: Path) -> Path:
    from demo.training.torchscript import export_reference

    bundle = root / "bts_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=2))
    (bundle / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=2))
    path, _ = export_reference("bts", bundle / "models")
    path.rename(bundle / "models" / "model.ts")
    return bundle


@pytest.mark.slow
def test_a_monai_bundle_becomes_a_pipeline_that_deploys_and_runs(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    target = tmp_path / "pipelines" / "bts-bundle.yaml"
    target.parent.mkdir()
    result = CliRunner().invoke(app, ["pipelines", "from-bundle", str(bundle),
                                      "--out", str(target)])
    assert result.exit_code == 0, result.output
    # what cannot be mapped is named, on the terminal and in the file
    assert "not mapped: preprocessing: SkullStripd" in result.output
    assert "# not mapped: preprocessing: SkullStripd" in target.read_text()
    loaded = load_pipeline(target)
    ops = [o.op for o in loaded.spec.operators]
    assert ops == ["select_series", "load_volume", "Orientation", "NormalizeIntensity",
                   "SlidingWindowInferer", "Invert", "argmax",
                   "KeepLargestConnectedComponent", "volumes", "write_seg", "write_sr"]
    assert loaded.spec.model.labels == {1: "lesion"}
    assert loaded.spec.selection.modalities == ("MR",)
    assert loaded.model_path == (bundle / "models" / "model.ts").resolve()
    assert loaded.spec.runtime == "torch"
    # deploys: the deployment event carries the file's hash and the registry folds it
    event = deployed_event(loaded, actor="test", stage=Stage.VALIDATION)
    registry = fold_pipelines([event])
    assert registry[loaded.name].file_sha256 == loaded.file_sha256
    # runs: the bundle's procedure on a phantom gives the reference pipeline's mask
    ctx = run(loaded, brain_mr_study(11).datasets,
              TorchRuntime.load(loaded.model_path, device="cpu"))
    before = np.load(REFERENCE_MASKS)["bts_11"]
    assert ctx.labels is not None and dice(ctx.labels == 1, before == 1) >= 0.999
    assert any(kind == "SEG" for kind, _ in ctx.results)


def test_a_folder_that_is_not_a_bundle_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(METADATA))
    result = CliRunner().invoke(app, ["pipelines", "from-bundle", str(tmp_path)])
    assert result.exit_code == 2
    assert "no configs/inference.json (or .yaml): not a MONAI bundle" in result.output
