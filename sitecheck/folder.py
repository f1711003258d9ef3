"""Which files of a folder are DICOM instances, grouped by study (headers only).

A file counts when pydicom reads its header and it has the three UIDs a receiver files
it by (SOP Class, SOP Instance and Study Instance UID, PS3.3 C.12.1 and C.7.2.1); the
rest (viewer snapshots, XML catalogues, DICOMDIR) is listed as skipped with the reason,
never sent. Files written without a File Meta Information header (PS3.10 7.1) are read
as what pydicom finds them to be (implicit or explicit VR little endian).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

#: Media Storage Directory (DICOMDIR, PS3.10 8.6): an index of files, not an instance
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class DicomFile:
    """One instance to send: where it is and what the receiver will file it under."""

    path: Path
    study_uid: str
    series_uid: str
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax: UID
    series_number: int | None = None
    instance_number: int | None = None


@dataclass(frozen=True)
class Skipped:
    """A file that is not sent, and why (our words; no value from the file)."""

    path: Path
    reason: str


@dataclass
class Folder:
    """The DICOM files of a folder by Study Instance UID, in a stable order."""

    studies: dict[str, list[DicomFile]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def file_count(self) -> int:
        return sum(len(files) for files in self.studies.values())


def _encoding_uid(implicit_vr: bool | None, little_endian: bool | None) -> UID:
    if little_endian is False:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def read_header(path: Path) -> DicomFile | Skipped:
    """The file's identity, or why it is skipped. Reads the header only."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        return Skipped(path, f"not readable as DICOM ({type(exc).__name__})")
    missing = [kw for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")
               if not str(ds.get(kw, "") or "").strip()]
    if missing:
        return Skipped(path, "not a DICOM instance: no " + ", ".join(missing))
    if str(ds.SOPClassUID) == MEDIA_STORAGE_DIRECTORY:
        return Skipped(path, "a DICOMDIR (an index of files), not an instance")
    meta_ts = ds.file_meta.get("TransferSyntaxUID") if ds.file_meta else None
    ts = UID(str(meta_ts)) if meta_ts else _encoding_uid(*ds.original_encoding)
    return DicomFile(
        path=path,
        study_uid=str(ds.StudyInstanceUID).strip(),
        series_uid=str(ds.get("SeriesInstanceUID", "") or "").strip(),
        sop_class_uid=UID(str(ds.SOPClassUID).strip()),
        sop_instance_uid=str(ds.SOPInstanceUID).strip(),
        transfer_syntax=ts,
        series_number=_int(ds.get("SeriesNumber")),
        instance_number=_int(ds.get("InstanceNumber")),
    )


def _walk(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def scan(root: Path) -> Folder:
    """Every file under ``root`` (or ``root`` itself), read and grouped by study.

    Within a study, files are ordered by series number, instance number and path, as a
    modality sends a series.
    """
    folder = Folder()
    for path in _walk(root):
        found = read_header(path)
        if isinstance(found, Skipped):
            folder.skipped.append(found)
        else:
            folder.studies.setdefault(found.study_uid, []).append(found)
    for files in folder.studies.values():
        files.sort(key=lambda f: (f.series_number if f.series_number is not None else 1 << 30,
                                  f.series_uid,
                                  f.instance_number if f.instance_number is not None
                                  else 1 << 30, str(f.path)))
    return folder
