"""A study's outcome, folded from its events (pure: events in, values out).

Per pipeline the study was routed to (its AE title, or the routing rules), the outcome
is the latest run's:

- ``valid``: the run completed and every result reached every destination;
- ``partial``: the run completed, but a destination did not take a result, or some of
  the study's instances were refused at the receiver;
- ``refused``: the pipeline declined the study with a reason, at once (a skip, or a
  failure that the engine recorded as final at the first attempt: an input error);
- ``crashed``: the run failed only after retries, or a consumer dead-lettered the
  study's event: what a site must report, since an input problem should never look like
  an outage;
- ``pending``: not decided yet (a *timed out* study when the wait is over).

A run whose result was followed by a later run of the same pipeline (an amended study
re-run, or an explicit ``...superseded`` event) is ``superseded``; the row reports the
latest run and how many it supersedes. A study that no pipeline wanted is
``no pipeline`` (with the routing reason); one whose every instance the receiver
refused is ``refused`` with the receiver's reasons.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from events.base import Event
from events.catalogue import (
    DeliveryFailed,
    InferenceCompleted,
    InferenceFailed,
    InferenceRequested,
    InferenceSkipped,
    InferenceStarted,
    InstanceDuplicated,
    InstanceRejected,
    InstanceStored,
    PublishFailed,
    ResultPublished,
    RouteMatched,
    RouteUnmatched,
    StudyCompleted,
)


class Result(StrEnum):
    VALID = "valid"
    PARTIAL = "partial"
    REFUSED = "refused"
    SUPERSEDED = "superseded"
    NO_PIPELINE = "no pipeline"
    NOT_SENT = "not sent"  # no file of the study could be read whole, here
    CRASHED = "crashed"
    PENDING = "pending"
    TIMED_OUT = "timed out"

    @property
    def final(self) -> bool:
        return self not in (Result.PENDING, Result.TIMED_OUT)


@dataclass
class Run:
    """One run key's events: what the engine did for one trigger of one pipeline."""

    run_key: str
    first_sequence: int
    starts: int = 0  # `inference started` events: attempts
    result: Result = Result.PENDING
    reason: str | None = None
    decided_at: datetime | None = None
    kinds: list[str] = field(default_factory=list)  # published result kinds (SEG, SR)
    result_keys: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # "label=classification"
    superseded: bool = False


@dataclass
class PipelineOutcome:
    """A study's outcome for one pipeline (one row of the check's table)."""

    pipeline: str
    result: Result = Result.PENDING
    reason: str | None = None
    completed_reason: str | None = None
    completed_at: datetime | None = None
    result_at: datetime | None = None
    runs: list[Run] = field(default_factory=list)

    @property
    def superseded_runs(self) -> int:
        return sum(1 for r in self.runs if r.superseded)

    @property
    def retried_runs(self) -> int:
        """Run keys started more than once (an input error must never be)."""
        return sum(1 for r in self.runs if r.starts > 1)


@dataclass
class StudyOutcome:
    """Everything the log says about one study, for the check's report."""

    study_uid: str
    stored: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> instances
    unrouted: list[str] = field(default_factory=list)  # routing reasons (general AE)
    pipelines: list[PipelineOutcome] = field(default_factory=list)
    dead_letters: list[str] = field(default_factory=list)
    #: instances stored as a new version of a SOP Instance UID first seen in another
    #: series: one UID is one object (PS3.3 C.12.1.1.1), so that replaced another object
    replaced_across_series: int = 0
    result: Result = Result.PENDING  # the study's own, when no pipeline is involved
    reason: str | None = None

    @property
    def final(self) -> bool:
        if self.pipelines:
            return all(p.result.final for p in self.pipelines)
        return self.result.final

    @property
    def crashed(self) -> bool:
        return (bool(self.dead_letters) or self.result is Result.CRASHED
                or any(p.result is Result.CRASHED for p in self.pipelines))

    @property
    def retried_runs(self) -> int:
        return sum(p.retried_runs for p in self.pipelines)


def _decide(run: Run, ev: Event, seq: int) -> None:
    if isinstance(ev, InferenceStarted):
        run.starts += 1
    elif isinstance(ev, InferenceCompleted):
        run.result, run.reason, run.decided_at = Result.VALID, None, ev.occurred_at
        run.result_keys = list(ev.result_keys)
        run.findings = [f"{f.label}={f.classification}" for f in ev.findings]
    elif isinstance(ev, InferenceSkipped):
        why = ev.reason
        if ev.rejected_series:
            why += " (" + "; ".join(ev.rejected_series[:3]) + ")"
        run.result, run.reason, run.decided_at = Result.REFUSED, why, ev.occurred_at
    elif isinstance(ev, InferenceFailed):
        if not ev.final:
            run.reason = f"attempt {ev.attempt} failed in {ev.operator}: {ev.error}"
        elif ev.attempt <= 1:
            run.result, run.decided_at = Result.REFUSED, ev.occurred_at
            run.reason = f"{ev.operator}: {ev.error}"
        else:
            run.result, run.decided_at = Result.CRASHED, ev.occurred_at
            run.reason = f"failed after {ev.attempt} attempts in {ev.operator}: {ev.error}"
    elif isinstance(ev, ResultPublished):
        run.kinds.append(ev.kind)
    elif isinstance(ev, PublishFailed):
        run.reason = f"{ev.destination} did not take the result: {ev.error}"


