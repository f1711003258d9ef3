"""`lastmile demo`: everything `lastmile up` runs, fed like a small hospital would feed it.

After the services are up, the demo deploys the three reference pipelines (as events,
moved to ``validation`` by "demo"), generates synthetic studies with the engine's phantom
generator (BTS brain MR at several time points per patient, LTS abdomen CT, HFD pelvis
radiographs; study dates spread over ``--weeks``) and sends them by C-STORE (dcmtk
``storescu``, ``TCP_NODELAY=1``) to ``LM_BTS``/``LM_LTS``/``LM_HFD``, as scanners would.
When each study has its inference outcome, simulated people act on it, as events with
actors: a QC reviewer for HFD (the last patient's HFD exam is left waiting at the QC
gate), readers with a sensitivity, specificity, disagreement rate
and review time, and three blinded readers who rate the LTS mask under its blinded label.
A few readers also correct the AI's mask (every patient's second BTS exam, every other
patient's LTS exam): the demo derives a corrected SEG from the AI's SEG (an erosion, a
dilation or a trimmed end slice, chosen by seed), writes it into the instance store and
submits it as ``review.edit.submitted``; the engine's edit service (``engine.edits``)
recomputes the volumes and the Dice against the AI mask, which the summary shows. A few
cases are assigned to ``demo.viewer`` (who opens the pages in demo mode) and left unread,
so the Worklist has cases after the demo; the LTS unblinding key is written to
``state_dir/demo_unblinding.json`` and named to the pages by ``LASTMILE_UNBLINDING_KEY``.

Everything is deterministic for ``--seed``: study UIDs come from the phantoms' seeds and
every simulated person's event id from (seed, study, reader), so a second run on the same
state sends the same instances (recorded as duplicates) and publishes nothing new.
Patient identity stays in the DICOM files only; the demo prints UIDs and pseudonyms.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from demo.people import (
    REFERENCE_MASKS,
    PlannedEdit,
    edit_for,
    open_cases,
    people_events,
    rng_for,
    simulate_edit,
    waits_at_qc,
)
from demo.studies import AE, PIPELINES, PlannedStudy, Truth, drift_batch, make_study, plan
from events.base import Event, deterministic_id
from events.catalogue import (
    DeliveryFailed,
    EditSubmitted,
    InferenceCompleted,
    InferenceFailed,
    InferenceSkipped,
    MeasurementRecomputed,
    Stage,
)
from events.jetstream import EventBus
from lastmile.settings import Settings

out = Console()
err = Console(stderr=True)

OUTCOMES = (InferenceCompleted, InferenceFailed, InferenceSkipped)


class DemoError(Exception):
    """The demo could not finish (a send failed, a study never got its outcome)."""


# --------------------------------------------------------------------------- pure core


# --------------------------------------------------------------------------- phantoms


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
    corrected = simulate_edit(masks, edit, rng_for(
        seed, outcome.study_uid, "edit", "mask",
        *(() if edit.source == "lastmile" else (edit.source,))))
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
        sha256=stored.sha256, source=edit.source))
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
    reference_masks: int = 0  # the blinded study's expert and novice masks
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
    rounds.append(drift_batch(options.patients, options.seed, options.weeks))
    total = sum(len(r) for r in rounds)
    from dashboards.review.blinded import load_blinded_study

    blinded = load_blinded_study(prepare_blinded_study(settings))
    prior_volume: dict[int, float | None] = {}
    first_volume: dict[int, float | None] = {}
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
                labels = None
                if isinstance(outcome, InferenceCompleted) and s.pipeline == blinded.pipeline:
                    # the reference masks first: readers rate every source's mask
                    for ref in REFERENCE_MASKS:
                        submitted = await submit_edit(bus, settings, history, outcome, ref,
                                                      options.seed)
                        if submitted is not None:
                            edit_id, is_new = submitted
                            edits[edit_id] = outcome.study_uid or ""
                            result.reference_masks += 1
                            result.people_events_new += is_new
                            result.people_events_existing += not is_new
                    labels = {src: blinded.label(outcome.study_uid or "", src)
                              for src in blinded.sources}
                if isinstance(outcome, InferenceCompleted):
                    evs = [] if waits_at_qc(s.pipeline, s.patient, options.patients) else \
                        people_events(options.seed, s.pipeline, outcome, truth,
                                      prior_volume.get(s.patient) if s.pipeline == "bts"
                                      else None, first_volume.get(s.patient), labels)
                    evs += open_cases(options.seed, s.pipeline, outcome, s.patient,
                                      s.timepoint, evs)
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
                    first_volume.setdefault(s.patient, truth.volume_ml)
                progress.advance(people)
    await wait_recomputed(bus, edits, options.study_timeout_s)
    result.edits = len(edits) - result.reference_masks
    result.seconds = time.monotonic() - t0
    return result


def unblinding_key_path(settings: Settings) -> Path:
    """Where the demo keeps its unblinding key: ``state_dir/demo_unblinding.json``."""
    return settings.state_dir / "demo_unblinding.json"


def prepare_unblinding_key(settings: Settings) -> Path:
    """Create the demo's key file (an empty key, 0600) unless it exists, before the pages
    start: they read the file named by ``LASTMILE_UNBLINDING_KEY`` at every render, and a
    named file that does not exist is a configuration error. Returns its path."""
    path = unblinding_key_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write("{}\n")
    return path


def prepare_blinded_study(settings: Settings) -> Path:
    """The demo's blinded LTS study (``state_dir/demo_blinded_study.toml``, 0600: it holds
    the salt), created once with a random salt; its readers are the simulated abdominal
    radiologists and ``demo.viewer``, its sources the AI, an expert and a novice.
    ``lastmile demo`` names it in ``LASTMILE_BLINDED_STUDY`` for the pages. Returns its
    path."""
    import secrets

    from demo.people import DEMO_VIEWER, LTS_ACCEPT_BY_SOURCE, LTS_READERS

    path = settings.state_dir / "demo_blinded_study.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    readers = [r.name for r in LTS_READERS] + [DEMO_VIEWER]
    with os.fdopen(fd, "w") as f:
        f.write(f'pipeline = "lts"\nsalt = "{secrets.token_hex(24)}"\n'
                f"readers = {json.dumps(readers)}\n"
                f"sources = {json.dumps(list(LTS_ACCEPT_BY_SOURCE))}\n")
    return path


async def write_unblinding_key(bus: EventBus, settings: Settings) -> dict[str, str]:
    """The LTS blinding key (label -> ai / expert / novice) of every LTS result in the
    log, from the demo's blinded study, written to ``state_dir/demo_unblinding.json``
    (0600), the file ``lastmile demo`` names in ``LASTMILE_UNBLINDING_KEY`` for the pages
    it starts."""
    from dashboards.review.blinded import load_blinded_study, unblinding
    from events.subjects import type_filter

    study = load_blinded_study(prepare_blinded_study(settings))
    key = unblinding(study, [ev async for _, ev, _ in bus.read(
        filter_subject=type_filter("engine.inference.completed"))
        if isinstance(ev, InferenceCompleted)])
    path = unblinding_key_path(settings)
    tmp = path.with_suffix(".tmp")  # the pages read it while it is rewritten: replace it whole
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(key, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return key


# --------------------------------------------------------------------------- command


