"""Inference patterns over a model function: 3D sliding window with overlap, 2D batches.

A *model function* takes a float32 batch ``(N, C, ...)`` and returns a dict of named
output arrays; the runtime (``engine.runtimes``) provides it. These functions only
tile, batch, check shapes and blend, so they run the same on every runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from engine.errors import ModelOutputError

ModelFn = Callable[[np.ndarray], dict[str, np.ndarray]]


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of windows of ``roi`` covering ``size`` with ``overlap`` (0..<1)."""
    if size <= roi:
        return [0]
    step = max(1, int(round(roi * (1.0 - overlap))))
    starts = list(range(0, size - roi + 1, step))
    if starts[-1] != size - roi:
        starts.append(size - roi)
    return starts


def _importance(roi: Sequence[int]) -> np.ndarray:
    """Gaussian weights (sigma = roi/8): window centres count more than edges."""
    w = np.ones(tuple(roi), np.float32)
    for axis, n in enumerate(roi):
        x = np.arange(n) - (n - 1) / 2.0
        g = np.exp(-0.5 * (x / max(n / 8.0, 1.0)) ** 2).astype(np.float32)
        shape = [1] * len(roi)
        shape[axis] = n
        w = w * g.reshape(shape)
    return np.maximum(w, 1e-3)


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sliding_window_3d(
    volume: np.ndarray,
    model: ModelFn,
    *,
    roi: Sequence[int],
    classes: int,
    overlap: float = 0.25,
    batch: int = 2,
    output: str | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Class probabilities ``(classes, Z, Y, X)`` for ``volume`` ``(C, Z, Y, X)``.

    The volume is padded up to the ROI where smaller; windows overlap by ``overlap``
    and their softmax outputs are blended with Gaussian weights. Raises
    ``ModelOutputError`` when the model's output is not ``(n, classes, *roi)``.
    """
    if volume.ndim != 4:
        raise ValueError(f"expected (C, Z, Y, X), got shape {volume.shape}")
    c, *dims = volume.shape
    roi = tuple(int(r) for r in roi)
    padded_dims = [max(d, r) for d, r in zip(dims, roi, strict=True)]
    pad = [(0, 0)] + [(0, p - d) for p, d in zip(padded_dims, dims, strict=True)]
    vol = np.pad(volume.astype(np.float32), pad, mode="constant")
    starts = [window_starts(p, r, overlap) for p, r in zip(padded_dims, roi, strict=True)]
    corners = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    acc = np.zeros((classes, *padded_dims), np.float32)
    norm = np.zeros(padded_dims, np.float32)
    weight = _importance(roi)
    for i in range(0, len(corners), batch):
        chunk = corners[i : i + batch]
        x = np.stack([vol[:, z : z + roi[0], y : y + roi[1], x_ : x_ + roi[2]]
                      for z, y, x_ in chunk])
        outputs = model(x)
        logits = outputs[output] if output else next(iter(outputs.values()))
        want = (len(chunk), classes, *roi)
        if tuple(logits.shape) != want:
            raise ModelOutputError(
                f"model output has shape {tuple(logits.shape)}, expected {want} "
                f"(batch, classes, *roi) for roi {roi} and {classes} classes"
            )
        probs = softmax(logits.astype(np.float32), axis=1)
        for (z, y, x_), p in zip(chunk, probs, strict=True):
            acc[:, z : z + roi[0], y : y + roi[1], x_ : x_ + roi[2]] += p * weight
            norm[z : z + roi[0], y : y + roi[1], x_ : x_ + roi[2]] += weight
        if on_window is not None:
            on_window(min(i + batch, len(corners)), len(corners))
    probs_full = acc / norm[None]
    return probs_full[:, : dims[0], : dims[1], : dims[2]]


def batches_2d(
    images: np.ndarray,
    model: ModelFn,
    *,
    batch: int = 8,
    expect: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``images`` ``(N, C, H, W)`` in batches; concatenate each named output.

    ``expect`` maps output names to their per-image shape; a mismatch raises
    ``ModelOutputError`` naming the output.
    """
    collected: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(images), batch):
        x = images[i : i + batch].astype(np.float32)
        outputs = model(x)
        for name, shape in (expect or {}).items():
            if name not in outputs:
                raise ModelOutputError(f"model has no output {name!r} (has {sorted(outputs)})")
            got = tuple(outputs[name].shape)
            if got != (len(x), *shape):
                raise ModelOutputError(
                    f"output {name!r} has shape {got}, expected {(len(x), *tuple(shape))}"
                )
        for name, arr in outputs.items():
            collected.setdefault(name, []).append(arr)
    return {name: np.concatenate(parts) for name, parts in collected.items()}
