"""MONAI's own network architectures (``UNet``, ``SegResNet``) trained briefly on the BTS
brain phantoms, and exported as TorchScript and ONNX from their state dicts.

    nice -n 10 .venv/bin/python -m demo.training.monai_nets [--only unet,segresnet]

Writes ``engine/models/bts_monai_{unet,segresnet}.state_dict.pt`` (a PyTorch
``state_dict``, float32, each < 2 MB: weights, not a program the engine loads) and
``bts_monai.json`` (sha256, size, parameters, training time and held-out Dice per
network). The preprocessing is the BTS reference pipeline's (``NormalizeIntensity``
over the foreground, 32×64×64 windows); held-out Dice against the phantoms' truth is
measured through the exported ONNX file and the engine's operators
(``demo.training.train.evaluate_seg``). The nets are small and trained for minutes on a
CPU: their masks are non-trivial, not good; they exist so tests can run real MONAI
architectures through both runtimes (``tests/engine/test_monai_networks.py``).

``export_torchscript`` / ``export_onnx_file`` make the programs from a state dict
(seconds): the tests export at test time, never train. Both programs return the logits
``(N, 2, Z, Y, X)`` as the output named ``logits``, like the reference ``bts.onnx``.

Needs the ``train`` extra (torch, MONAI); the platform never imports this module.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from demo.phantoms import BTS_LABELS, brain_mr_arrays
from demo.training.torchscript import NamedOutputs
from demo.training.train import (
    MODELS_DIR,
    bts_prep,
    evaluate_seg,
    export_onnx,
    fit_seg,
)

#: the BTS reference pipeline's sliding-window ROI (engine/pipelines/bts.yaml)
ROI = (32, 64, 64)
#: training patches: smaller than the ROI (the nets are fully convolutional) so that a
#: SegResNet step takes about a second on two CPU cores
PATCH = (16, 48, 48)
#: network name -> training steps (2.5 and 3.5 min on this machine's 2 cores, unloaded)
STEPS = {"unet": 250, "segresnet": 250}
CARD = MODELS_DIR / "bts_monai.json"


def _unet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32),
                strides=(2, 2), num_res_units=1)


def _segresnet() -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8,
                     blocks_down=(1, 2, 2), blocks_up=(1, 1))


#: network name -> MONAI architecture (input (N, 1, Z, Y, X), Z/Y/X divisible by 4)
NETWORKS: dict[str, Callable[[], nn.Module]] = {"unet": _unet, "segresnet": _segresnet}


def state_dict_path(name: str, models_dir: Path = MODELS_DIR) -> Path:
    return models_dir / f"bts_monai_{name}.state_dict.pt"


def load_network(name: str, models_dir: Path = MODELS_DIR) -> nn.Module:
    """The MONAI network ``name`` with its trained weights, in eval mode. Raises
    ``ValueError`` when the file's sha256 differs from ``bts_monai.json``'s."""
    path = state_dict_path(name, models_dir)
    card = json.loads((models_dir / CARD.name).read_text())
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    if sha != card[name]["sha256"]:
        raise ValueError(f"{path.name}: sha256 differs from {CARD.name}")
    net = NETWORKS[name]()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def export_torchscript(net: nn.Module, path: Path) -> Path:
    """Trace ``net`` on one ROI-sized window into a TorchScript program returning
    ``{"logits": (N, 2, Z, Y, X)}`` (traced, as ``bench.gpu`` traces SegResNet: only the
    ops this input runs are recorded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(NamedOutputs(net.eval(), ("logits",)),
                                 torch.zeros(1, 1, *ROI), strict=False)
    traced.save(str(path))
    return path


def export_onnx_file(net: nn.Module, path: Path) -> Path:
    """ONNX (opset 17, batch axis dynamic, output ``logits``) as the reference models."""
    export_onnx(net.eval(), torch.zeros(1, 1, *ROI), path, ["logits"])
    return path


def train(name: str, steps: int, n_train: int, n_test: int, seed: int,
          out: Path) -> dict[str, object]:
    """Train ``name`` for ``steps`` Adam steps on 2 random ``PATCH`` crops each; save the
    state dict under ``out``; return its card entry (held-out Dice through ONNX)."""
    t0 = time.monotonic()
    rng = np.random.default_rng(seed)
    data = [brain_mr_arrays(rng) for _ in range(n_train)]
    data = [(bts_prep(img), lab) for img, lab in data]
    torch.manual_seed(seed)
    net = NETWORKS[name]()
    fit_seg(net, data, rng, PATCH, 2, steps, name, flip=False, log_every=25)
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    path = state_dict_path(name, out)
    torch.save(net.state_dict(), path)
    train_s = time.monotonic() - t0
    test_rng = np.random.default_rng(seed + 10_000)  # held out: never used in training
    test = [brain_mr_arrays(test_rng) for _ in range(n_test)]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx_file(net, Path(tmp) / f"{name}.onnx")
        metrics = evaluate_seg(onnx_path, test, bts_prep, ROI, 2, BTS_LABELS, [1])
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "bytes": path.stat().st_size,
            "parameters": sum(p.numel() for p in net.parameters()),
            "steps": steps, "train_volumes": n_train, "held_out_volumes": n_test,
            "train_s": round(train_s, 1), **{k: round(v, 4) for k, v in metrics.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="unet,segresnet")
    ap.add_argument("--out", type=Path, default=MODELS_DIR)
    args = ap.parse_args()
    torch.set_num_threads(2)
    card_path = args.out / CARD.name
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card["_about"] = ("MONAI UNet/SegResNet state dicts trained on BTS brain phantoms by "
                      "`python -m demo.training.monai_nets`; not clinical models; "
                      "dice_lesion: held-out phantoms through the exported ONNX file")
    for name in args.only.split(","):  # one seed for each, so --only reproduces a net
        card[name] = train(name, STEPS[name], n_train=12, n_test=4, seed=20, out=args.out)
        print(name, card[name], flush=True)
        card_path.write_text(json.dumps(card, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
