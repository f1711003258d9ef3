"""Train the three reference models on synthetic phantoms, export ONNX, measure, write cards.

    nice -n 10 .venv/bin/python -m demo.training.train [--only bts,lts,hfd] [--out DIR]

Needs the ``train`` extra (torch, MONAI). The 3D preprocessing and inference are MONAI's
(``NormalizeIntensity``, ``ScaleIntensityRange``, ``SlidingWindowInferer``,
``KeepLargestConnectedComponent``: what the reference pipeline files name), and held-out
metrics are measured on the exported ONNX file through the engine's runtime, so the
figures on each model card are those of the deployed path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from demo.phantoms import (
    BTS_LABELS,
    HIP_CLASSES,
    HIP_SIDES,
    LTS_LABELS,
    abdomen_ct_arrays,
    brain_mr_arrays,
    pelvis_radiograph,
)
from engine.ops import inference, postprocess, preprocess, transforms
from engine.runtimes import OnnxRuntimeCpu

MODELS_DIR = Path(__file__).resolve().parents[2] / "engine" / "models"

# --------------------------------------------------------------------------- networks


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
    )


class UNet3D(nn.Module):
    """A small 3D U-Net (two poolings): input (N, 1, Z, Y, X), Z/Y/X divisible by 4."""

    def __init__(self, classes: int, base: int = 8) -> None:
        super().__init__()
        self.enc1 = _block(1, base)
        self.enc2 = _block(base, base * 2)
        self.bott = _block(base * 2, base * 4)
        self.up2 = nn.ConvTranspose3d(base * 4, base * 2, 2, stride=2)
        self.dec2 = _block(base * 4, base * 2)
        self.up1 = nn.ConvTranspose3d(base * 2, base, 2, stride=2)
        self.dec1 = _block(base * 2, base)
        self.head = nn.Conv3d(base, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool3d(e1, 2))
        b = self.bott(F.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class HipNet(nn.Module):
    """Pelvis radiograph (N, 1, 128, 128) -> boxes (N, 2, 4) in [0, 1], logits (N, 2, 3)."""

    def __init__(self) -> None:
        super().__init__()
        chans = [1, 16, 32, 48, 64, 64]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:], strict=False):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)  # -> 64 x 4 x 4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(inplace=True))
        self.box = nn.Linear(128, 8)
        self.cls = nn.Linear(128, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(self.features(x))
        return torch.sigmoid(self.box(h)).view(-1, 2, 4), self.cls(h).view(-1, 2, 3)


# --------------------------------------------------------------------------- helpers


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    probs = torch.softmax(logits, 1)
    onehot = F.one_hot(target, classes).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0))[1:].mean()


def random_patch(
    rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, roi: tuple[int, int, int],
    foreground_p: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """A random ROI crop, centred on a foreground voxel with probability ``foreground_p``."""
    dims = image.shape
    fg = np.argwhere(labels > 0)
    if len(fg) and rng.random() < foreground_p:
        centre = fg[rng.integers(len(fg))]
        start = [int(np.clip(c - r // 2 + rng.integers(-r // 4, r // 4 + 1), 0, d - r))
                 for c, r, d in zip(centre, roi, dims, strict=True)]
    else:
        start = [int(rng.integers(0, d - r + 1)) for r, d in zip(roi, dims, strict=True)]
    sl = tuple(slice(s, s + r) for s, r in zip(start, roi, strict=True))
    return image[sl], labels[sl]


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path,
                outputs: list[str]) -> str:
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (example,), str(path), input_names=["image"], output_names=outputs,
        dynamic_axes={"image": {0: "n"}, **{o: {0: "n"} for o in outputs}},
        opset_version=17, dynamo=False,
    )
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Trained:
    name: str
    onnx: Path
    sha256: str
    metrics: dict[str, float]
    train_s: float
    params: int


def fit_seg(model: nn.Module, data: list[tuple[np.ndarray, np.ndarray]],
            rng: np.random.Generator, roi: tuple[int, int, int], classes: int, steps: int,
            name: str, *, flip: bool, log_every: int) -> None:
    """Adam + one-cycle schedule for ``steps`` steps of two random ``roi`` crops each
    (cross-entropy + soft Dice over ``classes``); ``flip`` adds a random flip of the
    crops' second axis. Trains ``model`` in place (left in train mode)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        xs, ys = [], []
        for _ in range(2):
            img, lab = data[int(rng.integers(len(data)))]
            x, y = random_patch(rng, img, lab, roi)
            if flip and rng.random() < 0.5:
                x, y = x[:, ::-1], y[:, ::-1]
            xs.append(x.copy())
            ys.append(y.copy())
        xb = torch.from_numpy(np.stack(xs)[:, None]).float()
        yb = torch.from_numpy(np.stack(ys)).long()
        logits = model(xb)
        loss = F.cross_entropy(logits, yb) + soft_dice_loss(logits, yb, classes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0:
            print(f"{name} step {step}/{steps} loss {loss.item():.3f}", flush=True)


def _train_seg(
    name: str,
    make: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]],
    prep: Callable[[np.ndarray], np.ndarray],
    classes: int,
    roi: tuple[int, int, int],
    n_train: int,
    n_test: int,
    steps: int,
    out: Path,
    seed: int,
) -> tuple[Trained, list[tuple[np.ndarray, np.ndarray]]]:
    t0 = time.monotonic()
    rng = np.random.default_rng(seed)
    train = [make(rng) for _ in range(n_train)]
    train = [(prep(img), lab) for img, lab in train]
    torch.manual_seed(seed)
    model = UNet3D(classes)
    # left-right flip: not label-preserving for lobes, but fine for these phantoms
    fit_seg(model, train, rng, roi, classes, steps, name, flip=True, log_every=50)
    path = out / f"{name}.onnx"
    sha = export_onnx(model, torch.zeros(1, 1, *roi), path, ["logits"])
    test_rng = np.random.default_rng(seed + 10_000)  # held out: seeds never used in training
    test = [make(test_rng) for _ in range(n_test)]
    return Trained(name, path, sha, {}, time.monotonic() - t0,
                   sum(p.numel() for p in model.parameters())), test