def _publish_gaps(runs: dict[str, Run], history: Sequence[tuple[int, Event]]) -> set[str]:
    """Run keys with a destination that failed and never took the result later."""
    failed: dict[tuple[str, str], bool] = {}
    for _, ev in history:
        if isinstance(ev, PublishFailed):
            failed.setdefault((ev.run_key, ev.destination), True)
        elif isinstance(ev, ResultPublished) and (ev.run_key, ev.destination) in failed:
            failed[(ev.run_key, ev.destination)] = False
    return {key for (key, _), open_ in failed.items() if open_ and key in runs}


def fold(study_uid: str, history: Sequence[tuple[int, Event]]) -> StudyOutcome:
    """The study's outcome from its events (``(stream sequence, event)``, in log order)."""
    out = StudyOutcome(study_uid)
    expected: dict[str, PipelineOutcome] = {}
    runs: dict[str, Run] = {}
    run_pipeline: dict[str, str] = {}
    seen_sops: dict[str, str] = {}  # SOP Instance UID -> the series it was first stored in

    def pipeline(name: str) -> PipelineOutcome:
        if name not in expected:
            expected[name] = PipelineOutcome(name)
        return expected[name]

    for seq, ev in history:
        if isinstance(ev, InstanceStored):
            first = seen_sops.setdefault(ev.sop_instance_uid, ev.series_uid)
            if first != ev.series_uid:
                out.replaced_across_series += 1
            if ev.pipeline:
                pipeline(ev.pipeline)
        elif isinstance(ev, InstanceDuplicated):
            out.duplicates += 1
        elif isinstance(ev, InstanceRejected):
            out.rejected[f"{ev.status_name}: {ev.reason}"] += 1
        elif isinstance(ev, RouteMatched):
            for name in ev.pipelines:
                pipeline(name)
        elif isinstance(ev, RouteUnmatched):
            out.unrouted.append(ev.reason)
        elif isinstance(ev, StudyCompleted) and ev.pipeline:
            p = pipeline(ev.pipeline)
            if p.completed_at is None:
                p.completed_reason, p.completed_at = str(ev.reason), ev.occurred_at
        elif isinstance(ev, DeliveryFailed):
            out.dead_letters.append(f"{ev.consumer}: {ev.original_type}: {ev.reason}")
            if ev.pipeline:
                p = pipeline(ev.pipeline)
                p.result, p.reason = Result.CRASHED, f"dead-lettered by {ev.consumer}"
        key = getattr(ev, "run_key", None)
        if isinstance(key, str) and ev.pipeline:
            if isinstance(ev, InferenceRequested | InferenceStarted | InferenceCompleted
                          | InferenceSkipped | InferenceFailed) and key not in runs:
                runs[key] = Run(key, seq)
                run_pipeline[key] = ev.pipeline
                pipeline(ev.pipeline).runs.append(runs[key])
            if key in runs:
                _decide(runs[key], ev, seq)
                if ev.type_name().endswith(".superseded"):  # an explicit supersession
                    runs[key].superseded = True
    out.stored = len(seen_sops)
    gaps = _publish_gaps(runs, history)
    for p in expected.values():
        if p.result is Result.CRASHED and not p.runs:
            continue
        ordered = sorted(p.runs, key=lambda r: r.first_sequence)
        for earlier in ordered[:-1]:
            if earlier.result is Result.VALID:
                earlier.superseded = True
        if not ordered:
            continue
        latest = ordered[-1]
        if latest.result is Result.VALID and (latest.run_key in gaps or out.rejected):
            latest.result = Result.PARTIAL
            if out.rejected:
                latest.reason = (f"{sum(out.rejected.values())} instance(s) refused at the "
                                 f"receiver")
        if p.result is not Result.CRASHED:
            p.result = Result.SUPERSEDED if latest.superseded else latest.result
            p.reason = latest.reason
        p.result_at = latest.decided_at
    out.pipelines = sorted(expected.values(), key=lambda p: p.pipeline)
    if not out.pipelines:
        if out.stored:
            out.result = Result.NO_PIPELINE
            out.reason = "; ".join(sorted(set(out.unrouted))) or "no pipeline for this AE title"
        elif out.rejected:
            out.result = Result.REFUSED
            out.reason = "; ".join(sorted(out.rejected))
    return out
