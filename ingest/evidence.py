"""Completion evidence an instance carries, and what a series' geometry says.

Pure functions over a pydicom header and over numbers. The receiver puts
``instance_evidence`` into ``ingest.instance.stored``; the completion fold
(``ingest.completion``) asks ``series_geometry`` whether a series' slices run from end
to end without a gap.

- Slice position: ImagePositionPatient (0020,0032) projected on the slice normal, the
  cross product of the two ImageOrientationPatient (0020,0037) direction cosines
  (PS3.3 C.7.6.2.1.1), in mm.
- Declared counts: ImagesInAcquisition (0020,1002), NumberOfSeriesRelatedInstances
  (0020,1209), NumberOfStudyRelatedInstances (0020,1208). Few modalities fill them; when
  present they are the strongest evidence there is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median

from pydicom.dataset import Dataset


def _floats(ds: Dataset, keyword: str, n: int) -> tuple[float, ...] | None:
    try:
        raw = ds.get(keyword)
        if raw is None:
            return None
        values = tuple(float(v) for v in raw)
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def _count(ds: Dataset, keyword: str) -> int | None:
    try:
        raw = ds.get(keyword)
        value = int(raw) if raw not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return value if value is not None and value > 0 else None


def slice_position_mm(ds: Dataset) -> float | None:
    """The slice's position along its normal in mm, or None without a plane geometry."""
    pos = _floats(ds, "ImagePositionPatient", 3)
    ori = _floats(ds, "ImageOrientationPatient", 6)
    if pos is None or ori is None:
        return None
    r, c = ori[:3], ori[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return round(sum(p * n for p, n in zip(pos, normal, strict=True)), 4)


def instance_evidence(ds: Dataset) -> dict[str, float | int]:
    """The optional ``InstanceStored`` fields this header gives (absent ones left out)."""
    out: dict[str, float | int | None] = {
        "slice_position_mm": slice_position_mm(ds),
        "images_in_acquisition": _count(ds, "ImagesInAcquisition"),
        "declared_series_instances": _count(ds, "NumberOfSeriesRelatedInstances"),
        "declared_study_instances": _count(ds, "NumberOfStudyRelatedInstances"),
    }
    return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Geometry:
    """What a series' slice positions say. ``contiguous`` is None when they cannot say
    (fewer than 3 positioned slices, or none)."""

    slices: int
    contiguous: bool | None
    spacing_mm: float | None = None
    gaps: int = 0  # steps over 1.5 x the median spacing: that many holes at least

    def describe(self, series_uid: str) -> str:
        if self.contiguous is None:
            return f"series {series_uid}: {self.slices} instances, no slice geometry to check"
        if self.contiguous:
            return (f"series {series_uid}: {self.slices} slices contiguous end to end "
                    f"({self.spacing_mm:g} mm apart)")
        return (f"series {series_uid}: {self.slices} slices with {self.gaps} gap(s) "
                f"wider than 1.5 x the {self.spacing_mm:g} mm spacing")


def series_geometry(positions: Sequence[float]) -> Geometry:
    """Whether slices at ``positions`` (mm along the normal, any order) are evenly spaced
    from first to last: every step within 1.5 x the median step. Repeated positions
    (echoes, phases at one location) count once."""
    distinct = sorted(set(positions))
    if len(distinct) < 3:
        return Geometry(len(positions), None)
    steps = [b - a for a, b in zip(distinct, distinct[1:], strict=False)]
    spacing = median(steps)
    if spacing <= 0:
        return Geometry(len(positions), None)
    gaps = sum(1 for s in steps if s > 1.5 * spacing)
    return Geometry(len(positions), gaps == 0, round(spacing, 3), gaps)
