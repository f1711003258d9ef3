"""Feedback from XNAT: clinicians' reviews and corrected segmentations, pulled back as events.

The paper's readers reviewed results in XNAT (feedback forms, OHIF edits). This poller
reads what they left on the sessions the publisher created (``engine.xnat_publisher``:
label ``LM_<study token>``, fields ``lm_study_uid`` and ``lm_run_key``) and publishes

- ``review.review.submitted`` (``source="xnat"``) for each submitted review form, and
- ``review.edit.submitted`` (``source="xnat"``) for each corrected SEG uploaded,

each exactly once: the event id is derived from what makes the fact unique (the XNAT
object and the form's content, or the file's path and SHA-256), and the study's history
is checked for that id before publishing (JetStream's duplicate window alone is not
forever). A restart, a second poller or a re-poll therefore writes nothing twice.

The review form contract (custom fields on the session, or on an assessor of the session,
e.g. a ``xnat:qcManualAssessorData`` per reader; XNAT lower-cases field names):

==============================  =========================================================
``lm_review_submitted_at``      required: ISO-8601 time; its presence marks the form as
                                submitted (a half-filled form without it is ignored)
``lm_review_reader``            required: the reader's user name (the event's actor)
``lm_review_agree_<label>``     ``yes``/``no`` (also true/false, 1/0) per AI finding
                                (labels as in ``lm_finding_<label>``, e.g. ``left_hip``,
                                or ``lesion`` for a segmentation)
``lm_review_read_<label>``      the reader's own classification, e.g. ``fracture``
``lm_review_confidence``        optional: 1..5
``lm_review_comment``           optional free text
``lm_review_seconds``           optional: time on case in seconds
``lm_review_run_key``           optional: the result reviewed (default: ``lm_run_key``)
==============================  =========================================================

A form that is submitted but breaks the contract (no reader, confidence 7, agree
"maybe") is reported with a clear message in the log and writes no event. After a review
is recorded, the session's ``lm_worklist`` becomes ``reviewed``.

Corrected segmentations: DICOM SEG files uploaded to the session resource ``LM_EDITS``,
as ``<reader>/<file>.dcm`` (the folder names the reader; a file at the top level takes
the session's ``lm_edit_reader`` field). A file that is not a SEG of the session's study
is refused with a message and no event. Accepted files are stored in the
content-addressed instance store (``events.instance_store``), and the event carries its
``store_key`` and SHA-256.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from events.base import deterministic_id
from events.catalogue import EditSubmitted, ReviewSubmitted
from events.instance_store import InstanceStore
from events.jetstream import EventBus
from ingest.errors import IngestError
from xnat_client.session import XnatAccess, XnatSession

log = logging.getLogger(__name__)

SESSION_PREFIX = "LM_"
FIELD_STUDY_UID = "lm_study_uid"  # written by engine.xnat_publisher
FIELD_RUN_KEY = "lm_run_key"
FIELD_WORKLIST = "lm_worklist"
WORKLIST_REVIEWED = "reviewed"
EDITS_RESOURCE = "LM_EDITS"
REVIEW = "lm_review_"
TRUE = {"yes", "true", "1", "agree", "y"}
FALSE = {"no", "false", "0", "disagree", "n"}


class FeedbackError(IngestError):
    """XNAT could not be read, or what a clinician left there breaks the contract."""


class FormError(FeedbackError):
    """A submitted review form is incomplete or invalid (the message says what)."""


# --------------------------------------------------------------------------- pure core


@dataclass(frozen=True)
class ReviewForm:
    reader: str
    submitted_at: str
    agree: dict[str, bool]
    reads: dict[str, str]
    confidence: int | None
    comment: str | None
    seconds_on_case: float | None
    run_key: str | None

    def content_hash(self) -> str:
        body = json.dumps({"reader": self.reader, "at": self.submitted_at, "agree": self.agree,
                           "reads": self.reads, "confidence": self.confidence,
                           "comment": self.comment, "seconds": self.seconds_on_case,
                           "run": self.run_key}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()


def parse_review(fields: Mapping[str, str]) -> ReviewForm | None:
    """The review on an XNAT object's fields; ``None`` if none was submitted there.

    Raises ``FormError`` naming every problem of a submitted but invalid form.
    """
    f = {k.lower(): (v or "").strip() for k, v in fields.items()}
    submitted_at = f.get(f"{REVIEW}submitted_at", "")
    if not submitted_at:
        return None
    problems: list[str] = []
    reader = f.get(f"{REVIEW}reader", "")
    if not reader:
        problems.append(f"{REVIEW}reader is missing")
    agree: dict[str, bool] = {}
    reads: dict[str, str] = {}
    for key, value in sorted(f.items()):
        if key.startswith(f"{REVIEW}agree_"):
            label = key[len(f"{REVIEW}agree_"):]
            if value.lower() in TRUE:
                agree[label] = True
            elif value.lower() in FALSE:
                agree[label] = False
            else:
                problems.append(f"{key}={value!r} is not yes/no")
        elif key.startswith(f"{REVIEW}read_") and value:
            reads[key[len(f"{REVIEW}read_"):]] = value
    if not agree and not reads:
        problems.append(f"no {REVIEW}agree_<label> or {REVIEW}read_<label> answer")
    confidence = None
    if raw := f.get(f"{REVIEW}confidence"):
        try:
            confidence = int(raw)
        except ValueError:
            confidence = -1
        if not 1 <= confidence <= 5:
            problems.append(f"{REVIEW}confidence={raw!r} is not 1..5")
    seconds = None
    if raw := f.get(f"{REVIEW}seconds"):
        try:
            seconds = float(raw)
        except ValueError:
            problems.append(f"{REVIEW}seconds={raw!r} is not a number")
    if problems:
        raise FormError("; ".join(problems))
    return ReviewForm(reader=reader, submitted_at=submitted_at, agree=agree, reads=reads,
                      confidence=confidence, comment=f.get(f"{REVIEW}comment") or None,
                      seconds_on_case=seconds, run_key=f.get(f"{REVIEW}run_key") or None)


def review_event_id(url: str, object_id: str, form: ReviewForm) -> str:
    return deterministic_id("xnat-review", url.rstrip("/"), object_id, form.content_hash())


def edit_event_id(url: str, session_id: str, path: str, sha256: str) -> str:
    return deterministic_id("xnat-edit", url.rstrip("/"), session_id, path, sha256)


def check_edit(data: bytes, study_uid: str) -> None:
    """Accept only a DICOM SEG of the session's study (PS3.3 A.51: Modality SEG)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise FeedbackError(f"not a readable DICOM file ({exc})") from None
    if str(ds.get("Modality", "")) != "SEG":
        raise FeedbackError(f"not a segmentation (Modality {ds.get('Modality', 'missing')!s})")
    if str(ds.get("StudyInstanceUID", "")) != study_uid:
        raise FeedbackError("a SEG of another study (its StudyInstanceUID differs from the "
                            "session's lm_study_uid)")


