"""The review rules as pure functions: what a case is, who it is assigned to, what a
reader is asked, when a review is refused, and the blinded labels of LTS reading.

Nothing here reads a file, a database or the network. The pages and the assignment
service hand in events and values and get events (or a refusal) back, so every rule is
tested without a browser.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dashboards.review.auth import Role, User
from events.base import Event, deterministic_id
from events.catalogue import (
    CaseAssigned,
    EditSubmitted,
    InferenceCompleted,
    QcPassed,
    QcRejected,
    ReviewSubmitted,
)

#: pipelines whose results a QC reviewer must accept before readers see them (paper: HFD)
QC_PIPELINES: frozenset[str] = frozenset({"hfd"})
HIP_CLASSES = ("normal", "fracture", "hardware")
PROGRESSION_CLASSES = ("progression", "stable", "improved")  # engine.ops.longitudinal
MASK_CLASSES = ("acceptable", "unacceptable")
ASSIGNER = "worklist"


class ReviewRefused(Exception):
    """A review, QC decision or edit that must not become an event, and why (shown as is)."""


# --------------------------------------------------------------------------- the case


@dataclass(frozen=True)
class Question:
    """One item of the form: the AI's answer and the reader's choices."""

    label: str
    ai: str
    choices: tuple[str, ...]


def questions(result: InferenceCompleted) -> tuple[Question, ...]:
    """What a reader is asked about a result.

    Findings (HFD): one question per hip, the AI's class being its most probable finding
    across images (the same rule the demo and the XNAT fields use). BTS follow-ups: the
    progression flag. Otherwise (masks): is the mask acceptable.
    """
    if result.progression is not None:  # before findings: BTS's finding is its progression
        ai_class = next((f.classification for f in result.findings
                         if f.classification in PROGRESSION_CLASSES),
                        "progression" if result.progression else "stable")
        return (Question("lesion", ai_class, PROGRESSION_CLASSES),)
    if result.findings:
        ai: dict[str, str] = {}
        for f in sorted(result.findings, key=lambda f: -(f.probability or 0.0)):
            ai.setdefault(f.label, f.classification)
        choices = tuple(dict.fromkeys((*HIP_CLASSES, *(f.classification for f in
                                                       result.findings))))
        return tuple(Question(label, cls, choices) for label, cls in sorted(ai.items()))
    return (Question("mask", "acceptable", MASK_CLASSES),)


@dataclass(frozen=True)
class Case:
    """One result (a run) of one study, and what people did with it so far."""

    study_uid: str
    pipeline: str
    result: InferenceCompleted
    superseded_by: str | None = None  # a newer run of the same study and pipeline
    qc: str | None = None  # "passed" | "rejected" | None
    qc_reason: str | None = None
    assigned: frozenset[str] = frozenset()
    reviews: tuple[ReviewSubmitted, ...] = ()
    edits: tuple[EditSubmitted, ...] = ()

    @property
    def run_key(self) -> str:
        return self.result.run_key

    def reviewed_by(self, reader: str, blinded_label: str | None = None) -> bool:
        return any(r.reader == reader and r.blinded_label == blinded_label
                   for r in self.reviews)

    def visible_reviews(self, reader: str) -> tuple[ReviewSubmitted, ...]:
        """Others' reads only after this reader submitted their own (no anchoring)."""
        if not any(r.reader == reader for r in self.reviews):
            return ()
        return self.reviews


def cases_of_study(events: Iterable[Event]) -> dict[str, Case]:
    """Every result of one study's history, keyed by run key, with QC, assignments,
    reviews and edits attached; a run is superseded by a later completion of the same
    pipeline (an amended study re-run, or a new model)."""
    results: dict[str, InferenceCompleted] = {}
    latest: dict[str, str] = {}
    qc: dict[str, tuple[str, str | None]] = {}
    assigned: dict[str, set[str]] = {}
    reviews: dict[str, list[ReviewSubmitted]] = {}
    edits: dict[str, list[EditSubmitted]] = {}
    for ev in events:
        if isinstance(ev, InferenceCompleted) and ev.pipeline:
            results[ev.run_key] = ev
            latest[ev.pipeline] = ev.run_key
        elif isinstance(ev, QcPassed):
            qc[ev.run_key] = ("passed", None)
        elif isinstance(ev, QcRejected):
            qc[ev.run_key] = ("rejected", ev.reason)
        elif isinstance(ev, CaseAssigned):
            assigned.setdefault(ev.run_key, set()).add(ev.reader)
        elif isinstance(ev, ReviewSubmitted):
            reviews.setdefault(ev.run_key, []).append(ev)
        elif isinstance(ev, EditSubmitted):
            edits.setdefault(ev.run_key, []).append(ev)
    out = {}
    for key, res in results.items():
        pipeline = res.pipeline or ""
        newest = latest.get(pipeline)
        state, reason = qc.get(key, (None, None))
        out[key] = Case(res.study_uid or "", pipeline, res,
                        superseded_by=newest if newest != key else None, qc=state,
                        qc_reason=reason, assigned=frozenset(assigned.get(key, ())),
                        reviews=tuple(reviews.get(key, ())), edits=tuple(edits.get(key, ())))
    return out


