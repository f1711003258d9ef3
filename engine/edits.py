"""After a clinician's edit: volumes recomputed from the corrected SEG and its Dice
against the AI's SEG (the paper's automatic volume recalculation, issue 5 part 4).

Two layers, in this order in the file:

- **Pure core** (values in, values out): ``read_seg_frames`` turns a DICOM SEG into its
  frames (segment label, plane position, referenced source image, pixels) and checks its
  geometry; ``align`` puts the AI SEG and the edited SEG on one grid of planes, matching
  frames by *where they are* (ImagePositionPatient along the slice normal, or the
  referenced source SOP Instance where a frame has no position), never by frame index,
  so a SEG written by another tool with its frames in another order, or with empty
  frames omitted, compares correctly; ``compare`` gives each segment label's volume in mL
  (the engine's own ``volumes_ml`` operator, voxel = PixelSpacing x slice spacing) and
  its Dice against the AI mask. ``build_edited_seg`` writes a corrected SEG in memory (the
  demo's simulated readers and any "paint a correction" page use it).
- **Bus edge**: ``EditRecomputer`` is a durable JetStream consumer (``engine-edits``) of
  ``review.edit.submitted``. For each ``EditSubmitted`` it finds the run's
  ``InferenceCompleted`` in the study's history, reads the AI SEG (under ``results_dir``)
  and the edited SEG (under ``instances_dir``, its SHA-256 checked against the event) and
  publishes ``MeasurementRecomputed`` caused by the edit, with a deterministic id (the
  edit's), so a redelivery or a second consumer never records a second fact.

A bad edit (file missing or altered, not a SEG, another study, segments that are not the
AI result's, another grid) raises ``EditRejected``. The catalogue has no "edit rejected"
type and ``InferenceFailed`` would mark the *run* failed in the read model, so a rejected
edit is dead-lettered: ``EditRejected`` is ``Unprocessable``, so the consumer records
``system.delivery.failed`` with the reason on the first delivery (retrying the same file
cannot help); no ``MeasurementRecomputed`` is written and the consumer goes on. Other
errors (a result file still being copied, the log unreachable) are retried as usual.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from engine.dicom_results import MANUFACTURER, SOFTWARE_VERSION, uid_from
from engine.errors import safe_reason
from engine.ops.postprocess import dice, volumes_ml
from engine.ops.volume import functional_group
from events.base import Event, deterministic_id
from events.catalogue import (
    EditSubmitted,
    InferenceCompleted,
    InstanceStored,
    Measurement,
    MeasurementRecomputed,
)
from events.errors import EditRejected
from events.jetstream import Delivery, EventBus
from events.subjects import type_filter

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
SEG_CLASSES = frozenset({SEGMENTATION_STORAGE, LABEL_MAP_SEGMENTATION_STORAGE})
DURABLE = "engine-edits"
TRIGGER = type_filter(EditSubmitted.type_name())

POSITION_TOL_MM = 0.05  # two frames are on the same plane when closer than this
ORIENTATION_TOL = 1e-3
SPACING_REL_TOL = 0.02


# --------------------------------------------------------------------------- pure core


@dataclass(frozen=True)
class SegGeometry:
    """The in-plane grid every frame of a SEG shares (PS3.3 C.7.6.16.2)."""

    rows: int
    columns: int
    orientation: tuple[float, ...]  # ImageOrientationPatient: row cosine, column cosine
    pixel_spacing: tuple[float, float]  # (row spacing dy, column spacing dx) mm
    slice_spacing: float | None  # SpacingBetweenSlices, when the SEG declares it
    frame_of_reference_uid: str | None

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation, float)
        return np.cross(o[:3], o[3:])


@dataclass(frozen=True)
class SegFrame:
    """One frame: which segment (by label), where, from which source image, which pixels."""

    label: str
    position: tuple[float, ...] | None  # ImagePositionPatient of the frame (3 values)
    source: tuple[str, int] | None  # (referenced SOP Instance UID, frame number or 0)
    pixels: np.ndarray  # (rows, columns) bool


@dataclass(frozen=True)
class SegFrames:
    """A SEG read into frames: enough to align it with another SEG of the same grid."""

    sop_instance_uid: str
    study_uid: str
    labels: tuple[str, ...]  # segment labels in segment-number order
    geometry: SegGeometry
    frames: tuple[SegFrame, ...]
    source_instances: tuple[str, ...] = ()  # every source instance the SEG references


@dataclass(frozen=True)
class Aligned:
    """Two SEGs' masks on one grid of planes (ordered along the slice normal)."""

    labels: tuple[str, ...]
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    positions: tuple[float, ...]  # plane positions along the normal, mm
    ai: dict[str, np.ndarray]  # label -> (planes, rows, columns) bool
    edited: dict[str, np.ndarray]


