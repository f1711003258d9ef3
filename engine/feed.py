"""Putting a study into the instance store and the log as ingest would (no network).

For tests, the demo and ``lastmile bench e2e`` when measuring from *study completed*
on: files go to the content-addressed store (``<sha[:2]>/<sha>.dcm``), and the same
``ingest.instance.stored`` / ``ingest.study.completed`` events the DICOM SCP writes are
published, with pseudonyms instead of identity.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset

from events.base import deterministic_id
from events.catalogue import (
    CompletionReason,
    InstanceStored,
    SeriesSummary,
    StudyCompleted,
)
from events.dicom_dates import DicomValueError, normalise_da
from events.jetstream import EventBus
from events.pseudonym import age_band, pseudonym, sex_code


def _study_date(value: object) -> str | None:
    """StudyDate as ``YYYYMMDD`` (older forms normalised), None when empty or unreadable:
    an event never carries a malformed value (what ingest's receiver should do too)."""
    try:
        return normalise_da(value, "StudyDate")
    except DicomValueError:
        return None


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def store_bytes(data: bytes, instances_dir: Path) -> tuple[str, str]:
    """Write ``data`` content-addressed; returns (sha256, store_key)."""
    sha = hashlib.sha256(data).hexdigest()
    key = f"{sha[:2]}/{sha}.dcm"
    path = instances_dir / key
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return sha, key


def stored_events(
    datasets: Sequence[Dataset],
    instances_dir: Path,
    secret: bytes,
    *,
    called_ae: str,
    calling_ae: str = "PHANTOM_SCU",
    raw: Sequence[bytes] | None = None,
) -> list[InstanceStored]:
    """Store each dataset (or the given raw bytes) and build its InstanceStored event."""
    out = []
    for i, ds in enumerate(datasets):
        data = raw[i] if raw is not None else encode(ds)
        sha, key = store_bytes(data, instances_dir)
        pid = str(ds.get("PatientID", ""))
        out.append(InstanceStored.new(
            actor=f"ae:{called_ae}",
            study_uid=str(ds.StudyInstanceUID),
            event_id=deterministic_id("instance.stored", ds.SOPInstanceUID, sha),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            series_uid=str(ds.SeriesInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            sha256=sha,
            size_bytes=len(data),
            store_key=key,
            calling_ae=calling_ae,
            called_ae=called_ae,
            modality=str(ds.get("Modality", "")) or None,
            series_number=int(ds.SeriesNumber) if ds.get("SeriesNumber") else None,
            series_description=str(ds.get("SeriesDescription", "")) or None,
            instance_number=int(ds.InstanceNumber) if ds.get("InstanceNumber") else None,
            patient_pseudonym=pseudonym(secret, pid, issuer=str(ds.get("IssuerOfPatientID", "")))
            if pid else None,
            patient_sex=sex_code(ds.get("PatientSex")),
            age_band=age_band(ds.get("PatientAge")),
            study_date=_study_date(ds.get("StudyDate")),
        ))
    return out


def completed_event(stored: Sequence[InstanceStored], *, pipeline: str,
                    reason: CompletionReason = CompletionReason.ASSOCIATION_RELEASED,
                    actor: str = "feed") -> StudyCompleted:
    study = stored[0].study_uid
    series: dict[str, list[InstanceStored]] = {}
    for ev in stored:
        series.setdefault(ev.series_uid, []).append(ev)
    now = datetime.now(UTC).isoformat()
    return StudyCompleted.new(
        actor=actor, study_uid=study, pipeline=pipeline,
        event_id=deterministic_id("study.completed", study, pipeline, reason.value,
                                  *sorted(e.event_id for e in stored)),
        reason=reason, series_count=len(series), instance_count=len(stored), latency_s=0.0,
        first_instance_at=now, last_instance_at=now,
        series=tuple(SeriesSummary(series_uid=uid, modality=evs[0].modality,
                                   series_description=evs[0].series_description,
                                   instance_count=len(evs)) for uid, evs in series.items()),
        patient_pseudonym=stored[0].patient_pseudonym,
    )


async def feed_study(
    bus: EventBus,
    datasets: Sequence[Dataset],
    instances_dir: Path,
    secret: bytes,
    *,
    pipeline: str,
    called_ae: str,
    raw: Sequence[bytes] | None = None,
    complete: bool = True,
) -> tuple[list[InstanceStored], StudyCompleted | None]:
    """Store a study, publish its InstanceStored events and (by default) StudyCompleted."""
    stored = stored_events(datasets, instances_dir, secret, called_ae=called_ae, raw=raw)
    await bus.publish_many(stored)
    done = completed_event(stored, pipeline=pipeline) if complete else None
    if done is not None:
        await bus.publish(done)
    return stored, done
