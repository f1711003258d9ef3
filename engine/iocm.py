"""One current result per study and pipeline: supersede, mark stale, withdraw from a PACS.

When a re-run of a study (after an amendment) completes, every earlier result of the same
study and pipeline is superseded explicitly (``engine.result.superseded``): the read
models, metrics and worklists count only the current one. An earlier result that went
to a PACS is withdrawn there the way the field does it, by an IHE Imaging Object Change
Management (IOCM, IHE RAD TF-1 §37, TF-3 RAD-66) rejection note: a Key Object Selection
Document (PS3.3 A.35.4) whose document title is the rejection reason and whose evidence
is the rejected SEG/SR instances, sent to that PACS *after* the new result
(``engine.result.withdrawn``). IOCM-aware archives hide the rejected instances from
regular queries; any other PACS at least stores the note beside them.

The reason is (113001, DCM, "Rejected for Quality Reasons"), from CID 7011: a
superseded result was computed on an incomplete or changed study, so its content is not
of usable quality; it is not about the wrong patient ("Rejected for Patient Safety
Reasons", 113037, which archives may restrict further), not a wrong worklist entry
(113038) and not a retention expiry (113039).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from engine import pacs
from engine.errors import PublishFailedError
from engine.pipeline_model import PipelineSpec
from events.base import Event, deterministic_id
from events.catalogue import (
    InferenceCompleted,
    PublishFailed,
    ResultMarkedStale,
    ResultPublished,
    ResultSuperseded,
    ResultWithdrawn,
    StudyAmended,
    StudyCompleted,
)
from events.jetstream import EventBus

log = logging.getLogger(__name__)

#: CID 7011 "Rejected for Quality Reasons" (see the module doc for why this one)
REJECTED_FOR_QUALITY = Code("113001", "DCM", "Rejected for Quality Reasons")
KOS_SERIES_NUMBER = 9901
Make = Callable[..., Event]


def rejection_note(rejected: Sequence[Dataset], *, superseded: str, current: str,
                   manufacturer: str = "Lastmile") -> KeyObjectSelectionDocument:
    """An IOCM rejection note (PS3.3 A.35.4 Key Object Selection Document) for
    ``rejected``, all of one study. Its SOP Instance and Series UIDs are derived from the
    two run keys, so the same withdrawal always gives the same note. Raises ``ValueError``
    (from highdicom) when the instances are not of one study."""
    content = KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY,
        referenced_objects=list(rejected),
        description=f"Superseded by a re-run of the study (result {current[:12]})",
    )
    return KeyObjectSelectionDocument(
        evidence=list(rejected),
        content=content,
        series_instance_uid=generate_uid(entropy_srcs=["iocm-series", superseded, current]),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=["iocm-note", superseded, current]),
        instance_number=1,
        manufacturer=manufacturer,
    )


def current_runs(history: Sequence[tuple[int, Event]], pipeline: str) -> list[InferenceCompleted]:
    """Completed results of ``pipeline`` in this study's history not yet superseded,
    oldest first."""
    superseded = {ev.run_key for _, ev in history if isinstance(ev, ResultSuperseded)}
    return [ev for _, ev in history if isinstance(ev, InferenceCompleted)
            and ev.pipeline == pipeline and ev.run_key not in superseded]


def _partial(history: Sequence[tuple[int, Event]], run: InferenceCompleted) -> bool:
    return any(isinstance(ev, StudyCompleted | StudyAmended) and ev.partial
               and ev.event_id == run.causation_id for _, ev in history)


async def supersede_earlier(bus: EventBus, make: Make, *, study_uid: str, current_key: str,
                            spec: PipelineSpec, results_dir: Path, calling_ae: str,
                            reason: str | None = None) -> int:
    """Supersede every earlier current result of this study and pipeline by
    ``current_key`` and withdraw those sent to a PACS. Idempotent (deterministic ids and
    UIDs): a redelivered trigger repeats nothing. Returns how many were superseded."""
    history = await bus.history(study_uid)
    earlier = [r for r in current_runs(history, spec.name) if r.run_key != current_key]
    if not any(isinstance(ev, InferenceCompleted) and ev.run_key == current_key
               for _, ev in history):
        return 0  # the current result is not committed: nothing to supersede yet
    for old in earlier:
        await bus.publish(make(
            ResultSuperseded, deterministic_id("superseded", old.run_key, current_key),
            run_key=old.run_key, superseded_by=current_key, partial=_partial(history, old),
            reason=reason
            or "a re-run of the study after more instances (or changed pixels) arrived"))
        await _withdraw(bus, make, history, old, current_key, spec, results_dir, calling_ae)
    return len(earlier)


async def _withdraw(bus: EventBus, make: Make, history: Sequence[tuple[int, Event]],
                    old: InferenceCompleted, current_key: str, spec: PipelineSpec,
                    results_dir: Path, calling_ae: str) -> None:
    sent: dict[str, set[str]] = {}
    for _, ev in history:
        if (isinstance(ev, ResultPublished) and ev.run_key == old.run_key
                and ev.destination.startswith("pacs:") and ev.sop_instance_uid):
            sent.setdefault(ev.destination, set()).add(ev.sop_instance_uid)
    done = {ev.destination for _, ev in history
            if isinstance(ev, ResultWithdrawn) and ev.run_key == old.run_key}
    for destination, uids in sorted(sent.items()):
        if destination in done:
            continue
        pub = next((p for p in spec.publishers if p.kind == "pacs"
                    and f"pacs:{p.ae_title}" == destination), None)
        if pub is None or not (pub.ae_title and pub.host and pub.port):
            log.warning("result %s was sent to %s, which %s no longer publishes to: "
                        "not withdrawn", old.run_key, destination, spec.name)
            continue
        rejected = [ds for ds in await asyncio.to_thread(_read_results, results_dir,
                                                         old.result_keys)
                    if str(ds.SOPInstanceUID) in uids]
        if not rejected:
            continue
        note = rejection_note(rejected, superseded=old.run_key, current=current_key)
        dest = pacs.PacsAddress(pub.ae_title, pub.host, pub.port, calling_ae)
        try:
            await asyncio.to_thread(pacs.c_store, [note], dest, retries=pub.retries,
                                    retry_delay_s=pub.retry_delay_s)
        except PublishFailedError as exc:
            await bus.publish(make(
                PublishFailed, deterministic_id("withdraw-failed", old.run_key, destination),
                run_key=old.run_key, destination=destination, attempt=pub.retries + 1,
                error=f"IOCM rejection note not taken: {exc}", will_retry=False,
                address=pacs.format_address(dest)))
            continue
        await bus.publish(make(
            ResultWithdrawn, deterministic_id("withdrawn", old.run_key, destination),
            run_key=old.run_key, destination=destination,
            rejection_note_uid=str(note.SOPInstanceUID),
            rejected_sop_instance_uids=tuple(sorted(uids)),
            reason_code=f"({REJECTED_FOR_QUALITY.value}, {REJECTED_FOR_QUALITY.scheme_designator}"
                        f", {REJECTED_FOR_QUALITY.meaning})"))


def _read_results(results_dir: Path, keys: Sequence[str]) -> list[Dataset]:
    out: list[Dataset] = []
    for key in keys:
        try:
            out.append(pydicom.dcmread(results_dir / key))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            log.warning("result file %s is unreadable, not withdrawn: %s", key, exc)
    return out


async def mark_stale(bus: EventBus, make: Make, pipeline: str, amended: StudyAmended) -> int:
    """``on_changed_pixels: stale``: mark the study's current result(s) stale."""
    assert amended.study_uid is not None
    history = await bus.history(amended.study_uid)
    runs = current_runs(history, pipeline)
    for run in runs:
        await bus.publish(make(
            ResultMarkedStale, deterministic_id("stale", run.run_key, amended.event_id),
            run_key=run.run_key, changed_instances=amended.pixels_changed,
            reason=f"{amended.pixels_changed} instance(s) of the study were re-sent with "
                   "other pixel data after this result"))
    return len(runs)

