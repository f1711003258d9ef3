"""`lastmile demo`: everything `lastmile up` runs, fed like a small hospital would feed it.

After the services are up, the demo deploys the three reference pipelines (as events,
moved to ``validation`` by "demo"), generates synthetic studies with the engine's phantom
generator (BTS brain MR at several time points per patient, LTS abdomen CT, HFD pelvis
radiographs; study dates spread over ``--weeks``) and sends them by C-STORE (dcmtk
``storescu``, ``TCP_NODELAY=1``) to ``LM_BTS``/``LM_LTS``/``LM_HFD``, as scanners would.
When each study has its inference outcome, simulated people act on it, as events with
actors: a QC reviewer for HFD, readers with a sensitivity, specificity, disagreement rate
and review time, and three blinded readers who rate the LTS mask under its blinded label.
A few readers also correct the AI's mask (every patient's second BTS exam, every other
patient's LTS exam): the demo derives a corrected SEG from the AI's SEG (an erosion, a
dilation or a trimmed end slice, chosen by seed), writes it into the instance store and
submits it as ``review.edit.submitted``; the engine's edit service (``engine.edits``)
recomputes the volumes and the Dice against the AI mask, which the summary shows.

Everything is deterministic for ``--seed``: study UIDs come from the phantoms' seeds and
every simulated person's event id from (seed, study, reader), so a second run on the same
state sends the same instances (recorded as duplicates) and publishes nothing new.
Patient identity stays in the DICOM files only; the demo prints UIDs and pseudonyms.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from events.base import Event, deterministic_id
from events.catalogue import (
    CaseAssigned,
    DeliveryFailed,
    EditSubmitted,
    InferenceCompleted,
    InferenceFailed,
    InferenceSkipped,
    MeasurementRecomputed,
    QcPassed,
    QcRejected,
    ReviewSubmitted,
    Stage,
)
from events.jetstream import EventBus
from lastmile.settings import Settings

out = Console()
err = Console(stderr=True)

PIPELINES = ("bts", "lts", "hfd")
AE = {"bts": "LM_BTS", "lts": "LM_LTS", "hfd": "LM_HFD"}
FIRST_DATE = date(2026, 1, 5)  # a Monday; study dates are spread over --weeks from here
PROGRESSION_PCT = 25.0  # the BTS pipeline's threshold_pct: the truth uses the same rule
OUTCOMES = (InferenceCompleted, InferenceFailed, InferenceSkipped)


class DemoError(Exception):
    """The demo could not finish (a send failed, a study never got its outcome)."""


# --------------------------------------------------------------------------- pure core


@dataclass(frozen=True)
class Reader:
    """A simulated reader: how often they call a positive positive (sensitivity) and a
    negative negative (specificity), how often they pick another class regardless
    (disagreement), and their typical seconds on a case (log-normal around it)."""

    name: str
    sensitivity: float = 0.92
    specificity: float = 0.95
    disagreement: float = 0.03
    seconds: float = 60.0


HFD_READERS = (Reader("msk_a", 0.93, 0.96, 0.02, 45.0), Reader("msk_b", 0.90, 0.95, 0.04, 60.0),
               Reader("msk_c", 0.85, 0.92, 0.06, 90.0))
BTS_READERS = (Reader("neurorad_a", 0.92, 0.94, 0.03, 150.0),
               Reader("neurorad_b", 0.88, 0.92, 0.05, 200.0))
LTS_READERS = (Reader("abdrad_a", seconds=240.0), Reader("abdrad_b", seconds=300.0),
               Reader("abdrad_c", seconds=180.0))
QC_REJECT_RATE = 0.1
QC_REASONS = ("wrong body part", "boxes misplaced", "image quality")
LTS_ACCEPT = 0.85  # chance a reader rates the AI liver mask acceptable
EDIT_KINDS = ("erode", "dilate", "trim")


def rng_for(seed: int, *parts: object) -> random.Random:
    """An independent, reproducible random stream per (seed, what it decides)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def seed_for(seed: int, *parts: object) -> int:
    """A phantom seed (31 bits) per (demo seed, pipeline, patient, time point)."""
    digest = hashlib.sha256("/".join(map(str, ("phantom", seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def simulate_read(reader: Reader, truth: str, *, positive: str, negative: str,
                  classes: Sequence[str], rng: random.Random) -> str:
    """One reader's class for one finding, given the truth. Classes other than
    positive/negative (e.g. hardware) are recognised unless the reader disagrees."""
    if truth == positive:
        read = positive if rng.random() < reader.sensitivity else negative
    elif truth == negative:
        read = negative if rng.random() < reader.specificity else positive
    else:
        read = truth
    if rng.random() < reader.disagreement:
        read = rng.choice([c for c in classes if c != read])
    return read


def review_seconds(reader: Reader, rng: random.Random) -> float:
    return round(rng.lognormvariate(0.0, 0.4) * reader.seconds, 1)


@dataclass(frozen=True)
class PlannedEdit:
    """A simulated reader's correction of one AI mask."""

    reader: str
    kind: str  # one of EDIT_KINDS
    label: str | None  # the segment corrected; None: a non-empty one, chosen by seed


def edit_for(seed: int, pipeline: str, study_uid: str, patient: int, timepoint: int
             ) -> PlannedEdit | None:
    """Which AI masks a reader corrects: every patient's second BTS exam (the first
    neuroradiologist) and every other patient's LTS exam (the first abdominal radiologist);
    the kind of correction comes from the seed."""
    if pipeline == "bts" and timepoint == 1:
        reader = BTS_READERS[0].name
    elif pipeline == "lts" and patient % 2 == 0:
        reader = LTS_READERS[0].name
    else:
        return None
    rng = rng_for(seed, study_uid, "edit")
    return PlannedEdit(reader, rng.choice(EDIT_KINDS), None)


def simulate_edit(masks: dict[str, Any], edit: PlannedEdit, rng: random.Random
                  ) -> dict[str, Any]:
    """The corrected masks: one label (``edit.label``, else one of the non-empty ones,
    chosen by ``rng``) eroded or dilated by one pixel in each slice, or its first or last
    one or two slices removed. Masks are ``(slices, rows, columns)`` bool arrays; the
    others are returned unchanged."""
    import numpy as np
    from scipy import ndimage

    label = edit.label or rng.choice(sorted(k for k in masks if np.any(masks[k]))
                                     or sorted(masks))
    mask = np.asarray(masks[label], bool)
    if edit.kind == "erode":
        new = np.stack([ndimage.binary_erosion(s) for s in mask])
    elif edit.kind == "dilate":
        new = np.stack([ndimage.binary_dilation(s) for s in mask])
    elif edit.kind == "trim":
        new = mask.copy()
        rows = np.flatnonzero(mask.any(axis=(1, 2)))
        n = min(len(rows), rng.choice((1, 2)))
        new[rows[:n] if rng.random() < 0.5 else rows[len(rows) - n:]] = False
    else:
        raise ValueError(f"unknown edit kind {edit.kind!r} (one of {EDIT_KINDS})")
    return {**masks, label: new}


@dataclass(frozen=True)
class PlannedStudy:
    """One study to generate and send: which phantom, for whom, when."""

    pipeline: str
    patient: int  # index within the demo
    timepoint: int
    study_date: str  # YYYYMMDD
    phantom_seed: int
    lesion_radius_mm: float | None = None
    lesion_centre_mm: tuple[float, float, float] | None = None


def plan(patients: int, seed: int, weeks: int, timepoints: int = 3) -> list[list[PlannedStudy]]:
    """Rounds of studies. Round k holds every patient's k-th BTS exam (a patient's exams
    must be read in date order for the longitudinal comparison); round 0 also holds the
    LTS and HFD exams. Half of the BTS patients' lesions grow >25% per exam."""
    span_days = max(1, weeks * 7 - 1)
    rounds: list[list[PlannedStudy]] = [[] for _ in range(timepoints)]
    for p in range(patients):
        rng = rng_for(seed, "patient", p)
        base_r = rng.uniform(8.0, 12.0)
        growth = 1.12 if p % 2 == 0 else 1.0  # radius x1.12 = volume x1.40 per exam
        centre = (rng.uniform(-10, 10), rng.uniform(-20, 20), rng.uniform(-15, 15))
        for t in range(timepoints):
            day = round(t * span_days / max(1, timepoints - 1)) if timepoints > 1 else 0
            rounds[t].append(PlannedStudy(
                "bts", p, t, (FIRST_DATE + timedelta(days=day)).strftime("%Y%m%d"),
                seed_for(seed, "bts", p, t), round(base_r * growth ** t, 2), centre))
        for name in ("lts", "hfd"):
            day = rng.randrange(span_days + 1)
            rounds[0].append(PlannedStudy(name, p, 0,
                                          (FIRST_DATE + timedelta(days=day)).strftime("%Y%m%d"),
                                          seed_for(seed, name, p)))
    return rounds


@dataclass
class Truth:
    """What the phantom was made from, per finding label (for the simulated readers)."""

    labels: dict[str, str] = field(default_factory=dict)
    volume_ml: float | None = None


# --------------------------------------------------------------------------- phantoms


def make_study(s: PlannedStudy, seed: int, hfd_images: int) -> tuple[Any, Truth]:
    """The phantom study (all of one demo patient's exams share a fake patient)."""
    from demo import phantoms

    patient = phantoms.fake_patient(seed_for(seed, "patient", s.patient))
    if s.pipeline == "bts":
        st = phantoms.brain_mr_study(s.phantom_seed, patient=patient, study_date=s.study_date,
                                     lesion_radius_mm=s.lesion_radius_mm,
                                     lesion_centre_mm=s.lesion_centre_mm)
        st.datasets += t1_post_series(st.datasets, s.phantom_seed)
        return st, Truth(volume_ml=st.truth_volumes_ml().get("lesion"))
    if s.pipeline == "lts":
        return phantoms.abdomen_ct_study(s.phantom_seed, patient=patient,
                                         study_date=s.study_date), Truth()
    st = phantoms.pelvis_study(s.phantom_seed, patient=patient, study_date=s.study_date,
                               images=hfd_images)
    return st, Truth(labels={f"{h.side}_hip": h.classification for h in st.hips[0]})


def t1_post_series(datasets: list[Any], phantom_seed: int) -> list[Any]:
    """A T1 post-contrast series for a BTS study. The site's routing rules expect one
    (the paper's BTS reads FLAIR + T1 post) before a BTS study counts as complete, and
    the phantom generator makes only the FLAIR (and a localizer). The demo derives it
    from the FLAIR slices (same geometry, contrast inverted, new deterministic UIDs);
    the pipeline selects the FLAIR, so this series only satisfies completion."""
    import numpy as np

    from demo.phantoms import uid_for

    flair = [ds for ds in datasets if "FLAIR" in str(ds.get("SeriesDescription", ""))]
    series_uid = uid_for("demo-t1", phantom_seed)
    out = []
    for ds in flair:
        t1 = copy.deepcopy(ds)
        t1.SeriesInstanceUID = series_uid
        t1.SOPInstanceUID = uid_for("demo-t1", phantom_seed, ds.SOPInstanceUID)
        t1.file_meta.MediaStorageSOPInstanceUID = t1.SOPInstanceUID
        t1.SeriesDescription = "AX T1 POST GAD"
        t1.SeriesNumber = 5
        pixels = ds.pixel_array.astype(np.int32)
        t1.PixelData = np.clip(1200 - pixels, 0, 4095).astype(np.uint16).tobytes()
        out.append(t1)
    return out


# --------------------------------------------------------------------------- DICOM edge


async def wait_listening(host: str, port: int, timeout_s: float = 30.0) -> None:
    """The services start with the demo; the first C-STORE waits for the receiver."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise DemoError(f"the DICOM receiver on {host}:{port} did not start in "
                                f"{timeout_s:.0f}s") from None
            await asyncio.sleep(0.2)


async def storescu(host: str, port: int, called_ae: str, files: list[Path],
                   timeout_s: float = 120.0) -> None:
    """Send like a modality: dcmtk storescu, Nagle off. Output is not echoed (the
    files carry the fake patients' identity)."""
    proc = await asyncio.create_subprocess_exec(
        "storescu", "-aet", "DEMO_SCANNER", "-aec", called_ae, host, str(port),
        *map(str, files), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"})
    try:
        await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DemoError(f"storescu to {called_ae} timed out after {timeout_s:.0f}s") from None
    if proc.returncode != 0:
        raise DemoError(f"storescu to {called_ae} on {host}:{port} failed with exit code "
                        f"{proc.returncode} (is the DICOM receiver up?)")


# --------------------------------------------------------------------------- bus edge


async def deploy_pipelines(bus: EventBus) -> list[str]:
    """Deploy each reference pipeline (unless the same file is deployed) and move it to
    validation (unless it is there): on a second run nothing is published."""
    from engine.registry import (
        PIPELINE_EVENTS,
        deployed_event,
        fold_pipelines,
        stage_changed_event,
    )
    from engine.spec import REFERENCE_DIR, load_pipeline

    notes = []
    state = fold_pipelines([ev async for _, ev, _ in bus.read(filter_subject=PIPELINE_EVENTS)
                            if isinstance(ev, Event)])
    for name in PIPELINES:
        loaded = load_pipeline(REFERENCE_DIR / f"{name}.yaml")
        current = state.get(name)
        if current is None or current.retired or current.file_sha256 != loaded.file_sha256:
            await bus.publish(deployed_event(loaded, actor="demo", reason="lastmile demo"))
            state = fold_pipelines([ev async for _, ev, _ in
                                    bus.read(filter_subject=PIPELINE_EVENTS)
                                    if isinstance(ev, Event)])
            current = state[name]
            notes.append(f"deployed {name}")
        if current.stage != Stage.VALIDATION:
            await bus.publish(stage_changed_event(current, Stage.VALIDATION, actor="demo",
                                                  reason="lastmile demo: synthetic studies"))
            notes.append(f"{name} -> validation")
    return notes


async def wait_outcome(bus: EventBus, study_uid: str, pipeline: str,
                       timeout_s: float) -> tuple[Event, list[Event]]:
    """Poll the study's subject until the pipeline's inference outcome is in the log."""
    deadline = time.monotonic() + timeout_s
    while True:
        history = [ev for _, ev in await bus.history(study_uid)]
        outcome = next((ev for ev in history if isinstance(ev, OUTCOMES)
                        and ev.pipeline == pipeline), None)
        if outcome is not None:
            return outcome, history
        if time.monotonic() > deadline:
            types = sorted({ev.type_name() for ev in history})
            raise DemoError(f"{pipeline} study {study_uid}: no inference outcome after "
                            f"{timeout_s:.0f}s; its events: {types}")
        await asyncio.sleep(0.25)


def _edited_seg_bytes(settings: Settings, history: list[Event], outcome: InferenceCompleted,
                      edit: PlannedEdit, seed: int, uid_key: str) -> bytes | None:
    """The corrected SEG's bytes (None when the AI mask is empty: nothing to correct)."""
    import io

    import pydicom

    from engine import edits

    ai_seg = edits.find_ai_seg(settings.results_dir, outcome.result_keys)
    frames = edits.read_seg_frames(ai_seg, what="AI SEG")
    if not any(fr.pixels.any() for fr in frames.frames):
        return None
    paths = edits.source_paths([(0, ev) for ev in history], settings.instances_dir,
                               frames.source_instances)
    sources = [pydicom.dcmread(p) for p in paths]
    masks = edits.masks_on_sources(frames, sources)
    corrected = simulate_edit(masks, edit, rng_for(seed, outcome.study_uid, "edit", "mask"))
    seg = edits.build_edited_seg(sources, corrected, ai_seg, reader=edit.reader,
                                 uid_key=uid_key)
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


async def submit_edit(bus: EventBus, settings: Settings, history: list[Event],
                      outcome: InferenceCompleted, edit: PlannedEdit, seed: int
                      ) -> tuple[str, bool] | None:
    """Write the corrected SEG into the instance store and submit it, as the review page
    does; returns (edit event id, new?). An edit already in the log is not redone."""
    from events.instance_store import InstanceStore

    study = outcome.study_uid or ""
    event_id = deterministic_id("demo", seed, study, edit.reader, "edit")
    if any(ev.event_id == event_id for ev in history):
        return event_id, False
    data = await asyncio.to_thread(_edited_seg_bytes, settings, history, outcome, edit, seed,
                                   event_id)
    if data is None:
        return None
    stored = await asyncio.to_thread(InstanceStore(settings.instances_dir).put, [data])
    await bus.publish(EditSubmitted.new(
        actor=edit.reader, study_uid=study, pipeline=outcome.pipeline, event_id=event_id,
        run_key=outcome.run_key, reader=edit.reader, store_key=stored.store_key,
        sha256=stored.sha256))
    return event_id, True


async def wait_recomputed(bus: EventBus, edits: dict[str, str], timeout_s: float) -> None:
    """Wait until every submitted edit (edit event id -> study) has its recomputation;
    an edit the engine refused (dead-lettered) stops the demo with the reason."""
    deadline = time.monotonic() + timeout_s
    pending = dict(edits)
    while pending:
        for edit_id, study in list(pending.items()):
            for _, ev in await bus.history(study):
                if isinstance(ev, MeasurementRecomputed) and ev.edit_event_id == edit_id:
                    del pending[edit_id]
                    break
                if isinstance(ev, DeliveryFailed) and ev.original_event_id == edit_id:
                    raise DemoError(f"the engine refused the demo's edit of study {study}: "
                                    f"{ev.reason}")
        if pending and time.monotonic() > deadline:
            raise DemoError(f"{len(pending)} mask edits were not recomputed in "
                            f"{timeout_s:.0f}s (is the engine's edit service running?)")
        if pending:
            await asyncio.sleep(0.25)


def people_events(seed: int, pipeline: str, outcome: InferenceCompleted, truth: Truth,
                  prior_volume_ml: float | None) -> list[Event]:
    """The simulated people's events for one completed run (pure; deterministic ids)."""
    study, run_key = outcome.study_uid or "", outcome.run_key
    evs: list[Event] = []

    def eid(*parts: object) -> str:
        return deterministic_id("demo", seed, study, *parts)

    if pipeline == "hfd":
        rng = rng_for(seed, study, "qc")
        if rng.random() < QC_REJECT_RATE:
            evs.append(QcRejected.new(actor="qc_demo", study_uid=study, pipeline=pipeline,
                                      event_id=eid("qc_demo", "qc"), run_key=run_key,
                                      reason=rng.choice(QC_REASONS),
                                      seconds_on_case=round(rng.uniform(5, 40), 1)))
            return evs
        evs.append(QcPassed.new(actor="qc_demo", study_uid=study, pipeline=pipeline,
                                event_id=eid("qc_demo", "qc"), run_key=run_key,
                                seconds_on_case=round(rng.uniform(3, 25), 1)))
        ai: dict[str, str] = {}
        for f in sorted(outcome.findings, key=lambda f: -(f.probability or 0.0)):
            ai.setdefault(f.label, f.classification)
        for reader in HFD_READERS:
            rng = rng_for(seed, study, reader.name)
            reads = {label: simulate_read(reader, truth.labels.get(label, "normal"),
                                          positive="fracture", negative="normal",
                                          classes=("normal", "fracture", "hardware"), rng=rng)
                     for label in sorted(ai)}
            evs += _assigned_and_review(eid, reader, study, pipeline, run_key, reads, ai, rng)
        return evs
    if pipeline == "bts":
        if outcome.progression is None or prior_volume_ml is None or truth.volume_ml is None:
            return evs  # a first exam: nothing to compare, nothing to read
        grew = 100.0 * (truth.volume_ml - prior_volume_ml) / prior_volume_ml > PROGRESSION_PCT
        true_class = "progression" if grew else "stable"
        ai = {"lesion": "progression" if outcome.progression else "stable"}
        for reader in BTS_READERS:
            rng = rng_for(seed, study, reader.name)
            reads = {"lesion": simulate_read(reader, true_class, positive="progression",
                                             negative="stable",
                                             classes=("progression", "stable"), rng=rng)}
            evs += _assigned_and_review(eid, reader, study, pipeline, run_key, reads, ai, rng)
        return evs
    # lts: three readers rate the AI mask under its blinded label
    label = outcome.blinding_hash or hashlib.sha256(f"demo/{run_key}".encode()).hexdigest()[:12]
    for reader in LTS_READERS:
        rng = rng_for(seed, study, reader.name)
        ok = rng.random() < LTS_ACCEPT
        evs.append(CaseAssigned.new(actor="worklist", study_uid=study, pipeline=pipeline,
                                    event_id=eid(reader.name, "assigned"), run_key=run_key,
                                    reader=reader.name, blinded_label=label))
        evs.append(ReviewSubmitted.new(
            actor=reader.name, study_uid=study, pipeline=pipeline,
            event_id=eid(reader.name, "review"), run_key=run_key, reader=reader.name,
            reads={"mask": "acceptable" if ok else "unacceptable"},
            confidence=rng.randint(3, 5) if ok else rng.randint(1, 3),
            seconds_on_case=review_seconds(reader, rng), blinded_label=label))
    return evs


def _assigned_and_review(eid: Any, reader: Reader, study: str, pipeline: str, run_key: str,
                         reads: dict[str, str], ai: dict[str, str],
                         rng: random.Random) -> list[Event]:
    return [
        CaseAssigned.new(actor="worklist", study_uid=study, pipeline=pipeline,
                         event_id=eid(reader.name, "assigned"), run_key=run_key,
                         reader=reader.name),
        ReviewSubmitted.new(actor=reader.name, study_uid=study, pipeline=pipeline,
                            event_id=eid(reader.name, "review"), run_key=run_key,
                            reader=reader.name, reads=reads,
                            agree={k: v == ai.get(k) for k, v in reads.items()},
                            confidence=rng.randint(2, 5),
                            seconds_on_case=review_seconds(reader, rng)),
    ]


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class DemoOptions:
    patients: int = 4
    seed: int = 7
    weeks: int = 4
    timepoints: int = 3
    hfd_images: int = 3
    dashboard: bool = True
    exit_when_done: bool = False
    study_timeout_s: float = 120.0


@dataclass
class DemoResult:
    sent: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)
    people_events_new: int = 0
    people_events_existing: int = 0
    edits: int = 0  # corrected masks submitted (in this run or an earlier one)
    seconds: float = 0.0


async def run_demo(bus: EventBus, settings: Settings, options: DemoOptions) -> DemoResult:
    """Deploy, generate, send, wait for outcomes, simulate people; returns the counts."""
    t0 = time.monotonic()
    result = DemoResult(sent=dict.fromkeys(PIPELINES, 0),
                        outcomes={p: {} for p in PIPELINES})
    for note in await deploy_pipelines(bus):
        out.print(f"pipelines: {note} (by demo)")
    if shutil.which("storescu") is None:
        raise DemoError("dcmtk's storescu is not installed (apt-get install dcmtk)")
    host = "127.0.0.1" if settings.dicom_host in ("0.0.0.0", "") else settings.dicom_host
    await wait_listening(host, settings.dicom_port)
    rounds = plan(options.patients, options.seed, options.weeks, options.timepoints)
    total = sum(len(r) for r in rounds)
    prior_volume: dict[int, float | None] = {}
    edits: dict[str, str] = {}  # edit event id -> study
    with tempfile.TemporaryDirectory(prefix="lastmile-demo-") as tmp, Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=out) as progress:
        sending = progress.add_task("studies sent (C-STORE)", total=total)
        done = progress.add_task("inference outcomes", total=total)
        people = progress.add_task("simulated QC and reads", total=total)
        for round_ in rounds:
            sent: list[tuple[PlannedStudy, Any, Truth]] = []
            for s in round_:
                study, truth = await asyncio.to_thread(make_study, s, options.seed,
                                                       options.hfd_images)
                folder = Path(tmp) / f"{s.pipeline}-{s.patient}-{s.timepoint}"
                files = await asyncio.to_thread(study.write, folder)
                await storescu(host, settings.dicom_port, AE[s.pipeline], files)
                await asyncio.to_thread(shutil.rmtree, folder, True)
                result.sent[s.pipeline] += 1
                sent.append((s, study, truth))
                progress.advance(sending)
            for s, study, truth in sent:
                outcome, history = await wait_outcome(bus, study.study_uid, s.pipeline,
                                                      options.study_timeout_s)
                kind = outcome.type_name().rsplit(".", 1)[-1]
                result.outcomes[s.pipeline][kind] = result.outcomes[s.pipeline].get(kind, 0) + 1
                progress.advance(done)
                if isinstance(outcome, InferenceCompleted):
                    evs = people_events(options.seed, s.pipeline, outcome, truth,
                                        prior_volume.get(s.patient) if s.pipeline == "bts"
                                        else None)
                    existing = {ev.event_id for ev in history}
                    new = [ev for ev in evs if ev.event_id not in existing]
                    for ev in new:  # in order: an assignment before its review
                        await bus.publish(ev)
                    result.people_events_new += len(new)
                    result.people_events_existing += len(evs) - len(new)
                    planned = edit_for(options.seed, s.pipeline, outcome.study_uid or "",
                                       s.patient, s.timepoint)
                    if planned is not None:
                        submitted = await submit_edit(bus, settings, history, outcome,
                                                      planned, options.seed)
                        if submitted is not None:
                            edit_id, is_new = submitted
                            edits[edit_id] = outcome.study_uid or ""
                            result.people_events_new += is_new
                            result.people_events_existing += not is_new
                if s.pipeline == "bts":
                    prior_volume[s.patient] = truth.volume_ml
                progress.advance(people)
    await wait_recomputed(bus, edits, options.study_timeout_s)
    result.edits = len(edits)
    result.seconds = time.monotonic() - t0
    return result


def _read_in_child(path: str, what: str, unblinding: dict[str, str]) -> Any:
    """Runs in the reader process: one short read-only connection, then closed."""
    from projections.duckdb_store import read_only

    with read_only(path, wait_s=10.0) as con:
        if what == "checkpoint":
            row = con.execute("SELECT max(last_sequence) FROM checkpoint").fetchone()
            return int(row[0] or 0) if row else 0
        return summary_rows(con, unblinding)


class ReadModelReader:
    """Reads the DuckDB read model from a separate process, as `lastmile metrics` and the
    dashboards do. In this process the projector opens the file read-write per batch,
    and DuckDB refuses a second connection with another configuration in the same
    process (either side would fail); across processes the file lock arbitrates and the
    store's ``connect`` waits for it."""

    def __init__(self, settings: Settings) -> None:
        import concurrent.futures
        import multiprocessing

        self.path = str(settings.duckdb_path)
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"))

    async def read(self, what: str, unblinding: dict[str, str] | None = None,
                   timeout_s: float = 30.0) -> Any:
        import importlib

        from projections.errors import ProjectionsError

        # by module name, so it pickles the same when this file runs as __main__
        fn = importlib.import_module("lastmile.demo")._read_in_child
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return await loop.run_in_executor(self.pool, fn, self.path, what,
                                                  unblinding or {})
            except ProjectionsError as exc:
                if time.monotonic() > deadline:
                    raise DemoError(f"cannot read the read model {self.path}: {exc}") from None
                await asyncio.sleep(0.2)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


async def wait_projector(bus: EventBus, reader: ReadModelReader,
                         timeout_s: float = 60.0) -> int:
    """Wait until the read model's checkpoint covers the log's last event."""
    target = await bus.last_sequence()
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        seen = await reader.read("checkpoint", timeout_s=timeout_s)
        if seen >= target:
            return seen
        await asyncio.sleep(0.3)
    raise DemoError(f"the projector reached event #{seen}, not #{target}, in {timeout_s:.0f}s")


def _stat(s: Any, digits: int = 2) -> str:
    """A value with its 95% CI, or "n/a" (the reason goes to the notes)."""
    if s is None or s.value is None:
        return "n/a"
    ci = f" [{s.low:.{digits}f}, {s.high:.{digits}f}]" if s.low is not None else ""
    return f"{s.value:.{digits}f}{ci}"


def summary_rows(con: Any, unblinding: dict[str, str]) -> list[dict[str, str]]:
    """Per pipeline, from the read model through projections.metrics."""
    from projections import metrics

    rows = []
    outcomes = {r.pipeline: r for r in metrics.outcomes(con)}
    dice: dict[str, list[Any]] = {}
    for r in metrics.dice_summary(con):
        dice.setdefault(r.pipeline, []).append(r)
    for p in PIPELINES:
        studies = con.execute("SELECT count(DISTINCT study_uid) FROM study_timeline "
                              "WHERE pipeline = ?", [p]).fetchone()
        reviews = con.execute("SELECT count(*) FROM reviews WHERE pipeline = ?",
                              [p]).fetchone()
        o = outcomes.get(p)
        # metrics.turnaround's arrival_to_published, over all weeks rather than per week
        tat = con.execute(
            "SELECT count(*), quantile_cont(s, 0.5), quantile_cont(s, 0.9) FROM ("
            " SELECT date_diff('millisecond', first_instance_at, published_at) / 1000.0 AS s"
            " FROM study_timeline WHERE pipeline = ? AND first_instance_at IS NOT NULL"
            " AND published_at IS NOT NULL)", [p]).fetchone()
        tat_s = f"{tat[1]:.1f} / {tat[2]:.1f} s" if tat and tat[0] else "n/a"
        if p == "lts":
            blinded = metrics.blinded_reads(con, p, unblinding)
            kappa = "; ".join(f"{b.source} mask accepted {_stat(b.accepted)}"
                              for b in blinded) or "n/a"
        else:
            ag = metrics.agreement(con, p, positive="fracture" if p == "hfd"
                                   else "progression")
            kappa = (f"Fleiss κ {_stat(ag.fleiss)}" if ag.fleiss.value is not None
                     else "n/a (no AI finding classes)" if p == "bts" else "n/a")
        labels = dice.get(p, [])
        rows.append({
            "pipeline": p,
            "studies": str(int(studies[0]) if studies else 0),
            "results": f"{o.completed}/{o.failed}/{o.skipped}" if o else "0/0/0",
            "turnaround": tat_s,
            "reviews": str(int(reviews[0]) if reviews else 0),
            "agreement": kappa,
            "dice": "; ".join(f"{d.label} {_stat(d.mean)} (n={d.mean.n})" for d in labels)
            or ("n/a (no masks)" if p == "hfd" else "n/a (no edits)"),
        })
    return rows


def print_summary(rows: list[dict[str, str]], result: DemoResult, url: str | None) -> None:
    table = Table(title="lastmile demo: summary (from the read model)")
    for col in ("pipeline", "studies", "completed/failed/skipped",
                "arrival→published p50/p90", "reviews", "agreement (95% CI)",
                "Dice of edited masks (95% CI)"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["pipeline"], r["studies"], r["results"], r["turnaround"], r["reviews"],
                      r["agreement"], r["dice"])
    out.print(table)
    sent = sum(result.sent.values())
    out.print(f"sent {sent} studies in {result.seconds:.0f}s; simulated people: "
              f"{result.people_events_new} new events, {result.people_events_existing} "
              f"already in the log; {result.edits} masks edited and recomputed")
    if url:
        out.print(f"dashboard: [bold]{url}[/]")


def demo_main(settings: Settings, options: DemoOptions) -> int:
    """Start NATS and the services like `lastmile up`, run the demo, stay up (or not)."""
    from lastmile import dashboards_wiring
    from lastmile.runtime import Supervisor, embedded_server
    from lastmile.services import services_for

    # the dashboard process inherits this: without a users file, pages open as the demo
    # viewer (reader, QC and governance) instead of asking for a sign-in
    os.environ.setdefault("LASTMILE_DEMO", "1")
    services = services_for(settings)
    if not options.dashboard:
        services = [s for s in services if not isinstance(s, dashboards_wiring.DashboardService)]
    url = f"http://127.0.0.1:{settings.dashboard_port}" if options.dashboard else None
    status = {"code": 0}

    async def demo(bus: EventBus, stop: asyncio.Event) -> None:
        try:
            result = await run_demo(bus, settings, options)
            reader = ReadModelReader(settings)
            try:
                seq = await wait_projector(bus, reader)
                key = await write_unblinding_key(bus, settings)
                rows = await reader.read("summary", key)
            finally:
                await asyncio.to_thread(reader.close)
            print_summary(rows, result, url)
            out.print(f"read model at event #{seq}")
        except DemoError as exc:
            err.print(f"[red]demo:[/] {exc}")
            status["code"] = 1
            stop.set()
            return
        except Exception as exc:  # noqa: BLE001 - the demo must stop, not hang, on any error
            err.print(f"[red]demo failed:[/] {type(exc).__name__}: {exc}")
            status["code"] = 1
            stop.set()
            return
        if options.exit_when_done:
            stop.set()
        else:
            out.print("Lastmile stays up; Ctrl-C stops everything.")

    async def run() -> None:
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []

        async def ready(bus: EventBus) -> None:
            seq = await bus.last_sequence()
            out.print(f"[green]Lastmile is up[/] (stream {bus.settings.stream} at event "
                      f"#{seq}); running the demo")
            tasks.append(asyncio.create_task(demo(bus, stop), name="demo"))

        await Supervisor(settings, services, on_ready=ready).run(stop)
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    if settings.embedded_nats:
        with embedded_server(settings) as server:
            out.print(f"embedded nats-server on {server.url} (data {settings.state_dir / 'nats'})")
            asyncio.run(run())
    else:
        asyncio.run(run())
    out.print("stopped cleanly")
    return status["code"]


async def write_unblinding_key(bus: EventBus, settings: Settings) -> dict[str, str]:
    """The LTS blinding key from the log's LTS results (each label is the AI mask),
    written to ``state_dir/demo_unblinding.json`` (0600) for LASTMILE_UNBLINDING_KEY."""
    from events.subjects import type_filter

    key: dict[str, str] = {}
    async for _, ev, _ in bus.read(filter_subject=type_filter("engine.inference.completed")):
        if isinstance(ev, InferenceCompleted) and ev.pipeline == "lts":
            key[ev.blinding_hash or hashlib.sha256(f"demo/{ev.run_key}".encode())
                .hexdigest()[:12]] = "ai"
    path = settings.state_dir / "demo_unblinding.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(key, f, indent=1, sort_keys=True)
    return key


# --------------------------------------------------------------------------- command


def demo_command(
    ctx: typer.Context,
    patients: Annotated[int, typer.Option(min=1, help="Synthetic patients (each: BTS MR "
                                          "at 3 time points, an LTS CT, an HFD exam).")] = 4,
    seed: Annotated[int, typer.Option(help="Same seed, same studies and events.")] = 7,
    weeks: Annotated[int, typer.Option(min=1, help="Study dates spread over this many "
                                       "weeks.")] = 4,
    no_dashboard: Annotated[bool, typer.Option("--no-dashboard",
                                               help="Do not start the dashboard.")] = False,
    exit_when_done: Annotated[bool, typer.Option("--exit-when-done",
                                                 help="Stop after the summary.")] = False,
) -> None:
    """Start everything (`lastmile up`), send synthetic studies to the three pipelines,
    simulate QC and readers, print a summary; stays up until Ctrl-C."""
    settings = ctx.find_root().obj
    if not isinstance(settings, Settings):
        raise typer.BadParameter("settings not loaded")
    code = demo_main(settings, DemoOptions(patients=patients, seed=seed, weeks=weeks,
                                           dashboard=not no_dashboard,
                                           exit_when_done=exit_when_done))
    if code:
        raise typer.Exit(code)
