"""The deployed reference models as TorchScript programs, weight for weight.

    python -m demo.training.torchscript OUT_DIR     # writes bts.ts, lts.ts, hfd.ts

The reference models ship as ONNX files (``engine/models``). ``torch.onnx.export`` folded
each BatchNorm into the convolution before it, so the ONNX weights load into the same
architectures (``UNet3D``, ``HipNet``) with their BatchNorm layers replaced by identity.
The program returns ``dict[str, Tensor]`` keyed by the ONNX output names (``logits``;
``boxes`` and ``logits`` for HFD), so the ``torch`` runtime and ONNX Runtime hand the
operators the same named outputs. ``export_reference`` checks the TorchScript program
against ONNX Runtime on the same input before it returns (max abs difference < 1e-3 on
logits).

Needs the ``train`` extra (torch) and ``onnx``; the platform never imports this module.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from demo.training.train import HFD_SIZE, MODELS_DIR, HipNet, UNet3D
from engine.runtimes import OnnxRuntimeCpu

#: model name -> (architecture factory, example input shape (N, C, ...), output names)
REFERENCE = {
    "bts": (lambda: UNet3D(2), (2, 1, 32, 64, 64), ("logits",)),
    "lts": (lambda: UNet3D(4), (2, 1, 32, 64, 64), ("logits",)),
    "hfd": (HipNet, (4, 1, *HFD_SIZE), ("boxes", "logits")),
}


class NamedOutputs(nn.Module):
    """Wrap a module so that it returns its outputs by name (TorchScript-able)."""

    def __init__(self, inner: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.inner = inner
        self.single = len(names) == 1
        self.first = names[0]
        self.second = names[1] if len(names) > 1 else ""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.inner(x)
        if isinstance(out, torch.Tensor):
            return {self.first: out}
        return {self.first: out[0], self.second: out[1]}


def _fold_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm with identity, in place (the ONNX weights have it folded)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d | nn.BatchNorm3d):
            setattr(module, name, nn.Identity())
        else:
            _fold_batchnorm(child)


def load_onnx_weights(module: nn.Module, onnx_path: Path) -> nn.Module:
    """Load an exported ONNX file's weights into ``module`` (BatchNorm folded away).

    Initialisers that kept their parameter name load by name; the convolutions whose
    weights ONNX renamed (``onnx::Conv_N`` after BatchNorm folding) load in graph order,
    which is the order the forward pass uses them. Raises ``ValueError`` when a shape or
    the count does not match (the file is not this architecture)."""
    _fold_batchnorm(module)
    model = onnx.load(str(onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    state = module.state_dict()
    named = {k for k in state if k in inits}
    renamed: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            renamed += [n for n in node.input[1:] if n in inits and n not in named]
    targets = [k for k in state if k not in named]
    if len(targets) != len(renamed):
        raise ValueError(f"{onnx_path.name}: {len(renamed)} unnamed weights in the file, "
                         f"{len(targets)} parameters left in the architecture")
    new = {k: torch.from_numpy(inits[k].copy()) for k in named}
    new.update({k: torch.from_numpy(inits[n].copy())
                for k, n in zip(targets, renamed, strict=True)})
    for k, v in new.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(f"{onnx_path.name}: {k} has shape {tuple(v.shape)} in the file, "
                             f"{tuple(state[k].shape)} in the architecture")
    module.load_state_dict(new)
    return module.eval()


def export_reference(name: str, out_dir: Path, models_dir: Path = MODELS_DIR,
                     seed: int = 0) -> tuple[Path, str]:
    """Write ``out_dir/{name}.ts`` from ``models_dir/{name}.onnx``; return (path, sha256).

    Raises ``AssertionError`` if the program and ONNX Runtime disagree on a random input."""
    factory, shape, names = REFERENCE[name]
    onnx_path = models_dir / f"{name}.onnx"
    module = NamedOutputs(load_onnx_weights(factory(), onnx_path), names).eval()
    scripted = torch.jit.script(module)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.ts"
    scripted.save(str(path))
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    ref = OnnxRuntimeCpu.load(onnx_path).run(x)
    with torch.inference_mode():
        got = scripted(torch.from_numpy(x))
    for k in names:
        diff = float(np.abs(got[k].numpy() - ref[k]).max())
        assert diff < 1e-3, f"{name}: output {k} differs from ONNX Runtime by {diff}"
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", default="bts,lts,hfd")
    args = ap.parse_args()
    for name in args.only.split(","):
        path, sha = export_reference(name, args.out)
        print(f"{path}  sha256 {sha}")


if __name__ == "__main__":
    main()
