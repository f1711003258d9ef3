"""Publishing results to XNAT (the ``xnat`` client), retried from the durable log.

The paper's "Delivery of results": each completed result becomes an XNAT case that a
clinician opens from PACS, outside the clinical record. For every
``engine.inference.completed`` event the publisher:

1. finds or creates the project (``LASTMILE_XNAT_PROJECT``), a subject labelled by the
   patient pseudonym (never a name or an ID) and one image session per study, labelled
   ``LM_<study token>`` (the 16-hex-digit study token of ``events.subjects``: XNAT labels
   allow only letters, digits, ``_`` and ``-``), typed by modality (MR → ``xnat:
   mrSessionData`` ...);
2. uploads the SEG/SR files to the session resource ``LM_RESULTS`` and a preview PNG to
   ``LM_PREVIEW``; the SEG also goes to the OHIF viewer plugin's ROI collection import
   (``PUT /xapi/roi/projects/{P}/sessions/{E}/collections/{label}?type=SEG``) so the
   viewer lists it;
3. sets the session's custom fields (``FIELD_*`` below: pipeline, model and version,
   volumes, findings, flags) and puts the case on the worklist: ``lm_worklist=pending``
   (the project's worklist is the sessions with that value; the feedback poller, see
   ``ingest.xnat_feedback``, turns it to ``reviewed``);
4. records ``engine.result.published`` per file (SEG, SR, PNG) with deterministic ids.

For ``engine.result.superseded`` it updates the case: the superseded result's SEG/SR
files leave ``LM_RESULTS``, ``lm_superseded`` lists the run keys replaced, and a session
still showing the superseded result leaves the worklist (``lm_worklist=superseded``)
until the current one arrives; ``engine.result.withdrawn`` records it. A superseded
result that reaches the publisher late is not published at all.

Every step is idempotent (find-or-create by label, ``overwrite=true``), so a retry after
a failure half-way repeats nothing visible. A failure records ``engine.result.
publish_failed`` saying why (unreachable, timed out, refused credentials, HTTP status)
and whether it will be retried; the handler retries with exponential backoff while
telling JetStream it is alive, then raises so the event is redelivered from the log, and
after the consumer's delivery limit it is dead-lettered (the original stays in the log).
Nothing is lost: the result files stay in ``results_dir`` and the trigger in the log.

Credentials come from the caller (environment) or ``.netrc`` (the client reads it when no
password is given); they are never logged or put into events.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import requests
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from engine.errors import PublishFailedError
from events.base import Event, deterministic_id
from events.catalogue import (
    Finding,
    InferenceCompleted,
    InstanceStored,
    PublishFailed,
    ResultPublished,
    ResultSuperseded,
    ResultWithdrawn,
)
from events.jetstream import Delivery, EventBus
from events.subjects import study_token
from xnat_client.session import XnatAccess, XnatSession

log = logging.getLogger(__name__)

RESULTS_RESOURCE = "LM_RESULTS"
PREVIEW_RESOURCE = "LM_PREVIEW"
PREVIEW_NAME = "preview.png"
SESSION_PREFIX = "LM_"
# Session fields: the contract with ingest.xnat_feedback (which repeats the two it reads,
# since ingest must not import engine; tests/xnat checks they agree).
FIELD_STUDY_UID = "lm_study_uid"
FIELD_RUN_KEY = "lm_run_key"
FIELD_WORKLIST = "lm_worklist"
WORKLIST_PENDING = "pending"

SESSION_TYPES = {
    "MR": "xnat:mrSessionData", "CT": "xnat:ctSessionData", "CR": "xnat:crSessionData",
    "DX": "xnat:dxSessionData", "PT": "xnat:petSessionData", "US": "xnat:usSessionData",
    "MG": "xnat:mgSessionData", "XA": "xnat:xaSessionData", "NM": "xnat:nmSessionData",
}
DEFAULT_SESSION_TYPE = "xnat:otherDicomSessionData"
_LABEL_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
_FIELD_SAFE = re.compile(r"[^a-z0-9_]+")


class XnatPublishError(PublishFailedError):
    """XNAT could not take a result. ``retryable`` says whether trying later can help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


# --------------------------------------------------------------------------- pure core