def evaluate_seg(path: Path, test: list[tuple[np.ndarray, np.ndarray]],
                 prep: Callable[[np.ndarray], np.ndarray], roi: tuple[int, int, int],
                 classes: int, names: dict[int, str], keep_largest: list[int]) -> dict[str, float]:
    """Held-out Dice per label through the ONNX file and the engine's operators."""
    runtime = OnnxRuntimeCpu.load(path)
    scores: dict[str, list[float]] = {n: [] for n in names.values()}
    inferer = transforms.build("SlidingWindowInferer", {"roi_size": list(roi), "overlap": 0.25,
                                                        "mode": "gaussian",
                                                        "sw_batch_size": 2})
    keep = transforms.build("KeepLargestConnectedComponent", {"applied_labels": keep_largest})
    for img, lab in test:
        probs = transforms.infer(inferer, torch.from_numpy(prep(img)[None]), runtime.run,
                                 classes=classes).probs
        labels = postprocess.labels_from_probabilities(probs.numpy(), activation="softmax")
        pred = np.asarray(keep(labels[None]))[0]
        for value, n in names.items():
            scores[n].append(postprocess.dice(pred == value, lab == value))
    return {f"dice_{n}": float(np.mean(v)) for n, v in scores.items()}


def bts_prep(img: np.ndarray) -> np.ndarray:
    out = transforms.build("NormalizeIntensity", {"nonzero": True})(img[None])
    return np.asarray(out, np.float32)[0]


def lts_prep(img: np.ndarray) -> np.ndarray:
    out = transforms.build("ScaleIntensityRange", {"a_min": -140.0, "a_max": 260.0,
                                                   "b_min": 0.0, "b_max": 1.0,
                                                   "clip": True})(img[None])
    return np.asarray(out, np.float32)[0]


HFD_SIZE = (128, 128)


def hfd_prep(img: np.ndarray) -> np.ndarray:
    return preprocess.scale_range(preprocess.resize_2d(img, HFD_SIZE), low=0.0, high=4095.0)


def _hip_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img, truths = pelvis_radiograph(rng, size)
    boxes = np.array([t.box for t in truths], np.float32) / size
    cls = np.array([HIP_CLASSES.index(t.classification) for t in truths])
    return hfd_prep(img), boxes, cls


