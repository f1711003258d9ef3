"""``lastmile bench gpu``: the GPU check's bundle, made here, run on a GPU host.

The build machines have no GPU; a GPU host may have only Python, PyTorch (often an
older version) and numpy. So the check is split: ``build_bundle`` makes, on this machine,
TorchScript programs, input arrays and the outputs of each program on this CPU, plus the
self-contained ``gpu_check.py``; the GPU host runs that script on the bundle and compares
CPU, CUDA fp32 and CUDA fp16 (autocast) outputs with ours, with latencies.

Models in the bundle:

- ``bts``, ``lts``, ``hfd``: the deployed reference models, converted weight for weight
  from their ONNX files (``demo.training.torchscript``), on inputs made by the
  reference pipelines' own preprocessing of phantom studies: a sliding-window batch of
  two 32×64×64 windows (BTS, LTS), four 128×128 radiographs (HFD).
- ``segresnet``: MONAI's ``SegResNet`` (3D, 1 → 2 channels, seeded weights, not trained:
  a network of the size our field deploys, for latency; its masks are compared like the
  others') on one 96×96×96 window of a phantom brain MR, when MONAI is installed.

Needs torch (the ``train`` extra); imported only by the CLI command.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

CHECK_SCRIPT = Path(__file__).with_name("gpu_check.py")


def _inputs(seed: int) -> dict[str, np.ndarray]:
    from demo.phantoms import abdomen_ct_arrays, brain_mr_arrays, pelvis_radiograph
    from demo.training.train import bts_prep, hfd_prep, lts_prep

    rng = np.random.default_rng(seed)
    mr, _ = brain_mr_arrays(rng)
    ct, _ = abdomen_ct_arrays(rng)
    mr_n, ct_n = bts_prep(mr), lts_prep(ct)
    windows = {
        "bts": np.stack([mr_n[4:36, 32:96, 32:96], mr_n[8:40, 40:104, 24:88]])[:, None],
        "lts": np.stack([ct_n[0:32, 16:80, 16:80], ct_n[8:40, 24:88, 8:72]])[:, None],
        "hfd": np.stack([hfd_prep(pelvis_radiograph(rng, 512)[0]) for _ in range(4)])[:, None],
    }
    big = bts_prep(brain_mr_arrays(rng, shape=(96, 128, 128))[0])
    windows["segresnet"] = big[None, None, :, 16:112, 16:112]
    return {k: np.ascontiguousarray(v, np.float32) for k, v in windows.items()}


def _segresnet(out_dir: Path, seed: int) -> Path | None:
    try:
        from monai.networks.nets import SegResNet
    except ImportError:
        return None
    import torch

    torch.manual_seed(seed)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=16).eval()

    class Named(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.inner(x)}

    path = out_dir / "segresnet.ts"
    # Traced, not scripted: scripting compiles every branch of torch.nn.functional.interpolate,
    # and the program then names ops (e.g. aten::_upsample_lanczos2d_aa) that an older
    # torch on the GPU host lacks (seen: torch 2.11 there, 2.13 here). A trace records only
    # the ops this fixed 96^3 input runs, so the bundle loads on older torch too.
    example = torch.zeros((1, 1, 96, 96, 96), dtype=torch.float32)
    with torch.no_grad():
        torch.jit.trace(Named(net), example, strict=False).save(str(path))
    return path


def build_bundle(out_dir: Path, seed: int = 7, names: tuple[str, ...] = ("bts", "lts", "hfd"),
                 segresnet: bool = True) -> dict:
    """Write the bundle into ``out_dir`` (created) with the reference models ``names`` (and
    MONAI's SegResNet unless ``segresnet`` is false); return its manifest.

    Raises ``ImportError`` when torch is not installed (install the ``train`` extra)."""
    import torch

    from demo.training.torchscript import REFERENCE, export_reference

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    inputs = _inputs(seed)
    programs: dict[str, tuple[Path, tuple[str, ...], str]] = {}
    for name in names:
        path, _ = export_reference(name, out_dir)
        programs[name] = (path, REFERENCE[name][2],
                          "detection" if name == "hfd" else "segmentation")
    seg = _segresnet(out_dir, seed) if segresnet else None
    if seg is not None:
        programs["segresnet"] = (seg, ("logits",), "segmentation")
    models = []
    for name, (path, outputs, kind) in programs.items():
        module = torch.jit.load(str(path)).eval()
        x = inputs[name]
        with torch.inference_mode():
            out = module(torch.from_numpy(x))
        arrays = {"input": x, **{f"ref_{k}": out[k].numpy() for k in outputs}}
        np.savez_compressed(out_dir / f"{name}.npz", **arrays)
        models.append({"name": name, "file": path.name, "arrays": f"{name}.npz",
                       "outputs": list(outputs), "kind": kind})
    shutil.copy2(CHECK_SCRIPT, out_dir / CHECK_SCRIPT.name)
    manifest = {"models": models,
                "made_with": {"torch": torch.__version__, "numpy": np.__version__,
                              "python": sys.version.split()[0]}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def run_check(bundle: Path, runs: int = 20, json_out: Path | None = None,
              only: tuple[str, ...] = ()) -> int:
    """Run the bundle's own script with this interpreter (CPU here; CUDA where present)."""
    cmd = [sys.executable, str(bundle / CHECK_SCRIPT.name), str(bundle), "--runs", str(runs)]
    if only:
        cmd += ["--only", ",".join(only)]
    if json_out is not None:
        cmd += ["--json", str(json_out)]
    return subprocess.call(cmd)