# --------------------------------------------------------------------------- XNAT edge


@dataclass(frozen=True)
class ReviewFound:
    session_id: str
    object_id: str  # the session, or the assessor holding the form
    study_uid: str
    run_key: str
    fields: dict[str, str]
    worklist: str | None = None  # the session's lm_worklist


@dataclass(frozen=True)
class EditFound:
    session_id: str
    study_uid: str
    run_key: str
    path: str
    md5: str
    reader: str
    uri: str


@dataclass
class Scan:
    reviews: list[ReviewFound] = field(default_factory=list)
    edits: list[EditFound] = field(default_factory=list)


class XnatFeedbackSource:
    """Reads forms and edit files through the ``xnat`` client (blocking: use a thread)."""

    def __init__(self, access: XnatAccess) -> None:
        self.access = access
        self.xnat = XnatSession(access, self._describe)

    def _describe(self, exc: BaseException) -> FeedbackError:
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        return FeedbackError(f"XNAT at {self.access.url}: {type(exc).__name__}: {first}")

    def close(self) -> None:
        self.xnat.close()

    def scan(self) -> Scan:
        return self.xnat.call(self._scan)

    def _scan(self, session: Any) -> Scan:
        out = Scan()
        session.clearcache()  # the client caches listings; each poll must see XNAT as it is
        projects = session.projects
        if self.access.project not in projects:
            return out
        project = projects[self.access.project]
        for experiment in list(project.experiments.values()):
            if not str(experiment.label).startswith(SESSION_PREFIX):
                continue
            fields = dict(experiment.fields)
            study_uid, run_key = fields.get(FIELD_STUDY_UID), fields.get(FIELD_RUN_KEY)
            if not study_uid or not run_key:
                continue  # not one of ours (or not finished publishing)
            sid = str(experiment.id)
            worklist = fields.get(FIELD_WORKLIST)
            if any(k.startswith(REVIEW) for k in fields):
                out.reviews.append(ReviewFound(sid, sid, study_uid, run_key, fields, worklist))
            for assessor in list(experiment.assessors.values()):
                a_fields = dict(assessor.fields)
                if any(k.startswith(REVIEW) for k in a_fields):
                    out.reviews.append(ReviewFound(sid, str(assessor.id), study_uid, run_key,
                                                   a_fields, worklist))
            resource = experiment.resources.get(EDITS_RESOURCE)
            if resource is None:
                continue
            for f in list(resource.files.values()):
                path = str(f.path)
                reader = path.split("/", 1)[0] if "/" in path else \
                    fields.get("lm_edit_reader", "")
                out.edits.append(EditFound(sid, study_uid, run_key, path, str(f.digest or ""),
                                           reader, f.uri))
        return out

    def fetch(self, edit: EditFound) -> bytes:
        def get(session: Any) -> bytes:
            buf = io.BytesIO()
            session.download_stream(edit.uri, buf, verbose=False,
                                    timeout=self.access.timeout_s,
                                    expected_md5_digest=edit.md5 or None)
            return buf.getvalue()

        return self.xnat.call(get)

    def mark_reviewed(self, session_id: str) -> None:
        def mark(session: Any) -> None:
            experiment = session.experiments[session_id]
            experiment.mset({f"fields/field[name={FIELD_WORKLIST}]/field": WORKLIST_REVIEWED})

        self.xnat.call(mark)