def train_hfd(out: Path, seed: int, n_train: int, n_test: int, epochs: int) -> Trained:
    t0 = time.monotonic()
    rng = np.random.default_rng(seed)
    data = [_hip_sample(rng, 512) for _ in range(n_train)]
    x_all = torch.from_numpy(np.stack([d[0] for d in data])[:, None]).float()
    b_all = torch.from_numpy(np.stack([d[1] for d in data])).float()
    c_all = torch.from_numpy(np.stack([d[2] for d in data])).long()
    torch.manual_seed(seed)
    model = HipNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * (n_train // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n_train)
        for i in range(0, n_train - 31, 32):
            idx = order[i : i + 32]
            x = x_all[idx] + 0.01 * torch.randn_like(x_all[idx])
            boxes, logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, 3), c_all[idx].reshape(-1)) + \
                5.0 * F.l1_loss(boxes, b_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        print(f"hfd epoch {epoch} loss {loss.item():.3f}", flush=True)
    path = out / "hfd.onnx"
    sha = export_onnx(model, torch.zeros(1, 1, *HFD_SIZE), path, ["boxes", "logits"])
    # held out: full-size 1024 px radiographs through the ONNX file and engine operators
    runtime = OnnxRuntimeCpu.load(path)
    test_rng = np.random.default_rng(seed + 10_000)
    correct = total = 0
    box_err = []
    for _ in range(n_test):
        img, truths = pelvis_radiograph(test_rng, 1024)
        outs = inference.batches_2d(hfd_prep(img)[None, None], runtime.run,
                                    expect={"boxes": (2, 4), "logits": (2, 3)})
        dets = postprocess.detections(outs["boxes"][0], outs["logits"][0],
                                      region_labels=HIP_SIDES, classes=HIP_CLASSES,
                                      image_shape=img.shape)
        for det, truth in zip(dets, truths, strict=True):
            correct += det.classification == truth.classification
            total += 1
            box_err.append(float(np.mean(np.abs(np.array(det.box) - np.array(truth.box)))))
    metrics = {"accuracy_hip_class": correct / total,
               "mean_abs_box_error_px_1024": float(np.mean(box_err))}
    return Trained("hfd", path, sha, metrics, time.monotonic() - t0,
                   sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- cards

CARDS = {
    "bts": dict(
        title="BTS lesion segmentation (synthetic demo model)",
        task="segmentation3d",
        inputs="one axial MR series (T2/FLAIR-like), any in-plane size; float32 "
               "(N, 1, 32, 64, 64) windows",
        preprocessing="z-score over voxels > 0 (MONAI NormalizeIntensity); sliding "
                      "window ROI 32x64x64, overlap 0.25, Gaussian blending",
        outputs="logits (N, 2, 32, 64, 64): background, lesion; argmax, largest "
                "connected component; lesion volume in mL",
        training="40 synthetic brain phantoms (demo.phantoms.brain_mr_arrays: ellipsoid "
                 "head, skull rim, ventricles, one bright spherical lesion of radius "
                 "6-22 mm, Gaussian noise); no patient data",
    ),
    "lts": dict(
        title="LTS liver lobes and vessels segmentation (synthetic demo model)",
        task="segmentation3d",
        inputs="one axial CT series in HU; float32 (N, 1, 32, 64, 64) windows",
        preprocessing="window centre 60 / width 400 HU to [0, 1]; sliding window ROI "
                      "32x64x64, overlap 0.25",
        outputs="logits (N, 4, 32, 64, 64): background, left lobe, right lobe, vessels; "
                "argmax, largest component per lobe; volumes in mL",
        training="40 synthetic abdomen phantoms (demo.phantoms.abdomen_ct_arrays: body, "
                 "spine, ellipsoid liver split by an oblique fissure; the left lobe is "
                 "~27 HU less dense than the right, a synthetic cue real livers do not "
                 "have; contrast vessels ~185 HU); no patient data",
    ),
    "hfd": dict(
        title="HFD hip detection and classification (synthetic demo model)",
        task="detection2d",
        inputs="pelvis AP radiographs (CR/DX), 12-bit; float32 (N, 1, 128, 128)",
        preprocessing="area-average resize to 128x128, scale 0..4095 to [0, 1]",
        outputs="boxes (N, 2, 4): right/left hip boxes, normalised x0, y0, x1, y1; "
                "logits (N, 2, 3): normal / fracture / hardware per hip",
        training="1200 synthetic pelvis radiographs at 512 px (demo.phantoms."
                 "pelvis_radiograph: pelvic ring, femoral heads/necks/shafts, fracture = "
                 "dark line across the neck, hardware = bright screw); held-out images "
                 "at 1024 px; no patient data",
    ),
}


PIPELINES_DIR = Path(__file__).resolve().parents[2] / "engine" / "pipelines"


def update_pipeline_hash(t: Trained) -> None:
    """Point the reference pipeline file at the new model: its ``sha256:`` line changes
    (the worker refuses a model whose bytes differ from the file's hash)."""
    path = PIPELINES_DIR / f"{t.name}.yaml"
    if not path.is_file() or t.onnx.parent.resolve() != MODELS_DIR.resolve():
        return
    text = path.read_text()
    new = re.sub(r"(?m)^(  sha256: )[0-9a-fA-F_A-Z]+$", rf"\g<1>{t.sha256}", text, count=1)
    path.write_text(new)


def write_card(t: Trained, out: Path, extra: dict[str, object]) -> Path:
    card = CARDS[t.name]
    size = t.onnx.stat().st_size
    lines = [
        f"# {card['title']}",
        "",
        "**Not a clinical model.** Trained only on synthetic phantoms generated by this "
        "repository, to exercise the platform end to end.",
        "",
        f"- file: `{t.onnx.name}` ({size / 1e6:.2f} MB, {t.params:,} parameters)",
        f"- sha256: `{t.sha256}`",
        f"- task: {card['task']}",
        f"- inputs: {card['inputs']}",
        f"- preprocessing: {card['preprocessing']}",
        f"- outputs: {card['outputs']}",
        f"- training data: {card['training']}",
        "- produced by: `nice -n 10 python -m demo.training.train` "
        f"(training + evaluation took {t.train_s:.0f} s on this machine's CPU)",
        "",
        "## Held-out metrics (measured by the training script on the exported ONNX file)",
        "",
    ]
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}"
              for k, v in {**t.metrics, **extra}.items()]
    path = out / f"{t.name}.card.md"
    path.write_text("\n".join(lines) + "\n")
    (out / f"{t.name}.metrics.json").write_text(json.dumps(
        {"sha256": t.sha256, "metrics": t.metrics, **extra}, indent=1) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="bts,lts,hfd")
    parser.add_argument("--out", type=Path, default=MODELS_DIR)
    parser.add_argument("--steps", type=int, default=500, help="segmentation training steps")
    args = parser.parse_args()
    torch.set_num_threads(2)
    which = set(args.only.split(","))
    roi = (32, 64, 64)
    if "bts" in which:
        t, test = _train_seg("bts", lambda r: brain_mr_arrays(r), bts_prep, 2, roi, 40, 10,
                             args.steps, args.out, seed=1)
        t.metrics = evaluate_seg(t.onnx, test, bts_prep, roi, 2, BTS_LABELS, [1])
        write_card(t, args.out, {"held_out_volumes": len(test)})
        update_pipeline_hash(t)
        print(t.name, t.metrics, f"{t.train_s:.0f}s", flush=True)
    if "lts" in which:
        t, test = _train_seg("lts", lambda r: abdomen_ct_arrays(r), lts_prep, 4, roi, 40, 10,
                             args.steps, args.out, seed=2)
        t.metrics = evaluate_seg(t.onnx, test, lts_prep, roi, 4, LTS_LABELS, [1, 2])
        t.metrics["dice_lobes_mean"] = (t.metrics["dice_left_lobe"]
                                        + t.metrics["dice_right_lobe"]) / 2
        write_card(t, args.out, {"held_out_volumes": len(test)})
        update_pipeline_hash(t)
        print(t.name, t.metrics, f"{t.train_s:.0f}s", flush=True)
    if "hfd" in which:
        t = train_hfd(args.out, seed=3, n_train=1200, n_test=150, epochs=12)
        write_card(t, args.out, {"held_out_images": 150, "held_out_hips": 300})
        update_pipeline_hash(t)
        print(t.name, t.metrics, f"{t.train_s:.0f}s", flush=True)


if __name__ == "__main__":
    main()