@dataclass(frozen=True)
class ResultFile:
    kind: str  # "SEG" | "SR" | "PNG"
    resource: str
    name: str
    path: Path | None = None  # a file in results_dir, or
    data: bytes | None = None  # bytes made here (the preview)
    sop_instance_uid: str | None = None


@dataclass(frozen=True)
class PublicationPlan:
    """Everything one result becomes in XNAT, decided before any request is made."""

    run_key: str
    study_uid: str
    subject_label: str
    session_label: str
    session_type: str
    fields: dict[str, str]
    files: tuple[ResultFile, ...]
    roi_label: str | None  # the SEG's ROI collection label, when there is a SEG
    session_date: str | None = None


@dataclass(frozen=True)
class StudyFacts:
    """What the study's ``ingest.instance.stored`` events tell the publisher."""

    patient_pseudonym: str | None
    modality: str | None
    study_date: str | None
    instances: dict[str, Path]  # SOP Instance UID → file in the instance store


def study_facts(history: Sequence[Event], instances_dir: Path,
                selected_series: Sequence[str] = ()) -> StudyFacts:
    """Pseudonym, modality (of the selected series when known) and stored files."""
    pseudonym = modality = study_date = None
    chosen = set(selected_series)
    latest: dict[str, InstanceStored] = {}
    for ev in history:
        if not isinstance(ev, InstanceStored):
            continue
        pseudonym = ev.patient_pseudonym or pseudonym
        study_date = ev.study_date or study_date
        if ev.modality and (not chosen or ev.series_uid in chosen or modality is None):
            modality = ev.modality
        cur = latest.get(ev.sop_instance_uid)
        if cur is None or ev.version >= cur.version:
            latest[ev.sop_instance_uid] = ev
    return StudyFacts(pseudonym, modality, study_date,
                      {uid: instances_dir / ev.store_key for uid, ev in latest.items()})


def session_label(study_uid: str) -> str:
    """``LM_<study token>``: stable per study, and a valid XNAT label."""
    return f"{SESSION_PREFIX}{study_token(study_uid)}"


def field_name(*parts: str | None) -> str:
    """A custom-field name XNAT keeps as written (it lower-cases names)."""
    name = "_".join(p for p in parts if p)
    return _FIELD_SAFE.sub("_", name.lower()).strip("_")[:64]


def _number(value: float) -> str:
    return f"{value:.6g}"


def result_fields(ev: InferenceCompleted, published_at: str) -> dict[str, str]:
    """The session's custom fields for one result (all strings, as XNAT stores them).

    ``lm_flags`` lists what a reader should look at first: every finding that is not
    "normal" (``left_hip:fracture``) and ``progression`` when the BTS comparison says so.
    """
    fields = {
        FIELD_STUDY_UID: ev.study_uid or "",
        FIELD_RUN_KEY: ev.run_key,
        "lm_pipeline": ev.pipeline or "",
        "lm_model": ev.model_name,
        "lm_model_version": ev.model_version,
        "lm_model_sha256": (ev.model_sha256 or "")[:16],
        "lm_runtime": ev.runtime,
        FIELD_WORKLIST: WORKLIST_PENDING,
        "lm_published_at": published_at,
    }
    for m in ev.measurements:
        fields[field_name("lm", m.name, m.label, m.unit)] = _number(m.value)
    for f in ev.findings:
        fields[field_name("lm_finding", f.label)] = f.classification
        if f.probability is not None:
            fields[field_name("lm_prob", f.label)] = _number(f.probability)
    if ev.score is not None:
        fields["lm_score"] = _number(ev.score)
    if ev.progression is not None:
        fields["lm_progression"] = "true" if ev.progression else "false"
    # a longitudinal finding ("stable"/"improved"/"progression") is flagged once, as
    # "progression"
    flags = [f"{f.label}:{f.classification}" for f in ev.findings
             if f.classification.lower() not in ("normal", "stable", "improved", "progression")]
    if ev.progression:
        flags.append("progression")
    fields["lm_flags"] = ",".join(flags) if flags else "none"
    if ev.blinding_hash:
        fields["lm_blinding_hash"] = ev.blinding_hash
    return {k: v for k, v in fields.items() if k}


