"""The DICOM edge of the review pages: source images from the instance store, the AI's
SEG from the results folder, and the check of an uploaded corrected SEG.

Files are read with pydicom (images) and highdicom (segmentations, PS3.3 A.51). A
corrected SEG is accepted only if it is a Segmentation of the same study that references
the AI result's source series and has the AI SEG's frame geometry (rows, columns, and
source images covered), so the engine can compute Dice voxel by voxel. An upload is
bounded as sent (the pages' front, ``MAX_EDIT_MB``) and once inflated: a deflated dataset
(PS3.5 A.5, Deflated Explicit VR Little Endian) is inflated chunk by chunk, without
keeping the output, and refused as soon as it passes the same limit (``check_inflation``),
before pydicom reads it.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from dashboards.config import MAX_UPLOAD_MB
from events.errors import EditRejected

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian (PS3.5 A.5)
MAX_EDIT_MB = MAX_UPLOAD_MB  # a corrected SEG as uploaded, and once inflated
_CHUNK = 1 << 16


@dataclass(frozen=True)
class SourceImage:
    sop_instance_uid: str
    series_uid: str
    position: float  # along the slice normal (or the instance number)
    pixels: np.ndarray  # (rows, cols), float32, display-ready after windowing


@dataclass(frozen=True)
class Volume:
    """A series' slices in position order, and the AI mask on them (labels per segment)."""

    images: tuple[SourceImage, ...]
    mask: np.ndarray | None  # (z, rows, cols) uint8 segment numbers (0 = none)
    segment_labels: Mapping[int, str]


def _position(ds: pydicom.Dataset) -> float:
    ipp = getattr(ds, "ImagePositionPatient", None)
    iop = getattr(ds, "ImageOrientationPatient", None)
    if ipp is not None and iop is not None and len(iop) == 6:
        row, col = np.array(iop[:3], float), np.array(iop[3:], float)
        return float(np.dot(np.cross(row, col), np.array(ipp, float)))
    return float(getattr(ds, "InstanceNumber", 0) or 0)


def _pixels(ds: pydicom.Dataset) -> np.ndarray:
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim == 3:  # a multi-frame image: its middle frame (radiographs are single)
        arr = arr[arr.shape[0] // 2]
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    arr = arr * slope + intercept
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        arr = arr.max() - arr
    return arr


def read_images(paths: Mapping[str, Path]) -> list[SourceImage]:
    """``sop_instance_uid -> file`` read and sorted along the slice normal."""
    out = []
    for uid, path in paths.items():
        ds = pydicom.dcmread(path)
        out.append(SourceImage(uid, str(ds.SeriesInstanceUID), _position(ds), _pixels(ds)))
    return sorted(out, key=lambda s: (s.series_uid, s.position))


def read_seg(path: Path | bytes) -> hd.seg.Segmentation:
    try:
        data = io.BytesIO(path) if isinstance(path, bytes) else path
        ds = pydicom.dcmread(data)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise EditRejected(f"the file is not DICOM ({exc})") from None
    if str(getattr(ds, "SOPClassUID", "")) != SEG_SOP_CLASS:
        raise EditRejected("the file is not a DICOM Segmentation (SOP Class "
                           f"{getattr(ds, 'SOPClassUID', 'missing')}, expected {SEG_SOP_CLASS})")
    try:
        return hd.seg.Segmentation.from_dataset(ds, copy=False)
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise EditRejected(f"the Segmentation cannot be read: {exc}") from None


def seg_labels(seg: hd.seg.Segmentation) -> dict[int, str]:
    return {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}


def display_numbers(labels: Mapping[int, str]) -> dict[int, int]:
    """Segment number -> display value (1..n by label name), so two SEGs with the same
    labels get the same colours whatever their segment numbering: in blinded reading the
    colours must not tell an AI mask from a person's."""
    order = sorted(set(labels.values()))
    return {number: order.index(name) + 1 for number, name in labels.items()}


def seg_on_sources(seg: hd.seg.Segmentation, source_uids: Sequence[str]) -> np.ndarray:
    """The label map ``(z, rows, cols)`` on the given source images (display values of
    ``display_numbers``; where segments overlap the later one wins, only for display)."""
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    present = [u for u in source_uids if u in referenced]
    rows, cols = int(seg.Rows), int(seg.Columns)
    out = np.zeros((len(source_uids), rows, cols), np.uint8)
    if not present:
        return out
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=present,
                                            ignore_spatial_locations=True,
                                            assert_missing_frames_are_empty=True)
    index = {u: i for i, u in enumerate(source_uids)}
    numbers = seg.get_segment_numbers()
    value = display_numbers(seg_labels(seg))
    for j, uid in enumerate(present):
        for k, number in enumerate(numbers):
            out[index[uid]][arr[j, :, :, k] > 0] = value[number]
    return out