def current_cases(cases: Mapping[str, Case]) -> list[Case]:
    """The cases a deep link opens: the newest run per pipeline, sorted by pipeline."""
    return sorted((c for c in cases.values() if c.superseded_by is None),
                  key=lambda c: c.pipeline)


# --------------------------------------------------------------------------- assignment


def needs_qc(pipeline: str | None, qc_pipelines: frozenset[str] = QC_PIPELINES) -> bool:
    return pipeline in qc_pipelines


def assignments(trigger: InferenceCompleted | QcPassed, readers: Sequence[str], *,
                qc_pipelines: frozenset[str] = QC_PIPELINES,
                blinded_label: str | None = None) -> list[CaseAssigned]:
    """The ``CaseAssigned`` facts a result (or, for gated pipelines, its QC pass) makes:
    one per reader of the pipeline, with ids derived from (run, reader) so a redelivery
    or a second assigner adds nothing."""
    gated = needs_qc(trigger.pipeline, qc_pipelines)
    if isinstance(trigger, InferenceCompleted) and gated:
        return []  # wait for the QC gate
    if isinstance(trigger, QcPassed) and not gated:
        return []  # already assigned at completion
    return [trigger.caused(CaseAssigned, actor=ASSIGNER,
                           event_id=deterministic_id("assigned", trigger.run_key, reader),
                           run_key=trigger.run_key, reader=reader, blinded_label=blinded_label)
            for reader in readers]


# --------------------------------------------------------------------------- the form


@dataclass(frozen=True)
class ReviewForm:
    """What the reader answered. ``agree`` and ``reads`` are per question label; a read
    of ``None`` means "not answered"."""

    agree: Mapping[str, bool] = field(default_factory=dict)
    reads: Mapping[str, str | None] = field(default_factory=dict)
    confidence: int | None = None
    comment: str | None = None
    quick_agree: bool = False  # the one-click "Agree with AI and submit"


def _require_reader(case: Case, user: User) -> None:
    if not user.has(Role.READER):
        raise ReviewRefused(f"{user.name} does not have the reader role; ask an admin "
                            "(`lastmile users add NAME --role reader`)")
    if not user.reads(case.pipeline):
        raise ReviewRefused(f"{user.name} does not read {case.pipeline} cases")


def check_open(case: Case, *, blinded_label: str | None = None, reader: str | None = None,
               qc_pipelines: frozenset[str] = QC_PIPELINES) -> None:
    """Refuse work on a case that is stale or not released to readers."""
    if case.superseded_by is not None:
        raise ReviewRefused("this result was superseded by a newer run of the same study "
                            "(a re-run after new images, or a new model): open the study "
                            "again to read the current result")
    if needs_qc(case.pipeline, qc_pipelines) and case.qc != "passed":
        state = "was rejected at QC" if case.qc == "rejected" else "has not passed QC yet"
        raise ReviewRefused(f"this {case.pipeline} result {state}; readers see it only "
                            "after a QC reviewer accepts it")
    if reader is not None and case.reviewed_by(reader, blinded_label):
        raise ReviewRefused("you already reviewed this case; your review is recorded")


def build_review(case: Case, user: User, form: ReviewForm, *, seconds_on_case: float,
                 blinded_label: str | None = None,
                 qc_pipelines: frozenset[str] = QC_PIPELINES) -> ReviewSubmitted:
    """The ``ReviewSubmitted`` fact for a submitted form, or ``ReviewRefused``.

    Its id is derived from (run, reader, blinded label): a double click, a retry or a
    second tab records one review.
    """
    _require_reader(case, user)
    check_open(case, blinded_label=blinded_label, reader=user.name, qc_pipelines=qc_pipelines)
    qs = questions(case.result)
    agree: dict[str, bool] = {}
    reads: dict[str, str] = {}
    missing: list[str] = []
    for q in qs:
        if form.quick_agree:
            agree[q.label], reads[q.label] = True, q.ai
            continue
        ok = form.agree.get(q.label)
        if ok is None:
            missing.append(f"agree/disagree for {q.label}")
            continue
        agree[q.label] = ok
        own = q.ai if ok else form.reads.get(q.label)
        if own is None:
            missing.append(f"your own read for {q.label}")
        elif own not in q.choices:
            raise ReviewRefused(f"{own!r} is not a choice for {q.label} "
                                f"({', '.join(q.choices)})")
        else:
            reads[q.label] = own
            agree[q.label] = own == q.ai
    confidence = form.confidence
    if not form.quick_agree and confidence is None:
        missing.append("confidence (1-5)")
    if confidence is not None and not 1 <= confidence <= 5:
        raise ReviewRefused("confidence must be between 1 and 5")
    if missing:
        raise ReviewRefused("please answer: " + "; ".join(missing))
    comment = (form.comment or "").strip() or None
    return case.result.caused(
        ReviewSubmitted, actor=user.name,
        event_id=deterministic_id("review", case.run_key, user.name, blinded_label or ""),
        run_key=case.run_key, reader=user.name, agree=agree, reads=reads,
        confidence=confidence, comment=comment[:2000] if comment else None,
        seconds_on_case=round(max(seconds_on_case, 0.0), 1), blinded_label=blinded_label,
        source="lastmile")