def plan_publication(ev: InferenceCompleted, facts: StudyFacts, results_dir: Path,
                     preview: bytes | None, published_at: str) -> PublicationPlan:
    """The XNAT side of one result. Raises ``XnatPublishError`` (not retryable) for a
    result that cannot be published as it is (no study, no pseudonym, missing files)."""
    if not ev.study_uid:
        raise XnatPublishError("the result names no study", retryable=False)
    pseudonym = ev.patient_pseudonym or facts.patient_pseudonym
    if not pseudonym:
        raise XnatPublishError(
            f"no patient pseudonym for study {ev.study_uid}: neither the result nor the "
            "study's stored instances carry one", retryable=False)
    files: list[ResultFile] = []
    roi_label = None
    for key in ev.result_keys:
        path = results_dir / key
        if not path.is_file():
            raise XnatPublishError(f"result file {key} is missing from {results_dir}",
                                   retryable=False)
        kind, _, rest = path.name.partition("-")
        kind = kind.upper()
        uid = rest[:-4] if rest.endswith(".dcm") else None
        files.append(ResultFile(kind, RESULTS_RESOURCE, path.name, path=path,
                                sop_instance_uid=uid))
        if kind == "SEG" and roi_label is None:
            roi_label = _LABEL_SAFE.sub("_", f"LM_{ev.pipeline or 'result'}_{ev.run_key[:12]}")
    if preview is not None:
        files.append(ResultFile("PNG", PREVIEW_RESOURCE, PREVIEW_NAME, data=preview))
    date = ev.study_date or facts.study_date
    return PublicationPlan(
        run_key=ev.run_key, study_uid=ev.study_uid, subject_label=_LABEL_SAFE.sub("_", pseudonym),
        session_label=session_label(ev.study_uid),
        session_type=SESSION_TYPES.get((facts.modality or "").upper(), DEFAULT_SESSION_TYPE),
        fields=result_fields(ev, published_at), files=tuple(files), roi_label=roi_label,
        session_date=f"{date[:4]}-{date[4:6]}-{date[6:8]}" if date and len(date) == 8 else None,
    )


# --------------------------------------------------------------------------- preview


