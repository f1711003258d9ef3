"""Exam parsing and series selection: which series a pipeline runs on, and why not others.

Selection rules are data (``SelectionRule``); ``select_series`` is a pure function of
the series' headers and the rule. Every series is returned with the reason it was chosen
or rejected (``Selection.considered``: the worker records it as
``engine.series.selected``, for completed and failed runs alike), so "no series matched"
events can say exactly what was wrong.

Beyond the geometric checks (orientation, slice count, spacing), ``when`` is a condition
of the rule language routing uses (``dicom_rules``: equals, one_of, regex, range,
exists; all, any, not) on any attribute of the series' first instance, e.g. "no
ContrastBolusAgent", "ImageType has ORIGINAL", "SequenceName matches /tse/". When more
than one series matches and the rule takes one, ``tie_break`` (names from
``TIE_BREAKS``, in order) decides; the reason says which one did.

A pipeline also declares its *input contract* (``InputContract``): the modality,
photometric interpretation, bit depth, pixel spacing and body part its model was
validated on. A series outside it is refused with a reason in words a site can act on
("colour images are not supported by this model"), never by the model's failure.
Reasons name attributes by keyword and tag; they quote no free-text value (a series
description can hold anything).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from dicom_rules.conditions import Condition, condition_tags, evaluate
from dicom_rules.values import tag_values


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
    # what the input contract checks (first instance of the series)
    photometric: str | None = None
    samples_per_pixel: int = 1
    bits_stored: int | None = None
    pixel_spacing_mm: float | None = None  # smallest of (Imager)PixelSpacing
    body_part: str | None = None
    #: values of the attributes a ``when`` condition reads (first instance), as text
    tags: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def tag_map(self) -> Mapping[str, tuple[str, ...]]:
        return dict(self.tags)


def _number_or(value: float | int | None, missing: float) -> float:
    return missing if value is None else float(value)


#: tie-breaks a pipeline file may name (``selection.tie_break``), each a sort key where
#: larger ranks first; a series missing the attribute ranks last
TIE_BREAKS: dict[str, tuple[str, Callable[[SeriesInfo], float]]] = {
    "most_slices": ("the most slices", lambda s: s.slice_count),
    "fewest_slices": ("the fewest slices", lambda s: -s.slice_count),
    "most_instances": ("the most instances", lambda s: s.instance_count),
    "finest_spacing": ("the finest spacing (PixelSpacing, SliceThickness)",
                       lambda s: -_number_or(s.spacing_mm, math.inf)),
    "lowest_series_number": ("the lowest SeriesNumber (0020,0011)",
                             lambda s: -_number_or(s.series_number, math.inf)),
    "highest_series_number": ("the highest SeriesNumber (0020,0011)",
                              lambda s: _number_or(s.series_number, -math.inf)),
}
#: what a file that names no tie-break gets (the behaviour before ``tie_break`` existed)
DEFAULT_TIE_BREAK = ("most_slices", "lowest_series_number")


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
    when: Condition | None = None  # the rule language, on the series' first instance
    tie_break: tuple[str, ...] = ()  # names of TIE_BREAKS, in order; () = the default

    @property
    def tags(self) -> frozenset[str]:
        """The attributes ``when`` reads (what ``describe_series`` must collect)."""
        return condition_tags(self.when) if self.when is not None else frozenset()


COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT",
                    "YBR_RCT", "PALETTE COLOR", "YBR_PARTIAL_422", "HSV", "ARGB", "CMYK"})
PHOTOMETRIC_TERMS = COLOUR | {"MONOCHROME1", "MONOCHROME2"}


@dataclass(frozen=True)
class InputContract:
    """What a pipeline's model was validated on (pipeline file ``input:``). Empty
    fields accept anything; a series without BodyPartExamined is accepted unless
    ``body_part_required``."""

    modalities: tuple[str, ...] = ()
    photometric: tuple[str, ...] = ()
    bits_stored: tuple[int, int] | None = None  # inclusive
    pixel_spacing_mm: tuple[float, float] | None = None  # inclusive
    body_parts: tuple[str, ...] = ()
    body_part_required: bool = False


def _modality_text(modality: str) -> str:
    """A modality code as such; anything else is not quoted (it would be a value)."""
    return modality if re.fullmatch(r"[A-Z]{2,6}", modality) else "(not a modality code)"


def contract_violation(info: SeriesInfo, contract: InputContract) -> str | None:
    """Why ``info`` is outside ``contract``, or None when it is inside."""
    if contract.modalities and info.modality not in contract.modalities:
        return (f"modality {_modality_text(info.modality)} is not one this model was "
                f"validated on ({', '.join(contract.modalities)}; Modality (0008,0060))")
    photometric = info.photometric or ""
    if contract.photometric and photometric not in contract.photometric:
        shown = photometric if photometric in PHOTOMETRIC_TERMS else "not a defined term"
        if info.samples_per_pixel > 1 or photometric in COLOUR:
            return (f"colour images are not supported by this model (PhotometricInterpretation "
                    f"(0028,0004) {shown}, SamplesPerPixel (0028,0002) "
                    f"{info.samples_per_pixel}; it takes {', '.join(contract.photometric)})")
        return (f"photometric interpretation {shown} is not supported by this model "
                f"(PhotometricInterpretation (0028,0004); it takes "
                f"{', '.join(contract.photometric)})")
    if contract.bits_stored is not None:
        lo, hi = contract.bits_stored
        if info.bits_stored is None or not lo <= info.bits_stored <= hi:
            have = "no" if info.bits_stored is None else f"{info.bits_stored}"
            return (f"{have} bits stored; this model takes {lo} to {hi} "
                    "(BitsStored (0028,0101))")
    if contract.pixel_spacing_mm is not None:
        lo_mm, hi_mm = contract.pixel_spacing_mm
        ps = info.pixel_spacing_mm
        if ps is None or ps <= 0:
            return (f"no usable pixel spacing (PixelSpacing (0028,0030) or ImagerPixelSpacing "
                    f"(0018,1164) missing or zero); this model takes {lo_mm} to {hi_mm} mm")
        if not lo_mm <= ps <= hi_mm:
            return (f"pixel spacing {ps:g} mm is outside the {lo_mm} to {hi_mm} mm this model "
                    "was validated on (PixelSpacing (0028,0030))")
    if contract.body_parts:
        part = (info.body_part or "").upper()
        if not part and contract.body_part_required:
            return ("no body part (BodyPartExamined (0018,0015)); this model takes "
                    f"{', '.join(contract.body_parts)}")
        if part and part not in contract.body_parts:
            return ("body part is not one this model was validated on (BodyPartExamined "
                    f"(0018,0015); it takes {', '.join(contract.body_parts)})")
    return None


@dataclass(frozen=True)
class Selection:
    chosen: tuple[SeriesInfo, ...]
    rejected: tuple[tuple[str, str], ...]  # (series uid, reason)
    #: why each chosen series was chosen (series uid, reason), in ``chosen`` order
    chosen_reasons: tuple[tuple[str, str], ...] = ()

    def rejected_lines(self) -> tuple[str, ...]:
        return tuple(f"{uid}: {reason}" for uid, reason in self.rejected)

    @property
    def considered(self) -> tuple[tuple[str, bool, str], ...]:
        """Every series considered: (series uid, chosen?, reason), chosen first."""
        reasons = dict(self.chosen_reasons)
        return (*((s.series_uid, True, reasons.get(s.series_uid, "matched every selection "
                                                    "rule")) for s in self.chosen),
                *((uid, False, why) for uid, why in self.rejected))


def orientation_of(iop: Sequence[float] | None) -> str | None:
    """Axial/coronal/sagittal from ImageOrientationPatient, or oblique (> ~25 degrees)."""
    if not iop or len(iop) != 6:
        return None
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _floats(value: object) -> list[float]:
    try:
        return [float(v) for v in (value or [])]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return []


def describe_series(datasets: Iterable[Dataset], tags: frozenset[str] = frozenset()
                    ) -> list[SeriesInfo]:
    """Group instance headers by series into ``SeriesInfo`` (order: series number), with
    the values of ``tags`` (``SelectionRule.tags``) from each series' first instance."""
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
                spacing = next(iter(_floats([measures.get("SliceThickness")])), None) \
                    if measures.get("SliceThickness") not in (None, "") else None
            if iop is None and "PlaneOrientationSequence" in shared:
                iop = shared.PlaneOrientationSequence[0].get("ImageOrientationPatient")
        values = _floats(ps)
        values += _floats([first.get("SliceThickness")] if first.get("SliceThickness")
                          not in (None, "") else [])
        if spacing is not None:
            values.append(spacing)
        pixel = _floats(ps or first.get("ImagerPixelSpacing"))
        infos.append(SeriesInfo(
            series_uid=uid,
            modality=str(first.get("Modality", "")),
            description=str(first.get("SeriesDescription", "")),
            instance_count=len(items),
            orientation=orientation_of(_floats(iop) or None),
            slice_count=frames,
            spacing_mm=max(values) if values else None,
            series_number=_int(first.get("SeriesNumber")),
            photometric=str(first.get("PhotometricInterpretation", "")).strip() or None,
            samples_per_pixel=_int(first.get("SamplesPerPixel")) or 1,
            bits_stored=_int(first.get("BitsStored")),
            pixel_spacing_mm=min(pixel) if pixel else None,
            body_part=str(first.get("BodyPartExamined", "")).strip() or None,
            tags=tuple(sorted(tag_values(first, tags).items())) if tags else (),
        ))
    return sorted(infos, key=lambda s: (s.series_number or 0, s.series_uid))


