"""Inference over a model function: 2D batches, and the model's output as the pipeline
file declares it (``to_probabilities``). 3D volumes go through MONAI's inferers
(``engine.ops.transforms.infer``).

A *model function* takes a float32 batch ``(N, C, ...)`` and returns a dict of named
output arrays; the runtime (``engine.runtimes``) provides it. These functions only
batch, check shapes and activate, so they run the same on every runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from engine.errors import ModelOutputError

ModelFn = Callable[[np.ndarray], dict[str, np.ndarray]]


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
