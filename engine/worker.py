"""The engine worker: a durable JetStream consumer that runs pipelines on completed studies.

Any number of worker processes share one durable consumer (``engine-workers``), so
scaling out is starting more of them, on more hosts. For each ``study completed`` (and
``study amended`` with ``rerun``, and ``study rerun requested``) the worker:

1. finds the pipeline (``event.pipeline``) in the deployed state folded from the log
   (stage, file hash): the file of that hash from its pipeline folders, else the file's
   text the deployment event carries (so a pipeline deployed while the worker runs is
   runnable at once, without a restart); no runnable pipeline (not deployed, retired,
   file unavailable) is recorded as ``study not run`` with the reason. Staging runs only
   studies sent to the pipeline's own AE title, forced or re-run by hand;
2. derives the run key (study, pipeline, model hash, file hash [, amendment or re-run])
   and looks in the
   study's history: a run key that already completed, was skipped or failed finally is
   never run again, so a redelivery cannot publish a second result;
3. reads the study's files from the instance store (``InstanceStored.store_key``, the
   latest version per SOP Instance UID), runs the operators in a thread while telling
   JetStream the work is alive, and records each operator's duration;
4. stores the SEG/SR files, publishes them (store, PACS by stage), and records
   ``inference completed`` last, as the commit of the run.

The error taxonomy (``engine.errors``): whatever a pure step raises on the study's
bytes ends in ``inference failed`` with ``final=true`` at the first attempt (the model
never runs twice on the same bad input); only edges (the event log, the disk, the
inference runtime, PACS) are retried up to the limit, then dead-lettered by the bus.
Every reason recorded is built by ``engine.errors.safe_reason``: no DICOM value.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from engine import iocm, pacs, pacs_priors
from engine.dicom_results import Provenance
from engine.errors import (
    EngineError,
    InputError,
    OperatorError,
    PriorFetchError,
    PublishFailedError,
    RuntimeUnavailable,
    is_retryable,
    quiet_value_warnings,
    safe_reason,
)
from engine.ops.longitudinal import EarlierResult, earlier_than
from engine.pacs_redelivery import outcome_events
from engine.pipeline_model import PipelineSpec
from engine.registry import PIPELINE_EVENTS, DeployedPipeline, fold_pipelines
from engine.runtimes import (
    HostCapabilities,
    Runtime,
    RuntimeChoice,
    load_runtime,
    model_format,
    probe_host,
    select_runtime,
)
from engine.spec import LoadedPipeline
from engine.steps import LongitudinalParams, RunContext, StepTiming, run_steps
from events.base import Event, deterministic_id
from events.catalogue import (
    CompletionReason,
    Finding,
    InferenceCompleted,
    InferenceFailed,
    InferenceRequested,
    InferenceSkipped,
    InferenceStarted,
    InstanceStored,
    Measurement,
    NotRunReason,
    OperatorFinished,
    PriorOutcome,
    PriorRetrieved,
    PriorsSearched,
    PublishFailed,
    ResultPublished,
    RetrieveOutcome,
    SeriesChoice,
    SeriesSelected,
    Stage,
    StudyAmended,
    StudyCompleted,
    StudyNotRun,
    StudyRerunRequested,
)
from events.dicom_dates import DicomValueError, normalise_da
from events.jetstream import Delivery, EventBus
from events.subjects import type_filter

log = logging.getLogger(__name__)
T = TypeVar("T")

DURABLE = "engine-workers"
#: modalities that are not images of the exam (results, states, selections)
_NOT_IMAGES = frozenset({"SR", "SEG", "PR", "KO", "REG", "RTSTRUCT"})
Make = Callable[..., Event]  # builds a follow-up event of the trigger (see _run_pipeline)
TRIGGERS = (type_filter("ingest.study.completed"), type_filter("ingest.study.amended"),
            type_filter("engine.study.rerun_requested"))


def run_key(study_uid: str, pipeline: str, model_sha256: str, revision: str = "",
            file_sha256: str = "") -> str:
    """One result per (study, pipeline, model hash, pipeline file hash [, amendment or
    re-run]), ever: a changed pipeline file is a new run."""
    parts = "\x1f".join((study_uid, pipeline, model_sha256, revision, file_sha256))
    return hashlib.sha256(parts.encode()).hexdigest()[:32]


def blinding_hash(secret: bytes, key: str) -> str:
    """A salted hash shown instead of the mask's origin during blinded reading (LTS)."""
    return hmac.new(secret, f"blind\x1f{key}".encode(), hashlib.sha256).hexdigest()[:12]