def build_qc(case: Case, user: User, *, accept: bool, reason: str | None,
             seconds_on_case: float) -> QcPassed | QcRejected:
    """A QC gate decision, once per run (deterministic id: a second click is a no-op)."""
    if not user.has(Role.QC):
        raise ReviewRefused(f"{user.name} does not have the qc role")
    if not user.reads(case.pipeline):
        raise ReviewRefused(f"{user.name} does not QC {case.pipeline} cases")
    if case.superseded_by is not None:
        raise ReviewRefused("this result was superseded by a newer run; QC the new one")
    if case.qc is not None:
        raise ReviewRefused(f"this case was already QC'd ({case.qc})")
    eid = deterministic_id("qc", case.run_key)
    secs = round(max(seconds_on_case, 0.0), 1)
    if accept:
        return case.result.caused(QcPassed, actor=user.name, event_id=eid,
                                  run_key=case.run_key, seconds_on_case=secs)
    why = (reason or "").strip()
    if not why:
        raise ReviewRefused("a rejection needs a reason (e.g. wrong body part, motion)")
    return case.result.caused(QcRejected, actor=user.name, event_id=eid, run_key=case.run_key,
                              reason=why[:500], seconds_on_case=secs)


def build_edit(case: Case, user: User, *, store_key: str, sha256: str,
               source: str = "lastmile") -> EditSubmitted:
    """The ``EditSubmitted`` fact for a validated, stored corrected SEG (one per file per
    reader and run)."""
    _require_reader(case, user)
    check_open(case)
    return case.result.caused(
        EditSubmitted, actor=user.name,
        event_id=deterministic_id("edit", case.run_key, user.name, sha256),
        run_key=case.run_key, reader=user.name, store_key=store_key, sha256=sha256,
        source=source)


# --------------------------------------------------------------------------- blinding


def blinded_label(salt: bytes, study_uid: str, source: str) -> str:
    """The salted hash a mask is shown under: HMAC-SHA256(study salt, study + source).
    Without the salt nobody can tell which label is the AI, the expert or the novice."""
    msg = f"blind\x1f{study_uid}\x1f{source}".encode()
    return hmac.new(salt, msg, hashlib.sha256).hexdigest()[:12]


def reader_order(labels: Iterable[str], reader: str, run_key: str) -> list[str]:
    """The masks in a per-reader random order, the same each time this reader opens
    this case (seeded by reader and case), different between readers."""
    seed = int.from_bytes(hashlib.sha256(f"{reader}\x1f{run_key}".encode()).digest()[:8], "big")
    out = sorted(labels)
    random.Random(seed).shuffle(out)
    return out


def unblinding_key(salt: bytes, study_sources: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """label -> source for every (study, source) pair: what projections'
    ``blinded_reads`` needs, computable only with the salt from the study configuration."""
    return {blinded_label(salt, study, src): src
            for study, sources in study_sources.items() for src in sources}


def build_blinded_review(case: Case, user: User, *, label: str, read: str | None,
                         confidence: int | None, comment: str | None,
                         seconds_on_case: float, allowed_readers: Sequence[str]
                         ) -> ReviewSubmitted:
    """A blinded rating of one mask, known to the log only by its salted ``label``."""
    _require_reader(case, user)
    if allowed_readers and user.name not in allowed_readers:
        raise ReviewRefused(f"{user.name} is not a reader of this blinded study")
    check_open(case, blinded_label=label, reader=user.name, qc_pipelines=frozenset())
    missing = [what for what, v in (("acceptable or not", read), ("confidence", confidence))
               if v is None]
    if missing:
        raise ReviewRefused("please answer: " + "; ".join(missing))
    if read not in MASK_CLASSES:
        raise ReviewRefused(f"{read!r} is not one of {', '.join(MASK_CLASSES)}")
    if confidence is not None and not 1 <= confidence <= 5:
        raise ReviewRefused("confidence must be between 1 and 5")
    text = (comment or "").strip() or None
    return case.result.caused(
        ReviewSubmitted, actor=user.name,
        event_id=deterministic_id("review", case.run_key, user.name, label),
        run_key=case.run_key, reader=user.name, reads={"mask": read}, confidence=confidence,
        comment=text[:2000] if text else None, seconds_on_case=round(max(seconds_on_case, 0), 1),
        blinded_label=label, source="lastmile")
