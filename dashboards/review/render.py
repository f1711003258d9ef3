"""Drawing a case to PNG with numpy and PIL (pure: arrays in, bytes out).

Masks are blended over the windowed slice, one colour per segment; radiograph findings
are boxes labelled with their class. Images are downscaled to ``max_px`` for the page.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

PALETTE = ((230, 60, 60), (60, 160, 240), (250, 200, 40), (80, 200, 120), (200, 90, 220))
CLASS_COLOURS = {"normal": (80, 200, 120), "fracture": (230, 60, 60),
                 "hardware": (250, 200, 40)}


def window(pixels: np.ndarray) -> np.ndarray:
    """8-bit grey from the 1st-99th percentile (robust to a few bright voxels)."""
    lo, hi = np.percentile(pixels, (1, 99)) if pixels.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((pixels - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def overlay(pixels: np.ndarray, mask: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
    """RGB of the slice with each segment tinted (segment n gets PALETTE[n-1])."""
    grey = window(pixels)
    rgb = np.repeat(grey[:, :, None], 3, axis=2).astype(np.float32)
    if mask is not None and mask.shape == pixels.shape:
        for number in np.unique(mask[mask > 0]):
            colour = np.array(PALETTE[(int(number) - 1) % len(PALETTE)], np.float32)
            sel = mask == number
            rgb[sel] = (1 - alpha) * rgb[sel] + alpha * colour
    return rgb.astype(np.uint8)


def to_png(rgb: np.ndarray, max_px: int = 512) -> bytes:
    img = Image.fromarray(rgb)
    if max(img.size) > max_px:
        img.thumbnail((max_px, max_px))
    elif 2 * max(img.size) <= max_px:  # small matrices (MR): whole-number zoom, no blur
        k = max_px // max(img.size)
        img = img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def slice_png(pixels: np.ndarray, mask: np.ndarray | None, max_px: int = 512) -> bytes:
    return to_png(overlay(pixels, mask), max_px)


def boxes_png(pixels: np.ndarray, boxes: Sequence[tuple[str, str, tuple[float, float, float,
                                                                          float]]],
              max_px: int = 640) -> bytes:
    """A radiograph with labelled boxes ``(label, class, (x0, y0, x1, y1))`` in pixels."""
    grey = window(pixels)
    img = Image.fromarray(grey).convert("RGB")
    scale = min(1.0, max_px / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
    draw = ImageDraw.Draw(img)
    for label, cls, (x0, y0, x1, y1) in boxes:
        colour = CLASS_COLOURS.get(cls, (60, 160, 240))
        draw.rectangle((x0 * scale, y0 * scale, x1 * scale, y1 * scale), outline=colour, width=3)
        draw.text((x0 * scale + 4, y0 * scale + 4), f"{label}: {cls}", fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