# --------------------------------------------------------------------------- poller


@dataclass
class PollOutcome:
    reviews: list[str] = field(default_factory=list)  # event ids published this poll
    edits: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # refused forms and files, why


class XnatFeedbackPoller:
    """Polls XNAT and publishes what clinicians left there, each fact once."""

    def __init__(self, access: XnatAccess, store: InstanceStore, *,
                 source: XnatFeedbackSource | None = None, poll_s: float = 60.0,
                 actor_prefix: str = "xnat:") -> None:
        self.access = access
        self.store = store
        self.source = source or XnatFeedbackSource(access)
        self.poll_s = poll_s
        self.actor_prefix = actor_prefix
        self._recorded: set[str] = set()  # event ids known to be in the log
        self._refused: set[tuple[str, str, str]] = set()  # (object, content, why) logged
        self._refused_files: set[str] = set()

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.poll_once(bus)
                except FeedbackError as exc:
                    log.warning("XNAT feedback: %s; trying again in %.0fs", exc, self.poll_s)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.poll_s)
                except TimeoutError:
                    pass
        finally:
            await asyncio.to_thread(self.source.close)

    async def poll_once(self, bus: EventBus) -> PollOutcome:
        out = PollOutcome()
        scan = await asyncio.to_thread(self.source.scan)
        histories: dict[str, set[str]] = {}

        async def recorded(study_uid: str, event_id: str) -> bool:
            if event_id in self._recorded:
                return True
            if study_uid not in histories:
                histories[study_uid] = {e.event_id for _, e in await bus.history(study_uid)}
            return event_id in histories[study_uid]

        for found in scan.reviews:
            try:
                form = parse_review(found.fields)
            except FormError as exc:
                self._refuse(out, found.object_id, json.dumps(found.fields, sort_keys=True),
                             f"review form on XNAT object {found.object_id} refused: {exc}")
                continue
            if form is None:
                continue
            event_id = review_event_id(self.access.url, found.object_id, form)
            if await recorded(found.study_uid, event_id):
                self._recorded.add(event_id)
                if found.worklist != WORKLIST_REVIEWED:  # recorded, but not marked yet
                    await self._mark_reviewed(found.session_id)
                continue
            await bus.publish(ReviewSubmitted.new(
                event_id=event_id, actor=f"{self.actor_prefix}{form.reader}",
                study_uid=found.study_uid, run_key=form.run_key or found.run_key,
                reader=form.reader, agree=form.agree, reads=form.reads,
                confidence=form.confidence, comment=form.comment,
                seconds_on_case=form.seconds_on_case, source="xnat"))
            self._recorded.add(event_id)
            out.reviews.append(event_id)
            await self._mark_reviewed(found.session_id)

        for edit in scan.edits:
            memo = f"{edit.session_id}\x1f{edit.path}\x1f{edit.md5}"
            if memo in self._recorded or memo in self._refused_files:
                continue
            data = await asyncio.to_thread(self.source.fetch, edit)
            sha = hashlib.sha256(data).hexdigest()
            event_id = edit_event_id(self.access.url, edit.session_id, edit.path, sha)
            if await recorded(edit.study_uid, event_id):
                self._recorded.update((event_id, memo))
                continue
            try:
                if not edit.reader:
                    raise FeedbackError("no reader: upload it as <reader>/<file> or set the "
                                        "session's lm_edit_reader field")
                check_edit(data, edit.study_uid)
            except FeedbackError as exc:
                self._refuse(out, edit.session_id, f"{edit.path}\x1f{sha}",
                             f"edit {edit.path} on XNAT session {edit.session_id} refused: {exc}")
                self._refused_files.add(memo)  # not downloaded again until it changes
                continue
            stored = await asyncio.to_thread(self.store.put, [data], sha)
            await bus.publish(EditSubmitted.new(
                event_id=event_id, actor=f"{self.actor_prefix}{edit.reader}",
                study_uid=edit.study_uid, run_key=edit.run_key, reader=edit.reader,
                store_key=stored.store_key, sha256=stored.sha256, source="xnat"))
            self._recorded.update((event_id, memo))
            out.edits.append(event_id)
        return out

    async def _mark_reviewed(self, session_id: str) -> None:
        try:
            await asyncio.to_thread(self.source.mark_reviewed, session_id)
        except FeedbackError as exc:  # the review is recorded; the next poll tries again
            log.warning("XNAT feedback: could not mark session %s reviewed: %s", session_id, exc)

    def _refuse(self, out: PollOutcome, obj: str, content: str, message: str) -> None:
        key = (obj, hashlib.sha256(content.encode()).hexdigest(), message)
        out.problems.append(message)
        if key not in self._refused:
            self._refused.add(key)
            log.warning("XNAT feedback: %s", message)