@dataclass(frozen=True)
class Recomputed:
    """Per segment label: the edited mask's volume in mL, the AI's, and their Dice."""

    volumes_ml: dict[str, float]
    ai_volumes_ml: dict[str, float]
    dice: dict[str, float]  # labels where both masks are empty are left out (undefined)


def _floats(value: object, n: int, what: str, where: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise EditRejected(f"{where}: {what} is missing or not numeric") from None
    if len(out) != n:
        raise EditRejected(f"{where}: {what} has {len(out)} values, expected {n}")
    return out


def _frame_pixels(ds: Dataset, where: str) -> np.ndarray:
    """All frames as (frames, rows, columns), decoded once."""
    try:
        px = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        raise EditRejected(f"{where}: pixel data cannot be decoded: "
                           f"{safe_reason(exc)}") from None
    return px.reshape((-1, int(ds.Rows), int(ds.Columns)))


def read_seg_frames(ds: Dataset, *, what: str = "SEG") -> SegFrames:
    """``ds`` (a DICOM Segmentation: BINARY, FRACTIONAL or LABELMAP) as frames.

    FRACTIONAL frames count where the value is at least half MaximumFractionalValue
    (PS3.3 C.8.20.2.3). Raises ``EditRejected`` naming what is missing or wrong.
    """
    try:
        return _read_seg_frames(ds, what)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        # a required attribute missing or malformed deep inside a sequence
        raise EditRejected(f"{what} {ds.get('SOPInstanceUID', '?')} is malformed: "
                           f"{safe_reason(exc)}") from None


def _read_seg_frames(ds: Dataset, what: str) -> SegFrames:
    if str(ds.get("SOPClassUID", "")) not in SEG_CLASSES:
        raise EditRejected(f"{what} is not a DICOM Segmentation (SOP Class "
                           f"{ds.get('SOPClassUID', 'missing')})")
    where = f"{what} {ds.get('SOPInstanceUID', '?')}"
    if not ds.get("StudyInstanceUID"):
        raise EditRejected(f"{where} has no StudyInstanceUID")
    kind = str(ds.get("SegmentationType", "BINARY"))
    numbers: dict[int, str] = {}
    for item in ds.get("SegmentSequence") or []:
        if kind == "LABELMAP" and int(item.SegmentNumber) == 0:
            continue  # a label map's pixel value 0 is the background, not a segment
        label = str(item.get("SegmentLabel", "")).strip()
        if not label:
            raise EditRejected(f"{where}: segment {item.get('SegmentNumber')} has no label")
        numbers[int(item.SegmentNumber)] = label
    if not numbers:
        raise EditRejected(f"{where} has no segments")
    if len(set(numbers.values())) != len(numbers):
        raise EditRejected(f"{where}: two segments share a label ({sorted(numbers.values())})")
    orient = functional_group(ds, 0, "PlaneOrientationSequence")
    measures = functional_group(ds, 0, "PixelMeasuresSequence")
    if orient is None or measures is None:
        raise EditRejected(f"{where}: no plane orientation or pixel measures: it is not on "
                           "an image grid")
    iop = _floats(orient.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where)
    dy, dx = _floats(measures.get("PixelSpacing"), 2, "PixelSpacing", where)
    sbs = measures.get("SpacingBetweenSlices")
    geometry = SegGeometry(int(ds.Rows), int(ds.Columns), iop, (dy, dx),
                           float(sbs) if sbs not in (None, "") else None,
                           str(ds.get("FrameOfReferenceUID") or "") or None)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = _frame_pixels(ds, where)
    if pixels.shape[0] != n:
        raise EditRejected(f"{where}: {n} frames declared, {pixels.shape[0]} in the pixel data")
    threshold = 1
    if kind == "FRACTIONAL":
        threshold = max(1, (int(ds.get("MaximumFractionalValue", 255)) + 1) // 2)
    frames: list[SegFrame] = []
    for f in range(n):
        pos_item = functional_group(ds, f, "PlanePositionSequence")
        position = (_floats(pos_item.get("ImagePositionPatient"), 3, "ImagePositionPatient",
                            f"{where} frame {f + 1}") if pos_item is not None else None)
        source = None
        deriv = functional_group(ds, f, "DerivationImageSequence")
        refs = deriv.get("SourceImageSequence") if deriv is not None else None
        if refs:
            source = (str(refs[0].ReferencedSOPInstanceUID),
                      int(refs[0].get("ReferencedFrameNumber", 0) or 0))
        if position is None and source is None:
            raise EditRejected(f"{where} frame {f + 1} has neither a plane position nor a "
                               "source image: it cannot be placed")
        if kind == "LABELMAP":
            for number, label in numbers.items():
                mask = pixels[f] == number
                if mask.any():
                    frames.append(SegFrame(label, position, source, mask))
            continue
        ident = functional_group(ds, f, "SegmentIdentificationSequence")
        if ident is None or int(ident.ReferencedSegmentNumber) not in numbers:
            raise EditRejected(f"{where} frame {f + 1} refers to no segment of the SEG")
        frames.append(SegFrame(numbers[int(ident.ReferencedSegmentNumber)], position,
                               source, pixels[f] >= threshold))
    sources = tuple(str(i.ReferencedSOPInstanceUID)
                    for s in ds.get("ReferencedSeriesSequence") or []
                    for i in s.get("ReferencedInstanceSequence") or [])
    return SegFrames(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                     tuple(numbers[k] for k in sorted(numbers)), geometry, tuple(frames),
                     sources)


def _same_grid(ai: SegGeometry, edit: SegGeometry) -> None:
    if (edit.rows, edit.columns) != (ai.rows, ai.columns):
        raise EditRejected(f"the edited SEG's frames are {edit.rows}x{edit.columns}, the AI "
                           f"result's {ai.rows}x{ai.columns}: it is not on the same grid")
    if np.max(np.abs(np.subtract(edit.orientation, ai.orientation))) > ORIENTATION_TOL:
        raise EditRejected(f"the edited SEG's orientation {list(edit.orientation)} differs "
                           f"from the AI result's {list(ai.orientation)}")
    if np.max(np.abs(np.subtract(edit.pixel_spacing, ai.pixel_spacing))) > 1e-4 * max(
            1.0, max(ai.pixel_spacing)):
        raise EditRejected(f"the edited SEG's pixel spacing {list(edit.pixel_spacing)} mm "
                           f"differs from the AI result's {list(ai.pixel_spacing)} mm")
    if (edit.frame_of_reference_uid and ai.frame_of_reference_uid
            and edit.frame_of_reference_uid != ai.frame_of_reference_uid):
        raise EditRejected("the edited SEG is in another frame of reference "
                           f"({edit.frame_of_reference_uid}, the AI result's "
                           f"{ai.frame_of_reference_uid})")


def _plane_clusters(values: Sequence[float]) -> list[float]:
    """Distinct plane positions: values closer than ``POSITION_TOL_MM`` are one plane."""
    planes: list[float] = []
    for v in sorted(values):
        if not planes or v - planes[-1] > POSITION_TOL_MM:
            planes.append(v)
    return planes


def align(ai: SegFrames, edited: SegFrames) -> Aligned:
    """Both SEGs' masks on one grid of planes, per AI segment label.

    Frames are placed by ImagePositionPatient (projected on the slice normal); a frame
    without one is placed where the other SEG put the same source image. Labels must
    be the AI result's labels (case and surrounding spaces ignored), no more, no fewer.
    """
    _same_grid(ai.geometry, edited.geometry)
    by_key = {lb.strip().lower(): lb for lb in ai.labels}
    edit_keys = {lb.strip().lower(): lb for lb in edited.labels}
    if set(edit_keys) != set(by_key):
        extra = sorted(edit_keys[k] for k in set(edit_keys) - set(by_key))
        missing = sorted(by_key[k] for k in set(by_key) - set(edit_keys))
        raise EditRejected(
            f"the edited SEG's segments {sorted(edited.labels)} do not match the AI result's "
            f"{sorted(ai.labels)}" + (f"; not in the AI result: {extra}" if extra else "")
            + (f"; missing: {missing}" if missing else ""))
    geo = ai.geometry
    o = np.asarray(geo.orientation, float)
    normal = geo.normal
    # where each source image is, from every frame that has both a source and a position
    source_pos: dict[tuple[str, int], np.ndarray] = {}
    for fr in (*ai.frames, *edited.frames):
        if fr.source is not None and fr.position is not None:
            pos = np.asarray(fr.position, float)
            known = source_pos.setdefault(fr.source, pos)
            if np.max(np.abs(known - pos)) > POSITION_TOL_MM:
                raise EditRejected(f"source image {fr.source[0]} is placed at {list(known)} "
                                   f"by one frame and at {list(pos)} by another")

    def placed(fr: SegFrame, who: str) -> np.ndarray:
        if fr.position is not None:
            return np.asarray(fr.position, float)
        assert fr.source is not None
        if fr.source not in source_pos:
            raise EditRejected(f"a frame of the {who} SEG refers to source image "
                               f"{fr.source[0]}, which no positioned frame shows: it "
                               "cannot be placed")
        return source_pos[fr.source]

    placed_ai = [(fr, placed(fr, "AI")) for fr in ai.frames]
    placed_edit = [(fr, placed(fr, "edited")) for fr in edited.frames]
    if not placed_ai and not placed_edit:
        raise EditRejected("neither SEG has a frame: nothing to compare")
    origin = (placed_ai or placed_edit)[0][1]
    in_plane = np.array([o[:3] @ origin, o[3:] @ origin])
    for who, frames in (("AI", placed_ai), ("edited", placed_edit)):
        for _, pos in frames:
            if np.max(np.abs(np.array([o[:3] @ pos, o[3:] @ pos]) - in_plane)) > POSITION_TOL_MM:
                raise EditRejected(f"a frame of the {who} SEG at {list(np.round(pos, 3))} is "
                                   "shifted within the plane against the AI result's grid")
    planes = _plane_clusters([float(pos @ normal) for _, pos in (*placed_ai, *placed_edit)])
    dz = geo.slice_spacing or edited.geometry.slice_spacing
    if dz is None:
        gaps = np.diff(planes)
        if not len(gaps):
            raise EditRejected("the slice spacing is unknown: neither SEG declares "
                               "SpacingBetweenSlices and there is only one plane")
        dz = float(gaps.min())
    for a, b in zip(planes, planes[1:], strict=False):
        steps = (b - a) / dz
        if abs(steps - round(steps)) > SPACING_REL_TOL * max(1.0, round(steps)):
            raise EditRejected(f"planes at {a:.3f} and {b:.3f} mm are {b - a:.3f} mm apart, "
                               f"not a multiple of the slice spacing {dz:.3f} mm")
    index = np.asarray(planes)

    def stack(frames: list[tuple[SegFrame, np.ndarray]]) -> dict[str, np.ndarray]:
        out = {lb: np.zeros((len(planes), geo.rows, geo.columns), bool) for lb in ai.labels}
        for fr, pos in frames:
            k = int(np.argmin(np.abs(index - float(pos @ normal))))
            out[by_key[fr.label.strip().lower()]][k] |= fr.pixels
        return out

    return Aligned(ai.labels, (float(dz), *geo.pixel_spacing), tuple(planes),
                   stack(placed_ai), stack(placed_edit))


def compare(aligned: Aligned) -> Recomputed:
    """Volumes (the engine's ``volumes_ml``) and Dice (``dice``) per label."""
    vols, ai_vols, scores = {}, {}, {}
    for label in aligned.labels:
        a, e = aligned.ai[label], aligned.edited[label]
        vols[label] = volumes_ml(e.astype(np.uint8), aligned.spacing, {1: label})[label]
        ai_vols[label] = volumes_ml(a.astype(np.uint8), aligned.spacing, {1: label})[label]
        if a.any() or e.any():
            scores[label] = dice(a, e)
    return Recomputed(vols, ai_vols, scores)


def recompute(ai_seg: Dataset, edited_seg: Dataset, *, study_uid: str) -> Recomputed:
    """Check that ``edited_seg`` is a SEG of ``study_uid`` on the AI SEG's grid with the
    AI's segments, then compare them. Raises ``EditRejected`` otherwise."""
    edited = read_seg_frames(edited_seg, what="edited SEG")
    if edited.study_uid != study_uid:
        raise EditRejected(f"the edited SEG belongs to study {edited.study_uid}, the edit "
                           f"was submitted for study {study_uid}")
    ai = read_seg_frames(ai_seg, what="AI SEG")
    if ai.study_uid != study_uid:
        raise EditRejected(f"the AI SEG of the run belongs to study {ai.study_uid}, not "
                           f"{study_uid}")
    if ai.source_instances and edited.source_instances and not (
            set(ai.source_instances) & set(edited.source_instances)):
        raise EditRejected("the edited SEG references none of the AI result's source images")
    return compare(align(ai, edited))


def measurements(result: Recomputed) -> tuple[Measurement, ...]:
    """As the AI's own measurements are named (``volume_<label>``, mL), so the read model
    pairs each recomputed volume with the AI's (Bland-Altman in projections)."""
    return tuple(Measurement(name=f"volume_{label}", value=round(ml, 6), unit="mL",
                             label=label) for label, ml in result.volumes_ml.items())


def masks_on_sources(seg: SegFrames, sources: Sequence[Dataset]) -> dict[str, np.ndarray]:
    """Each label's mask as ``(len(sources), rows, columns)`` in the order of
    ``sources`` (single-frame images), frames placed by source image or position."""
    by_uid = {str(ds.SOPInstanceUID): i for i, ds in enumerate(sources)}
    normal = seg.geometry.normal
    pos = [float(np.asarray(_floats(ds.get("ImagePositionPatient"), 3,
                                    "ImagePositionPatient", f"source {ds.SOPInstanceUID}"))
                 @ normal) for ds in sources]
    out = {lb: np.zeros((len(sources), seg.geometry.rows, seg.geometry.columns), bool)
           for lb in seg.labels}
    for fr in seg.frames:
        if fr.source is not None and fr.source[0] in by_uid:
            k = by_uid[fr.source[0]]
        elif fr.position is not None:
            d = np.abs(np.asarray(pos) - float(np.asarray(fr.position) @ normal))
            k = int(np.argmin(d))
            if d[k] > POSITION_TOL_MM:
                raise EditRejected(f"a frame at {fr.position} is on no source image")
        else:
            raise EditRejected(f"a frame refers to source {fr.source}, not among the sources")
        out[fr.label][k] |= fr.pixels
    return out


def build_edited_seg(sources: Sequence[Dataset], masks: Mapping[str, np.ndarray],
                     ai_seg: Dataset, *, reader: str, uid_key: str,
                     series_number: int = 901) -> Dataset:
    """A corrected BINARY SEG over ``sources`` (one per mask slice, same order), one
    segment per label with the AI SEG's codes, marked SEMIAUTOMATIC (an AI mask a person
    corrected) with the AI's algorithm identification. UIDs derive from ``uid_key`` and
    dates from the AI SEG, so the same edit gives the same bytes."""
    ai_segments = {str(s.SegmentLabel).strip(): s for s in ai_seg.SegmentSequence}
    labels = list(masks)
    descriptions = []
    for number, label in enumerate(labels, start=1):
        item = ai_segments.get(label)
        if item is None:
            raise EditRejected(f"label {label!r} is not a segment of the AI SEG")
        algo = hd.AlgorithmIdentificationSequence.from_sequence(
            item.SegmentationAlgorithmIdentificationSequence
        ) if "SegmentationAlgorithmIdentificationSequence" in item else None
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label[:64],
            segmented_property_category=hd.sr.CodedConcept.from_dataset(
                item.SegmentedPropertyCategoryCodeSequence[0]),
            segmented_property_type=hd.sr.CodedConcept.from_dataset(
                item.SegmentedPropertyTypeCodeSequence[0]),
            algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if algo
                            else hd.seg.SegmentAlgorithmTypeValues.MANUAL),
            algorithm_identification=algo,
            tracking_uid=uid_from(uid_key, "segment", number),
            tracking_id=f"edit:{label}"[:64],
        ))
    pixel_array = np.stack([np.asarray(masks[lb], bool) for lb in labels], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uid_from(uid_key, "edit-series"),
        series_number=series_number,
        sop_instance_uid=uid_from(uid_key, "edit"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="Lastmile mask edit",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="edit",
        series_description=f"Edited {ai_seg.get('SeriesDescription', 'SEG')}"[:64],
        content_label="EDIT",
        content_description=f"corrected by {reader}"[:64],
        content_creator_name=reader[:63] if "^" in reader else f"{reader[:63]}^",
        omit_empty_frames=bool(pixel_array.any()),
    )
    if "ContentDate" in ai_seg and "ContentTime" in ai_seg:  # no wall clock in the bytes
        for prefix in ("Series", "Content", "InstanceCreation"):
            setattr(seg, f"{prefix}Date", ai_seg.ContentDate)
            setattr(seg, f"{prefix}Time", ai_seg.ContentTime)
    if "CodingSchemeIdentificationSequence" in ai_seg:
        seg.CodingSchemeIdentificationSequence = ai_seg.CodingSchemeIdentificationSequence
    return seg


# --------------------------------------------------------------------------- files edge


def read_dicom(path: Path, what: str) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError:
        raise EditRejected(f"{what} {path.name} is missing") from None
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise EditRejected(f"{what} {path.name} is not readable DICOM: "
                           f"{safe_reason(exc)}") from None


def in_root(root: Path, key: str, what: str) -> Path:
    """``root / key``, refused if the key leaves ``root`` (keys come from events)."""
    path = (root / key).resolve()
    if not path.is_relative_to(root.resolve()):
        raise EditRejected(f"{what} key {key!r} points outside {root}")
    return path


def read_edit(instances_dir: Path, store_key: str, sha256: str) -> Dataset:
    """The edited SEG from the instance store; its bytes must hash to ``sha256``."""
    path = in_root(instances_dir, store_key, "edited SEG")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EditRejected(f"the edited SEG {store_key} is not in the instance store") from None
    except OSError as exc:
        raise EditRejected(f"the edited SEG {store_key} cannot be read: {exc}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise EditRejected(f"the edited SEG {store_key} has SHA-256 {actual[:12]}…, the edit "
                           f"event says {sha256[:12]}…: the file is not the one submitted")
    return read_dicom(path, "edited SEG")


def find_ai_seg(results_dir: Path, result_keys: Sequence[str]) -> Dataset:
    """The SEG among a run's result files (by SOP Class, not by file name)."""
    for key in result_keys:
        path = in_root(results_dir, key, "result")
        try:
            head = pydicom.dcmread(path, stop_before_pixels=True)
        except (FileNotFoundError, InvalidDicomError, OSError, ValueError):
            continue
        if str(head.get("SOPClassUID", "")) in SEG_CLASSES:
            return read_dicom(path, "AI SEG")
    raise EditRejected(f"the run has no readable SEG among its results {list(result_keys)}")


def source_paths(history: Sequence[tuple[int, Event]], instances_dir: Path,
                 sop_instance_uids: Sequence[str]) -> list[Path]:
    """Files of the given source instances (the latest stored version of each)."""
    latest: dict[str, InstanceStored] = {}
    for _, ev in history:
        if isinstance(ev, InstanceStored) and ev.sop_instance_uid in sop_instance_uids:
            cur = latest.get(ev.sop_instance_uid)
            if cur is None or ev.version >= cur.version:
                latest[ev.sop_instance_uid] = ev
    missing = [u for u in sop_instance_uids if u not in latest]
    if missing:
        raise EditRejected(f"{len(missing)} source instances of the SEG are not in the "
                           f"study's log (first: {missing[0]})")
    return [instances_dir / latest[u].store_key for u in sop_instance_uids]


# --------------------------------------------------------------------------- bus edge


@dataclass
class EditConfig:
    instances_dir: Path
    results_dir: Path
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    durable: str = DURABLE
    max_attempts: int = 3
    ack_wait_s: float = 60.0


@dataclass(frozen=True)
class EditOutcome:
    edit_event_id: str
    status: str  # recomputed | duplicate | ignored
    detail: str = ""


class EditRecomputer:
    """The consumer of ``review.edit.submitted`` (see the module doc)."""

    name = "engine-edits"

    def __init__(self, config: EditConfig) -> None:
        self.config = config
        self.outcomes: list[EditOutcome] = []  # for tests; bounded below
        self._bus: EventBus

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        self._bus = bus
        await bus.consume(self.config.durable, self.handle, filter_subjects=[TRIGGER],
                          max_attempts=self.config.max_attempts,
                          ack_wait_s=self.config.ack_wait_s, stop=stop)

    def bind(self, bus: EventBus) -> EditRecomputer:
        self._bus = bus
        return self

    async def handle(self, event: Event, delivery: Delivery) -> None:
        outcome = await self._handle(self._bus, event)
        self.outcomes = [*self.outcomes[-999:], outcome]

    async def _handle(self, bus: EventBus, edit: Event) -> EditOutcome:
        if not isinstance(edit, EditSubmitted):
            return EditOutcome(edit.event_id, "ignored", edit.type_name())
        if not edit.study_uid:
            raise EditRejected(f"edit {edit.event_id} names no study")
        history = await bus.history(edit.study_uid)
        for _, ev in history:
            if isinstance(ev, MeasurementRecomputed) and ev.edit_event_id == edit.event_id:
                return EditOutcome(edit.event_id, "duplicate", "already recomputed")
        ai = next((ev for _, ev in history if isinstance(ev, InferenceCompleted)
                   and ev.run_key == edit.run_key), None)
        if ai is None:
            raise EditRejected(f"study {edit.study_uid} has no completed inference with run "
                               f"key {edit.run_key}: there is no AI result to compare with")
        result = await asyncio.to_thread(self._recompute, edit, ai)
        await bus.publish(edit.caused(
            MeasurementRecomputed, actor=f"worker:{self.config.worker_id}",
            event_id=deterministic_id("recomputed", edit.event_id),
            pipeline=ai.pipeline, run_key=edit.run_key, edit_event_id=edit.event_id,
            measurements=measurements(result),
            dice={k: round(v, 6) for k, v in result.dice.items()}))
        log.info("edit %s of run %s: %s", edit.event_id, edit.run_key,
                 ", ".join(f"{k} Dice {v:.3f}" for k, v in result.dice.items()))
        return EditOutcome(edit.event_id, "recomputed",
                           ", ".join(f"{k}={v:.4f}" for k, v in result.dice.items()))

    def _recompute(self, edit: EditSubmitted, ai: InferenceCompleted) -> Recomputed:
        edited = read_edit(self.config.instances_dir, edit.store_key, edit.sha256)
        ai_seg = find_ai_seg(self.config.results_dir, ai.result_keys)
        return recompute(ai_seg, edited, study_uid=edit.study_uid or "")
