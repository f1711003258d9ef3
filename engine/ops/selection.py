"""Exam parsing and series selection: which series a pipeline runs on, and why not others.

Selection rules are data (``SelectionRule``); ``select_series`` is a pure function of
the series' headers and the rule. Every rejected series is returned with its reason,
so "no series matched" events can say exactly what was wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class SeriesInfo:
    """What selection needs to know about one series (headers only)."""

    series_uid: str
    modality: str
    description: str
    instance_count: int
    orientation: str | None  # axial | coronal | sagittal | oblique | None (2D / unknown)
    slice_count: int  # frames of a volume (instances, or frames of a multi-frame)
    spacing_mm: float | None  # largest of pixel spacing and slice thickness
    series_number: int | None = None


@dataclass(frozen=True)
class SelectionRule:
    modalities: tuple[str, ...] = ()
    description_regex: str | None = None
    exclude_regex: str | None = None
    orientation: str | None = None
    min_slices: int = 1
    max_slices: int | None = None
    max_spacing_mm: float | None = None
    multiple: bool = False  # True: every matching series (radiographs); else the best one


@dataclass(frozen=True)
class Selection:
    chosen: tuple[SeriesInfo, ...]
    rejected: tuple[tuple[str, str], ...]  # (series uid, reason)

    def rejected_lines(self) -> tuple[str, ...]:
        return tuple(f"{uid}: {reason}" for uid, reason in self.rejected)


def orientation_of(iop: Sequence[float] | None) -> str | None:
    """Axial/coronal/sagittal from ImageOrientationPatient, or oblique (> ~25 degrees)."""
    if not iop or len(iop) != 6:
        return None
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def describe_series(datasets: Iterable[Dataset]) -> list[SeriesInfo]:
    """Group instance headers by series into ``SeriesInfo`` (order: series number)."""
    groups: dict[str, list[Dataset]] = {}
    for ds in datasets:
        groups.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    infos = []
    for uid, items in groups.items():
        first = items[0]
        frames = sum(int(getattr(d, "NumberOfFrames", 1) or 1) for d in items)
        iop = first.get("ImageOrientationPatient")
        spacing = None
        ps = first.get("PixelSpacing")
        if ps is None and "SharedFunctionalGroupsSequence" in first:
            shared = first.SharedFunctionalGroupsSequence[0]
            if "PixelMeasuresSequence" in shared:
                measures = shared.PixelMeasuresSequence[0]
                ps = measures.get("PixelSpacing")
                if "SliceThickness" in measures:
                    spacing = float(measures.SliceThickness)
            if iop is None and "PlaneOrientationSequence" in shared:
                iop = shared.PlaneOrientationSequence[0].get("ImageOrientationPatient")
        values = [float(v) for v in (ps or [])]
        if first.get("SliceThickness") not in (None, ""):
            values.append(float(first.SliceThickness))
        if spacing is not None:
            values.append(spacing)
        infos.append(SeriesInfo(
            series_uid=uid,
            modality=str(first.get("Modality", "")),
            description=str(first.get("SeriesDescription", "")),
            instance_count=len(items),
            orientation=orientation_of([float(v) for v in iop] if iop else None),
            slice_count=frames,
            spacing_mm=max(values) if values else None,
            series_number=int(first.SeriesNumber) if first.get("SeriesNumber") else None,
        ))
    return sorted(infos, key=lambda s: (s.series_number or 0, s.series_uid))


def why_rejected(info: SeriesInfo, rule: SelectionRule) -> str | None:
    """The first reason ``info`` fails ``rule``, or None when it matches."""
    if rule.modalities and info.modality not in rule.modalities:
        return f"modality {info.modality or '(none)'} not in {list(rule.modalities)}"
    if rule.description_regex and not re.search(rule.description_regex, info.description,
                                                re.IGNORECASE):
        return f"description {info.description!r} does not match /{rule.description_regex}/"
    if rule.exclude_regex and re.search(rule.exclude_regex, info.description, re.IGNORECASE):
        return f"description {info.description!r} matches exclusion /{rule.exclude_regex}/"
    if rule.orientation and info.orientation != rule.orientation:
        return f"orientation {info.orientation or 'unknown'} is not {rule.orientation}"
    if info.slice_count < rule.min_slices:
        return f"{info.slice_count} slices, fewer than {rule.min_slices}"
    if rule.max_slices is not None and info.slice_count > rule.max_slices:
        return f"{info.slice_count} slices, more than {rule.max_slices}"
    if rule.max_spacing_mm is not None and (
        info.spacing_mm is None or info.spacing_mm > rule.max_spacing_mm
    ):
        return f"spacing {info.spacing_mm} mm exceeds {rule.max_spacing_mm} mm"
    return None


def select_series(series: Sequence[SeriesInfo], rule: SelectionRule) -> Selection:
    """Matching series (all when ``rule.multiple``, else the one with most slices and
    then the lowest series number) and the reason for each series not chosen."""
    matched, rejected = [], []
    for info in series:
        reason = why_rejected(info, rule)
        if reason is None:
            matched.append(info)
        else:
            rejected.append((info.series_uid, reason))
    if rule.multiple or len(matched) <= 1:
        return Selection(tuple(matched), tuple(rejected))
    best = max(matched, key=lambda s: (s.slice_count, -(s.series_number or 0)))
    for info in matched:
        if info is not best:
            rejected.append((info.series_uid, f"matched, but series {best.series_uid} has "
                             f"more slices ({best.slice_count} > {info.slice_count})"))
    return Selection((best,), tuple(rejected))