@dataclass
class WorkerConfig:
    instances_dir: Path
    results_dir: Path
    secret: bytes
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    durable: str = DURABLE
    max_attempts: int = 3
    ack_wait_s: float = 60.0
    heartbeat_s: float = 10.0
    calling_ae: str = "LASTMILE"
    host: HostCapabilities | None = None  # None: probe this host
    #: the PACS asked for earlier studies by longitudinal pipelines; None: never asked
    priors: pacs_priors.PriorSource | None = None


@dataclass(frozen=True)
class StudyFiles:
    paths: list[Path]
    patient_pseudonym: str | None
    study_date: str | None
    called_aes: frozenset[str]


def study_date_of(value: object) -> str | None:
    """A StudyDate as ``YYYYMMDD`` (older forms normalised, ``events.dicom_dates``), or
    None when empty or unreadable: an unreadable date is never recorded or compared."""
    try:
        return normalise_da(value, "StudyDate")
    except DicomValueError:
        return None


def study_files(history: Sequence[tuple[int, Event]], instances_dir: Path) -> StudyFiles:
    """Paths of the study's instances: the latest version per SOP Instance UID."""
    latest: dict[str, InstanceStored] = {}
    pseudonym = study_date = None
    aes = set()
    for _, ev in history:
        if isinstance(ev, InstanceStored):
            cur = latest.get(ev.sop_instance_uid)
            if cur is None or ev.version >= cur.version:
                latest[ev.sop_instance_uid] = ev
            pseudonym = ev.patient_pseudonym or pseudonym
            study_date = study_date_of(ev.study_date) or study_date
            aes.add(ev.called_ae)
    paths = [instances_dir / ev.store_key for ev in latest.values()]
    return StudyFiles(sorted(paths), pseudonym, study_date, frozenset(aes))


def read_datasets(paths: Sequence[Path]) -> list[Dataset]:
    """Read every file; a missing or non-DICOM file is an input error naming it.

    Values over 64 KB (pixel data) are read from disk only when used, so series that
    selection rejects cost only their headers.
    """
    out: list[Dataset] = []
    for path in paths:
        try:
            out.append(pydicom.dcmread(path, defer_size="64 KB"))
        except FileNotFoundError:
            raise InputError(f"instance file {path} is missing from the store") from None
        except (InvalidDicomError, ValueError) as exc:
            raise InputError(f"{path.name} is not readable DICOM ({type(exc).__name__} "
                             "while parsing)") from None
    return out


@dataclass
class RunOutcome:
    """What happened to one trigger (for tests and the bench)."""

    run_key: str
    status: str  # completed | skipped | failed | duplicate | retry
    detail: str = ""
    study_uid: str | None = None
    pipeline: str | None = None
    # seconds spent outside the operators (read files, store, publish, bus); the
    # operators' own durations are OperatorFinished events
    stages: dict[str, float] = field(default_factory=dict)
    inference_s: float = 0.0


