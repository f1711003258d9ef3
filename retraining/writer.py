"""Write a retraining set: de-identified DICOM, NIfTI for nnU-Net v2 and MONAI, the event
tables, and a manifest — every file under one keyed mapping (``events.deidentify``).

Layout of ``OUT``::

    dicom/<patient>/<study>/<series>/<sop>.dcm   source series, AI SEG/SR, corrected SEGs
    nnUNet_raw/Dataset<ID>_Lastmile<PIPE>/        imagesTr/<case>_0000.nii.gz,
                                                  labelsTr/<case>.nii.gz, dataset.json
    masks/<case>/ai.nii.gz, masks/<case>/<reader>.nii.gz   every mask, same label values
    datalist.json                                 MONAI datalist ("training")
    tables/events.parquet, tables/labels/*.parquet, tables/cases.parquet
    manifest.json                                 filter, counts, what was removed and how

The nnU-Net label of a case is the last reader's corrected mask where one exists, else
the AI mask (``cases.parquet`` and the datalist say which). Segmentation pipelines only
get NIfTI (a case without a readable SEG is listed in the manifest with the reason);
every case gets its DICOM and table rows.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from pydicom.dataset import Dataset

from engine.edits import (
    find_ai_seg,
    in_root,
    masks_on_sources,
    read_edit,
    read_seg_frames,
)
from engine.errors import EngineError
from engine.ops.volume import Volume, series_to_volume
from events.base import Event
from events.deidentify import Deidentifier, LogContext, Pseudonymiser
from events.errors import EditRejected
from events.export import TIMESTAMP, ParquetExporter
from projections.export import export_labels
from retraining.dicom_deid import DicomActions, deidentify_dataset
from retraining.nifti import nnunet_dataset_json, write_image, write_label_map
from retraining.selection import Case, RetrainingFilter, select_cases

log = logging.getLogger(__name__)

DATASET_IDS = {"bts": 501, "lts": 502, "hfd": 503}

CASES_SCHEMA = pa.schema([
    ("case", pa.string()),
    ("patient", pa.string()),
    ("study_uid", pa.string()),
    ("run_key", pa.string()),
    ("study_date", pa.string()),
    ("completed_at", TIMESTAMP),
    ("stage", pa.string()),
    ("label_source", pa.string()),
    ("image", pa.string()),
    ("label", pa.string()),
    ("readers", pa.list_(pa.string())),
    ("disagreement", pa.bool_()),
])


class RetrainingError(Exception):
    """The set cannot be written (and why)."""


@dataclass
class RetrainingSet:
    """What ``write_retraining_set`` wrote."""

    root: Path
    cases: int
    dicom_files: int
    nifti_cases: int
    events: int
    skipped: dict[str, str] = field(default_factory=dict)  # case -> why no NIfTI
    nnunet_dir: Path | None = None
    datalist: Path | None = None


def _read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def _save(ds: Dataset, root: Path, patient: str) -> Path:
    path = (root / "dicom" / patient / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
            / f"{ds.SOPInstanceUID}.dcm")
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    return path


def write_retraining_set(events: Sequence[tuple[int, Event]], *, instances_dir: Path,
                         results_dir: Path, out: Path, key: bytes, flt: RetrainingFilter,
                         dataset_id: int | None = None) -> RetrainingSet:
    """Select the cases of ``flt`` from ``events`` and write the set under ``out``.

    ``key`` is the export key (``events.deidentify.export_key``): the same key gives the
    same pseudonyms, UIDs and dates, so two exports of the same studies agree.
    Raises ``RetrainingError`` when ``out`` is not empty or no case passes the filter.
    """
    if out.exists() and any(out.iterdir()):
        raise RetrainingError(f"{out} is not empty: a retraining set is written to a new "
                              "folder")
    cases = select_cases(events, flt)
    if not cases:
        raise RetrainingError(f"no {flt.pipeline} result passes the filter")
    studies = {c.study_uid for c in cases}
    chosen = [(s, e) for s, e in events
              if (e.study_uid in studies) or (e.study_uid is None and e.pipeline == flt.pipeline)]
    deid = Deidentifier(Pseudonymiser(key), LogContext.of(chosen))
    seed = key.hex()
    actions = DicomActions()
    out.mkdir(parents=True, exist_ok=True)

    did = dataset_id or DATASET_IDS.get(flt.pipeline, 500)
    nn = out / "nnUNet_raw" / f"Dataset{did:03d}_Lastmile{flt.pipeline.upper()}"
    rows: list[dict[str, Any]] = []
    training: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    dicom_files = 0
    label_names: list[str] = []
    channel = ""
    p = deid.pseudo
    for case in sorted(cases, key=lambda c: p.ident(c.run_key, "case")):
        case_id = f"{flt.pipeline}_{p.ident(case.run_key, 'case')[:8]}"
        patient = deid.patient_for_study(case.study_uid) or p.patient(case.study_uid)
        sources = [_read(instances_dir / s.store_key) for s in case.sources.values()]
        ai_seg = _ai_seg(results_dir, case)
        edits = [(e, read_edit(instances_dir, e.store_key, e.sha256)) for e in case.edits]
        originals = list(sources)
        results = [_read(in_root(results_dir, k, "result")) for k in case.completed.result_keys]
        # NIfTI first: it reads the original geometry and references
        nifti = _nifti(case, case_id, sources, ai_seg, edits, nn, out, deid)
        if isinstance(nifti, str):
            skipped[case_id] = nifti
        else:
            names, modality, entry = nifti
            label_names = label_names or names
            channel = channel or modality
            training.append(entry)
        for ds in [*originals, *results, *(seg for _, seg in edits)]:
            deidentify_dataset(ds, deid, case.study_uid, seed=seed, actions=actions)
            _save(ds, out, patient)
            dicom_files += 1
        rows.append({
            "case": case_id, "patient": patient, "study_uid": p.uid(case.study_uid),
            "run_key": p.ident(case.run_key),
            "study_date": p.shift_date(case.completed.study_date,
                                       deid.shift_for_study(case.study_uid))
            if case.completed.study_date else None,
            "completed_at": deid.timestamp(case.completed.occurred_at, case.study_uid),
            "stage": str(case.stage) if case.stage else None,
            "label_source": None if isinstance(nifti, str) else nifti[2]["label_source"],
            "image": None if isinstance(nifti, str) else nifti[2]["image"],
            "label": None if isinstance(nifti, str) else nifti[2]["label"],
            "readers": sorted({p.person(r.reader) for r in case.reviews}
                              | {p.person(e.reader) for e in case.edits}),
            "disagreement": case.disagreement,
        })

    tables = out / "tables"
    exporter = ParquetExporter(tables, deid=deid)
    exporter.add_all(chosen)
    exporter.close()
    export_labels(chosen, tables, deid)
    pq.write_table(pa.Table.from_pylist(rows, schema=CASES_SCHEMA), tables / "cases.parquet",
                   compression="zstd")
    datalist = None
    if training:
        (nn / "dataset.json").write_text(json.dumps(nnunet_dataset_json(
            channel=channel, labels=label_names, cases=len(training)), indent=1))
        datalist = out / "datalist.json"
        datalist.write_text(json.dumps({"labels": {"0": "background", **{
            str(i): n for i, n in enumerate(label_names, start=1)}}, "training": training},
            indent=1))
    manifest = {
        "pipeline": flt.pipeline,
        "filter": {"stages": sorted(str(s) for s in flt.stages), "since": flt.since,
                   "until": flt.until, "reviewed_only": flt.reviewed_only,
                   "disagreements_only": flt.disagreements_only},
        "counts": {"cases": len(rows), "dicom_files": dicom_files, "events": exporter.count,
                   "nifti_cases": len(training)},
        "skipped_nifti": skipped,
        "profile": {
            "standard": "DICOM PS3.15 Annex E: Basic Application Level Confidentiality "
                        "Profile, Clean Descriptors Option, Retain Longitudinal Temporal "
                        "Information with Modified Dates Option",
            "library": f"dicognito {version('dicognito')}",
            "dicom": {"removed": dict(sorted(actions.removed.items())),
                      "emptied_or_dummy": dict(sorted(actions.emptied.items())),
                      "cleaned": dict(sorted(actions.cleaned.items())),
                      "uids_remapped": actions.remapped_uids,
                      "replaced_by_dicognito": "person names, IDs, accession numbers, "
                                               "addresses"},
            "events": deid.manifest(),
            "kept": "registry UIDs (SOP Class, Transfer Syntax...), modality, manufacturer "
                    "and model, pixel spacing, model and pipeline file hashes, findings, "
                    "measurements, Dice, timings",
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return RetrainingSet(root=out, cases=len(rows), dicom_files=dicom_files,
                         nifti_cases=len(training), events=exporter.count, skipped=skipped,
                         nnunet_dir=nn if training else None, datalist=datalist)


def _ai_seg(results_dir: Path, case: Case) -> Dataset | None:
    try:
        return find_ai_seg(results_dir, case.completed.result_keys)
    except EditRejected:
        return None


def _nifti(case: Case, case_id: str, sources: list[Dataset], ai_seg: Dataset | None,
           edits: list[tuple[Any, Dataset]], nn: Path, out: Path,
           deid: Deidentifier) -> tuple[list[str], str, dict[str, Any]] | str:
    """Write the case's image and label maps; a reason string when it has none."""
    if ai_seg is None:
        return "no segmentation among the AI results"
    try:
        volume: Volume = series_to_volume(sources)
        ai_frames = read_seg_frames(ai_seg)
        labels = list(ai_frames.labels)
        ai_masks = masks_on_sources(ai_frames, volume.sources)
        reader_masks = [(deid.pseudo.person(e.reader), masks_on_sources(read_seg_frames(seg),
                                                                        volume.sources))
                        for e, seg in edits]
    except (EngineError, EditRejected) as exc:
        return f"{type(exc).__name__}: {deid.clean_text(str(exc))}"
    image = nn / "imagesTr" / f"{case_id}_0000.nii.gz"
    label = nn / "labelsTr" / f"{case_id}.nii.gz"
    write_image(volume, image)
    write_label_map(volume, ai_masks, labels, out / "masks" / case_id / "ai.nii.gz")
    readers = {}
    for reader, masks in reader_masks:
        path = out / "masks" / case_id / f"{reader}.nii.gz"
        write_label_map(volume, masks, labels, path)
        readers[reader] = str(path.relative_to(out))
    source, masks = (reader_masks[-1][0], reader_masks[-1][1]) if reader_masks else (
        "ai", ai_masks)
    write_label_map(volume, masks, labels, label)
    modality = str(sources[0].get("Modality", "")) or "image"
    return labels, modality, {
        "case": case_id, "image": str(image.relative_to(out)),
        "label": str(label.relative_to(out)), "label_source": source,
        "ai_label": f"masks/{case_id}/ai.nii.gz", "reader_labels": readers,
    }