def _grey(pixels: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(pixels, (1, 99)) if pixels.size else (0, 1)
    scaled = (pixels.astype(np.float32) - lo) / max(float(hi - lo), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


SEGMENT_COLOURS = ((255, 40, 40), (40, 200, 255), (255, 200, 0), (160, 80, 255),
                   (0, 220, 120), (255, 120, 200))


def _frame_source(seg: Dataset, index: int) -> str | None:
    try:
        item = seg.PerFrameFunctionalGroupsSequence[index]
        return str(item.DerivationImageSequence[0].SourceImageSequence[0]
                   .ReferencedSOPInstanceUID)
    except (AttributeError, IndexError):
        return None


def _frame_segment(seg: Dataset, index: int) -> int:
    try:
        item = seg.PerFrameFunctionalGroupsSequence[index]
        return int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
    except (AttributeError, IndexError):
        return 1


def _best_slice(seg: Dataset, masks: np.ndarray) -> tuple[str | None, list[int]]:
    """The source image whose frames (all segments) cover the most pixels, and those
    frames; a SEG without references falls back to its largest frame."""
    areas = masks.reshape(masks.shape[0], -1).sum(axis=1)
    sources = [_frame_source(seg, i) for i in range(masks.shape[0])]
    if any(s is None for s in sources):
        return None, [int(np.argmax(areas))]
    total: dict[str, int] = {}
    for src, area in zip(sources, areas, strict=True):
        total[str(src)] = total.get(str(src), 0) + int(area)
    best = max(total, key=lambda k: total[k])
    return best, [i for i, s in enumerate(sources) if s == best]


def _source_pixels(instances: dict[str, Path], uid: str | None) -> np.ndarray | None:
    if uid is None or uid not in instances:
        return None
    try:
        ds = pydicom.dcmread(instances[uid])
        arr = ds.pixel_array
    except (OSError, InvalidDicomError, ValueError, AttributeError):
        return None
    return arr if arr.ndim == 2 else None


def _png(img: Image.Image, max_side: int = 512, min_side: int = 256) -> bytes:
    """PNG bytes, scaled into [min_side, max_side] so a small slice is still legible."""
    if max(img.size) < min_side:
        factor = -(-min_side // max(img.size))
        img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def render_preview(seg: Dataset | None, findings: Sequence[Finding],
                   instances: dict[str, Path]) -> bytes | None:
    """A PNG a clinician sees first: the SEG's largest slice in red over its source
    image (mask alone if the source is not in the store), or the radiograph with the
    findings' boxes. ``None`` when the result has nothing to draw."""
    if seg is not None:
        masks = seg.pixel_array
        masks = masks[None] if masks.ndim == 2 else masks
        source_uid, frames = _best_slice(seg, masks)
        source = _source_pixels(instances, source_uid)
        shape = masks.shape[1:]
        base = _grey(source) if source is not None and source.shape == shape \
            else np.zeros(shape, np.uint8)
        rgb = np.stack([base] * 3, axis=-1).astype(np.float32)
        for index in frames:
            mask = masks[index] > 0
            colour = SEGMENT_COLOURS[(_frame_segment(seg, index) - 1) % len(SEGMENT_COLOURS)]
            rgb[mask] = rgb[mask] * 0.5 + np.array(colour, np.float32) * 0.5
        return _png(Image.fromarray(rgb.astype(np.uint8), "RGB"))
    boxed = [f for f in findings if f.box is not None and f.sop_instance_uid]
    if not boxed:
        return None
    source = _source_pixels(instances, boxed[0].sop_instance_uid)
    if source is None:
        return None
    img = Image.fromarray(_grey(source)).convert("RGB")
    draw = ImageDraw.Draw(img)
    width = max(2, img.width // 300)
    for f in boxed:
        if f.sop_instance_uid != boxed[0].sop_instance_uid or f.box is None:
            continue
        colour = (0, 200, 0) if f.classification.lower() == "normal" else (255, 40, 40)
        draw.rectangle(f.box, outline=colour, width=width)
        draw.text((f.box[0] + 4, f.box[1] + 4), f"{f.label}: {f.classification}", fill=colour)
    return _png(img)


def preview_for(ev: InferenceCompleted, facts: StudyFacts, results_dir: Path) -> bytes | None:
    seg_key = next((k for k in ev.result_keys if Path(k).name.startswith("seg-")), None)
    seg = None
    if seg_key is not None:
        try:
            seg = pydicom.dcmread(results_dir / seg_key)
        except (OSError, InvalidDicomError):
            return None
    try:
        return render_preview(seg, ev.findings, facts.instances)
    except (ValueError, AttributeError) as exc:  # a SEG whose pixels cannot be decoded
        log.warning("run %s: no preview (%s)", ev.run_key, exc)
        return None


# --------------------------------------------------------------------------- XNAT edge


def _describe(exc: BaseException, target: XnatAccess) -> XnatPublishError:
    """Translate client errors into one error that says why, and whether to retry."""
    import xnat.exceptions as xe

    url = target.url
    if isinstance(exc, requests.Timeout):
        return XnatPublishError(f"XNAT at {url} did not answer within {target.timeout_s:g}s "
                                f"({type(exc).__name__})")
    if isinstance(exc, requests.ConnectionError | xe.XNATConnectionError):
        return XnatPublishError(f"XNAT at {url} is unreachable ({type(exc).__name__}); "
                                "check that it is running and LASTMILE_XNAT_URL")
    if isinstance(exc, xe.XNATLoginFailedError | xe.XNATAuthError):
        return XnatPublishError(
            f"XNAT at {url} refused the credentials of user {target.user or '(from .netrc)'} "
            "(401): set LASTMILE_XNAT_USER/LASTMILE_XNAT_PASSWORD or the .netrc entry")
    if isinstance(exc, xe.XNATResponseError | xe.XNATUploadError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is None and (m := re.search(r"Status code (\d{3})", str(exc))):
            status = int(m.group(1))  # XNATUploadError carries it only in its message
        text = str(exc).split("\n", 1)[0][:300]
        where = f"HTTP {status}" if status else "an error"
        return XnatPublishError(f"XNAT at {url} answered {where}: {text}",
                                retryable=status is None or status >= 500 or status in (401,
                                                                                       403, 409))
    if isinstance(exc, xe.XNATError):
        return XnatPublishError(f"XNAT client error with {url}: {type(exc).__name__}: {exc}")
    return XnatPublishError(f"XNAT publish to {url} failed: {type(exc).__name__}: {exc}")


class XnatConnection(XnatSession):
    """The publisher's session: client errors become ``XnatPublishError`` saying why, and
    whether to retry."""

    def __init__(self, target: XnatAccess) -> None:
        super().__init__(target, lambda exc: _describe(exc, target))


def _project(session: Any, project_id: str) -> Any:
    projects = session.projects
    if project_id in projects:
        return projects[project_id]
    session.classes.ProjectData(parent=session, id_=project_id, name=project_id)
    session.clearcache()
    return session.projects[project_id]


def _subject(session: Any, project: Any, label: str) -> Any:
    subjects = project.subjects
    if label in subjects:
        return subjects[label]
    subject = session.classes.SubjectData(parent=project, label=label)
    project.clearcache()
    return subject


def _image_session(session: Any, project: Any, subject: Any, plan: PublicationPlan) -> Any:
    project.experiments.clearcache()
    existing = project.experiments.get(plan.session_label)
    if existing is not None:
        return existing
    cls = session.XNAT_CLASS_LOOKUP[plan.session_type]
    extra = {"date": plan.session_date} if plan.session_date else {}
    return cls(parent=subject, label=plan.session_label, UID=plan.study_uid, **extra)


def publish_plan(session: Any, target: XnatAccess, plan: PublicationPlan,
                 on_file: Callable[[ResultFile], None] | None = None) -> str:
    """Do everything the plan says (idempotently); return the XNAT session ID."""
    session.clearcache()  # the client caches listings; others may have changed XNAT since
    project = _project(session, target.project)
    subject = _subject(session, project, plan.subject_label)
    experiment = _image_session(session, project, subject, plan)
    resources: dict[str, Any] = {}
    for f in plan.files:
        if f.resource not in resources:
            existing = experiment.resources.get(f.resource)
            resources[f.resource] = existing if existing is not None else \
                experiment.create_resource(f.resource, format="PNG" if f.kind == "PNG"
                                           else "DICOM")
        resource = resources[f.resource]
        if f.path is not None:
            resource.upload(f.path, f.name, overwrite=True, content_type=_content_type(f),
                            verbose=False)
        else:
            resource.upload_data(f.data or b"", f.name, overwrite=True,
                                 content_type=_content_type(f), verbose=False)
        if f.kind == "SEG" and plan.roi_label is not None and f.path is not None:
            session.put(f"/xapi/roi/projects/{target.project}/sessions/{experiment.id}"
                        f"/collections/{plan.roi_label}",
                        data=f.path.read_bytes(), query={"type": "SEG", "overwrite": "true"},
                        headers={"Content-Type": "application/octet-stream"})
        if on_file is not None:
            on_file(f)
    xsi = experiment.__xsi_type__
    experiment.mset({f"fields/field[name={k}]/field": v for k, v in plan.fields.items()})
    experiment.clearcache()
    stored = dict(experiment.fields)
    missing = [k for k, v in plan.fields.items() if stored.get(k) != v]
    if missing:
        raise XnatPublishError(f"XNAT did not keep the session fields {missing[:5]} of {xsi}")
    return str(experiment.id)


FIELD_SUPERSEDED = "lm_superseded"
WORKLIST_SUPERSEDED = "superseded"


def withdraw_from_session(session: Any, target: XnatAccess, study_uid: str, old_run_key: str,
                          file_names: Sequence[str]) -> str | None:
    """Take a superseded result out of its study's XNAT session (idempotently); returns
    the session ID, or None when the study has no session (nothing was published)."""
    session.clearcache()
    if target.project not in session.projects:
        return None
    project = session.projects[target.project]
    project.experiments.clearcache()
    experiment = project.experiments.get(session_label(study_uid))
    if experiment is None:
        return None
    resource = experiment.resources.get(RESULTS_RESOURCE)
    if resource is not None:
        for name in file_names:
            if name in resource.files:
                resource.files[name].delete()
    fields = dict(experiment.fields)
    replaced = [k for k in (fields.get(FIELD_SUPERSEDED) or "").split(",") if k]
    update = {FIELD_SUPERSEDED: ",".join(sorted({*replaced, old_run_key}))}
    if fields.get(FIELD_RUN_KEY) == old_run_key:  # the current result is not there yet
        update[FIELD_WORKLIST] = WORKLIST_SUPERSEDED
    experiment.mset({f"fields/field[name={k}]/field": v for k, v in update.items()})
    return str(experiment.id)


def _content_type(f: ResultFile) -> str:
    return "image/png" if f.kind == "PNG" else "application/dicom"


# --------------------------------------------------------------------------- handler


@dataclass
class PublisherConfig:
    target: XnatAccess
    results_dir: Path
    instances_dir: Path
    actor: str = "xnat-publisher"
    tries_per_delivery: int = 3
    backoff_s: float = 2.0
    max_backoff_s: float = 300.0
    heartbeat_s: float = 5.0
    max_deliveries: int = 10


@dataclass
class PublishOutcome:
    run_key: str
    status: str  # published | duplicate | failed | retry
    detail: str = ""
    session_id: str | None = None


class XnatPublisher:
    """The ``engine.inference.completed`` handler that publishes to XNAT."""

    def __init__(self, config: PublisherConfig, connection: XnatConnection | None = None,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self.config = config
        self.connection = connection or XnatConnection(config.target)
        self.outcomes: list[PublishOutcome] = []
        self._sleep = sleep
        self._bus: EventBus | None = None
        self._stop: asyncio.Event | None = None

    def bind(self, bus: EventBus, stop: asyncio.Event | None = None) -> XnatPublisher:
        self._bus = bus
        self._stop = stop
        return self

    def delay(self, attempt: int) -> float:
        """Exponential backoff by overall attempt number (1, 2, ...), capped."""
        return min(self.config.backoff_s * 2 ** (attempt - 1), self.config.max_backoff_s)

    async def handle(self, event: Event, delivery: Delivery) -> None:
        if not isinstance(event, InferenceCompleted | ResultSuperseded):
            return
        if self._bus is None:
            raise XnatPublishError("the XNAT publisher is not bound to the event bus")
        if isinstance(event, ResultSuperseded):
            outcome = await self._superseded(self._bus, event)
        else:
            outcome = await self._handle(self._bus, event, delivery)
        self.outcomes.append(outcome)
        if outcome.status == "retry":
            raise XnatPublishError(outcome.detail)

    async def _handle(self, bus: EventBus, ev: InferenceCompleted, delivery: Delivery
                      ) -> PublishOutcome:
        cfg = self.config
        dest = cfg.target.destination
        history = [e for _, e in await bus.history(ev.study_uid)] if ev.study_uid else []
        if any(isinstance(e, ResultSuperseded) and e.run_key == ev.run_key for e in history):
            return PublishOutcome(ev.run_key, "superseded", "a later result replaced it")
        facts = study_facts(history, cfg.instances_dir, ev.selected_series)
        done = {e.kind for e in history if isinstance(e, ResultPublished)
                and e.run_key == ev.run_key and e.destination == dest}
        first = (delivery.attempt - 1) * cfg.tries_per_delivery + 1
        last_delivery = delivery.attempt >= cfg.max_deliveries
        try:
            preview = await asyncio.to_thread(preview_for, ev, facts, cfg.results_dir)
            plan = plan_publication(ev, facts, cfg.results_dir, preview,
                                    ev.occurred_at.isoformat(timespec="seconds"))
        except XnatPublishError as exc:
            await self._failed(bus, ev, first, str(exc), will_retry=False)
            return PublishOutcome(ev.run_key, "failed", str(exc))
        if plan.files and {f.kind for f in plan.files} <= done:
            return PublishOutcome(ev.run_key, "duplicate", "already published to XNAT")
        for i in range(cfg.tries_per_delivery):
            attempt = first + i
            try:
                session_id = await self._attempt(plan, delivery)
            except XnatPublishError as exc:
                final_try = i == cfg.tries_per_delivery - 1
                will_retry = exc.retryable and not (final_try and last_delivery)
                await self._failed(bus, ev, attempt, str(exc), will_retry=will_retry)
                log.warning("run %s: XNAT publish attempt %d failed: %s", ev.run_key, attempt, exc)
                if not exc.retryable:
                    return PublishOutcome(ev.run_key, "failed", str(exc))
                if final_try:
                    # back off, then raise: the log redelivers the event, and after the
                    # delivery limit dead-letters it with this reason (it stays in the log)
                    if not last_delivery:
                        await self._wait(self.delay(attempt), delivery)
                    return PublishOutcome(ev.run_key, "retry", str(exc))
                await self._wait(self.delay(attempt), delivery)
                continue
            await bus.publish_many([
                ev.caused(ResultPublished, actor=cfg.actor,
                          event_id=deterministic_id("published", ev.run_key, dest, f.kind,
                                                    f.sop_instance_uid or f.name),
                          run_key=ev.run_key, destination=dest, kind=f.kind,
                          sop_instance_uid=f.sop_instance_uid, attempt=attempt)
                for f in plan.files])
            return PublishOutcome(ev.run_key, "published", f"{len(plan.files)} files", session_id)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _superseded(self, bus: EventBus, ev: ResultSuperseded) -> PublishOutcome:
        """Update the study's case for a superseded result (retried from the log)."""
        dest = self.config.target.destination
        history = [e for _, e in await bus.history(ev.study_uid)] if ev.study_uid else []
        old = next((e for e in history if isinstance(e, InferenceCompleted)
                    and e.run_key == ev.run_key), None)
        if old is None or not ev.study_uid or any(
                isinstance(e, ResultWithdrawn) and e.run_key == ev.run_key
                and e.destination == dest for e in history):
            return PublishOutcome(ev.run_key, "duplicate", "nothing to withdraw")
        names = [Path(k).name for k in old.result_keys]
        study_uid = ev.study_uid
        try:
            session_id = await asyncio.to_thread(self.connection.call, lambda s: (
                withdraw_from_session(s, self.config.target, study_uid, ev.run_key, names)))
        except XnatPublishError as exc:
            await self._failed(bus, old, 1, f"withdrawing a superseded result: {exc}",
                               will_retry=exc.retryable)
            return PublishOutcome(ev.run_key, "retry" if exc.retryable else "failed",
                                  str(exc))
        if session_id is None:
            return PublishOutcome(ev.run_key, "duplicate", "never published to XNAT")
        await bus.publish(ev.caused(
            ResultWithdrawn, actor=self.config.actor,
            event_id=deterministic_id("withdrawn", ev.run_key, dest), run_key=ev.run_key,
            destination=dest, rejected_sop_instance_uids=tuple(sorted(
                n.partition("-")[2].removesuffix(".dcm") for n in names)),
            reason_code=f"removed from XNAT session {session_id}; superseded by "
                        f"{ev.superseded_by}"))
        return PublishOutcome(ev.run_key, "withdrawn", "removed from the case", session_id)

    async def _attempt(self, plan: PublicationPlan, delivery: Delivery) -> str:
        """One publication in a thread, heart-beating JetStream while it runs."""
        work = asyncio.create_task(asyncio.to_thread(
            self.connection.call, lambda s: publish_plan(s, self.config.target, plan)))
        while True:
            done, _ = await asyncio.wait({work}, timeout=self.config.heartbeat_s)
            if done:
                return str(work.result())
            await delivery.in_progress()

    async def _wait(self, seconds: float, delivery: Delivery) -> None:
        """Back off, staying alive for JetStream; a stop cuts the wait (the event is
        redelivered after a restart, since it was not acknowledged)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stop is not None and self._stop.is_set():
                raise XnatPublishError("stopping while waiting to retry")
            await self._sleep(min(left, self.config.heartbeat_s))
            await delivery.in_progress()

    async def _failed(self, bus: EventBus, ev: InferenceCompleted, attempt: int, error: str,
                      *, will_retry: bool) -> None:
        dest = self.config.target.destination
        await bus.publish(ev.caused(
            PublishFailed, actor=self.config.actor,
            event_id=deterministic_id("publish-failed", ev.run_key, dest, attempt,
                                      hashlib.sha256(error.encode()).hexdigest()[:8]),
            run_key=ev.run_key, destination=dest, error=error[:2000], attempt=attempt,
            will_retry=will_retry))
