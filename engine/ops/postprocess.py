"""Post-processing: label maps from probabilities as the model's output is declared,
volumes in mL, detection boxes with class probabilities, classification decisions
(connected components: MONAI's ``KeepLargestConnectedComponent``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.ops.inference import to_probabilities


def labels_from_probabilities(probs: np.ndarray, *, activation: str,
                              thresholds: Mapping[int, float] | None = None,
                              default: float = 0.5) -> np.ndarray:
    """Label map (uint8) from channel probabilities ``(K, ...)`` as the model's output
    is declared (``model.output``).

    ``softmax``: channel 0 is background, channel k label k; each voxel takes its most
    probable class, and a label with a threshold in ``thresholds`` (label value ->
    probability) only where its probability reaches it (background otherwise).
    ``sigmoid``: channel k-1 is label k (one channel: label 1); a voxel takes the most
    probable label among those at or above their threshold (``default`` where none is
    given), background where none is.
    """
    thresholds = dict(thresholds or {})
    if activation == "softmax":
        labels = np.argmax(probs, axis=0).astype(np.uint8)
        for value, t in thresholds.items():
            if 0 < value < probs.shape[0]:
                labels[(labels == value) & (probs[value] < t)] = 0
        return labels
    if activation != "sigmoid":
        raise ValueError(f"activation is softmax or sigmoid, not {activation!r}")
    limits = np.array([thresholds.get(k + 1, default) for k in range(probs.shape[0])],
                      np.float32).reshape((-1,) + (1,) * (probs.ndim - 1))
    passing = np.where(probs >= limits, probs, -1.0)
    best = np.argmax(passing, axis=0)
    found = np.take_along_axis(passing, best[None], axis=0)[0] >= 0
    return np.where(found, best + 1, 0).astype(np.uint8)


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
    values: str = "logits",
    activation: str = "softmax",
) -> list[Detection]:
    """Detections of one image from ``boxes`` ``(R, 4)`` (normalised x0, y0, x1, y1 in
    [0, 1]) and ``logits`` ``(R, K)``: boxes scaled to the source image, sorted corners,
    probabilities per class as the output is declared (``to_probabilities``)."""
    rows, cols = image_shape
    probs = to_probabilities(logits.astype(np.float64), values=values,
                             activation=activation, axis=-1)
    out = []
    for r, label in enumerate(region_labels):
        x0, y0, x1, y1 = np.clip(boxes[r].astype(float), 0.0, 1.0)
        x0, x1 = sorted((x0 * cols, x1 * cols))
        y0, y1 = sorted((y0 * rows, y1 * rows))
        out.append(Detection(label, (float(x0), float(y0), float(x1), float(y1)),
                             {c: float(probs[r, k]) for k, c in enumerate(classes)}))
    return out


PRESENT, ABSENT = "present", "absent"


@dataclass(frozen=True)
class Classification:
    """One classification: of a ``finding`` (the question: e.g. brain tumour type, or
    one class of a multi-label model), its probabilities per class and the decided
    class (``decision``)."""

    finding: str
    probabilities: dict[str, float]
    decision: str

    @property
    def probability(self) -> float:
        """The decided class's probability (a multi-label class: P(present))."""
        return self.probabilities.get(self.decision, self.probabilities.get(PRESENT, 0.0))


def classify(probs: np.ndarray, *, finding: str, classes: Sequence[str], activation: str,
             thresholds: Mapping[str, float] | None = None, otherwise: str | None = None,
             default: float = 0.5) -> list[Classification]:
    """Decisions from one prediction's probabilities ``(K,)`` (``to_probabilities``
    already applied), as ``model.output`` declares them.

    - ``softmax``, K = len(classes): one classification of ``finding``: the most probable
      class among those at or above their threshold (classes without one: no threshold);
      ``otherwise`` when none qualifies (then required), else the most probable class.
    - ``sigmoid``, one channel and two classes: P(second class) = the channel; the second
      class where it reaches its threshold (``default`` 0.5), else the first.
    - ``sigmoid``, K = len(classes): multi-label: one classification per class, whose
      decision is ``present`` where its probability reaches its threshold, else ``absent``.

    Raises ``ModelOutputError`` when the channel count does not fit the classes.
    """
    from engine.errors import ModelOutputError

    thresholds = dict(thresholds or {})
    p = np.asarray(probs, np.float64).reshape(-1)
    k = len(classes)
    if activation == "sigmoid" and p.size == 1 and k == 2:
        positive = float(p[0])
        return [Classification(finding, {classes[0]: 1.0 - positive, classes[1]: positive},
                               classes[1] if positive >= thresholds.get(classes[1], default)
                               else classes[0])]
    if activation == "sigmoid":
        if p.size != k:
            raise ModelOutputError(f"model output has {p.size} channels for {k} classes")
        return [Classification(c, {PRESENT: float(p[i]), ABSENT: float(1.0 - p[i])},
                               PRESENT if p[i] >= thresholds.get(c, default) else ABSENT)
                for i, c in enumerate(classes)]
    if p.size != k:
        raise ModelOutputError(f"model output has {p.size} channels for {k} classes")
    by_class = {c: float(p[i]) for i, c in enumerate(classes)}
    ranked = sorted(classes, key=lambda c: -by_class[c])
    decided = next((c for c in ranked if by_class[c] >= thresholds.get(c, 0.0)), None)
    if decided is None:
        decided = otherwise if otherwise is not None else ranked[0]
    return [Classification(finding, by_class, decided)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * (a & b).sum() / denom)
