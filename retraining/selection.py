"""Which results go into a retraining set (pure: events in, cases out).

A *case* is one completed inference (``engine.inference.completed``) of the chosen
pipeline, with what the log says about it: the source instances it read, its result
files, the readers' reviews, their corrected masks (``review.edit.submitted``) and the
Dice recomputed against the AI mask. The filter keeps cases by stage (the pipeline's
stage when the run was requested), by study date (the original ``YYYYMMDD``, inclusive),
reviewed ones only (a review or an edit exists) and disagreements only (a reader did not
agree with a finding, read it differently, or corrected the mask to Dice < 1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from events.base import Event
from events.catalogue import (
    EditSubmitted,
    InferenceCompleted,
    InferenceRequested,
    InstanceStored,
    MeasurementRecomputed,
    ReviewSubmitted,
    Stage,
)


@dataclass(frozen=True)
class RetrainingFilter:
    pipeline: str
    stages: frozenset[Stage] = frozenset()  # empty: any stage
    since: str | None = None  # YYYYMMDD, inclusive
    until: str | None = None
    reviewed_only: bool = False
    disagreements_only: bool = False


@dataclass
class Case:
    """One AI result and the people's work on it, with the files that hold them."""

    completed: InferenceCompleted
    stage: Stage | None = None
    sources: dict[str, InstanceStored] = field(default_factory=dict)  # SOP UID -> latest
    reviews: list[ReviewSubmitted] = field(default_factory=list)
    edits: list[EditSubmitted] = field(default_factory=list)
    dice: dict[str, dict[str, float]] = field(default_factory=dict)  # edit id -> label -> Dice

    @property
    def study_uid(self) -> str:
        return self.completed.study_uid or ""

    @property
    def run_key(self) -> str:
        return self.completed.run_key

    @property
    def reviewed(self) -> bool:
        return bool(self.reviews or self.edits)

    @property
    def disagreement(self) -> bool:
        ai = {f.label: f.classification for f in self.completed.findings}
        for r in self.reviews:
            if any(not ok for ok in r.agree.values()):
                return True
            if any(label in ai and read != ai[label] for label, read in r.reads.items()):
                return True
        return any(d < 1.0 for per in self.dice.values() for d in per.values())


def select_cases(events: Iterable[tuple[int, Event]], flt: RetrainingFilter) -> list[Case]:
    """The cases of ``flt.pipeline`` that pass the filter, in log order."""
    stages: dict[str, Stage | None] = {}
    stored: dict[str, dict[str, InstanceStored]] = {}  # study -> SOP -> latest version
    cases: dict[str, Case] = {}
    later: list[Event] = []
    for _, ev in events:
        if isinstance(ev, InstanceStored) and ev.study_uid:
            per = stored.setdefault(ev.study_uid, {})
            cur = per.get(ev.sop_instance_uid)
            if cur is None or ev.version >= cur.version:
                per[ev.sop_instance_uid] = ev
        elif ev.pipeline != flt.pipeline:
            continue
        elif isinstance(ev, InferenceRequested):
            stages[ev.run_key] = ev.stage
        elif isinstance(ev, InferenceCompleted):
            cases.setdefault(ev.run_key, Case(ev, stages.get(ev.run_key)))
        elif isinstance(ev, ReviewSubmitted | EditSubmitted | MeasurementRecomputed):
            later.append(ev)
    for ev in later:
        case = cases.get(getattr(ev, "run_key", ""))
        if case is None:
            continue
        if isinstance(ev, ReviewSubmitted):
            case.reviews.append(ev)
        elif isinstance(ev, EditSubmitted):
            if all(e.event_id != ev.event_id for e in case.edits):
                case.edits.append(ev)
        elif isinstance(ev, MeasurementRecomputed):
            case.dice[ev.edit_event_id] = dict(ev.dice)
    out = []
    for case in cases.values():
        series = set(case.completed.selected_series)
        case.sources = {uid: s for uid, s in stored.get(case.study_uid, {}).items()
                        if s.series_uid in series}
        if _passes(case, flt):
            out.append(case)
    return out


def _passes(case: Case, flt: RetrainingFilter) -> bool:
    if flt.stages and case.stage not in flt.stages:
        return False
    date = case.completed.study_date or next(
        (s.study_date for s in case.sources.values() if s.study_date), None)
    if (flt.since or flt.until) and date is None:
        return False
    if flt.since and date is not None and date < flt.since:
        return False
    if flt.until and date is not None and date > flt.until:
        return False
    if flt.reviewed_only and not case.reviewed:
        return False
    return not (flt.disagreements_only and not case.disagreement)
