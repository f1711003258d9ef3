"""Radiograph preprocessing: intensity normalisation or windowing, 2D resize (volumes
go through MONAI's transforms, ``engine.ops.transforms``).

All functions take arrays and return new arrays; none modifies its input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


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
