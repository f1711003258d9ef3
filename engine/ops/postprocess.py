"""Post-processing: label maps from probabilities, connected components, volumes in mL,
detection boxes with class probabilities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from engine.ops.inference import softmax


def argmax_labels(probs: np.ndarray) -> np.ndarray:
    """Label map (uint8) from class probabilities ``(K, ...)``; class 0 is background."""
    return np.argmax(probs, axis=0).astype(np.uint8)


def threshold_labels(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary label map: foreground where the probability of class 1 exceeds ``threshold``."""
    return (probs[1] > threshold).astype(np.uint8)


def largest_components(
    labels: np.ndarray, label_values: Sequence[int], keep: int = 1
) -> np.ndarray:
    """Keep only the ``keep`` largest 26-connected components of each listed label.

    Small false-positive islands far from the organ/lesion are what this removes;
    labels not listed (e.g. vessels, which may be disconnected) are left as they are.
    """
    out = labels.copy()
    structure = np.ones((3,) * labels.ndim, bool)
    for value in label_values:
        mask = labels == value
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=structure)
        if n <= keep:
            continue
        sizes = ndimage.sum_labels(mask, comp, index=np.arange(1, n + 1))
        kept = np.argsort(sizes)[::-1][:keep] + 1
        out[mask & ~np.isin(comp, kept)] = 0
    return out


def volumes_ml(
    labels: np.ndarray, spacing: Sequence[float], names: Mapping[int, str]
) -> dict[str, float]:
    """Volume of each named label in mL: voxel count x voxel volume (mm^3 / 1000)."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=max(names) + 1)
    return {name: float(counts[value]) * voxel_ml for value, name in names.items()}


@dataclass(frozen=True)
class Detection:
    """One region (e.g. a hip) on one image: box in source pixels and class probabilities."""

    label: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the source image
    probabilities: dict[str, float]

    @property
    def classification(self) -> str:
        return max(self.probabilities, key=lambda k: self.probabilities[k])

    @property
    def probability(self) -> float:
        return self.probabilities[self.classification]


def detections(
    boxes: np.ndarray,
    logits: np.ndarray,
    *,
    region_labels: Sequence[str],
    classes: Sequence[str],
    image_shape: tuple[int, int],
) -> list[Detection]:
    """Detections of one image from ``boxes`` ``(R, 4)`` (normalised x0, y0, x1, y1 in
    [0, 1]) and ``logits`` ``(R, K)``: boxes scaled to the source image, sorted corners,
    softmax probabilities per class."""
    rows, cols = image_shape
    probs = softmax(logits.astype(np.float64), axis=-1)
    out = []
    for r, label in enumerate(region_labels):
        x0, y0, x1, y1 = np.clip(boxes[r].astype(float), 0.0, 1.0)
        x0, x1 = sorted((x0 * cols, x1 * cols))
        y0, y1 = sorted((y0 * rows, y1 * rows))
        out.append(Detection(label, (float(x0), float(y0), float(x1), float(y1)),
                             {c: float(probs[r, k]) for k, c in enumerate(classes)}))
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * (a & b).sum() / denom)
