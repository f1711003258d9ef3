"""Preprocessing: resampling, intensity normalisation or windowing, crop/pad, 2D resize.

All functions take arrays and return new arrays; none modifies its input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def resample(
    volume: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    *,
    order: int = 1,
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Resample ``volume`` to ``target_spacing`` (mm per axis).

    Returns the new array and its exact spacing (the grid is rounded to whole voxels,
    so the true spacing differs slightly from the target; volumes must use it).
    ``order`` 1 for images, 0 for label maps.
    """
    spacing = tuple(float(s) for s in spacing)
    shape_in = np.array(volume.shape, float)
    extent = shape_in * np.array(spacing)
    shape_out = np.maximum(1, np.round(extent / np.array(target_spacing, float))).astype(int)
    zoom = shape_out / shape_in
    out = ndimage.zoom(volume, zoom, order=order, mode="nearest", grid_mode=True)
    true_spacing = tuple(float(e / n) for e, n in zip(extent, out.shape, strict=True))
    return out, true_spacing


def resize_to_shape(volume: np.ndarray, shape: Sequence[int], *, order: int = 1) -> np.ndarray:
    """Resize to an exact shape (used to bring probabilities back to the source grid)."""
    zoom = np.array(shape, float) / np.array(volume.shape, float)
    out = ndimage.zoom(volume, zoom, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(shape):  # zoom can be off by one on odd ratios
        out = crop_or_pad(out, shape)
    return out


def zscore(volume: np.ndarray, *, nonzero_only: bool = True) -> np.ndarray:
    """Zero mean, unit variance, over the foreground (voxels > 0) when ``nonzero_only``."""
    v = volume.astype(np.float32)
    mask = v > 0 if nonzero_only else np.ones(v.shape, bool)
    if not mask.any():
        return np.zeros_like(v)
    mean, std = float(v[mask].mean()), float(v[mask].std())
    out = (v - mean) / (std if std > 1e-6 else 1.0)
    if nonzero_only:
        out[~mask] = 0.0
    return out


def window(volume: np.ndarray, *, center: float, width: float) -> np.ndarray:
    """CT windowing to [0, 1]: values below center - width/2 become 0, above + width/2 1."""
    lo = center - width / 2.0
    return np.clip((volume.astype(np.float32) - lo) / float(width), 0.0, 1.0)


def scale_range(image: np.ndarray, *, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] to [0, 1], clipped (radiographs with a known bit depth)."""
    return np.clip((image.astype(np.float32) - low) / float(high - low), 0.0, 1.0)


def crop_or_pad(volume: np.ndarray, shape: Sequence[int], *, value: float = 0.0) -> np.ndarray:
    """Centre-crop or pad with ``value`` to ``shape`` (per axis)."""
    out = volume
    for axis, want in enumerate(shape):
        have = out.shape[axis]
        if have > want:
            start = (have - want) // 2
            out = np.take(out, np.arange(start, start + want), axis=axis)
        elif have < want:
            before = (want - have) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, want - have - before)
            out = np.pad(out, pad, mode="constant", constant_values=value)
    return out


def resize_2d(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Area-averaged downsampling (or linear upsampling) of one image to ``size`` (rows, cols)."""
    rows, cols = image.shape
    want_r, want_c = int(size[0]), int(size[1])
    img = image.astype(np.float32)
    if rows % want_r == 0 and cols % want_c == 0:
        fr, fc = rows // want_r, cols // want_c
        return img.reshape(want_r, fr, want_c, fc).mean(axis=(1, 3))
    return ndimage.zoom(img, (want_r / rows, want_c / cols), order=1, grid_mode=True,
                        mode="nearest")