def why_rejected(info: SeriesInfo, rule: SelectionRule,
                 contract: InputContract | None = None) -> str | None:
    """The first reason ``info`` fails ``rule`` or ``contract``, or None when it matches."""
    if rule.modalities and info.modality not in rule.modalities:
        shown = _modality_text(info.modality) if info.modality else "(none)"
        return f"modality {shown} not in {list(rule.modalities)}"
    if rule.description_regex and not re.search(rule.description_regex, info.description,
                                                re.IGNORECASE):
        return f"SeriesDescription (0008,103E) does not match /{rule.description_regex}/"
    if rule.exclude_regex and re.search(rule.exclude_regex, info.description, re.IGNORECASE):
        return f"SeriesDescription (0008,103E) matches exclusion /{rule.exclude_regex}/"
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
    if rule.when is not None:
        ok, why = evaluate(rule.when, info.tag_map, show_values=False)
        if not ok:
            return f"selection condition not met: {why}"
    if contract is not None:
        return contract_violation(info, contract)
    return None


def select_series(series: Sequence[SeriesInfo], rule: SelectionRule,
                  contract: InputContract | None = None) -> Selection:
    """Matching series (all when ``rule.multiple``, else the first by ``rule.tie_break``,
    default most slices then lowest series number), with the reason each series was
    chosen or not (outside the rule or the pipeline's input contract, or lost the tie).
    Reasons are our words, keywords and the rule's own operands, never a DICOM value."""
    matched, rejected = [], []
    for info in series:
        reason = why_rejected(info, rule, contract)
        if reason is None:
            matched.append(info)
        else:
            rejected.append((info.series_uid, reason))
    if rule.multiple or len(matched) <= 1:
        why = ("matched every selection rule" + (" (multiple: every matching series is "
                                                 "used)" if rule.multiple else ""))
        return Selection(tuple(matched), tuple(rejected),
                         tuple((s.series_uid, why) for s in matched))
    names = rule.tie_break or DEFAULT_TIE_BREAK
    keys = [TIE_BREAKS[n][1] for n in names]
    # a stable sort: on a tie on every key, series order (series number, UID) decides
    ranked = sorted(matched, key=lambda s: tuple(-k(s) for k in keys))
    best = ranked[0]
    for info in ranked[1:]:
        decided = next((n for n, k in zip(names, keys, strict=True) if k(best) != k(info)),
                       None)
        if decided is None:
            rejected.append((info.series_uid, f"matched, but tied with series "
                             f"{best.series_uid} on every tie-break ({', '.join(names)}); "
                             "the earlier in series order was taken"))
        else:
            rejected.append((info.series_uid, f"matched, but series {best.series_uid} "
                             f"ranks first by tie-break {decided} "
                             f"({TIE_BREAKS[decided][0]})"))
    chosen_why = (f"matched every selection rule; first of {len(matched)} matching series "
                  f"by tie-break {', then '.join(names)}")
    return Selection((best,), tuple(rejected), ((best.series_uid, chosen_why),))
