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


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Logistic function, element-wise, without overflow for large negative logits."""
    out = np.empty_like(logits)
    pos = logits >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-logits[pos]))
    e = np.exp(logits[~pos])
    out[~pos] = e / (1.0 + e)
    return out


#: how far declared probabilities may stray outside [0, 1] (float rounding in the model)
PROBABILITY_TOL = 1e-3


def to_probabilities(raw: np.ndarray, *, values: str = "logits", activation: str = "softmax",
                     axis: int = 1) -> np.ndarray:
    """Probabilities from a model's raw output as the pipeline file declares it
    (``model.output``): ``values="logits"`` applies ``activation`` (``softmax`` over
    ``axis``, or ``sigmoid`` element-wise); ``values="probabilities"`` returns them as
    they are (clipped to [0, 1]), never a second activation. Raises ``ModelOutputError``
    when declared probabilities lie outside [0, 1] (beyond ``PROBABILITY_TOL``) or are
    not finite: the declaration does not fit the model."""
    arr = raw.astype(np.float32 if raw.dtype != np.float64 else np.float64)
    if not np.all(np.isfinite(arr)):
        raise ModelOutputError("model output has values that are not finite (NaN or inf)")
    if values == "probabilities":
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if lo < -PROBABILITY_TOL or hi > 1.0 + PROBABILITY_TOL:
            raise ModelOutputError(
                f"model output ranges {lo:.4g}..{hi:.4g}, but the pipeline file declares "
                "probabilities (model.output.values); are they logits?")
        return np.clip(arr, 0.0, 1.0)
    if values != "logits":
        raise ValueError(f"values is logits or probabilities, not {values!r}")
    if activation == "softmax":
        return softmax(arr, axis=axis)
    if activation == "sigmoid":
        return sigmoid(arr)
    raise ValueError(f"activation is softmax or sigmoid, not {activation!r}")


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
    values: str = "logits",
    activation: str = "softmax",
) -> np.ndarray:
    """Channel probabilities ``(classes, Z, Y, X)`` for ``volume`` ``(C, Z, Y, X)``.

    The volume is padded up to the ROI where smaller; windows overlap by ``overlap``
    and their probabilities (``to_probabilities`` of the output as ``values`` and
    ``activation`` declare it) are blended with Gaussian weights. ``classes`` is the
    number of output channels (one for a single sigmoid channel). Raises
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
                f"(batch, channels, *roi) for roi {roi} and {classes} channels"
            )
        probs = to_probabilities(logits, values=values, activation=activation, axis=1)
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
    layout: str = "nchw",
    channels: int | None = None,
) -> dict[str, np.ndarray]:
    """Run ``images`` ``(N, C, H, W)`` in batches; concatenate each named output.

    ``channels``: the channels the model takes; a one-channel image is repeated into
    them (grey as RGB). ``layout``: ``nchw`` or ``nhwc`` (channels last, as Keras and
    many exported models take them). ``expect`` maps output names to their per-image
    shape; a mismatch raises ``ModelOutputError`` naming the output.
    """
    if channels is not None and images.shape[1] != channels:
        if images.shape[1] != 1:
            raise ValueError(f"images have {images.shape[1]} channels; the model takes "
                             f"{channels}")
        images = np.repeat(images, channels, axis=1)
    if layout == "nhwc":
        images = np.moveaxis(images, 1, -1)
    elif layout != "nchw":
        raise ValueError(f"layout is nchw or nhwc, not {layout!r}")
    collected: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(images), batch):
        x = np.ascontiguousarray(images[i : i + batch], dtype=np.float32)
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
