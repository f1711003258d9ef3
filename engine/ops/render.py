"""Rendering to 8 bits and resizing as an image library would: what models trained on
exported JPEG/PNG pictures (not on DICOM values) were fed.

``window_8bit`` applies a linear VOI window (PS3.3 C.11.2.1.2.1) and rounds to 0..255,
as a viewer exports a picture; ``resize_pillow`` resizes with Pillow's filters, on an
8-bit image in Pillow's 8-bit mode (rounded to 8 bits, exactly as a package that calls
``Image.resize`` on its picture), on any other image in 32-bit float mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Pillow's resampling filters by the names a pipeline file uses
FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def window_8bit(values: np.ndarray, *, center: float, width: float) -> np.ndarray:
    """``values`` (real-world, after the Modality LUT) through the linear window
    ``center``/``width`` (PS3.3 C.11.2.1.2.1: below ``c - 0.5 - (w - 1) / 2`` black,
    above ``c - 0.5 + (w - 1) / 2`` white, linear between), rounded to uint8 0..255.
    Raises ``ValueError`` for a width below 1 (the standard's minimum)."""
    if width < 1:
        raise ValueError(f"window width {width} is below 1 (PS3.3 C.11.2.1.2.1)")
    x = values.astype(np.float64)
    if width == 1:
        out = np.where(x > center - 0.5, 255.0, 0.0)
    else:
        out = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def range_8bit(values: np.ndarray, *, low: float, high: float) -> np.ndarray:
    """``values`` scaled linearly from ``low``..``high`` to 0..255, rounded to uint8."""
    if high <= low:
        raise ValueError("the range needs low < high")
    out = (values.astype(np.float64) - low) / (high - low) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_pillow(image: np.ndarray, size: Sequence[int], interpolation: str = "bicubic"
                  ) -> np.ndarray:
    """``image`` ``(rows, cols)`` resized to ``size`` ``(rows, cols)`` with Pillow's
    ``interpolation`` filter (``FILTERS``). A uint8 image is resized in mode ``L`` and
    comes back uint8 (Pillow rounds each channel to 8 bits, as it does for RGB
    pictures); any other is resized in mode ``F`` and comes back float32."""
    from PIL import Image

    if interpolation not in FILTERS:
        raise ValueError(f"interpolation is one of {', '.join(FILTERS)}, not {interpolation!r}")
    resample = getattr(Image.Resampling, interpolation.upper())
    rows, cols = int(size[0]), int(size[1])
    if image.dtype == np.uint8:
        picture = Image.fromarray(np.ascontiguousarray(image))  # mode L
        return np.asarray(picture.resize((cols, rows), resample), dtype=np.uint8)
    picture = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))  # mode F
    return np.asarray(picture.resize((cols, rows), resample), dtype=np.float32)