def load_volume(image_paths: Mapping[str, Path], seg_path: Path | None) -> Volume:
    images = tuple(read_images(image_paths))
    if seg_path is None:
        return Volume(images, None, {})
    seg = read_seg(seg_path)
    mask = seg_on_sources(seg, [i.sop_instance_uid for i in images])
    return Volume(images, mask, {v: n for n, v in
                                 ((name, i + 1) for i, name in
                                  enumerate(sorted(set(seg_labels(seg).values()))))})


def _transfer_syntax(data: bytes) -> tuple[str | None, int]:
    """The Part 10 file's Transfer Syntax UID and where its dataset starts (PS3.10 7.1);
    (None, 0) when it has no file meta information (pydicom then decides)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None, 0
    fp = io.BytesIO(data)
    fp.seek(132)
    try:
        meta = pydicom.filereader._read_file_meta_info(fp)
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError):
        return None, 0
    return str(getattr(meta, "TransferSyntaxUID", "") or "") or None, fp.tell()


def check_inflation(data: bytes, limit_mb: int = MAX_EDIT_MB) -> None:
    """Refuse a deflated Part 10 file whose dataset inflates to more than ``limit_mb``
    MB (a 1 MB "zip bomb" can inflate to gigabytes). Memory stays at one 64 KiB chunk
    whatever the file says. Raises ``EditRejected``; other transfer syntaxes pass."""
    syntax, start = _transfer_syntax(data)
    if syntax != DEFLATED:
        return
    limit = limit_mb * 1024 * 1024
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    too_big = EditRejected(f"the file inflates to more than {limit_mb} MB, the limit for a "
                           "corrected segmentation; nothing recorded")
    view = memoryview(data)[start:]
    try:
        for i in range(0, len(view), _CHUNK):
            pending = bytes(view[i:i + _CHUNK])
            while pending:
                size += len(inflater.decompress(pending, _CHUNK))
                if size > limit:
                    raise too_big
                pending = inflater.unconsumed_tail
        size += len(inflater.flush())
    except zlib.error:
        raise EditRejected("the deflated dataset is corrupt (it cannot be inflated)") from None
    if size > limit:
        raise too_big


def validate_edit(data: bytes, *, ai_seg_path: Path, study_uid: str,
                  source_series: Sequence[str]) -> hd.seg.Segmentation:
    """The uploaded corrected SEG, or ``EditRejected`` saying what is wrong (size first:
    at most ``MAX_EDIT_MB`` as sent and once inflated)."""
    if not data:
        raise EditRejected("the uploaded file is empty")
    if len(data) > MAX_EDIT_MB * 1024 * 1024:
        raise EditRejected(f"the file is larger than {MAX_EDIT_MB} MB, the limit for a "
                           "corrected segmentation; nothing recorded")
    check_inflation(data)
    seg = read_seg(data)
    if str(seg.StudyInstanceUID) != study_uid:
        raise EditRejected("this Segmentation belongs to another study (StudyInstanceUID "
                           f"{seg.StudyInstanceUID}, expected {study_uid}); nothing recorded")
    refs = {str(s.SeriesInstanceUID) for s in getattr(seg, "ReferencedSeriesSequence", [])}
    wanted = set(source_series)
    if not refs & wanted:
        raise EditRejected("this Segmentation does not reference the series the AI read "
                           f"({', '.join(sorted(wanted)) or 'unknown'}); nothing recorded")
    ai = read_seg(ai_seg_path)
    if (int(seg.Rows), int(seg.Columns)) != (int(ai.Rows), int(ai.Columns)):
        raise EditRejected(f"frame size {seg.Rows}x{seg.Columns} differs from the AI "
                           f"segmentation's {ai.Rows}x{ai.Columns}")
    ai_sources = {uid for _, _, uid in ai.get_source_image_uids()}
    got_sources = {uid for _, _, uid in seg.get_source_image_uids()}
    outside = got_sources - ai_sources
    if outside:
        raise EditRejected(f"{len(outside)} frame(s) reference images the AI segmentation "
                           "does not cover: the geometry must match the AI result")
    return seg