class EngineWorker:
    """One worker process' engine: pipelines, loaded models and the handler."""

    name = "engine-worker"

    def __init__(self, pipelines: dict[str, LoadedPipeline], config: WorkerConfig) -> None:
        self.pipelines = pipelines
        self.config = config
        quiet_value_warnings()  # pydicom's value warnings quote values (engine.errors)
        self.host = config.host or probe_host()
        self._runtimes: dict[tuple[str, str], Runtime] = {}
        self.loads = 0  # model loads in this process (tests check "once per process")
        # recent outcomes, for tests and the bench (bounded: a worker runs for months)
        self.outcomes: deque[RunOutcome] = deque(maxlen=1000)
        self._bus: EventBus
        # pipelines read from deployment events, by file SHA-256
        self._from_log: dict[str, LoadedPipeline] = {}

    # ------------------------------------------------------------------ service

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        self.bind(bus)
        await bus.consume(self.config.durable, self.handle, filter_subjects=TRIGGERS,
                          max_attempts=self.config.max_attempts,
                          ack_wait_s=self.config.ack_wait_s, stop=stop)

    # ------------------------------------------------------------------ handler

    async def handle(self, event: Event, delivery: Delivery) -> None:
        """The consumer's handler (``EventBus.consume``); see the module doc."""
        try:
            outcome = await self._handle(self._bus, event, delivery)
        except EngineError as exc:
            self.outcomes.append(RunOutcome("", "retry", safe_reason(exc)))
            raise
        if outcome is not None:
            self.outcomes.append(outcome)

    def bind(self, bus: EventBus) -> EngineWorker:
        self._bus = bus
        return self

    async def _deployed(self, bus: EventBus) -> dict[str, DeployedPipeline]:
        events = [ev async for _, ev, _ in bus.read(filter_subject=PIPELINE_EVENTS)
                  if isinstance(ev, Event)]
        return fold_pipelines(events)

    async def _handle(self, bus: EventBus, event: Event, delivery: Delivery
                      ) -> RunOutcome | None:
        if not isinstance(event, StudyCompleted | StudyAmended | StudyRerunRequested
                          ) or not event.study_uid:
            return None
        if isinstance(event, StudyAmended) and not event.rerun:
            if event.stale and event.pipeline:  # changed pixels, pipeline says "stale"
                await iocm.mark_stale(bus, self._follow_up(event), event.pipeline, event)
            return None
        study = event.study_uid
        history = await bus.history(study)
        names = [event.pipeline] if event.pipeline else sorted(
            {ev.pipeline for _, ev in history if isinstance(ev, StudyCompleted) and ev.pipeline})
        last: RunOutcome | None = None
        deployed = await self._deployed(bus)
        for name in names:
            # off the event loop: parsing a file with MONAI operators imports torch and
            # MONAI and dry-runs each transform (seconds), which would stall every NATS
            # request of the services sharing this process into timeouts
            loaded = await asyncio.to_thread(self.resolve, name, deployed.get(name))
            if isinstance(loaded, StudyNotRun):
                last = await self._not_run(bus, event, name, loaded)
                continue
            last = await self._run_pipeline(bus, event, delivery, history, loaded,
                                            deployed[name])
        return last

    def resolve(self, name: str, deployed: DeployedPipeline | None
                ) -> LoadedPipeline | StudyNotRun:
        """The runnable file of ``name`` as deployed now, or why there is none (a
        ``StudyNotRun`` without its envelope, for ``_not_run`` to record).

        The worker's own file when its SHA-256 is the deployed one, else the deployed
        text from the log (parsed once per hash, model hash verified); pure apart from
        that cache and reading the model file."""
        def none(code: NotRunReason, reason: str) -> StudyNotRun:
            return StudyNotRun.new(actor="worker", reason_code=code, reason=reason,
                                   trigger="")
        if deployed is None:
            return none(NotRunReason.NOT_DEPLOYED, f"pipeline {name} is not deployed "
                        "(lastmile pipelines deploy FILE)")
        if deployed.retired:
            return none(NotRunReason.RETIRED, f"pipeline {name} is retired")
        own = self.pipelines.get(name)
        if own is not None and own.file_sha256 == deployed.file_sha256:
            return own
        cached = self._from_log.get(deployed.file_sha256)
        if cached is not None:
            return cached
        if deployed.file_text is not None and deployed.file_path:
            from engine.spec import parse_pipeline

            try:
                cached = parse_pipeline(deployed.file_text, Path(deployed.file_path))
            except EngineError as exc:  # not cached: the model may be put in place later
                return none(NotRunReason.FILE_UNAVAILABLE,
                            f"the deployed file of {name} cannot be used on this worker "
                            f"({safe_reason(exc).splitlines()[-1].strip()[:300]})")
            self._from_log[deployed.file_sha256] = cached
            return cached
        mine = (f", this worker's {own.path.name} has {own.file_sha256[:12]}: deploy it "
                "again" if own is not None else " and the log does not carry its text")
        return none(NotRunReason.FILE_UNAVAILABLE,
                    f"deployed file of {name} has SHA-256 {deployed.file_sha256[:12]}{mine}")

    async def _not_run(self, bus: EventBus, trigger: Event, name: str,
                       why: StudyNotRun) -> RunOutcome:
        """Record that ``trigger`` found no runnable pipeline ``name`` (once per trigger)."""
        await bus.publish(trigger.caused(
            StudyNotRun, actor=f"worker:{self.config.worker_id}", pipeline=name,
            event_id=deterministic_id("not-run", trigger.event_id, name),
            reason_code=why.reason_code, reason=why.reason, trigger=trigger.type_name()))
        log.warning("study %s not run by %s: %s", trigger.study_uid, name, why.reason)
        return RunOutcome("", "not_run", why.reason, trigger.study_uid, name)

    async def _run_pipeline(self, bus: EventBus, trigger: Event, delivery: Delivery,
                            history: list[tuple[int, Event]], loaded: LoadedPipeline,
                            deployed: DeployedPipeline | None = None,
                            *, fetch_priors: bool = True) -> RunOutcome:
        spec = loaded.spec
        study = trigger.study_uid or ""
        revision = (trigger.event_id
                    if isinstance(trigger, StudyAmended | StudyRerunRequested) else "")
        key = run_key(study, spec.name, spec.model.sha256, revision, loaded.file_sha256)
        actor = f"worker:{self.config.worker_id}"

        def caused(cls: type[Event], event_id: str, **payload: object) -> Event:
            return trigger.caused(cls, actor=actor, pipeline=spec.name, event_id=event_id,
                                  **payload)

        # 1. already decided? (redelivery, a second worker, a re-sent trigger). A skip
        # decides only its own trigger: a study skipped because the pipeline was not yet
        # deployed (or in staging) runs when completed again later.
        for _, ev in history:
            if getattr(ev, "run_key", None) == key and (
                isinstance(ev, InferenceCompleted)
                or (isinstance(ev, InferenceFailed) and ev.final)
                or (isinstance(ev, InferenceSkipped) and ev.causation_id == trigger.event_id)
            ):
                if isinstance(ev, InferenceCompleted):  # a crash before superseding
                    await self._supersede(bus, caused, study, key, spec, trigger)
                return RunOutcome(key, "duplicate", f"already {ev.type_name()}")

        async def skip(reason: str, rejected: tuple[str, ...] = ()) -> RunOutcome:
            await bus.publish(caused(InferenceSkipped,
                                     deterministic_id("skipped", key, trigger.event_id),
                                     run_key=key, reason=reason, rejected_series=rejected))
            return RunOutcome(key, "skipped", reason)

        # 2. deployed (``resolve``: this very file); does the stage allow this study?
        if deployed is None:  # a prior's run (``_fetch_priors``): the same deployment
            deployed = (await self._deployed(bus)).get(spec.name)
            if deployed is None or deployed.retired:
                return await skip(f"pipeline {spec.name} is "
                                  f"{'retired' if deployed else 'not deployed'}")
        files = study_files(history, self.config.instances_dir)
        if deployed.stage == Stage.STAGING:
            by_hand = spec.ae_title in files.called_aes or isinstance(
                trigger, StudyRerunRequested) or (
                isinstance(trigger, StudyCompleted) and trigger.reason == CompletionReason.FORCED
            ) or isinstance(trigger, PriorRetrieved)  # a prior the run of such a study needed
            if not by_hand:
                return await skip(f"{spec.name} is in staging: it runs only on studies sent "
                                  f"to {spec.ae_title} or completed by hand")
        if not files.paths:
            return await skip("no stored instances for this study")

        # 3. run
        attempt = delivery.attempt
        await bus.publish(caused(InferenceRequested, deterministic_id("requested", key),
                                 run_key=key, model_sha256=spec.model.sha256,
                                 stage=deployed.stage,
                                 trigger="study_rerun" if isinstance(trigger, StudyRerunRequested)
                                 else "study_amended" if revision
                                 else "prior_retrieved" if isinstance(trigger, PriorRetrieved)
                                 else "study_completed"))
        t_start = time.perf_counter()
        timings: list[StepTiming] = []
        ctx: RunContext | None = None
        stages: dict[str, float] = {}
        try:
            # a pipeline pinned to a GPU runtime fails here on a CPU host; not final:
            # the redelivery may reach a worker on a GPU host (same durable consumer)
            choice = select_runtime(spec.runtime, self.host,
                                    model_format(loaded.model_path))
        except RuntimeUnavailable as exc:
            return await self._failed(bus, caused, key, attempt, exc)
        await bus.publish(caused(InferenceStarted, deterministic_id("started", key, attempt),
                                 run_key=key, worker_id=self.config.worker_id, attempt=attempt,
                                 runtime=choice.name))
        try:
            # every slow part tells JetStream the run is alive, not only the operators:
            # on a loaded host reading or loading alone can outlast the ack wait
            datasets = await self._alive(delivery, asyncio.to_thread(read_datasets,
                                                                     files.paths))
            stages["read"] = time.perf_counter() - t_start
            t = time.perf_counter()
            runtime = await self._alive(delivery, asyncio.to_thread(self._runtime, loaded,
                                                                    choice))
            further = await self._alive(delivery, asyncio.to_thread(self._cascade, loaded))
            stages["model_load"] = time.perf_counter() - t
            earlier = await self._earlier(bus, spec.name, files.patient_pseudonym, loaded)
            study_date = files.study_date or study_date_of(datasets[0].get("StudyDate")) or ""
            if (fetch_priors and self.config.priors is not None and files.patient_pseudonym
                    and self._tracked(loaded) is not None
                    and not earlier_than(earlier, study_date, study)):
                await self._fetch_priors(bus, trigger, caused, key, attempt, loaded,
                                         datasets, study_date, delivery)
                earlier = await self._earlier(bus, spec.name, files.patient_pseudonym,
                                              loaded)
            ctx = RunContext(
                pipeline=loaded, runtime=runtime, datasets=datasets, runtimes=further,
                provenance=Provenance(spec.model.name, spec.model.version, spec.model.sha256,
                                      spec.name, spec.version, key),
                study_date=study_date,
                earlier=earlier,
                blinding_hash=blinding_hash(self.config.secret, key)
                if spec.outputs.blinding_hash else None,
            )
            await self._alive(delivery, asyncio.to_thread(run_steps, ctx,
                                                          on_step=timings.append))
        except (OperatorError, InputError, EngineError, OSError) as exc:
            await self._publish_timings(bus, caused, key, attempt, timings)
            await self._publish_selection(bus, caused, key, attempt, ctx)
            return await self._failed(bus, caused, key, attempt, exc)
        await self._publish_timings(bus, caused, key, attempt, timings)
        await self._publish_selection(bus, caused, key, attempt, ctx)
        assert ctx is not None
        if ctx.selection is not None and not ctx.selection.chosen:
            return await skip("no series matched the selection rules",
                              ctx.selection.rejected_lines())

        # 4. results: store, publish, then the commit event
        t = time.perf_counter()
        result_keys = await self._alive(delivery, asyncio.to_thread(self._store_results, key,
                                                                    ctx))
        stages["store"] = time.perf_counter() - t
        t = time.perf_counter()
        published = await self._publish_results(bus, caused, key, ctx, deployed.stage,
                                                delivery)
        stages["publish"] = time.perf_counter() - t
        duration = time.perf_counter() - t_start
        measurements = tuple(Measurement(name=m.name, value=round(m.value, 6), unit=m.unit,
                                         label=m.label) for m in ctx.measurements)
        findings = tuple(Finding(label=f"{d.label}_hip" if spec.task == "detection2d"
                                 else d.label, classification=d.classification,
                                 probability=round(d.probability, 6),
                                 box=tuple(round(float(v), 2) for v in d.box),  # type: ignore[arg-type]
                                 sop_instance_uid=str(src.SOPInstanceUID))
                         for src, d in ctx.detections)
        # classification: the study's decisions, and each class's probability
        findings += tuple(Finding(label=c.finding, classification=c.decision,
                                  probability=round(c.probability, 6))
                          for c in ctx.classifications)
        # longitudinal: progression (or stable) of the compared label, as a finding, so
        # readers' progression reads fold into agreement (issue 19 #4)
        if ctx.comparison is not None and ctx.comparison.finding is not None:
            findings += (Finding(label=ctx.comparison.label or "lesion",
                                 classification=ctx.comparison.finding),)
        measurements += tuple(Measurement(name=f"probability_{cls}", value=round(p, 6),
                                          unit="1", label=c.finding)
                              for c in ctx.classifications
                              for cls, p in c.probabilities.items() if cls != "absent")
        await bus.publish(caused(
            InferenceCompleted, deterministic_id("completed", key), run_key=key,
            model_name=spec.model.name, model_version=spec.model.version,
            model_sha256=spec.model.sha256, runtime=choice.name, runtime_reason=choice.reason,
            duration_s=round(duration, 4), inference_s=round(ctx.inference_s, 4),
            selected_series=tuple(s.series_uid for s in ctx.selection.chosen)
            if ctx.selection else (),
            measurements=measurements, findings=findings, result_keys=tuple(result_keys),
            progression=ctx.comparison.progression if ctx.comparison else None,
            blinding_hash=ctx.blinding_hash, patient_pseudonym=files.patient_pseudonym,
            study_date=ctx.study_date or None,
        ))
        await self._supersede(bus, caused, study, key, spec, trigger)
        return RunOutcome(key, "completed", f"{len(published)} published", study, spec.name,
                          stages, ctx.inference_s)

    # ------------------------------------------------------------------ pieces

    async def _supersede(self, bus: EventBus, make: Make, study: str, key: str,
                         spec: PipelineSpec, trigger: Event) -> None:
        """The new result is current: earlier ones are superseded (and withdrawn from
        the PACS they went to), after the new result was sent (``engine.iocm``)."""
        reason = None
        if isinstance(trigger, StudyRerunRequested):
            reason = f"re-run by hand by {trigger.actor}: {trigger.why}"[:500]
        await iocm.supersede_earlier(bus, make, study_uid=study, current_key=key, spec=spec,
                                     results_dir=self.config.results_dir,
                                     calling_ae=self.config.calling_ae, reason=reason)

    def _follow_up(self, trigger: Event) -> Make:
        actor = f"worker:{self.config.worker_id}"

        def make(cls: type[Event], event_id: str, **payload: object) -> Event:
            return trigger.caused(cls, actor=actor, event_id=event_id, **payload)
        return make

    def _runtime(self, loaded: LoadedPipeline, choice: RuntimeChoice) -> Runtime:
        """The model, loaded once per process per (model hash, runtime)."""
        cache_key = (loaded.spec.model.sha256, choice.name)
        if cache_key not in self._runtimes:
            self._runtimes[cache_key] = load_runtime(
                choice, loaded.model_path, loaded.spec.model.sha256, fp16=loaded.spec.fp16,
                cache_dir=self.config.results_dir.parent / "trt-cache")
            self.loads += 1
        return self._runtimes[cache_key]

    def _cascade(self, loaded: LoadedPipeline) -> dict[str, Runtime]:
        """A cascade's further models (``models:``), each loaded once per process."""
        out = {}
        for name, m in loaded.spec.models.items():
            path = loaded.model_paths[name]
            choice = select_runtime(loaded.spec.runtime, self.host, model_format(path))
            cache_key = (m.sha256, choice.name)
            if cache_key not in self._runtimes:
                self._runtimes[cache_key] = load_runtime(
                    choice, path, m.sha256, fp16=loaded.spec.fp16,
                    cache_dir=self.config.results_dir.parent / "trt-cache")
                self.loads += 1
            out[name] = self._runtimes[cache_key]
        return out

    async def _earlier(self, bus: EventBus, pipeline: str, pseudonym: str | None,
                       loaded: LoadedPipeline) -> list[EarlierResult]:
        """The same patient's earlier results of this pipeline (by pseudonym)."""
        tracked = self._tracked(loaded)
        if tracked is None or pseudonym is None:
            return []
        out = []
        async for _, ev, _ in bus.read(filter_subject=type_filter("engine.inference.completed")):
            if (isinstance(ev, InferenceCompleted) and ev.pipeline == pipeline
                    and ev.patient_pseudonym == pseudonym and ev.study_date and ev.study_uid):
                vol = next((m.value for m in ev.measurements
                            if m.label == tracked and m.unit == "mL"), None)
                if vol is not None:
                    out.append(EarlierResult(ev.study_uid, ev.study_date, vol))
        return out

    @staticmethod
    def _tracked(loaded: LoadedPipeline) -> str | None:
        """The label a longitudinal pipeline compares over time; None for the others."""
        return next((p.label for p in loaded.operator_params
                     if isinstance(p, LongitudinalParams)), None)

    async def _fetch_priors(self, bus: EventBus, trigger: Event, caused: Make, key: str,
                            attempt: int, loaded: LoadedPipeline, datasets: list[Dataset],
                            study_date: str, delivery: Delivery) -> None:
        """The log holds no earlier result: ask the PACS for the patient's earlier
        studies, have it send the baseline and the latest to our receiver, and run the
        pipeline on each (``engine.pacs_priors``; events ``PriorsSearched`` and
        ``PriorRetrieved``). "None there" is final and the run proceeds without change
        figures; a PACS that cannot be asked raises ``PriorFetchError`` (retried)."""
        source = self.config.priors
        assert source is not None
        spec = loaded.spec
        study = trigger.study_uid or ""
        address = pacs.format_address(source.address)
        patient_id = next((str(ds.PatientID) for ds in datasets
                           if str(ds.get("PatientID", "") or "").strip()), "")
        modalities = [str(ds.Modality) for ds in datasets
                      if ds.get("Modality") and ds.Modality not in _NOT_IMAGES]
        modality = max(sorted(set(modalities)), key=modalities.count) if modalities else None

        async def searched(outcome: PriorOutcome, reason: str = "", *, final: bool = True,
                           found: Sequence[pacs_priors.PriorStudy] = (),
                           chosen: Sequence[pacs_priors.PriorStudy] = ()) -> None:
            await bus.publish(caused(
                PriorsSearched, deterministic_id("priors-searched", key, attempt),
                run_key=key, address=address, outcome=outcome, modality=modality,
                before_date=study_date or None, reason=reason, attempt=attempt, final=final,
                prior_study_uids=tuple(p.study_uid for p in found),
                chosen_study_uids=tuple(p.study_uid for p in chosen)))

        if not study_date or not patient_id:
            missing = "StudyDate (0008,0020)" if not study_date else "PatientID (0010,0020)"
            return await searched(PriorOutcome.NONE, f"the current study has no readable "
                                  f"{missing}: the PACS cannot be asked for earlier studies")
        try:
            found = await self._alive(delivery, asyncio.to_thread(
                pacs_priors.find_priors, source, patient_id=patient_id, before=study_date,
                modality=modality, current_study_uid=study))
        except PriorFetchError as exc:
            await searched(PriorOutcome.FAILED, safe_reason(exc),
                           final=attempt >= self.config.max_attempts)
            raise
        if not found:
            return await searched(PriorOutcome.NONE, f"the PACS holds no earlier "
                                  f"{modality or ''} study of this patient".replace("  ", " "))
        chosen = pacs_priors.choose(found, source.max_priors)
        await searched(PriorOutcome.FOUND, found=found, chosen=chosen)
        destination = source.move_destination or spec.ae_title
        actor = f"worker:{self.config.worker_id}"

        def retrieved(prior: pacs_priors.PriorStudy, outcome: RetrieveOutcome,
                      counts: pacs_priors.Retrieved | None = None, reason: str = ""
                      ) -> PriorRetrieved:
            return PriorRetrieved.new(
                actor=actor, study_uid=prior.study_uid, pipeline=spec.name,
                causation_id=trigger.event_id,
                event_id=deterministic_id("prior-retrieved", key, prior.study_uid, attempt),
                for_study_uid=study, for_run_key=key, address=address,
                move_destination=destination, outcome=outcome, study_date=prior.study_date,
                completed=counts.completed if counts else 0,
                failed=counts.failed if counts else 0,
                warning=counts.warning if counts else 0, reason=reason, attempt=attempt)

        for prior in chosen:
            history = await bus.history(prior.study_uid)
            if any(isinstance(ev, InstanceStored) for _, ev in history):
                event = retrieved(prior, RetrieveOutcome.IN_LOG)
            else:
                try:
                    counts = await self._alive(delivery, asyncio.to_thread(
                        pacs_priors.retrieve, source, prior.study_uid, destination))
                except PriorFetchError as exc:
                    await bus.publish(retrieved(prior, RetrieveOutcome.FAILED,
                                                reason=safe_reason(exc)))
                    raise
                event = retrieved(prior, RetrieveOutcome.RETRIEVED, counts)
            await bus.publish(event)
            outcome = await self._run_pipeline(bus, event, delivery,
                                               await bus.history(prior.study_uid), loaded,
                                               fetch_priors=False)
            log.info("run %s: prior %s %s, its run %s", key, prior.study_uid,
                     event.outcome.value, outcome.status)

    async def _publish_timings(self, bus: EventBus, make: Make, key: str, attempt: int,
                               timings: list[StepTiming]) -> None:
        await bus.publish_many([
            make(OperatorFinished, deterministic_id("operator", key, attempt, t.index),
                 run_key=key, operator=t.operator, index=t.index,
                 duration_s=round(t.duration_s, 6), detail=(t.detail or "")[:500])
            for t in timings
        ])

    async def _publish_selection(self, bus: EventBus, make: Make, key: str, attempt: int,
                                 ctx: RunContext | None) -> None:
        """Every series the run considered and why (``engine.series.selected``)."""
        if ctx is None or ctx.selection is None:
            return
        await bus.publish(make(
            SeriesSelected, deterministic_id("selected", key, attempt), run_key=key,
            attempt=attempt, series=tuple(
                SeriesChoice(series_uid=uid, chosen=chosen, reason=reason[:500])
                for uid, chosen, reason in ctx.selection.considered)))

    async def _failed(self, bus: EventBus, make: Make, key: str, attempt: int,
                      exc: Exception) -> RunOutcome:
        """Record ``inference failed``: final at once unless an edge failed (taxonomy in
        ``engine.errors``); the reason is ``safe_reason``'s, never a value."""
        if isinstance(exc, OperatorError):
            operator = exc.operator
        elif isinstance(exc, RuntimeUnavailable):
            operator = "select_runtime"
        elif isinstance(exc, PriorFetchError):
            operator = "fetch_priors"
        elif isinstance(exc, InputError | OSError):
            operator = "read_instances"
        else:
            operator = "load_model"
        retry = is_retryable(exc)
        final = not retry or attempt >= self.config.max_attempts
        reason = safe_reason(exc)
        await bus.publish(make(InferenceFailed,
                               deterministic_id("failed", key, attempt), run_key=key,
                               operator=operator, error=reason[:2000], attempt=attempt,
                               final=final))
        log.warning("run %s failed in %s (attempt %d, final=%s): %s", key, operator, attempt,
                    final, reason)
        if retry:
            if isinstance(exc, EngineError):
                raise exc  # the bus naks it; at max_attempts it dead-letters it
            raise EngineError(f"{operator}: {reason}") from None
        return RunOutcome(key, "failed", f"{operator}: {reason}")

    def _store_results(self, key: str, ctx: RunContext) -> list[str]:
        """Result files under ``results_dir/<run key>/``; keys relative to results_dir."""
        folder = self.config.results_dir / key
        folder.mkdir(parents=True, exist_ok=True)
        keys = []
        for kind, ds in ctx.results:
            name = f"{kind.lower()}-{ds.SOPInstanceUID}.dcm"
            tmp = folder / (name + ".tmp")
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, folder / name)
            keys.append(f"{key}/{name}")
        return keys

    async def _alive(self, delivery: Delivery, work: Awaitable[T]) -> T:
        """Await ``work`` while telling JetStream every ``heartbeat_s`` that the run is
        alive, so a slow step (inference, a C-STORE to a slow PACS) is not redelivered to
        another worker mid-way."""
        task = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait({task}, timeout=self.config.heartbeat_s)
            if done:
                return await task
            await delivery.in_progress()

    async def _publish_results(self, bus: EventBus, make: Make, key: str, ctx: RunContext,
                               stage: Stage, delivery: Delivery) -> list[str]:
        done = []
        for pub in ctx.pipeline.spec.publishers:
            if stage.value not in pub.stages:
                continue
            if pub.kind == "store":
                for kind, ds in ctx.results:
                    await bus.publish(make(ResultPublished,
                                           deterministic_id("published", key, "store",
                                                            ds.SOPInstanceUID),
                                           run_key=key, destination="store", kind=kind,
                                           sop_instance_uid=str(ds.SOPInstanceUID)))
                done.append("store")
                continue
            assert pub.ae_title and pub.host and pub.port
            dest = pacs.PacsAddress(pub.ae_title, pub.host, pub.port, self.config.calling_ae)
            destination = f"pacs:{pub.ae_title}"
            kinds = {str(ds.SOPInstanceUID): kind for kind, ds in ctx.results}
            address = pacs.format_address(dest)
            try:
                outcomes = await self._alive(delivery, asyncio.to_thread(
                    pacs.c_store, [ds for _, ds in ctx.results], dest, retries=pub.retries,
                    retry_delay_s=pub.retry_delay_s))
            except PublishFailedError as exc:
                # what the PACS did decide is recorded; the rest is retried by the PACS
                # redelivery consumer (engine.pacs_redelivery), from the log, with backoff
                await bus.publish_many(outcome_events(make, key, destination, address,
                                                      exc.outcomes, kinds))
                await bus.publish(make(PublishFailed,
                                       deterministic_id("publish-failed", key, destination),
                                       run_key=key, destination=destination,
                                       error=safe_reason(exc), attempt=pub.retries + 1,
                                       will_retry=True, address=address))
                continue
            await bus.publish_many(outcome_events(make, key, destination, address, outcomes,
                                                  kinds))
            for o in outcomes:
                if o.refused:
                    log.warning("run %s: %s refused the %s: %s (%s)", key, destination,
                                kinds[o.sop_instance_uid], o.status, o.status_hex)
            done.append(destination)
        return done
