"""Series -> volume with correct geometry; radiographs -> images.

A volume is the series' pixel data in real-world units (rescale slope/intercept
applied, PS3.3 C.11.1), ordered along the slice normal, with its spacing, origin and
direction cosines (PS3.3 C.7.6.2). Both classic single-frame series and enhanced
multi-frame objects (per-frame functional groups, PS3.3 C.7.6.16) are read.
Inconsistent geometry or a missing slice raises ``GeometryError`` with the
instances involved, never a silently distorted volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from engine.errors import GeometryError, PixelDataError, safe_reason

ORIENTATION_TOL = 1e-3
SPACING_REL_TOL = 0.02


@dataclass
class Volume:
    array: np.ndarray  # (z, y, x) float32, real-world values
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    origin: tuple[float, float, float]  # ImagePositionPatient of the first slice
    direction: np.ndarray  # rows: row cosine (x), column cosine (y), slice normal (z)
    sources: list[Dataset] = field(default_factory=list)  # one per slice, in array order
    #: enhanced multi-frame: the source frame (0-based) of each slice, in array order;
    #: empty for single-frame series (then ``sources`` has one dataset per slice)
    frames: list[int] = field(default_factory=list)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def _floats(value: object, n: int, what: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise GeometryError(f"{where}: {what} is missing or not numeric") from None
    if arr.shape != (n,):
        raise GeometryError(f"{where}: {what} has {arr.size} values, expected {n}")
    return arr


def _pixels(ds: Dataset, where: str) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise PixelDataError(
            f"{where}: pixel data cannot be decoded (transfer syntax {ts}): "
            f"{safe_reason(exc)}"
        ) from None


def _rescale(pixels: np.ndarray, slope: object, intercept: object) -> np.ndarray:
    try:
        s = float(slope) if slope not in (None, "") else 1.0  # type: ignore[arg-type]
        i = float(intercept) if intercept not in (None, "") else 0.0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PixelDataError("RescaleSlope (0028,1053) or RescaleIntercept (0028,1052) is "
                             "not a number") from None
    return pixels.astype(np.float32) * np.float32(s) + np.float32(i)


def _check_spacing(positions: np.ndarray, where: Sequence[str]) -> float:
    """Uniform spacing along the normal, or a GeometryError naming the gap."""
    if len(positions) < 2:
        raise GeometryError("a volume needs at least two slices")
    gaps = np.diff(positions)
    if np.any(gaps <= 1e-4):
        i = int(np.argmin(gaps))
        raise GeometryError(
            f"two slices share position {positions[i]:.3f} mm ({where[i]}, {where[i + 1]}): "
            "duplicate or mixed series"
        )
    typical = float(np.median(gaps))
    bad = np.where(np.abs(gaps - typical) > SPACING_REL_TOL * typical)[0]
    if len(bad):
        i = int(bad[0])
        raise GeometryError(
            f"missing or misplaced slice: gap of {gaps[i]:.3f} mm between {where[i]} and "
            f"{where[i + 1]} where the series spacing is {typical:.3f} mm"
        )
    return typical


def series_to_volume(datasets: Sequence[Dataset]) -> Volume:
    """One series (single-frame instances, or one enhanced multi-frame) as a ``Volume``."""
    if not datasets:
        raise GeometryError("the series has no instances")
    if len(datasets) == 1 and int(getattr(datasets[0], "NumberOfFrames", 1) or 1) > 1:
        return _enhanced_to_volume(datasets[0])
    first = datasets[0]
    where0 = f"instance {first.SOPInstanceUID}"
    iop = _floats(first.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where0)
    spacing_px = _floats(first.get("PixelSpacing"), 2, "PixelSpacing", where0)
    rows, cols = int(first.Rows), int(first.Columns)
    normal = np.cross(iop[:3], iop[3:])
    items = []
    for ds in datasets:
        where = f"instance {ds.SOPInstanceUID}"
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise GeometryError(f"{where} is {ds.Rows}x{ds.Columns}, the series {rows}x{cols}")
        o = _floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where)
        if np.max(np.abs(o - iop)) > ORIENTATION_TOL:
            raise GeometryError(f"{where} has another orientation than the series "
                                f"(ImageOrientationPatient (0020,0037) differs by "
                                f"{float(np.max(np.abs(o - iop))):.3g})")
        ps = _floats(ds.get("PixelSpacing"), 2, "PixelSpacing", where)
        if np.max(np.abs(ps - spacing_px)) > 1e-4:
            raise GeometryError(f"{where} has another pixel spacing than the series "
                                f"(PixelSpacing (0028,0030) differs by "
                                f"{float(np.max(np.abs(ps - spacing_px))):.3g} mm)")
        ipp = _floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", where)
        items.append((float(ipp @ normal), ipp, ds))
    items.sort(key=lambda t: t[0])
    positions = np.array([t[0] for t in items])
    dz = _check_spacing(positions, [f"instance {t[2].SOPInstanceUID}" for t in items])
    slices = []
    for _, _, ds in items:
        px = _pixels(ds, f"instance {ds.SOPInstanceUID}")
        if px.shape != (rows, cols):
            raise PixelDataError(f"instance {ds.SOPInstanceUID}: pixel data shape {px.shape}")
        slices.append(_rescale(px, ds.get("RescaleSlope"), ds.get("RescaleIntercept")))
    direction = np.stack([iop[:3], iop[3:], normal])
    return Volume(
        array=np.stack(slices),
        spacing=(dz, float(spacing_px[0]), float(spacing_px[1])),
        origin=tuple(float(v) for v in items[0][1]),  # type: ignore[arg-type]
        direction=direction,
        sources=[t[2] for t in items],
    )


def functional_group(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """A functional group item for ``frame``: per-frame first, then shared."""
    for seq_name, index in (("PerFrameFunctionalGroupsSequence", frame),
                            ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_name)
        if seq and len(seq) > index and keyword in seq[index]:
            inner = seq[index].get(keyword)
            if inner:
                return inner[0]
    return None


def _enhanced_to_volume(ds: Dataset) -> Volume:
    where = f"instance {ds.SOPInstanceUID}"
    n = int(ds.NumberOfFrames)
    pixels = _pixels(ds, where)
    if pixels.ndim != 3 or pixels.shape[0] != n:
        raise PixelDataError(f"{where}: expected {n} frames, pixel data shape {pixels.shape}")
    orient = functional_group(ds, 0, "PlaneOrientationSequence")
    measures = functional_group(ds, 0, "PixelMeasuresSequence")
    if orient is None or measures is None:
        raise GeometryError(f"{where}: enhanced object without plane orientation/pixel measures")
    iop = _floats(orient.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where)
    spacing_px = _floats(measures.get("PixelSpacing"), 2, "PixelSpacing", where)
    normal = np.cross(iop[:3], iop[3:])
    frames = []
    for f in range(n):
        pos = functional_group(ds, f, "PlanePositionSequence")
        if pos is None:
            raise GeometryError(f"{where}: frame {f + 1} has no plane position")
        o = functional_group(ds, f, "PlaneOrientationSequence")
        if o is not None and np.max(np.abs(_floats(o.ImageOrientationPatient, 6, "IOP", where)
                                           - iop)) > ORIENTATION_TOL:
            raise GeometryError(f"{where}: frame {f + 1} has a different orientation")
        ipp = _floats(pos.get("ImagePositionPatient"), 3, "ImagePositionPatient", where)
        tr = functional_group(ds, f, "PixelValueTransformationSequence")
        slope = tr.get("RescaleSlope") if tr is not None else ds.get("RescaleSlope")
        intercept = tr.get("RescaleIntercept") if tr is not None else ds.get("RescaleIntercept")
        frames.append((float(ipp @ normal), ipp, f, slope, intercept))
    frames.sort(key=lambda t: t[0])
    positions = np.array([t[0] for t in frames])
    dz = _check_spacing(positions, [f"{where} frame {t[2] + 1}" for t in frames])
    array = np.stack([_rescale(pixels[f], s, i) for _, _, f, s, i in frames])
    return Volume(
        array=array,
        spacing=(dz, float(spacing_px[0]), float(spacing_px[1])),
        origin=tuple(float(v) for v in frames[0][1]),  # type: ignore[arg-type]
        direction=np.stack([iop[:3], iop[3:], normal]),
        sources=[ds],
        frames=[t[2] for t in frames],
    )


@dataclass
class Image2D:
    """One radiograph in display sense (MONOCHROME1 inverted), with its source dataset.

    ``low``/``high``: the range the values can take after the Modality LUT (PS3.3
    C.11.1), from the image's own Bits Stored, Pixel Representation and rescale or
    Modality LUT: what ``normalize`` ``image_range`` maps to [0, 1].
    """

    array: np.ndarray  # (rows, cols) float32
    source: Dataset
    low: float = 0.0
    high: float = 4095.0
    inverted: bool = False  # MONOCHROME1: array = low + high - modality values


def stored_range(ds: Dataset) -> tuple[float, float]:
    """The stored pixel values' range from Bits Stored and Pixel Representation (PS3.3
    C.7.6.3.1); an input error naming the attribute when it is missing or not usable."""
    try:
        bits = int(ds.BitsStored)
    except (AttributeError, TypeError, ValueError):
        raise PixelDataError("BitsStored (0028,0101) is missing or not a number") from None
    if not 1 <= bits <= 32:
        raise PixelDataError(f"BitsStored (0028,0101) of {bits} bits is outside 1..32")
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2 ** bits - 1)


def modality_range(ds: Dataset) -> tuple[float, float]:
    """The range of values after the Modality LUT or rescale (PS3.3 C.11.1)."""
    lo, hi = stored_range(ds)
    seq = ds.get("ModalityLUTSequence")
    if seq:
        descriptor = seq[0].get("LUTDescriptor")
        bits = int(descriptor[2]) if descriptor and len(descriptor) == 3 else 16
        return 0.0, float(2 ** bits - 1)
    ends = _rescale(np.array([lo, hi], np.float64), ds.get("RescaleSlope"),
                    ds.get("RescaleIntercept"))
    return float(ends.min()), float(ends.max())


def radiograph(ds: Dataset) -> Image2D:
    """A single-frame radiograph (CR/DX) as values where bright = dense.

    The Modality LUT or rescale is applied (pydicom's ``apply_modality_lut``);
    MONOCHROME1 is inverted within the image's own value range, not a fixed one.
    """
    from pydicom.pixels import apply_modality_lut

    where = f"instance {ds.SOPInstanceUID}"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise PixelDataError(f"{where}: colour images are not supported by this model "
                             "(SamplesPerPixel (0028,0002) above 1)")
    low, high = modality_range(ds)
    px = _pixels(ds, where)
    if px.ndim != 2:
        raise PixelDataError(f"{where}: a radiograph has one frame; this one has "
                             f"{px.shape[0]} (NumberOfFrames (0028,0008))")
    try:
        arr = np.asarray(apply_modality_lut(px, ds), dtype=np.float32)
    except (ValueError, TypeError, IndexError, KeyError):
        raise PixelDataError(f"{where}: the Modality LUT or rescale (RescaleSlope "
                             "(0028,1053), RescaleIntercept (0028,1052)) cannot be "
                             "applied") from None
    inverted = ds.get("PhotometricInterpretation") == "MONOCHROME1"
    if inverted:
        arr = np.float32(low + high) - arr
    return Image2D(arr, ds, low, high, inverted)


def voi_image(image: Image2D) -> tuple[np.ndarray, float, float] | None:
    """The image through its own VOI LUT or window (PS3.3 C.11.2, pydicom's
    ``apply_voi_lut``) in display sense, with the output range; ``None`` when the
    image has neither (the caller decides what to do)."""
    from pydicom.pixels import apply_voi_lut

    ds = image.source
    if not (ds.get("VOILUTSequence") or ds.get("WindowCenter") is not None):
        return None
    values = np.float32(image.low + image.high) - image.array if image.inverted \
        else image.array
    try:
        out = np.asarray(apply_voi_lut(values.astype(np.float64), ds), np.float32)
        seq = ds.get("VOILUTSequence")
        if seq:
            descriptor = seq[0].LUTDescriptor
            lo, hi = 0.0, float(2 ** int(descriptor[2]) - 1)
        else:
            ends = np.asarray(apply_voi_lut(np.array([-1e12, 1e12]), ds), np.float64)
            lo, hi = float(ends.min()), float(ends.max())
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        raise PixelDataError(f"instance {ds.SOPInstanceUID}: the VOI LUT or window "
                             "(WindowCenter (0028,1050), WindowWidth (0028,1051), "
                             "VOILUTSequence (0028,3010)) cannot be applied") from None
    if image.inverted:
        out = np.float32(lo + hi) - out
    return out, lo, hi
