"""A two-model cascade on the reference BTS model: a locating TorchScript program finds the
brain at 6 mm, its mask crops the image, BTS segments the lesion inside the crop, and the
result lands on the source grid (engine/README.md, "Cascades").

The locator is a 'model' with a known answer (brain where the scaled intensity > 0.5), so
tests can compare the platform's run with the same steps done by hand with MONAI, and
``lastmile bench e2e`` can time a cascade. Needs the ``train`` extra (torch); the platform
never imports this module.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import yaml

from engine.spec import REFERENCE_DIR, load_pipeline

#: voxels added on each side of the located brain's box before segmenting
MARGIN = 4


class BrainLocator(torch.nn.Module):
    """Logits ``(N, 2, ...)`` of background / brain for a scaled image ``(N, 1, ...)``:
    brain where the intensity > 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20.0


def cascade_pipeline(out_dir: Path, *, name: str = "bts-cascade",
                     ae_title: str | None = None) -> tuple[Path, Path]:
    """Write the locator program (``locator.ts``) and a pipeline file that runs it before
    the reference BTS model into ``out_dir``; model paths are absolute. Returns
    ``(pipeline file, locator program)``. ``ae_title`` defaults to BTS's own."""
    out_dir.mkdir(parents=True, exist_ok=True)
    locator = out_dir / "locator.ts"
    torch.jit.script(BrainLocator()).save(str(locator))
    bts = load_pipeline(REFERENCE_DIR / "bts.yaml")
    data = yaml.safe_load(bts.path.read_text())
    data["name"] = name
    if ae_title is not None:
        data["ae_title"] = ae_title
    data["model"]["path"] = str(bts.model_path)
    data["model"]["card"] = str(bts.card_path)
    data["models"] = {"locator": {"name": "brain-locator", "version": "1",
                                  "path": str(locator),
                                  "sha256": hashlib.sha256(locator.read_bytes()).hexdigest(),
                                  "output": {"values": "logits", "activation": "softmax"}}}
    data["operators"] = [
        {"op": "select_series"}, {"op": "load_volume"},
        # 1. locate, at 6 mm
        {"op": "Spacing", "params": {"pixdim": [6.0, 6.0, 6.0]}},
        {"op": "ScaleIntensityRange", "params": {"a_min": 0, "a_max": 720}},
        {"op": "SimpleInferer", "params": {"model": "locator", "classes": 2}},
        {"op": "Invert"}, {"op": "argmax"},
        # 2. crop to the brain's box, segment the lesion inside it
        {"op": "crop_to_labels", "params": {"labels": [1], "margin": MARGIN}},
        {"op": "Orientation", "params": {"axcodes": "SPL"}},
        {"op": "NormalizeIntensity", "params": {"nonzero": True}},
        {"op": "SlidingWindowInferer", "params": {"roi_size": [32, 64, 64], "sw_batch_size": 2,
                                                  "overlap": 0.25, "mode": "gaussian",
                                                  "classes": 2}},
        {"op": "Invert"}, {"op": "argmax"},
        {"op": "KeepLargestConnectedComponent", "params": {"applied_labels": [1]}},
        {"op": "volumes"}, {"op": "write_seg"}, {"op": "write_sr"}]
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, locator
